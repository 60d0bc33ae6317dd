"""Lock-step execution of a step's forwards on every expert-parallel rank.

Rank 0 (the leader) schedules. Each step it packs the model inputs of the step's batches into one
int64 tensor and broadcasts it over the EP group; every rank then runs the same forwards, so the
MoE layers' all-reduces (replicated dispatch) line up. Only the leader asks the LM head for logits:
the followers pass no `logits_rows` at all. Requests are validated on the leader before they can
enter a step, so a bad request never reaches the other ranks.

Per step: two broadcasts (a fixed-size header, then the payload) and, on followers, one host sync
to read the header. Nothing extra per layer. An idle server pings (a header, then a one-element
all-reduce): followers stay inside the collective timeout and a dead rank shows up as an error.

Legend: B rows, T tokens per row, NB block-table width, R logits rows.
"""
from __future__ import annotations

import time
from dataclasses import dataclass

import torch
import torch.distributed as dist

from .graphs import DecodeGraphs
from .kv_cache import PagedKVCache

MAX_BATCHES = 4  # forwards per step: the decode rows, and prefill chunks grouped by length
_STEP, _END, _PING = 1, 2, 3
_HEADER = 2 + 4 * MAX_BATCHES  # command, number of batches, then (B, T, NB, R) per batch


@dataclass
class Batch:
    """Model inputs of one forward, as flat host lists (row-major)."""

    B: int
    T: int
    NB: int
    tokens: list[int]  # [B*T], 0 at padding
    positions: list[int]  # [B*T], -1 at padding
    block_table: list[int]  # [B*NB]
    logits_rows: list[int]  # [R] flattened B*T indices whose next token is sampled


class StepRunner:
    def __init__(self, model, cache: PagedKVCache, device: torch.device, cuda_graphs: bool = True):
        self.model, self.cache, self.device = model, cache, torch.device(device)
        # Decode steps replay CUDA graphs (graphs.py); prefill chunks and CPU runs stay eager.
        self.graphs = (DecodeGraphs(self._forward, self.device, sync_free=model.sync_free)
                       if cuda_graphs and self.device.type == "cuda" else None)
        info = model.expert_parallel
        self.group = info.groups.ep_group if info is not None and info.plan.ep_size > 1 else None
        self.rank = dist.get_rank(self.group) if self.group is not None else 0
        self.is_leader = self.rank == 0
        self.last_heard = time.monotonic()  # followers: when the leader's last header arrived

    # ---- leader -----------------------------------------------------------------------------
    def execute(self, batches: list[Batch]) -> list[torch.Tensor]:
        """Run the batches on every rank; return the leader's logits [R, V] per batch."""
        if not self.is_leader:
            raise RuntimeError("StepRunner.execute is for the leader rank; other ranks call follow()")
        if not 1 <= len(batches) <= MAX_BATCHES:
            raise ValueError(f"a step holds 1 to {MAX_BATCHES} batches, got {len(batches)}")
        header = [_STEP, len(batches)] + [0] * (4 * MAX_BATCHES)
        flat: list[int] = []
        for i, b in enumerate(batches):
            header[2 + 4 * i: 6 + 4 * i] = [b.B, b.T, b.NB, len(b.logits_rows)]
            flat += b.tokens + b.positions + b.block_table + b.logits_rows
        payload = torch.tensor(flat, dtype=torch.int64).to(self.device, non_blocking=True)
        if self.group is not None:
            # NOTE: two broadcasts per step over the EP group.
            dist.broadcast(torch.tensor(header, dtype=torch.int64).to(self.device), src=0, group=self.group)
            dist.broadcast(payload, src=0, group=self.group)
        return self._run(header, payload, with_logits=True)

    def end(self) -> None:
        """Release the followers from `follow()`."""
        self._command(_END)

    def ping(self) -> None:
        """Leader: a round trip through every follower in `follow()` (returns once all of them answered)."""
        if self._command(_PING):
            self._answer_ping()

    def _command(self, command: int) -> bool:
        if self.group is None or not self.is_leader:
            return False
        header = torch.zeros(_HEADER, dtype=torch.int64)
        header[0] = command
        dist.broadcast(header.to(self.device), src=0, group=self.group)  # NOTE: collective
        return True

    def _answer_ping(self) -> None:
        dist.all_reduce(torch.ones(1, device=self.device), group=self.group)  # NOTE: collective

    # ---- followers --------------------------------------------------------------------------
    def follow(self) -> None:
        """Run every step the leader broadcasts, until it calls `end()`."""
        if self.group is None or self.is_leader:
            return
        while True:
            header_t = torch.empty(_HEADER, dtype=torch.int64, device=self.device)
            dist.broadcast(header_t, src=0, group=self.group)  # NOTE: collective
            header = header_t.tolist()  # NOTE: host sync, once per step
            self.last_heard = time.monotonic()
            if header[0] == _END:
                return
            if header[0] == _PING:
                self._answer_ping()
                continue
            size = sum(h[0] * h[1] * 2 + h[0] * h[2] + h[3]
                       for h in (header[2 + 4 * i: 6 + 4 * i] for i in range(header[1])))
            payload = torch.empty(size, dtype=torch.int64, device=self.device)
            dist.broadcast(payload, src=0, group=self.group)
            self._run(header, payload, with_logits=False)

    # ---- both -------------------------------------------------------------------------------
    @torch.no_grad()
    def _run(self, header: list[int], payload: torch.Tensor, with_logits: bool) -> list[torch.Tensor]:
        out, o = [], 0
        for i in range(header[1]):
            B, T, NB, R = header[2 + 4 * i: 6 + 4 * i]
            tokens = payload[o: o + B * T].view(B, T)
            positions = payload[o + B * T: o + 2 * B * T].view(B, T)
            table = payload[o + 2 * B * T: o + 2 * B * T + B * NB].view(B, NB)
            rows = payload[o + 2 * B * T + B * NB: o + 2 * B * T + B * NB + R]
            o += 2 * B * T + B * NB + R
            if self.graphs is not None and self.graphs.eligible(B, T, R):
                out.append(self.graphs.run(tokens, positions, table, with_logits))
            else:
                out.append(self._forward(tokens, positions, table, rows if with_logits else rows[:0]))
        return out

    def _forward(self, tokens, positions, table, rows) -> torch.Tensor:
        """One forward with the cache prepared for it; free of host syncs (CUDA graphs capture it). The
        model counts the routed real tokens (positions >= 0) into `model.routing_stats`."""
        self.cache.prepare(table, positions)
        logits, _ = self.model(tokens, positions, self.cache, logits_rows=rows)
        return logits
