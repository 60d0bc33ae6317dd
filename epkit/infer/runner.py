"""Lock-step execution of a step's forwards on every expert-parallel rank, without waiting for the GPU.

Rank 0 (the leader) schedules. `launch` sends the step's host-built inputs (a fixed-size header and
one int64 payload) to the other ranks over a CPU (gloo) group, then every rank copies them to its
device and runs the same forwards, so the MoE layers' all-reduces (replicated dispatch) line up. Only
the leader asks the LM head for logits and samples; `share` broadcasts the sampled ids over the EP
group in stream order, so every rank holds them on its device. Requests are validated on the leader
before they can enter a step, so a bad request never reaches the other ranks.

A token sampled in step n is an input of step n+1 before the host has seen it: the engine plans step
n+1 while step n runs, and a row whose input token is still being sampled names its slot in step n's
sampled ids (`Batch.from_sampled`); each rank fills it in on its device. Followers never wait for
their device: they receive the next header while their GPU still runs. An idle server pings (a
header, then a one-element all-reduce on the CPU group): a dead rank shows up as an error.

Legend: B rows, T tokens per row, NB block-table width, R logits rows, S tokens taken from the
previous step's samples, F 1 when every row starts at position 0 (a fresh prompt: causal attention).
"""
from __future__ import annotations

import datetime
import time
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from torch.nn.attention import SDPBackend, sdpa_kernel

from .decode import DecodeForward, choose_kernels, tune_expert_tiles
from .graphs import DecodeGraphs
from .kv_cache import PagedKVCache
from .sampling import to_device

MAX_BATCHES = 4  # forwards per step: the decode rows, and prefill chunks grouped by length
_STEP, _END, _PING = 1, 2, 3
# Attention kernels of eager forwards. Not cuDNN's: it builds an execution plan for every new shape, and prefill
# batches come in a new [B, T, S] nearly every step (on an H200, the 512-request load's 8192-token prefill steps
# took 0.5 to 2 s each, where one of fixed shape takes 0.39 s).
EAGER_ATTENTION = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]
_PER_BATCH = 6  # B, T, NB, R, S, F
_HEADER = 2 + _PER_BATCH * MAX_BATCHES  # command, number of batches, then the batches' sizes
# How long followers wait on the CPU group for the leader's next step: by default the engine's
# dist_timeout (an offline run whose leader froze ends naming it); a server waits however long the leader
# is idle (`control_timeout` unbounded: its own watchdog, `engine_loop.follow_leader`, decides when silence
# means death). If the leader's process ends, the connection closes and they fail at once.
UNBOUNDED_CONTROL_TIMEOUT = datetime.timedelta(days=7)


@dataclass
class Batch:
    """Model inputs of one forward, as flat host lists (row-major)."""

    B: int
    T: int
    NB: int
    tokens: list[int]  # [B*T], 0 at padding and where from_sampled fills in
    positions: list[int]  # [B*T], -1 at padding
    block_table: list[int]  # [B*NB]
    logits_rows: list[int]  # [R] flattened B*T indices whose next token is sampled
    from_sampled: list[tuple[int, int]] = field(default_factory=list)  # (token index, slot in last step's samples)

    @property
    def fresh(self) -> bool:
        """Every row starts at position 0: its keys are this forward's own (rows are padded at the end only)."""
        return all(p == 0 for p in self.positions[:: self.T])

    def sizes(self) -> list[int]:
        return [self.B, self.T, self.NB, len(self.logits_rows), len(self.from_sampled), int(self.fresh)]

    def flat(self) -> list[int]:
        return (self.tokens + self.positions + self.block_table + self.logits_rows
                + [i for i, _ in self.from_sampled] + [s for _, s in self.from_sampled])


