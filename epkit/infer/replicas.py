"""Data-parallel replicas: `dp` independent engines of `ep` ranks each, sharing one `generate` call.

    deepspeed --num_gpus 4 launch/infer.py --ep 2 --dp 2 --prompts p.jsonl --output r.jsonl
    llm = LLM(ckpt, ep=2, dp=2)          # inside a 4-rank launch; every rank calls llm.generate(...)

Replica r is the EP group of ranks r*ep .. r*ep+ep-1 (`parallel.data_parallel_replicas`, the training
groups' layout); its first rank is its leader, with its own scheduler and KV cache, and its followers
run the steps it broadcasts (or, with `dp_attention`, their own requests) exactly as a lone engine's
do. Only the leaders talk to each other, over one CPU (gloo) group:

  1. global rank 0 splits the prompts (`split_by_cost`: balanced by prompt tokens + max_tokens,
     deterministic) and scatters each leader its share (NOTE: one collective, host objects);
  2. each replica generates its share; after every step its leader joins one all-reduce of
     "still busy" flags (NOTE: one CPU collective per step), and a leader that has finished keeps
     joining them until every replica has: so no leader waits longer than one of another replica's
     steps, and a replica that stopped answering is noticed within --dist-timeout;
  3. rank 0 gathers the outputs (NOTE: one collective, host objects) and returns them in input order;
     `on_finish` sees its own replica's outputs as they finish and the others' after the gather.

Greedy outputs equal one engine's: the replicas run the same model on fewer requests each.
Not supported with replicas: `stream`, and the server's `step`/`add_request` loop (launch/serve.py).

Legend: P prompts, dp replicas.
"""
from __future__ import annotations

import datetime
import heapq

import torch
import torch.distributed as dist

from .request import prompt_ids
from .sampling import SamplingParams


def split_by_cost(costs: list[int], parts: int) -> list[list[int]]:
    """Prompt indices per replica: the costliest first, each to the replica with the least cost so far (ties:
    the lowest replica); each share in input order. Deterministic, so every run splits alike."""
    heap = [(0, r) for r in range(parts)]
    shares: list[list[int]] = [[] for _ in range(parts)]
    for i in sorted(range(len(costs)), key=lambda i: (-costs[i], i)):
        load, r = heapq.heappop(heap)
        shares[r].append(i)
        heapq.heappush(heap, (load + costs[i], r))
    return [sorted(s) for s in shares]


class Replicas:
    """The leaders' side of data-parallel replicas (every rank builds one; followers only follow)."""

    def __init__(self, llm, ep_size: int, timeout_s: float):
        from ..parallel import data_parallel_replicas, world_rank
        self.llm = llm
        self.index, self.leaders = data_parallel_replicas(ep_size)
        self.size = len(self.leaders)
        self.is_root = world_rank() == 0
        # NOTE: collective (every rank of the world creates the group, members or not), once at set-up
        self.group = dist.new_group(self.leaders, backend="gloo", timeout=datetime.timedelta(seconds=timeout_s))

    def cost(self, prompt, params: SamplingParams | None) -> int:
        """Work of one request: its prompt tokens plus its max_tokens (1 for a prompt that is not one: it
        fails at once wherever it goes)."""
        try:
            n = len(prompt_ids(self.llm.tokenizer, prompt, self.llm.args.vocab_size)[1])
        except (ValueError, TypeError):
            return 1
        return n + (params.max_tokens if isinstance(params, SamplingParams) else SamplingParams().max_tokens)

    def generate(self, prompts, params, use_tqdm: bool = False, on_finish=None) -> list:
        """`LLM.generate` over the replicas; global rank 0's prompts are served, its outputs returned in input
        order; every other rank returns []."""
        llm = self.llm
        if not llm.is_leader:
            llm.follow()
            return []
        share = [None]
        if self.is_root:
            prompts, params = llm.as_lists(prompts, params)
            costs = [self.cost(p, sp) for p, sp in zip(prompts, params)]
            share = [[(i, prompts[i], params[i]) for i in s] for s in split_by_cost(costs, self.size)]
        mine = [None]
        dist.scatter_object_list(mine, share if self.is_root else None, src=0, group=self.group)  # NOTE: collective
        mine = mine[0]
        index = [i for i, _, _ in mine]
        report = (lambda pos, out: on_finish(index[pos], out)) if on_finish is not None and self.is_root else None
        if mine:
            outs = llm.generate_here([p for _, p, _ in mine], [sp for _, _, sp in mine], use_tqdm and self.is_root,
                                     report, between_steps=lambda: self._busy(True))
        else:  # more replicas than prompts
            outs = []
            llm.release_followers()
        # A replica that failed raised above: its process ends, and the others' next collective fails with it.
        while self._busy(False):  # until every replica has finished
            pass
        every = [None] * self.size if self.is_root else None
        dist.gather_object(list(zip(index, outs)), every, dst=0, group=self.group)  # NOTE: collective, once
        if not self.is_root:
            return []
        by_index = dict(pair for part in every for pair in part)
        if report is not None:
            for i in sorted(set(by_index) - set(index)):
                on_finish(i, by_index[i])
        return [by_index[i] for i in range(len(by_index))]

    def _busy(self, busy: bool) -> bool:
        """Whether any replica is still generating. NOTE: collective on the leaders' CPU group, once a step."""
        flag = torch.tensor([int(busy)])
        dist.all_reduce(flag, group=self.group)
        return bool(flag.item())
