"""Data-parallel attention: each expert-parallel rank serves its own requests.

    llm = LLM(ckpt, ep=2, dp_attention=True)     # inside `torchrun --nproc_per_node 2 ...`

By default (replicated dispatch) every EP rank runs attention, norms, embeddings and the LM head for
every token, and rank 0 broadcasts each step's rows. In this mode each rank has its own scheduler,
its own running requests and its own paged KV cache; it runs the dense layers for its own tokens
only, and the MoE layers send tokens to the experts' owners and back by all-to-all
(`epkit.parallel.AllToAllDispatch`). `max_num_seqs` and `max_num_batched_tokens` apply per rank.

Requests: rank 0 validates each one, gives it to the rank with the least work in flight (remaining
prompt + output tokens; ties: most free KV blocks, then lowest rank) and sends it there once, in the
broadcast of the next step. Its own share it schedules at once, the others' start one step later.

A step, on every rank:
  1. schedule its own requests (nothing is committed until the forwards ran);
  2. ONE all-gather of a header [H]: rank 0's command and payload size, this rank's forwards (decode
     rows, decode block-table width, prefill chunk sizes), sampled rows and load;
  3. if rank 0 has new requests, one broadcast of them;
  4. the forwards, in lock-step. Slot 0 holds the decode rows, padded on every rank to one bucket
     (fixed-capacity all-to-all, replayed as a CUDA graph on GPUs); then one slot per prefill
     chunk group (fixed capacity up to `sync_free_max_tokens` tokens per rank, above that the uneven
     all-to-all). A rank with nothing for a slot runs a one-token padding forward, so every MoE
     collective has its partners also when a rank runs out of requests first;
  5. each rank samples its own rows; one gather brings (request, token, ...) records [S, 6 + 2k] to rank 0,
     which updates its outputs exactly as the owner did (same stop and length rules), so `generate`
     and `stream` return what one device returns.

Legend: R ranks, H header length, S sampled rows (most on any rank), Bb decode rows bucket.
"""
from __future__ import annotations

import pickle
import time
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch.nn.attention import sdpa_kernel

from ..parallel import set_dispatch_capacity
from .graphs import bucket
from .runner import EAGER_ATTENTION, MAX_BATCHES, Batch
from .scheduler import Sequence, StepPlan

_STEP, _END, _PING = 1, 2, 3
# header fields, then MAX_BATCHES prefill chunk sizes (tokens per forward)
(CMD, PAYLOAD, DEC_ROWS, DEC_WIDTH, DEC_FULL, GRAPHS, SAMPLED, LOGPROBS, UNFINISHED, WORK, FREE, N_PREFILL,
 PREFILL) = range(13)
HEADER = PREFILL + MAX_BATCHES
# a record per sampled row (float64: ids < 2^53 stay exact): request index, token, finish code, preemptions,
# step first scheduled, logprob, then the top-k ids and their logprobs (k: most asked by any row)
RECORD = 6
REASONS = (None, "stop", "length")
_PADDING = Batch(1, 1, 1, [0], [-1], [0], [])  # position -1: scratch KV block, never sampled
_all_gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor  # renamed in torch 2.13


@dataclass
class StepShape:
    """What every rank runs this step; the same on every rank (built from the all-gathered headers)."""

    command: int
    payload: int  # bytes of new requests rank 0 broadcasts
    decode_rows: int  # most decode rows on any rank (0: no decode slot)
    decode_width: int  # widest decode block table
    decode_all_sampled: bool  # every rank samples every decode row (a CUDA graph returns them all)
    graphs: bool  # every rank replays CUDA graphs
    prefill: list[int]  # per prefill slot, most tokens on any rank
    sampled: int
    logprobs: int  # most top logprobs any sampled row asks for, -1: none asks for logprobs
    unfinished: int  # requests in the schedulers of all ranks
    loads: list[tuple[int, int]]  # per rank: (remaining tokens, free KV blocks)

    @property
    def forwards(self) -> int:
        return int(self.decode_rows > 0) + len(self.prefill)


