"""Continuous batching: which sequences run this step, and how many of their tokens.

Every step has a token budget (`max_num_batched_tokens`) and a row limit (`max_num_seqs`).
Sequences join and leave between steps. Order of service each step:

1. running sequences that are decoding (one token each), oldest first: a long prompt never holds
   them back;
2. running sequences still prefilling, a chunk each (chunked prefill), oldest first;
3. waiting sequences, oldest first (a preempted one goes back to the front), while budget, rows and
   KV blocks last.

While other requests wait or prefill and the step cannot hold all of their tokens, one sequence's
prefill chunk is capped at `long_prefill_tokens` (default a quarter of the budget), so a long prompt
cannot take a whole step and hold short requests out; alone, or when everything fits, it takes what it
needs (two 4096-token prompts under a budget of 8192 prefill in one step, not two chunked ones).

While sequences decode, a step may be held to `max_tokens_while_decoding` tokens (when set): every
decoding row, then prefill chunks in what is left. A step's time grows with its tokens, so this bounds the
gap between a running request's tokens while new prompts prefill (stall-free batching, as in
Sarathi-Serve), at the cost of prefilling in smaller chunks; a step with nothing decoding keeps the whole
budget.

A sequence whose last sampled token reaches its length limit is left out while that token is still
on its way from the device (the engine plans a step before the previous one's tokens are read back).

When a running sequence needs a KV block and none is free, the newest running sequence not yet
scheduled this step is preempted by recompute: its blocks are freed and it waits again, keeping
the tokens it generated; when it is readmitted its prompt and outputs are prefilled again.

Nothing here touches tensors: the engine turns a `StepPlan` into model inputs.
"""
from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass, field

from .kv_cache import BlockAllocator
from .sampling import SamplingParams

WAITING, RUNNING, FINISHED = "waiting", "running", "finished"


@dataclass(eq=False)  # identity: queues look sequences up by object, never by value
class Sequence:
    """One request's state. `token_ids` = prompt + generated; `num_computed` of them are in the KV cache."""

    request_id: str
    prompt_len: int
    token_ids: list[int]
    params: SamplingParams
    seed: int
    max_len: int  # generation stops (finish_reason "length") when the sequence reaches this many tokens
    arrival: float = 0.0
    blocks: list[int] = field(default_factory=list)
    num_computed: int = 0
    status: str = WAITING
    first_scheduled: float | None = None
    first_token: float | None = None
    finished_at: float | None = None
    finish_reason: str | None = None
    num_preemptions: int = 0
    # The last token is still being sampled on the device: (its index in token_ids, its slot in that step's
    # samples). The next step reads it there; the engine writes it in when the step's ids reach the host.
    pending: tuple[int, int] | None = None

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def complete(self) -> bool:
        """Every token it may have is sampled (the last may be pending): nothing left to compute."""
        return self.num_tokens >= self.max_len

    @property
    def output_ids(self) -> list[int]:
        return self.token_ids[self.prompt_len:]

    @property
    def remaining(self) -> int:
        """Tokens not yet in the cache (1 while decoding)."""
        return self.num_tokens - self.num_computed


@dataclass
class StepPlan:
    """rows: (sequence, first position, number of tokens) for each sequence run this step."""

    rows: list[tuple[Sequence, int, int]]
    preempted: list[Sequence] = field(default_factory=list)

    @property
    def num_tokens(self) -> int:
        return sum(n for _, _, n in self.rows)


