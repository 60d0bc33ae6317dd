"""The engine core under `LLM` (epkit/infer/llm.py): requests in, generated tokens and text out.

    llm = LLM("outputs/default", ep_size=2)            # inside `deepspeed --num_gpus 2 ...`
    outs = llm.generate(["Hello", [1, 15, 27]], SamplingParams(temperature=0, max_tokens=32))
    for out in llm.stream(prompts, params): print(out.new_text, end="")
    outs = llm.chat([[{"role": "user", "content": "Hi"}]], params)      # the tokenizer's chat template

A server drives the engine itself, one thread owning it: `add_request`, `step` while `has_unfinished`,
`abort` (the request's KV blocks return to the pool at once), `occupancy` and `routed_tokens` for
metrics.

Under expert parallelism every rank builds the engine and calls the same method (`generate`,
`stream`, `expert_load`); rank 0 reads the requests, schedules, samples and returns the outputs,
the other ranks run the steps rank 0 broadcasts and return nothing. Requests are validated on rank 0
when they arrive; a bad one finishes at once with `finish_reason="error"` and a one-line `error`.
"""
from __future__ import annotations

import datetime
import os
import random
import time
from dataclasses import dataclass

import torch

from ..tokenizer import load_tokenizer
from .config import EngineConfig
from .kv_cache import BlockAllocator, PagedKVCache, blocks_for_budget, profile_kv_budget, size_prefill_chunk
from .request import RequestOutput, next_text, prompt_ids
from .runner import MAX_BATCHES, Batch, StepRunner, make_batch
from .sampling import HostCopy, SamplingBatch, SamplingParams, sample, token_logprobs
from .scheduler import FINISHED, Scheduler, Sequence, group_rows

SEQ_TOKENS_FOR_SIZING, MIN_SEQS, MAX_SEQS = 1024, 16, 512  # max_num_seqs = KV capacity / 1024 tokens, clamped


def _refuse_nonfinite(model, checkpoint: str) -> None:
    """A checkpoint with NaN or inf weights (a diverged run) would serve garbage: refuse it, naming the tensor.
    NOTE: one host sync per tensor at load, and a collective so that every EP rank refuses together."""
    from ..checkpoint import CheckpointError
    from ..parallel import all_ranks_ok
    bad = next((n for n, p in model.named_parameters() if p.is_floating_point() and not bool(torch.isfinite(p).all())),
               None)
    if not all_ranks_ok(bad is None):
        raise CheckpointError(f"{checkpoint}: tensor {bad} holds NaN or inf values; refusing to serve it (was it "
                              f"saved by a run that diverged?)" if bad else
                              f"{checkpoint}: another rank's experts hold NaN or inf values (see its error)")


@dataclass
class _Step:
    """A step on the device: its sampled ids (and log-probabilities) on their way to the host, and
    (sequence, token index) for each row it samples."""

    copy: HostCopy | None
    sampled: list[tuple[Sequence, int]]
    logprobs: int | None  # how many alternatives the copy holds per row (None: ids only)