def agree(headers: list[list[int]]) -> StepShape:
    """headers [R][H] -> the step's shape."""
    n_prefill = max(h[N_PREFILL] for h in headers)
    return StepShape(headers[0][CMD], headers[0][PAYLOAD], max(h[DEC_ROWS] for h in headers),
                     max(h[DEC_WIDTH] for h in headers), all(h[DEC_FULL] for h in headers),
                     all(h[GRAPHS] for h in headers), [max(h[PREFILL + i] for h in headers) for i in range(n_prefill)],
                     max(h[SAMPLED] for h in headers), max(h[LOGPROBS] for h in headers) - 1,
                     sum(h[UNFINISHED] for h in headers),
                     [(h[WORK], h[FREE]) for h in headers])


def assign_ranks(costs: list[tuple[int, int]], loads: list[tuple[int, int]]) -> list[int]:
    """The rank for each request, in order. costs: (tokens, KV blocks) per request; loads: (remaining
    tokens, free KV blocks) per rank. Least remaining work first, then most free blocks, then lowest rank."""
    work, free = [w for w, _ in loads], [f for _, f in loads]
    out = []
    for tokens, blocks in costs:
        r = min(range(len(work)), key=lambda i: (work[i], -free[i], i))
        work[r] += tokens
        free[r] -= blocks
        out.append(r)
    return out