class Scheduler:
    def __init__(self, allocator: BlockAllocator, block_size: int, max_num_seqs: int, max_num_batched_tokens: int,
                 long_prefill_tokens: int | None = None, max_tokens_while_decoding: int | None = None):
        if max_num_seqs < 1:
            raise ValueError(f"max_num_seqs={max_num_seqs} must be at least 1")
        if max_num_batched_tokens < 1:
            raise ValueError(f"max_num_batched_tokens={max_num_batched_tokens} must be at least 1")
        self.allocator, self.block_size = allocator, block_size
        self.max_num_seqs, self.max_num_batched_tokens = max_num_seqs, max_num_batched_tokens
        self.long_prefill_tokens = long_prefill_tokens or max(1, max_num_batched_tokens // 4)
        if self.long_prefill_tokens < 1:
            raise ValueError(f"long_prefill_tokens={long_prefill_tokens} must be at least 1")
        if max_tokens_while_decoding is not None and (isinstance(max_tokens_while_decoding, bool) or not isinstance(
                max_tokens_while_decoding, int) or max_tokens_while_decoding < 1):
            raise ValueError(f"max_tokens_while_decoding={max_tokens_while_decoding!r} must be a positive integer")
        self.max_tokens_while_decoding = max_tokens_while_decoding
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []  # in admission order
        self.num_preemptions = 0

    def add(self, seq: Sequence) -> None:
        seq.status = WAITING
        self.waiting.append(seq)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    # ---- blocks ---------------------------------------------------------------------------
    def _blocks_needed(self, seq: Sequence, num_tokens: int) -> int:
        return max(0, math.ceil(num_tokens / self.block_size) - len(seq.blocks))

    def _reserve(self, seq: Sequence, num_tokens: int) -> bool:
        """Give `seq` enough blocks to hold `num_tokens` tokens; False if the pool is short."""
        need = self._blocks_needed(seq, num_tokens)
        if need > self.allocator.num_free:
            return False
        seq.blocks += self.allocator.allocate(need)
        return True

    def _preempt(self, seq: Sequence) -> None:
        self.allocator.free(seq.blocks)
        seq.blocks, seq.num_computed, seq.status = [], 0, WAITING
        seq.num_preemptions += 1
        self.num_preemptions += 1
        self.running.remove(seq)
        self.waiting.appendleft(seq)

    def finish(self, seq: Sequence, reason: str) -> None:
        """Release a sequence's blocks and take it out of the queues."""
        self.allocator.free(seq.blocks)
        seq.blocks, seq.status, seq.finish_reason = [], FINISHED, reason
        if seq in self.running:
            self.running.remove(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)

    # ---- one step -------------------------------------------------------------------------
    def schedule(self) -> StepPlan:
        rows: list[tuple[Sequence, int, int]] = []
        scheduled: set[int] = set()
        preempted: list[Sequence] = []
        decoding = [s for s in self.running if s.remaining == 1 and not s.complete]
        budget = self.max_num_batched_tokens
        if decoding and self.max_tokens_while_decoding is not None:  # every decoding row still runs
            budget = min(budget, max(self.max_tokens_while_decoding, len(decoding)))
        prefilling = [s for s in self.running if s.remaining > 1]
        demand = len(decoding) + sum(q.remaining for q in prefilling) + sum(q.remaining for q in self.waiting)
        fits = demand <= budget  # the step holds everyone's tokens: capping would only add steps
        contended = (bool(self.waiting) or len(prefilling) > 1) and not fits
        cap = self.long_prefill_tokens if contended else budget
        for seq in decoding + prefilling:
            if budget == 0:
                break
            if seq.status != RUNNING:  # preempted earlier in this loop
                continue
            n = min(seq.remaining, budget, cap)
            while not self._reserve(seq, seq.num_computed + n):
                victim = next(s for s in reversed(self.running) if id(s) not in scheduled)
                self._preempt(victim)
                preempted.append(victim)
                if victim is seq:
                    break
            if seq.status != RUNNING:
                continue
            rows.append((seq, seq.num_computed, n))
            scheduled.add(id(seq))
            budget -= n
        # Admit waiting sequences only if nobody had to be preempted (the pool is tight otherwise).
        while self.waiting and budget > 0 and len(self.running) < self.max_num_seqs and not preempted:
            seq = self.waiting[0]
            n = min(seq.remaining, budget, self.long_prefill_tokens if len(self.waiting) > 1 and not fits else budget)
            if not self._reserve(seq, n):
                break
            self.waiting.popleft()
            seq.status = RUNNING
            self.running.append(seq)
            rows.append((seq, 0, n))
            budget -= n
        return StepPlan(rows, preempted)


def group_rows(rows: list[tuple[Sequence, int, int]], max_groups: int) -> list[list[tuple[Sequence, int, int]]]:
    """Split a step's rows into forwards of [B, T] with bounded padding.

    Decode rows (one token) form one group. Prefill chunks, longest first, share a group while its
    padded size B * T stays within twice its real tokens; at most `max_groups` groups in all (the
    rest join the last one).
    """
    decode = [r for r in rows if r[2] == 1]
    groups: list[list] = [decode] if decode else []
    for r in sorted((r for r in rows if r[2] > 1), key=lambda r: -r[2]):
        g = groups[-1] if groups and groups[-1] is not decode else None
        if g is not None and ((len(g) + 1) * g[0][2] <= 2 * (sum(x[2] for x in g) + r[2])
                              or len(groups) == max_groups):
            g.append(r)
        else:
            groups.append([r])
    return groups