def make_batch(rows, block_size: int) -> Batch:
    """One forward's inputs from scheduled rows (sequence, first position, number of tokens): rows padded
    to the longest, each row's block table to the widest; a row samples its next token when its chunk
    ends the known tokens. A sequence's last token may still be on the device (`Sequence.pending`)."""
    B, T = len(rows), max(n for _, _, n in rows)
    NB = max(-(-(start + n) // block_size) for _, start, n in rows)
    b = Batch(B, T, NB, [], [], [], [])
    for i, (seq, start, n) in enumerate(rows):
        b.tokens += seq.token_ids[start: start + n] + [0] * (T - n)
        if seq.pending is not None and start + n > seq.pending[0]:
            b.tokens[i * T + seq.pending[0] - start] = 0
            b.from_sampled.append((i * T + seq.pending[0] - start, seq.pending[1]))
        b.positions += list(range(start, start + n)) + [-1] * (T - n)
        b.block_table += seq.blocks[:NB] + [0] * (NB - min(NB, len(seq.blocks)))
        if start + n == seq.num_tokens:
            b.logits_rows.append(i * T + n - 1)
    return b


def _control_group(ep_group, timeout: datetime.timedelta):
    """A gloo group with the same ranks as `ep_group` (every rank of the world must call this)."""
    mine = dist.get_process_group_ranks(ep_group)
    every = [None] * dist.get_world_size()
    dist.all_gather_object(every, mine)  # NOTE: collective, once at set-up
    out = None
    for ranks in sorted({tuple(r) for r in every}):
        group = dist.new_group(list(ranks), backend="gloo", timeout=timeout)  # NOTE: collective
        if dist.get_rank() in ranks:
            out = group
    return out


class StepRunner:
    def __init__(self, model, cache: PagedKVCache, device: torch.device, cuda_graphs: bool = True,
                 decode_kernels: str | None = None, max_rows: int = 256, max_table_width: int = 1,
                 control_timeout: datetime.timedelta = UNBOUNDED_CONTROL_TIMEOUT, merge_tokens: int = 0):
        self.model, self.cache, self.device = model, cache, torch.device(device)
        # A step's eager batches (prefill chunks; on CPUs also decode rows), when there are several and their padded
        # tokens fit this bound (the activations the engine sized memory for), run as one forward
        # (`Mixtral.forward_segments`): the experts' weights are read once for them, not once per batch.
        self.merge_tokens = merge_tokens
        self.decode_kernels = choose_kernels(decode_kernels, model, self.device)
        self.expert_tiles = tune_expert_tiles(model)  # GPUs: the small-batch down projection's launch, timed
        self.decode = (DecodeForward(model, cache, self.decode_kernels) if self.decode_kernels != "reference"
                       else None)
        # Decode steps replay CUDA graphs (graphs.py); prefill chunks and CPU runs stay eager. Paged attention
        # skips unused table columns, so its graphs take tables of up to 4096 tokens in one width bucket.
        paged = self.decode is not None and self.decode.reads_table
        min_width = min(max_table_width, -(-4096 // cache.block_size)) if paged else 1
        self.graphs = (DecodeGraphs(self._forward, self.device, max_rows, sync_free=model.sync_free,
                                    min_table_width=min_width) if cuda_graphs and self.device.type == "cuda" else None)
        info = model.expert_parallel
        self.group = info.groups.ep_group if info is not None and info.plan.ep_size > 1 else None
        self.rank = dist.get_rank(self.group) if self.group is not None else 0
        self.is_leader = self.rank == 0
        if self.group is not None:
            self.leader = dist.get_global_rank(self.group, 0)
            self.control = _control_group(self.group, control_timeout)
        self.sampled = torch.zeros(1, dtype=torch.int64, device=self.device)  # the last step's samples
        self.last_heard = time.monotonic()  # followers: when the leader's last header arrived

    # ---- leader -----------------------------------------------------------------------------
    def launch(self, batches: list[Batch]) -> list[torch.Tensor]:
        """Queue the batches' forwards on every rank; return the leader's logits [R, V] per batch (still
        being computed: nothing here waits for the device)."""
        if not self.is_leader:
            raise RuntimeError("StepRunner.launch is for the leader rank; other ranks call follow()")
        if not 1 <= len(batches) <= MAX_BATCHES:
            raise ValueError(f"a step holds 1 to {MAX_BATCHES} batches, got {len(batches)}")
        header = [_STEP, len(batches)] + [0] * (_PER_BATCH * MAX_BATCHES)
        flat: list[int] = []
        for i, b in enumerate(batches):
            header[2 + _PER_BATCH * i: 2 + _PER_BATCH * (i + 1)] = b.sizes()
            flat += b.flat()
        payload = torch.tensor(flat, dtype=torch.int64)
        if self.group is not None:
            # NOTE: two broadcasts per step on the CPU group; the host does not wait for any device.
            dist.broadcast(torch.tensor(header, dtype=torch.int64), src=self.leader, group=self.control)
            dist.broadcast(payload, src=self.leader, group=self.control)
        return self._run(header, payload, with_logits=True)

    def share(self, sampled: torch.Tensor) -> None:
        """The step's sampled ids [R] (leader), for the next step's `from_sampled` on every rank."""
        self.sampled = sampled
        if self.group is not None:
            dist.broadcast(sampled, src=self.leader, group=self.group)  # NOTE: collective, in stream order

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
        dist.broadcast(header, src=self.leader, group=self.control)  # NOTE: collective (CPU group)
        return True

    def _answer_ping(self) -> None:
        dist.all_reduce(torch.ones(1), group=self.control)  # NOTE: collective (CPU group)

    # ---- followers --------------------------------------------------------------------------
    def follow(self) -> None:
        """Run every step the leader launches, until it calls `end()`."""
        if self.group is None or self.is_leader:
            return
        while True:
            header_t = torch.empty(_HEADER, dtype=torch.int64)
            dist.broadcast(header_t, src=self.leader, group=self.control)  # NOTE: collective (CPU group)
            header = header_t.tolist()
            self.last_heard = time.monotonic()
            if header[0] == _END:
                return
            if header[0] == _PING:
                self._answer_ping()
                continue
            sizes = [header[2 + _PER_BATCH * i: 2 + _PER_BATCH * (i + 1)] for i in range(header[1])]
            payload = torch.empty(sum(B * T * 2 + B * NB + R + 2 * S for B, T, NB, R, S, _ in sizes),
                                  dtype=torch.int64)
            dist.broadcast(payload, src=self.leader, group=self.control)
            self._run(header, payload, with_logits=False)
            R = sum(s[3] for s in sizes)
            if R:  # the leader shares what it sampled (see `share`)
                self.sampled = torch.empty(R, dtype=torch.int64, device=self.device)
                dist.broadcast(self.sampled, src=self.leader, group=self.group)  # NOTE: collective

    # ---- both -------------------------------------------------------------------------------
    @torch.no_grad()
    def _run(self, header: list[int], payload: torch.Tensor, with_logits: bool) -> list[torch.Tensor]:
        with sdpa_kernel(EAGER_ATTENTION):
            return self._run_batches(header, payload, with_logits)

    def _run_batches(self, header: list[int], payload: torch.Tensor, with_logits: bool) -> list[torch.Tensor]:
        payload = to_device(payload, torch.int64, self.device)
        batches, o = [], 0
        for i in range(header[1]):
            B, T, NB, R, S, F = header[2 + _PER_BATCH * i: 2 + _PER_BATCH * (i + 1)]
            tokens = payload[o: o + B * T].view(B, T)
            positions = payload[o + B * T: o + 2 * B * T].view(B, T)
            o += 2 * B * T
            table = payload[o: o + B * NB].view(B, NB)
            rows = payload[o + B * NB: o + B * NB + R]
            o += B * NB + R
            if S:  # tokens the previous step sampled: fill them in on the device
                tokens.view(-1)[payload[o: o + S]] = self.sampled[payload[o + S: o + 2 * S]]
            o += 2 * S
            batches.append((tokens, positions, table, rows if with_logits else rows[:0], bool(F), R))
        # decode batches replay their CUDA graph (the leader's R: every rank decides alike); the other batches
        # run eagerly, as one forward when there are several and their padded tokens fit `merge_tokens`
        graphed = [self.graphs is not None and self.graphs.eligible(b[0].shape[0], b[0].shape[1], b[5])
                   for b in batches]
        eager = [b for b, g in zip(batches, graphed) if not g]
        merge = len(eager) > 1 and sum(b[0].numel() for b in eager) <= self.merge_tokens
        out, merged = [], None
        for (tokens, positions, table, rows, fresh, _), g in zip(batches, graphed):
            if g:
                out.append(self.graphs.run(tokens, positions, table, with_logits))
            elif merge:
                if merged is None:  # at the first eager batch, all of them
                    merged = iter(self.model.forward_segments([(t, p, self.cache.view(tb, p, f), r)
                                                               for t, p, tb, r, f, _ in eager]))
                out.append(next(merged))
            else:
                out.append(self._forward(tokens, positions, table, rows, fresh))
        return out

    def _forward(self, tokens, positions, table, rows, fresh: bool = False) -> torch.Tensor:
        """One forward; free of host syncs (CUDA graphs capture it). One-token rows take the decode forward.
        Both count the routed real tokens (positions >= 0) into `model.routing_stats`. `fresh`: every row
        starts at position 0 (`Batch.fresh`), so attention needs no cache read and no mask."""
        if self.decode is not None and tokens.shape[1] == 1:
            return self.decode(tokens, positions, table, rows)
        self.cache.prepare(table, positions, fresh=fresh)
        logits, _ = self.model(tokens, positions, self.cache, logits_rows=rows)
        return logits