class Engine:
    """The engine core that `LLM` (epkit/infer/llm.py) puts its batch and streaming calls on: loading, the
    step loop (`add_request`, `step`, `abort`), sampling and the outputs, lock-step helpers and load reports.
    Settings and sizing: see `LLM`."""

    def __init__(self, checkpoint: str, config: EngineConfig | None = None, *, tokenizer=None, lora: str | None = None,
                 **settings):
        from ..args import ModelArgs
        from ..checkpoint import load_pretrained
        from ..parallel import init_distributed, world_size
        cfg = (config or EngineConfig()).replace(**settings)
        cfg.check()
        ep = cfg.resolve_ep_size()
        if ep > 1 or cfg.dp_size > 1:
            init_distributed(timeout_s=cfg.dist_timeout)
            cfg.check_world(world_size(), ep)  # every rank alike, before any collective
        cfg.check_model(ModelArgs.load(checkpoint))  # before the weights are read
        device = cfg.resolve_device()
        if cfg.expert_split == "rows" and lora is not None:
            raise ValueError(f"--expert-split rows cannot fold the LoRA adapter {lora} (its expert factors are "
                             f"whole); serve it with --expert-split experts")
        model, report = load_pretrained(checkpoint, device=device, dtype=cfg.resolve_dtype(device), ep_size=ep,
                                        split=cfg.expert_split,
                                        strategy=cfg.strategy, dispatch="all_to_all" if cfg.dp_attention else "replicated",
                                        return_report=True)
        self.load_report = report
        if lora is not None:  # folded into the weights at load: each rank merges only the experts it holds
            from ..lora_io import adapter_dir, merge_adapter
            lora = adapter_dir(lora)
            merge_adapter(model, lora)
        _refuse_nonfinite(model, checkpoint if lora is None else f"{checkpoint} + LoRA {lora}")
        if tokenizer is None:  # on every rank: a failure here must not leave the others in a collective
            tokenizer = load_tokenizer(checkpoint) or (load_tokenizer(lora) if lora is not None else None)
        self._setup(model.eval(), tokenizer, device, cfg)

    @classmethod
    def from_model(cls, model, config: EngineConfig | None = None, *, tokenizer=None, **settings) -> "Engine":
        """Serve an already-built model (e.g. `infer.build.random_model`); its device, dtype and plan stand."""
        self = cls.__new__(cls)
        self.load_report = None
        cfg = (config or EngineConfig()).replace(**settings)
        cfg.check()
        from ..parallel import is_distributed, world_size
        ep = model.expert_parallel.plan.ep_size if model.expert_parallel is not None else 1
        if cfg.dp_size > 1 or (ep > 1 and is_distributed()):
            cfg.check_world(world_size(), ep)
        self._setup(model.eval(), tokenizer, next(model.parameters()).device, cfg)
        return self

    def _setup(self, model, tokenizer, device, cfg: EngineConfig) -> None:
        cfg.check_model(model.args)
        info = model.expert_parallel
        dp_attention = cfg.dp_attention and info is not None and info.plan.ep_size > 1
        if dp_attention and info.dispatch != "all_to_all":
            from ..parallel import set_dispatch
            set_dispatch(model, "all_to_all")
        if info is not None and info.plan.ep_size > 1 and info.dispatch != "replicated" and not dp_attention:
            raise ValueError(f"the engine needs dispatch='replicated' (every EP rank holds the same tokens), "
                             f"the model uses {info.dispatch!r}")
        self.config = cfg
        from ..symm_sum import set_ep_all_reduce
        # NOTE: collective at set-up (symmetric-memory rendezvous); dp attention sums nothing (all-to-all)
        self.ep_all_reduce = "all_to_all" if dp_attention else set_ep_all_reduce(model, cfg.ep_all_reduce)
        self.model, self.tokenizer, self.device = model, tokenizer, torch.device(device)
        self.args = model.args
        self.dtype = next(model.parameters()).dtype
        chunk = cfg.max_num_batched_tokens or size_prefill_chunk(model, self.device, self._agree_min)
        kv_cache_memory = cfg.kv_cache_memory
        if kv_cache_memory is None:
            kv_cache_memory = profile_kv_budget(model, self.device, cfg.gpu_memory_utilization, chunk)
        num_blocks = blocks_for_budget(self.args, kv_cache_memory, cfg.block_size, self.dtype)
        num_blocks = self._agree_min(num_blocks)
        self.cache = PagedKVCache(self.args, num_blocks, cfg.block_size, self.device, self.dtype)
        self.max_model_len = min(cfg.max_model_len or self.args.max_position_embeddings, self.cache.capacity_tokens)
        seqs = cfg.max_num_seqs or min(MAX_SEQS, max(MIN_SEQS, self.cache.capacity_tokens // SEQ_TOKENS_FOR_SIZING))
        self.scheduler = Scheduler(BlockAllocator(num_blocks), cfg.block_size, seqs, chunk, cfg.long_prefill_tokens,
                                   cfg.max_tokens_while_decoding)
        cuda_graphs = cfg.cuda_graphs
        if cuda_graphs is None:
            cuda_graphs = os.environ.get("EPKIT_CUDA_GRAPHS", "1") != "0"
        wait = cfg.follower_wait if cfg.follower_wait is not None else cfg.dist_timeout
        self.runner = StepRunner(model, self.cache, self.device, cuda_graphs=cuda_graphs,
                                 decode_kernels=cfg.decode_kernels, max_rows=seqs,
                                 max_table_width=-(-self.max_model_len // cfg.block_size),
                                 control_timeout=datetime.timedelta(seconds=wait), merge_tokens=chunk)
        model.routing_stats.reset()  # the load report counts served tokens (not the profiling forward)
        self.overlap = cfg.overlap and not dp_attention
        self._inflight: _Step | None = None
        self.is_leader = self.runner.is_leader
        self._rng = random.Random(cfg.seed)
        self._ids = 0
        self._outputs: dict[str, RequestOutput] = {}  # every request not yet handed back finished
        self._seqs: dict[str, Sequence] = {}
        self._pending: list[RequestOutput] = []  # updates not yet returned by step()
        self._incremental_text = True  # step()/stream() callers read text as it grows; generate() does not
        self.stats = {"steps": 0, "prompt_tokens": 0, "generated_tokens": 0, "busy_s": 0.0}
        from .dp import DataParallelAttention
        self.dp = DataParallelAttention(self) if dp_attention else None
        from .replicas import Replicas
        ep = info.plan.ep_size if info is not None else 1
        self.replicas = Replicas(self, ep, cfg.dist_timeout) if cfg.dp_size > 1 else None

    # ---- sizing -----------------------------------------------------------------------------
    def _agree_min(self, n: int) -> int:
        """Every EP rank must hold the same block ids: take the smallest pool any rank can afford."""
        info = self.model.expert_parallel
        if info is None or info.plan.ep_size == 1:
            return n
        import torch.distributed as dist
        t = torch.tensor([n], dtype=torch.int64, device=self.device)
        dist.all_reduce(t, op=dist.ReduceOp.MIN, group=info.groups.ep_group)  # NOTE: collective, once
        return int(t.item())

    # ---- requests ---------------------------------------------------------------------------
    def add_request(self, prompt, params: SamplingParams | None = None, request_id: str | None = None) -> str:
        """Queue one request (leader only); a bad one is finished at once with an error. Returns its id."""
        if not self.is_leader:
            raise RuntimeError("add_request is for rank 0; other ranks call follow() (or generate/stream)")
        request_id = request_id if request_id is not None else str(self._ids)
        self._ids += 1
        if request_id in self._outputs:
            raise ValueError(f"request_id {request_id!r} is already in use")
        params = params if params is not None else SamplingParams()
        text = prompt if isinstance(prompt, str) else None
        out = RequestOutput(request_id, text, [])
        self._outputs[request_id] = out
        now = time.perf_counter()
        try:
            text, ids = prompt_ids(self.tokenizer, prompt, self.args.vocab_size)
            out.prompt, out.prompt_token_ids = text, ids
            if not isinstance(params, SamplingParams):
                raise ValueError(f"sampling params must be SamplingParams, got {type(params).__name__}")
            params.validate(self.args.vocab_size)
            if params.stop_strings and self.tokenizer is None:
                raise ValueError(f"stop={params.stop!r}: stop strings need a tokenizer and the checkpoint has no "
                                 f"tokenizer; use stop_token_ids")
            if len(ids) >= self.max_model_len:
                raise ValueError(f"prompt has {len(ids)} tokens; the context holds {self.max_model_len} "
                                 f"(max_model_len), which leaves no room to generate")
        except ValueError as e:
            out.finish_reason, out.error = "error", str(e)
            out.timings = {"total_s": 0.0}
            self._pending.append(out)
            return request_id
        seed = params.seed if params.seed is not None else self._rng.getrandbits(63)
        seq = Sequence(request_id, len(ids), list(ids), params, seed,
                       max_len=min(len(ids) + params.max_tokens, self.max_model_len), arrival=now)
        out.text = "" if self.tokenizer is not None else None
        self._seqs[request_id] = seq
        (self.dp.submit if self.dp is not None else self.scheduler.add)(seq)
        return request_id

    def has_unfinished(self) -> bool:
        busy = self.dp.has_unfinished() if self.dp is not None else self.scheduler.has_unfinished()
        return busy or bool(self._pending) or self._inflight is not None

    def output(self, request_id: str) -> RequestOutput | None:
        """A request's current state, until `step()` has returned it finished (leader)."""
        return self._outputs.get(request_id)

    def abort(self, request_id: str) -> bool:
        """Stop a running or waiting request (leader, between steps): its KV blocks return to the pool now,
        and the next `step()` returns it with finish_reason "abort". False if it is not running or waiting."""
        seq = self._seqs.get(request_id)
        if seq is None:
            return False
        if self.dp is not None:  # wherever it runs
            self.dp.abort(request_id)
        out = self._outputs[request_id]
        out.new_token_ids, out.new_text = [], "" if out.text is not None else None
        if out.text is not None and out.token_ids:  # text held back while streaming is final now
            out.text, out.new_text, _ = next_text(self.tokenizer, out.token_ids, out.text, seq.params, final=True)
        self._finish(seq, out, "abort", time.perf_counter())
        self._pending.append(out)
        return True

    def occupancy(self) -> dict:
        """Requests running and waiting, KV-cache blocks in use and in the pool (block 0 is scratch)."""
        free, total = self.scheduler.allocator.num_free, self.scheduler.allocator.num_blocks - 1
        return {"running": len(self.scheduler.running), "waiting": len(self.scheduler.waiting),
                "kv_blocks_used": total - free, "kv_blocks_total": total}

    # ---- one step ---------------------------------------------------------------------------
    def step(self) -> list[RequestOutput]:
        """Run one scheduler step (leader). Returns the requests that changed, finished ones included.

        With `overlap` (the default), a call queues the next step on the device and then reads back the
        tokens of the step queued by the previous call, so the tokens a call returns are one step old
        and the device is never idle while the host schedules."""
        if self.dp is not None:
            updates = self.dp.step()
        else:
            updates, self._pending = self._pending, []
            launched = self._launch() if self.scheduler.has_unfinished() else None
            if self._inflight is not None:
                updates += self._resolve(self._inflight)
            self._inflight = launched
            if launched is not None and not self.overlap:
                updates += self._resolve(launched)
                self._inflight = None
        for out in updates:  # handed back finished: forget it
            if out.finished:
                self._outputs.pop(out.request_id, None)
        return updates

    def _launch(self) -> _Step | None:
        """Schedule a step and queue it on every rank; None when every running sequence waits for a token."""
        t0 = time.perf_counter()
        plan = self.scheduler.schedule()
        if not plan.rows:
            if self._inflight is None:
                raise RuntimeError("the scheduler made no progress (KV cache too small for any waiting request)")
            return None
        batches, sampled = self._batches(plan)
        self._commit(plan, t0)
        logits = self.runner.launch(batches)
        copy, k = self._sample_on_device(logits, sampled) if sampled else (None, None)
        for slot, seq in enumerate(sampled):  # a placeholder until the step's ids reach the host
            seq.pending = (seq.num_tokens, slot)
            seq.token_ids.append(-1)
        self.stats["busy_s"] += time.perf_counter() - t0
        return _Step(copy, [(seq, seq.pending[0]) for seq in sampled], k)

    def _resolve(self, step: _Step) -> list[RequestOutput]:
        """Read a launched step's sampled ids (NOTE: the one host sync of a step) and apply them."""
        t0 = time.perf_counter()
        updates = []
        if step.copy is not None:
            rows, now = self._rows(step.copy.get(), step.logprobs), time.perf_counter()
            for (seq, index), (tok, lp, top) in zip(step.sampled, rows):
                if seq.status == FINISHED:  # stopped or aborted meanwhile: this token was computed in vain
                    continue
                seq.token_ids[index] = tok
                if seq.pending is not None and seq.pending[0] == index:
                    seq.pending = None
                updates.append(self._apply(seq, index, now, lp, top))
        self.stats["steps"] += 1
        self.stats["busy_s"] += time.perf_counter() - t0
        return updates

    def _drain(self) -> None:
        """Apply the step still on its way (its updates wait in `_pending` for the next `step()`)."""
        if self._inflight is not None:
            step, self._inflight = self._inflight, None
            self._pending += self._resolve(step)

    def _batches(self, plan) -> tuple[list[Batch], list[Sequence]]:
        """The step's forwards (the decode rows first, then prefill chunks grouped by length) and the
        sequences whose next token they sample, in logits order. Changes no state."""
        batches, sampled = [], []
        for rows in group_rows(plan.rows, MAX_BATCHES):
            batches.append(make_batch(rows, self.cache.block_size))
            sampled += [seq for seq, start, n in rows if start + n == seq.num_tokens]
        return batches, sampled

    def _commit(self, plan, t0: float) -> None:
        """The planned rows ran: their tokens are in the KV cache."""
        for seq, start, n in plan.rows:
            seq.num_computed = start + n
            if seq.first_scheduled is None:
                seq.first_scheduled = t0
        self.stats["prompt_tokens"] += sum(n for s, start, n in plan.rows if start < s.prompt_len)

    def _sample_on_device(self, logits: list[torch.Tensor], sampled: list[Sequence], share: bool = True
                          ) -> tuple[HostCopy, int | None]:
        """Sample the next token of each sequence in `sampled` (logits rows in that order), share the ids
        with the other ranks (replicated mode), and start copying ids (and log-probabilities) to the host."""
        logits = torch.cat(logits) if len(logits) > 1 else logits[0]
        sb = SamplingBatch.from_params([s.params for s in sampled], [s.seed for s in sampled],
                                       [s.num_tokens - s.prompt_len for s in sampled], self.args.vocab_size)
        next_ids = sample(logits, sb)
        if share:
            self.runner.share(next_ids)  # the next step's inputs, on every rank's device
        k = max((s.params.logprobs for s in sampled if s.params.logprobs is not None), default=None)
        if k is None:
            return HostCopy(next_ids), None
        lp, top_ids, top_lp = token_logprobs(logits, next_ids, k)  # in one float64 copy (ids < 2^53 stay exact)
        return HostCopy(torch.cat([next_ids[:, None].double(), lp[:, None].double(), top_ids.double(),
                                   top_lp.double()], dim=1)), k

    @staticmethod
    def _rows(values: list, k: int | None) -> list[tuple]:
        """(token, logprob, top-k) per sampled row from a HostCopy's values."""
        if k is None:
            return [(t, None, None) for t in values]
        return [(int(r[0]), r[1], list(zip(map(int, r[2: 2 + k]), r[2 + k:]))) for r in values]

    def _sample(self, logits: list[torch.Tensor], sampled: list[Sequence]) -> list[RequestOutput]:
        """Sample and append the next tokens now (data-parallel attention's lock-step steps)."""
        if not sampled:
            return []
        copy, k = self._sample_on_device(logits, sampled, share=False)  # every rank samples its own rows
        rows, now = self._rows(copy.get(), k), time.perf_counter()  # NOTE: host sync, once per step
        return [self._append(seq, tok, now, lp, top) for seq, (tok, lp, top) in zip(sampled, rows)]

    def _append(self, seq: Sequence, tok: int, now: float, logprob=None, top=None) -> RequestOutput:
        seq.token_ids.append(tok)
        return self._apply(seq, seq.num_tokens - 1, now, logprob, top)

    def _apply(self, seq: Sequence, index: int, now: float, logprob=None, top=None) -> RequestOutput:
        """Token `index` of `seq` has arrived: update its output and finish it if it stops here."""
        out, p = self._outputs[seq.request_id], seq.params
        tok = seq.token_ids[index]
        if p.logprobs is not None:  # new lists: updates already handed out keep theirs
            out.logprobs = (out.logprobs or []) + [logprob]
            out.top_logprobs = (out.top_logprobs or []) + [top[: p.logprobs]]
        self.stats["generated_tokens"] += 1
        if seq.first_token is None:
            seq.first_token = now
        out.token_ids = seq.token_ids[seq.prompt_len: index + 1]
        out.new_token_ids, out.new_text = [tok], None  # a step adds at most one token per request
        reason = None
        if (not p.ignore_eos and tok == self.args.eos_token_id) or tok in p.stop_token_ids:
            reason = "stop"
        if reason is None and index + 1 >= seq.max_len:
            reason = "length"
        # Text: every step only when someone reads it (streaming) or stop strings need it, else at the end.
        if self.tokenizer is not None and (self._incremental_text or p.stop_strings or reason is not None):
            try:
                out.text, out.new_text, stopped = next_text(self.tokenizer, out.token_ids, out.text or "", p,
                                                            final=reason is not None)
            except Exception as e:  # this request fails, the others go on
                return self._fail(seq, out, now, f"the output cannot be detokenised ({type(e).__name__}: {e})")
            reason = "stop" if stopped else reason
        if reason is not None:
            self._finish(seq, out, reason, now)
        return out

    def _finish(self, seq: Sequence, out: RequestOutput, reason: str, now: float) -> None:
        del seq.token_ids[seq.prompt_len + len(out.token_ids):]  # tokens a later step was already computing
        seq.pending = None
        self.scheduler.finish(seq, reason)
        seq.finished_at = now
        out.finish_reason = reason
        out.timings = self._timings(seq)
        del self._seqs[seq.request_id]

    def _fail(self, seq: Sequence, out: RequestOutput, now: float, error: str) -> RequestOutput:
        """Finish a running request with an error (its blocks go back to the pool)."""
        out.error = error
        self._finish(seq, out, "error", now)
        return out

    @staticmethod
    def _timings(seq: Sequence) -> dict:
        def since(t0, t1):
            return round(t1 - t0, 6) if t0 is not None and t1 is not None else None
        n = seq.num_tokens - seq.prompt_len
        decode_s = since(seq.first_token, seq.finished_at)
        return {"queue_s": since(seq.arrival, seq.first_scheduled), "ttft_s": since(seq.arrival, seq.first_token),
                "total_s": since(seq.arrival, seq.finished_at),
                "decode_tokens_per_s": round((n - 1) / decode_s, 3) if n > 1 and decode_s else None,
                "prompt_tokens": seq.prompt_len, "generated_tokens": n, "preemptions": seq.num_preemptions}

    # ---- lock-step helpers ------------------------------------------------------------------
    def follow(self) -> None:
        """Non-leader ranks: run the leader's steps until it calls `release_followers()`."""
        (self.dp or self.runner).follow()

    def release_followers(self) -> None:
        (self.dp or self.runner).end()

    def ping(self) -> None:
        """Leader, idle: a round trip through every rank in `follow()` (keeps them inside the collective timeout)."""
        (self.dp or self.runner).ping()

    def expert_load(self) -> dict:
        """Routed real tokens per layer and expert, and per EP rank. Every rank must call it (collective)."""
        from ..parallel import gather_routing_counts
        return self._load_report(gather_routing_counts(self.model))

    def routed_tokens(self) -> dict:
        """`expert_load()` as the leader alone counted it (leader; no collective: with replicated dispatch
        every EP rank routes the same tokens; with data-parallel attention, every rank's counts as of the
        last `ping`). NOTE: host sync."""
        counts = self.dp.routed_counts() if self.dp is not None else self.model.routing_stats.counts(self.device)
        return self._load_report(counts.tolist())

    def _load_report(self, counts: list[list[int]]) -> dict:
        from ..parallel import rank_loads
        loads = rank_loads(self.model, counts)
        per_rank = [sum(layer[r] for layer in loads) for r in range(len(loads[0]))]
        total = sum(per_rank) or 1.0
        return {"per_expert": counts, "per_rank_per_layer": loads, "per_rank": per_rank,
                "per_rank_share": [round(x / total, 4) for x in per_rank]}