class DataParallelAttention:
    """Lock-step for `LLM(..., dp_attention=True)`: every rank calls `step()` (rank 0 from generate,
    stream or its own loop; the others from `follow()`), rank 0 ends the loop with `end()`."""

    def __init__(self, llm):
        self.llm = llm
        info = llm.model.expert_parallel
        self.group, self.device = info.groups.ep_group, llm.device
        self.rank, self.size = dist.get_rank(self.group), dist.get_world_size(self.group)
        self.leader = dist.get_global_rank(self.group, 0)
        self.is_leader = self.rank == 0
        self.sync_free_max_tokens = llm.config.sync_free_max_tokens
        self.steps = 0  # same on every rank
        self.padding_forwards = 0  # forwards this rank ran with no request of its own
        self.failed = False  # every rank raised at the same step: no more collectives
        self._routed: torch.Tensor | None = None  # every rank's routing counts, summed at the last ping
        self._index: dict[str, int] = {}  # this rank's requests: request id -> global index
        self._local: dict[int, Sequence] = {}  # this rank's requests by global index
        self._first_step: dict[int, int] = {}  # owner: step in which a request was first scheduled
        # rank 0 only
        self._pending: list[Sequence] = []  # validated, not yet given a rank
        self._aborts: list[tuple] = []  # ("abort", index, rank, None) for the next broadcast
        self._shadows: dict[int, Sequence] = {}  # requests other ranks serve, mirrored from their records
        self._next_index = 0
        self._loads = [(0, llm.scheduler.allocator.num_free)] * self.size  # as last reported
        self._unreported = [(0, 0)] * self.size  # given out after the last report
        self._given = [(0, 0)] * self.size  # given out this step
        self._step_times: dict[int, float] = {}
        if not self.is_leader:
            llm._incremental_text = False  # nobody reads a follower's text (stop strings still work)

    # ---- rank 0 -----------------------------------------------------------------------------
    def submit(self, seq: Sequence) -> None:
        self._pending.append(seq)

    def abort(self, request_id: str) -> bool:
        """Rank 0: stop serving a request wherever it runs (its owner drops it at the next step and frees
        its KV blocks); False if it is not waiting or running. The caller reports it to the user."""
        seq = next((s for s in self._pending if s.request_id == request_id), None)
        if seq is not None:
            self._pending.remove(seq)
            return True
        if request_id in self._index:
            self._drop(self._index[request_id])
            return True
        index = next((i for i, s in self._shadows.items() if s.request_id == request_id), None)
        if index is None:
            return False
        self.llm.scheduler.finish(self._shadows.pop(index), "abort")
        self._aborts.append(("abort", index, -1, None))
        return True

    def _drop(self, index: int) -> None:
        """Stop serving one of this rank's requests."""
        seq = self._local.pop(index, None)
        if seq is None:  # finished meanwhile
            return
        llm = self.llm
        llm.scheduler.finish(seq, "abort")
        del self._index[seq.request_id]
        self._first_step.pop(index, None)
        if not self.is_leader:
            llm._seqs.pop(seq.request_id, None)
            llm._outputs.pop(seq.request_id, None)

    def has_unfinished(self) -> bool:
        return bool(self._pending or self._shadows or self.llm.scheduler.has_unfinished())

    def _load(self) -> tuple[int, int]:
        sched = self.llm.scheduler
        work = sum(s.max_len - s.num_computed for s in sched.running) + sum(s.max_len - s.num_computed
                                                                            for s in sched.waiting)
        return work, sched.allocator.num_free

    def _distribute(self) -> list[tuple]:
        """Give each new request a rank; keep our own share, return the messages for the others."""
        seqs, self._pending = self._pending, []
        if not seqs:
            return []
        bs = self.llm.cache.block_size
        loads = [(w + uw, f - uf) for (w, f), (uw, uf) in zip(self._loads, self._unreported)]
        loads[self.rank] = self._load()
        costs = [(s.max_len - s.num_computed, -(-s.max_len // bs)) for s in seqs]
        msgs = []
        given = [(0, 0)] * self.size
        for seq, cost, r in zip(seqs, costs, assign_ranks(costs, loads)):
            index, self._next_index = self._next_index, self._next_index + 1
            if r == self.rank:
                self._index[seq.request_id], self._local[index] = index, seq
                self.llm.scheduler.add(seq)
            else:
                self._shadows[index] = seq
                msgs.append(("add", index, r, seq))
                given[r] = (given[r][0] + cost[0], given[r][1] + cost[1])
        self._given = given
        return msgs

    def _mirror(self, records: list[list[list[float]]], now: float) -> list:
        """Apply the other ranks' sampled tokens to their requests' outputs, as their owners did."""
        updates = []
        for r, rows in enumerate(records):
            for row in (row for row in rows if row[0] >= 0):
                index, tok, code, preemptions, first = map(int, row[:5])
                if r == self.rank or index not in self._shadows:
                    continue
                seq = self._shadows[index]
                if seq.request_id not in self.llm._outputs:  # its caller is gone (a stream left early)
                    self.abort(seq.request_id)
                    continue
                seq.num_preemptions = preemptions
                if seq.first_scheduled is None:
                    seq.first_scheduled = self._step_times.get(first, now)
                lp, top = None, None
                if seq.params.logprobs is not None:
                    k = (len(row) - RECORD) // 2
                    ids, lps = row[RECORD: RECORD + k], row[RECORD + k:]
                    lp, top = row[5], [(int(i), v) for i, v in zip(ids, lps) if i >= 0]
                out = self.llm._append(seq, tok, now, lp, top)
                if out.finish_reason != REASONS[code]:
                    raise RuntimeError(f"request {seq.request_id!r}: rank {r} finished it with {REASONS[code]!r}, "
                                       f"rank 0 with {out.finish_reason!r} (ranks out of step)")
                if out.finished:
                    del self._shadows[index]
                updates.append(out)
        return updates

    # ---- every rank -------------------------------------------------------------------------
    def ping(self) -> None:
        """Rank 0, idle: a step every rank joins (nothing to run), so followers hear from it; it also sums
        the routing counts of every rank for `routed_counts`."""
        if self.is_leader and not self.failed:
            self.step(_PING)

    def routed_counts(self) -> torch.Tensor:
        """Rank 0: tokens routed to each expert of each layer [L, E] by every rank, as of the last ping
        (before any: rank 0's own)."""
        return self._routed if self._routed is not None else self.llm.model.routing_stats.counts(self.device)

    def follow(self) -> None:
        """Ranks other than 0: run steps until rank 0 calls `end()`."""
        if self.is_leader:
            return
        self._ended = False
        while not self._ended:
            self.step()

    def end(self) -> None:
        if self.is_leader and not self.failed:
            self.step(_END)

    def step(self, command: int = _STEP) -> list:
        """One lock-step step (module docstring); rank 0 gets the updated outputs, the others []."""
        llm = self.llm
        updates = []
        if self.is_leader:
            updates, llm._pending = llm._pending, []
            if command == _STEP and not self.has_unfinished():
                return updates
        t0 = time.perf_counter()
        msgs = []
        if self.is_leader:
            msgs, self._aborts = self._aborts, []
            msgs += self._distribute() if command != _END else []
        payload = pickle.dumps(msgs) if msgs else b""
        plan = llm.scheduler.schedule() if command != _END and llm.scheduler.has_unfinished() else StepPlan([])
        batches, sampled = llm._batches(plan) if plan.rows else ([], [])
        decode = batches[0] if batches and batches[0].T == 1 else None
        prefill = batches[1:] if decode is not None else batches
        asked = [s.params.logprobs for s in sampled if s.params.logprobs is not None]
        shape = self._exchange(command, len(payload), decode, prefill, len(sampled), max(asked, default=-1))
        if self.is_leader:
            self._loads, self._unreported, self._given = shape.loads, self._given, [(0, 0)] * self.size
            self._step_times[self.steps] = t0
        arrived = self._broadcast(payload, shape.payload) if shape.payload else []
        if shape.command == _END:
            self._admit(arrived)  # aborts only: rank 0 gives out no requests when it ends
            self._ended = True
            return updates
        if shape.command == _PING:
            counts = llm.model.routing_stats.counts(self.device).clone()
            dist.all_reduce(counts, group=self.group)  # NOTE: collective, on pings only (an idle server)
            self._routed = counts
        if shape.forwards == 0:
            if shape.unfinished and not shape.payload:
                self.failed = True
                raise RuntimeError("no rank could schedule any of its requests (KV cache too small for any "
                                   "waiting request)")
            self._admit(arrived)
            return updates
        fresh = [s for s, _, _ in plan.rows if s.first_scheduled is None]
        llm._commit(plan, t0)
        for seq in fresh:
            self._first_step[self._index[seq.request_id]] = self.steps
        outs = llm._sample(self._run(shape, decode, prefill), sampled)
        k = max(shape.logprobs, 0)
        records = [self._record(seq, out, k) for seq, out in zip(sampled, outs)]
        gathered = self._gather(records, shape.sampled, RECORD + 2 * k) if shape.sampled else []
        if self.is_leader:
            updates += outs + self._mirror(gathered, time.perf_counter())
            if len(self._step_times) > 100_000:
                self._step_times = dict(list(self._step_times.items())[-50_000:])
        self._admit(arrived)
        self.steps += 1
        llm.stats["steps"] += 1
        llm.stats["busy_s"] += time.perf_counter() - t0
        return updates

    def _record(self, seq: Sequence, out, k: int) -> list[float]:
        """What rank 0 needs of a token this rank sampled (see RECORD); forgets a finished request."""
        index = self._index[seq.request_id]
        record = [index, out.new_token_ids[0], REASONS.index(out.finish_reason), seq.num_preemptions,
                  self._first_step.get(index, self.steps), float("nan")]
        top = []
        if seq.params.logprobs is not None:
            record[-1], top = out.logprobs[-1], out.top_logprobs[-1]
        top = top + [(-1, float("nan"))] * (k - len(top))
        if out.finished:
            self._first_step.pop(index, None)
            del self._index[seq.request_id], self._local[index]
            if not self.is_leader:
                self.llm._outputs.pop(seq.request_id, None)
        return record + [i for i, _ in top] + [lp for _, lp in top]

    def _admit(self, arrived: list[tuple]) -> None:
        """Followers: queue the new requests rank 0 gave this rank, drop the ones it aborted."""
        from .engine import RequestOutput
        llm = self.llm
        for kind, index, r, seq in arrived:
            if kind == "abort":
                self._drop(index)
            elif r == self.rank and not self.is_leader:
                rid = seq.request_id
                llm._seqs[rid] = seq
                llm._outputs[rid] = RequestOutput(rid, None, seq.token_ids[: seq.prompt_len],
                                                  text="" if llm.tokenizer is not None else None)
                self._index[rid], self._local[index] = index, seq
                llm.scheduler.add(seq)

    # ---- collectives --------------------------------------------------------------------------
    def _exchange(self, command: int, payload: int, decode: Batch | None, prefill: list[Batch],
                  sampled: int, logprobs: int) -> StepShape:
        h = [0] * HEADER
        h[CMD], h[PAYLOAD] = command if self.is_leader else 0, payload
        if decode is not None:
            h[DEC_ROWS], h[DEC_WIDTH] = decode.B, decode.NB
        h[DEC_FULL] = int(decode is None or len(decode.logits_rows) == decode.B)
        h[GRAPHS] = int(self.llm.runner.graphs is not None)
        h[SAMPLED], h[LOGPROBS] = sampled, logprobs + 1
        sched = self.llm.scheduler
        h[UNFINISHED] = len(sched.running) + len(sched.waiting)
        h[WORK], h[FREE] = self._load()
        h[N_PREFILL] = len(prefill)
        for i, b in enumerate(prefill):
            h[PREFILL + i] = b.B * b.T
        mine = torch.tensor(h, dtype=torch.int64).to(self.device)
        every = torch.empty(self.size * HEADER, dtype=torch.int64, device=self.device)
        _all_gather(every, mine, group=self.group)  # NOTE: the step's one collective
        flat = every.tolist()  # NOTE: host sync, once per step
        self.llm.runner.last_heard = time.monotonic()  # a follower's watchdog reads it (engine_loop)
        return agree([flat[r * HEADER: (r + 1) * HEADER] for r in range(self.size)])

    def _broadcast(self, payload: bytes, size: int) -> list:
        if self.is_leader:
            buf = torch.frombuffer(bytearray(payload), dtype=torch.uint8).to(self.device)
        else:
            buf = torch.empty(size, dtype=torch.uint8, device=self.device)
        dist.broadcast(buf, src=self.leader, group=self.group)  # NOTE: collective, only when requests arrive
        return pickle.loads(buf.cpu().numpy().tobytes()) if not self.is_leader else pickle.loads(payload)

    def _gather(self, records: list[list[float]], S: int, width: int) -> list[list[list[float]]]:
        mine = torch.full((S, width), -1, dtype=torch.float64)
        if records:
            mine[: len(records)] = torch.tensor(records, dtype=torch.float64)
        mine = mine.to(self.device)
        every = [torch.empty_like(mine) for _ in range(self.size)] if self.is_leader else None
        dist.gather(mine, every, dst=self.leader, group=self.group)  # NOTE: collective, once per step
        return [t.tolist() for t in every] if self.is_leader else []  # NOTE: host sync on rank 0

    # ---- forwards ---------------------------------------------------------------------------
    def _capacity(self, tokens: int) -> int | None:
        """Rows per rank of the fixed-capacity all-to-all for a slot of `tokens`, None for the uneven one."""
        return bucket(tokens) if bucket(tokens) <= self.sync_free_max_tokens else None

    @torch.no_grad()
    def _run(self, shape: StepShape, decode: Batch | None, prefill: list[Batch]) -> list[torch.Tensor]:
        """Every slot of the step, in the same order on every rank; our logits per own batch. Attention as in
        the runner's forwards (`EAGER_ATTENTION`: no cuDNN plan for every new shape)."""
        model, logits = self.llm.model, []
        try:
            with sdpa_kernel(EAGER_ATTENTION):
                if shape.decode_rows:
                    cap = self._capacity(shape.decode_rows)
                    set_dispatch_capacity(model, cap)
                    graph = None
                    # the graphs' own check, for a full bucket of `cap` rows: the same answer on every rank
                    if cap is not None and shape.graphs and shape.decode_all_sampled and \
                            self.llm.runner.graphs.eligible(cap, 1, cap):
                        graph = (cap, bucket(shape.decode_width))  # the same graph key on every rank
                    out = self._forward(decode, graph)
                    if decode is not None:
                        logits.append(out)
                for i, tokens in enumerate(shape.prefill):
                    b = prefill[i] if i < len(prefill) else None
                    set_dispatch_capacity(model, self._capacity(tokens))
                    out = self._forward(b, None)
                    if b is not None:
                        logits.append(out)
        finally:
            set_dispatch_capacity(model, None)
        return logits

    def _forward(self, batch: Batch | None, graph: tuple[int, int] | None) -> torch.Tensor:
        b = batch if batch is not None else _PADDING
        self.padding_forwards += batch is None
        flat = torch.tensor(b.tokens + b.positions + b.block_table + b.logits_rows, dtype=torch.int64)
        flat = flat.to(self.device, non_blocking=True)
        n = b.B * b.T
        tokens, positions = flat[:n].view(b.B, b.T), flat[n: 2 * n].view(b.B, b.T)
        table, rows = flat[2 * n: 2 * n + b.B * b.NB].view(b.B, b.NB), flat[2 * n + b.B * b.NB:]
        if graph is not None:
            return self.llm.runner.graphs.run(tokens, positions, table, True, *graph)
        return self.llm.runner._forward(tokens, positions, table, rows, b.fresh)
