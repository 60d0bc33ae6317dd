"""CUDA graphs for decode steps: one captured forward per (rows, block-table width) bucket.

A decode step of a 32-layer Mixtral issues over a thousand small kernels; launched one by one from
Python that costs far more than the kernels themselves (the peers' per-step overhead). Capturing
the whole step - the KV-cache bookkeeping, the model forward with its expert all-reduces, the
routing counts - and replaying it removes that cost. Shapes are padded up to a bucket: padding rows
have position -1, write their keys to the scratch block and are never sampled.

Every EP rank captures and replays the same graphs in the same order (they run the same steps), so
the NCCL collectives inside line up. CPU devices and eager mode bypass all of this.

Legend: B rows, Bb rows bucket, NB block-table width, NBb its bucket, V vocab.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch


def bucket(n: int) -> int:
    """Smallest power of two >= n."""
    return 1 << max(0, n - 1).bit_length()


@dataclass
class _Graph:
    graph: torch.cuda.CUDAGraph
    tokens: torch.Tensor  # [Bb, 1]
    positions: torch.Tensor  # [Bb, 1]
    table: torch.Tensor  # [Bb, NBb]
    rows: torch.Tensor  # [Bb] or [0]; kept alive: the graph reads its memory at every replay
    logits: torch.Tensor | None  # [Bb, V] on the leader


class DecodeGraphs:
    """forward(tokens [B,1], positions [B,1], table [B,NB], rows [B] or [0]) -> logits, graph-replayed.

    `forward` is called with static buffers at capture time. Every tensor the captured forward reads must
    outlive the graph, so the inputs live in `_Graph`. `sync_free(rows)` says whether a forward of that
    many rows has no host sync (`Mixtral.sync_free`; None: always): only those are captured.
    """

    def __init__(self, forward: Callable, device: torch.device, max_rows: int = 256,
                 sync_free: Callable[[int], bool] | None = None, min_table_width: int = 1):
        # A forward that reads the block table directly costs nothing per unused column: a wide minimum
        # table bucket then saves captures (one graph per rows bucket for most serving loads).
        self.forward, self.device, self.max_rows, self.min_table_width = forward, device, max_rows, min_table_width
        self.pool = torch.cuda.graph_pool_handle() if torch.device(device).type == "cuda" else None
        self.graphs: dict[tuple[int, int, bool], _Graph] = {}
        self._sync_free = sync_free
        self._capturable: dict[int, bool] = {}  # per rows bucket: the answer depends only on shapes

    def eligible(self, B: int, T: int, rows: int) -> bool:
        """Decode batches that sample every one of their B rows (`rows` is the leader's count on every
        rank, so all ranks decide alike) and whose padded bucket runs without a host sync. A 1-token batch
        that samples nothing (mid-prompt chunks) runs eagerly: the graph would return B logits rows where
        the caller expects none."""
        if not (T == 1 and rows == B and B <= self.max_rows):
            return False
        Bb = bucket(B)
        if Bb not in self._capturable:
            self._capturable[Bb] = self._sync_free is None or self._sync_free(Bb)
        return self._capturable[Bb]

    def run(self, tokens: torch.Tensor, positions: torch.Tensor, table: torch.Tensor, with_logits: bool,
            rows: int | None = None, width: int | None = None):
        """Replay the graph of bucket (rows, width) (default: the buckets of B and NB; data-parallel
        attention passes the buckets all ranks agreed on, so their graphs hold the same collectives)."""
        B, NB = table.shape
        key = (rows or bucket(B), width or bucket(max(NB, self.min_table_width)), with_logits)
        g = self.graphs.get(key) or self._capture(*key)
        # NOTE: small device copies into the graph's static inputs; no host sync.
        g.tokens.zero_()
        g.tokens[:B].copy_(tokens)
        g.positions.fill_(-1)
        g.positions[:B].copy_(positions)
        g.table.zero_()
        g.table[:B, :NB].copy_(table)
        g.graph.replay()
        return g.logits[:B].clone() if with_logits else None

    def _capture(self, Bb: int, NBb: int, with_logits: bool) -> _Graph:
        dev = self.device
        tokens = torch.zeros(Bb, 1, dtype=torch.int64, device=dev)
        positions = torch.full((Bb, 1), -1, dtype=torch.int64, device=dev)  # all padding while capturing
        table = torch.zeros(Bb, NBb, dtype=torch.int64, device=dev)
        rows = torch.arange(Bb if with_logits else 0, device=dev)
        graph, logits = self._record(lambda: self.forward(tokens, positions, table, rows))
        g = _Graph(graph, tokens, positions, table, rows, logits if with_logits else None)
        self.graphs[(Bb, NBb, with_logits)] = g
        return g

    def _record(self, step: Callable):
        return record(step, self.device, self.pool)


def record(step: Callable, device, pool=None, warmup: int = 2):
    """Capture `step()` (free of host syncs) into a CUDA graph; returns the graph and the step's output,
    whose memory the graph rewrites at every replay. Warm-up runs on a side stream first (lazy inits,
    Triton compiles, cuBLAS workspaces, dispatcher tables moved to the device)."""
    side = torch.cuda.Stream(device)
    side.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(side):
        for _ in range(warmup):
            step()
    torch.cuda.current_stream(device).wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    # thread_local: the NCCL watchdog thread keeps polling its events while this thread captures
    with torch.cuda.graph(graph, pool=pool, capture_error_mode="thread_local"):
        out = step()
    return graph, out
