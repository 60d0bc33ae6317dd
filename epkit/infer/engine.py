"""`LLM`: the user-facing engine. Requests in, generated tokens and text out, in batches or streamed.

    llm = LLM("outputs/default", ep=2)                 # inside `deepspeed --num_gpus 2 ...`
    outs = llm.generate(["Hello", [1, 15, 27]], SamplingParams(temperature=0, max_tokens=32))
    for out in llm.stream(prompts, params): print(out.new_text, end="")

Under expert parallelism every rank builds the engine and calls the same method (`generate`,
`stream`, `expert_load`); rank 0 reads the requests, schedules, samples and returns the outputs,
the other ranks run the steps rank 0 broadcasts and return nothing. Requests are validated on rank 0
when they arrive; a bad one finishes at once with `finish_reason="error"` and a one-line `error`.
"""
from __future__ import annotations

import dataclasses
import os
import random
import time
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch

from .kv_cache import BlockAllocator, PagedKVCache, blocks_for_budget
from .runner import MAX_BATCHES, Batch, StepRunner
from .sampling import SamplingBatch, SamplingParams, sample
from .scheduler import Scheduler, Sequence, group_rows

CPU_KV_BUDGET = 256 << 20  # bytes of KV cache on CPU when no budget is given


@dataclass
class RequestOutput:
    """A request's state as returned by `generate` (final) or `stream` / `step` (incremental)."""

    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    token_ids: list[int] = field(default_factory=list)  # generated ids
    text: str | None = None  # None when the checkpoint has no tokenizer
    finish_reason: str | None = None  # "stop", "length", "error"; None while running
    error: str | None = None
    timings: dict = field(default_factory=dict)
    new_token_ids: list[int] = field(default_factory=list)  # since the previous update (streaming)
    new_text: str | None = None

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    def to_dict(self) -> dict:
        d = {"request_id": self.request_id, "text": self.text, "token_ids": self.token_ids,
             "finish_reason": self.finish_reason, "timings": self.timings}
        if self.error is not None:
            d["error"] = self.error
        return d


def load_tokenizer(path: str):
    """The checkpoint's tokenizer (transformers' AutoTokenizer), or None if the directory has none."""
    if not any(os.path.isfile(os.path.join(path, f)) for f in ("tokenizer.json", "tokenizer_config.json",
                                                                "tokenizer.model")):
        return None
    from transformers import AutoTokenizer
    return AutoTokenizer.from_pretrained(path)


def balanced_plan(checkpoint: str, ep: int):
    """A `balanced` plan for `ep` ranks from the routing counts the trainer stored in epkit_plan.json."""
    import json

    from ..checkpoint import PLAN_FILE
    from ..config import ModelArgs
    from ..plan import ShardingPlan
    file = os.path.join(checkpoint, PLAN_FILE)
    loads = None
    if os.path.isfile(file):
        with open(file) as f:
            loads = json.load(f).get("routed_tokens")
    if not loads:
        raise ValueError(f"strategy='balanced' needs routing counts and {file} has none; use 'contiguous'")
    args = ModelArgs.load(checkpoint)
    return ShardingPlan(args.num_experts, ep, strategy="balanced", loads=loads, num_layers=args.num_layers)


def _default_device() -> torch.device:
    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    return torch.device("cpu")


class LLM:
    """Batched inference over a (possibly expert-parallel) `epkit.model.Mixtral`.

    Engine settings: `block_size` tokens per KV block; `kv_cache_memory` bytes of KV cache (default:
    on GPU, what `gpu_memory_utilization` of the card leaves after the weights and a profiled forward;
    on CPU 256 MiB); `max_num_seqs` rows and `max_num_batched_tokens` tokens per step (the prefill
    chunk); `long_prefill_tokens` caps one prompt's chunk while others wait (default a quarter of the
    budget); `strategy` places experts on EP ranks (`contiguous`, `round_robin`, or `balanced` from the
    routing counts stored with the checkpoint); `max_model_len` caps prompt + output (default: the
    model's max positions, and no more than the KV cache holds); `seed` seeds the per-request seeds of
    unseeded requests; `cuda_graphs` replays decode steps as CUDA graphs on GPUs (default on; False
    or EPKIT_CUDA_GRAPHS=0: eager).
    """

    def __init__(self, checkpoint: str, ep: int = 1, device=None, dtype=None, *, strategy: str = "contiguous",
                 tokenizer=None, **engine):
        from ..checkpoint import load_pretrained
        from ..parallel import init_distributed, world_size
        if not isinstance(ep, int) or ep < 1:
            raise ValueError(f"ep={ep!r} must be a positive integer")
        if ep > 1:
            init_distributed()
            if world_size() != ep:
                raise ValueError(f"ep={ep} needs exactly {ep} ranks, this run has {world_size()}; launch with "
                                 f"`deepspeed --num_gpus {ep}` or `torchrun --nproc_per_node {ep}`")
        device = torch.device(device) if device is not None else _default_device()
        dtype = dtype or (torch.bfloat16 if device.type == "cuda" else torch.float32)
        plan = balanced_plan(checkpoint, ep) if strategy == "balanced" and ep > 1 else None
        model, report = load_pretrained(checkpoint, device=device, dtype=dtype, ep_size=ep, plan=plan,
                                        strategy=strategy, dispatch="replicated", return_report=True)
        self.load_report = report
        if tokenizer is None:  # on every rank: a failure here must not leave the others in a collective
            tokenizer = load_tokenizer(checkpoint)
        self._setup(model.eval(), tokenizer, device, **engine)

    @classmethod
    def from_model(cls, model, tokenizer=None, **engine) -> "LLM":
        """Serve an already-built model (e.g. one made on meta and sharded with `apply_expert_parallel`)."""
        self = cls.__new__(cls)
        self.load_report = None
        self._setup(model.eval(), tokenizer, next(model.parameters()).device, **engine)
        return self

    def _setup(self, model, tokenizer, device, block_size: int = 16, kv_cache_memory: int | None = None,
               gpu_memory_utilization: float = 0.85, max_num_seqs: int = 256, max_num_batched_tokens: int = 2048,
               max_model_len: int | None = None, seed: int = 0, cuda_graphs: bool | None = None,
               long_prefill_tokens: int | None = None) -> None:
        info = getattr(model, "expert_parallel", None)
        if info is not None and info.plan.ep_size > 1 and info.dispatch != "replicated":
            raise ValueError(f"the engine needs dispatch='replicated' (every EP rank holds the same tokens), "
                             f"the model uses {info.dispatch!r}")
        self.model, self.tokenizer, self.device = model, tokenizer, torch.device(device)
        self.args = model.args
        self.dtype = next(model.parameters()).dtype
        if kv_cache_memory is None:
            kv_cache_memory = self._kv_budget(gpu_memory_utilization, max_num_batched_tokens)
        num_blocks = blocks_for_budget(self.args, kv_cache_memory, block_size, self.dtype)
        num_blocks = self._agree_min(num_blocks)
        self.cache = PagedKVCache(self.args, num_blocks, block_size, self.device, self.dtype)
        self.max_model_len = min(max_model_len or self.args.max_position_embeddings, self.cache.capacity_tokens)
        self.scheduler = Scheduler(BlockAllocator(num_blocks), block_size, max_num_seqs, max_num_batched_tokens,
                                   long_prefill_tokens)
        if cuda_graphs is None:
            cuda_graphs = os.environ.get("EPKIT_CUDA_GRAPHS", "1") != "0"
        self.runner = StepRunner(model, self.cache, self.device, cuda_graphs=cuda_graphs)
        self.is_leader = self.runner.is_leader
        self._rng = random.Random(seed)
        self._ids = 0
        self._outputs: dict[str, RequestOutput] = {}  # every request not yet handed back finished
        self._seqs: dict[str, Sequence] = {}
        self._pending: list[RequestOutput] = []  # updates not yet returned by step()
        self._incremental_text = True  # step()/stream() callers read text as it grows; generate() does not
        self.stats = {"steps": 0, "prompt_tokens": 0, "generated_tokens": 0, "busy_s": 0.0}

    # ---- sizing -----------------------------------------------------------------------------
    def _kv_budget(self, utilization: float, profile_tokens: int) -> int:
        if self.device.type != "cuda":
            return CPU_KV_BUDGET
        if not 0 < utilization <= 1:
            raise ValueError(f"gpu_memory_utilization={utilization} must be in (0, 1]")
        # Profile the largest forward a step can run (every EP rank joins: the MoE all-reduces).
        torch.cuda.synchronize(self.device)
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(self.device)
        base = torch.cuda.memory_allocated(self.device)
        n = min(profile_tokens, self.args.max_position_embeddings)
        tokens = torch.zeros(1, n, dtype=torch.long, device=self.device)
        with torch.no_grad():
            self.model(tokens, logits_rows=torch.tensor([n - 1], device=self.device))
        activations = torch.cuda.max_memory_allocated(self.device) - base
        torch.cuda.empty_cache()
        free, total = torch.cuda.mem_get_info(self.device)
        budget = int(utilization * total - (total - free) - activations)
        if budget <= 0:
            raise RuntimeError(f"no GPU memory left for the KV cache: {utilization=} of {total >> 20} MiB, "
                               f"{(total - free) >> 20} MiB in use, {activations >> 20} MiB for activations")
        return budget

    def _agree_min(self, n: int) -> int:
        """Every EP rank must hold the same block ids: take the smallest pool any rank can afford."""
        info = getattr(self.model, "expert_parallel", None)
        if info is None or info.plan.ep_size == 1:
            return n
        import torch.distributed as dist
        t = torch.tensor([n], dtype=torch.int64, device=self.device)
        dist.all_reduce(t, op=dist.ReduceOp.MIN, group=info.groups.ep_group)  # NOTE: collective, once
        return int(t.item())

    # ---- requests ---------------------------------------------------------------------------
    def _tokenize(self, prompt) -> tuple[str | None, list[int]]:
        """A prompt: text, a list of token ids, or a dict with "prompt" or "prompt_token_ids"."""
        if isinstance(prompt, dict):
            if "prompt_token_ids" in prompt and prompt["prompt_token_ids"] is not None:
                prompt = prompt["prompt_token_ids"]
            elif "prompt" in prompt:
                prompt = prompt["prompt"]
            else:
                raise ValueError(f"a request needs 'prompt' or 'prompt_token_ids', got keys {sorted(prompt)}")
        if isinstance(prompt, str):
            if not prompt:
                raise ValueError("empty prompt")
            if self.tokenizer is None:
                raise ValueError("a text prompt needs a tokenizer and the checkpoint has no tokenizer; "
                                 "send prompt_token_ids")
            return prompt, list(self.tokenizer(prompt)["input_ids"])
        if isinstance(prompt, torch.Tensor):
            prompt = prompt.tolist()
        if not isinstance(prompt, (list, tuple)):
            raise ValueError(f"a prompt must be text or a list of token ids, got {type(prompt).__name__}")
        if not prompt:
            raise ValueError("empty prompt (no token ids)")
        V = self.args.vocab_size
        for t in prompt:
            if isinstance(t, bool) or not isinstance(t, int) or not 0 <= t < V:
                raise ValueError(f"token id {t!r} is outside the vocabulary (size {V})")
        return None, list(prompt)

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
            text, ids = self._tokenize(prompt)
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
        self.scheduler.add(seq)
        return request_id

    def has_unfinished(self) -> bool:
        return self.scheduler.has_unfinished() or bool(self._pending)

    # ---- one step ---------------------------------------------------------------------------
    def step(self) -> list[RequestOutput]:
        """Run one scheduler step (leader). Returns the requests that changed, finished ones included."""
        updates, self._pending = self._pending, []
        if not self.scheduler.has_unfinished():
            return updates
        t0 = time.perf_counter()
        plan = self.scheduler.schedule()
        if not plan.rows:
            raise RuntimeError("the scheduler made no progress (KV cache too small for any waiting request)")
        batches, sampled = [], []
        bs = self.cache.block_size
        for rows in group_rows(plan.rows, MAX_BATCHES):
            B, T = len(rows), max(n for _, _, n in rows)
            NB = max(-(-(start + n) // bs) for _, start, n in rows)
            tokens, positions, table, logits_rows = [], [], [], []
            for i, (seq, start, n) in enumerate(rows):
                tokens += seq.token_ids[start: start + n] + [0] * (T - n)
                positions += list(range(start, start + n)) + [-1] * (T - n)
                table += seq.blocks[:NB] + [0] * (NB - min(NB, len(seq.blocks)))
                if start + n == seq.num_tokens:  # this chunk ends the known tokens: sample the next one
                    logits_rows.append(i * T + n - 1)
                    sampled.append(seq)
                seq.num_computed = start + n
                if seq.first_scheduled is None:
                    seq.first_scheduled = t0
            batches.append(Batch(B, T, NB, tokens, positions, table, logits_rows))
        self.stats["prompt_tokens"] += sum(n for s, start, n in plan.rows if start < s.prompt_len)
        logits = self.runner.execute(batches)
        if sampled:
            logits = torch.cat(logits) if len(logits) > 1 else logits[0]
            sb = SamplingBatch.from_params([s.params for s in sampled], [s.seed for s in sampled],
                                           [s.num_tokens - s.prompt_len for s in sampled], self.args.vocab_size)
            next_ids = sample(logits, sb).tolist()  # NOTE: host sync, once per step
            now = time.perf_counter()
            for seq, tok in zip(sampled, next_ids):
                updates.append(self._append(seq, tok, now))
        self.stats["steps"] += 1
        self.stats["busy_s"] += time.perf_counter() - t0
        return updates

    def _append(self, seq: Sequence, tok: int, now: float) -> RequestOutput:
        out, p = self._outputs[seq.request_id], seq.params
        seq.token_ids.append(tok)
        self.stats["generated_tokens"] += 1
        if seq.first_token is None:
            seq.first_token = now
        out.token_ids = seq.output_ids
        out.new_token_ids, out.new_text = [tok], None  # a step adds at most one token per request
        reason = None
        if (not p.ignore_eos and tok == self.args.eos_token_id) or tok in p.stop_token_ids:
            reason = "stop"
        if reason is None and seq.num_tokens >= seq.max_len:
            reason = "length"
        # Text: every step only when someone reads it (streaming) or stop strings need it, else at the end.
        # NOTE: a full decode of the output each time; O(n^2) over a long streamed output.
        if self.tokenizer is not None and (self._incremental_text or p.stop_strings or reason is not None):
            old = out.text or ""
            text = self.tokenizer.decode(out.token_ids, skip_special_tokens=p.skip_special_tokens)
            if reason in (None, "length") and p.stop_strings:
                hits = [i for i in (text.find(s, max(0, len(old) - len(s))) for s in p.stop_strings) if i >= 0]
                if hits:
                    text, reason = text[: min(hits)], "stop"
            if reason is None and p.stop_strings:
                # Hold back the tail that may be the start of a stop string: streamed text is never taken back.
                text = text[: max(0, len(text) - (max(len(s) for s in p.stop_strings) - 1))]
            out.text = text
            out.new_text = text[len(old):] if text.startswith(old) else text
        if reason is not None:
            self.scheduler.finish(seq, reason)
            seq.finished_at = now
            out.finish_reason = reason
            out.timings = self._timings(seq)
            del self._seqs[seq.request_id]
        return out

    @staticmethod
    def _timings(seq: Sequence) -> dict:
        n = seq.num_tokens - seq.prompt_len
        decode_s = seq.finished_at - seq.first_token
        return {"queue_s": round(seq.first_scheduled - seq.arrival, 6),
                "ttft_s": round(seq.first_token - seq.arrival, 6),
                "total_s": round(seq.finished_at - seq.arrival, 6),
                "decode_tokens_per_s": round((n - 1) / decode_s, 3) if n > 1 and decode_s > 0 else None,
                "prompt_tokens": seq.prompt_len, "generated_tokens": n, "preemptions": seq.num_preemptions}

    # ---- batch and streaming APIs -----------------------------------------------------------
    def _add_all(self, prompts, params) -> list[str]:
        if isinstance(prompts, (str, dict)) or (isinstance(prompts, (list, tuple)) and prompts
                                                and all(isinstance(t, int) for t in prompts)):
            prompts = [prompts]
        prompts = list(prompts)
        if isinstance(params, (list, tuple)):
            if len(params) != len(prompts):
                raise ValueError(f"{len(params)} sampling params for {len(prompts)} prompts")
        else:
            params = [params] * len(prompts)
        return [self.add_request(p, sp) for p, sp in zip(prompts, params)]

    def stream(self, prompts, params: SamplingParams | list | None = None) -> Iterator[RequestOutput]:
        """Yield an update each time a request gets tokens (`new_token_ids`, `new_text`) or finishes.

        Every rank iterates it; only rank 0 yields."""
        if not self.is_leader:
            self.follow()
            return
        ids: set[str] = set()
        try:
            ids = set(self._add_all(prompts, params))
            while any(not self._outputs[i].finished for i in ids):
                for out in self.step():
                    if out.request_id in ids:
                        yield dataclasses.replace(out)
        finally:
            self.release_followers()
            for i in ids:
                self._outputs.pop(i, None)

    def generate(self, prompts, params: SamplingParams | list | None = None, use_tqdm: bool = False
                 ) -> list[RequestOutput]:
        """All outputs, in prompt order (rank 0); other ranks run the steps and return []."""
        if not self.is_leader:
            self.follow()
            return []
        bar, ids = None, []
        self._incremental_text = False
        try:
            ids = self._add_all(prompts, params)
            if use_tqdm:
                from tqdm import tqdm
                bar = tqdm(total=len(ids), desc="generate", unit="req")
            while any(not self._outputs[i].finished for i in ids):
                done = sum(1 for out in self.step() if out.finished and out.request_id in ids)
                if bar is not None:
                    bar.update(done)
        finally:
            self._incremental_text = True
            self.release_followers()
            if bar is not None:
                bar.close()
        outs = [self._outputs.pop(i) for i in ids]
        for out in outs:
            out.new_token_ids, out.new_text = [], None
        return outs

    # ---- lock-step helpers ------------------------------------------------------------------
    def follow(self) -> None:
        """Non-leader ranks: run the leader's steps until it calls `release_followers()`."""
        self.runner.follow()

    def release_followers(self) -> None:
        self.runner.end()

    def expert_load(self) -> dict:
        """Routed real tokens per layer and expert, and per EP rank. Every rank must call it (collective)."""
        from ..parallel import gather_routing_counts, rank_loads
        self.runner.sync_routing_counts()
        counts = gather_routing_counts(self.model)
        loads = rank_loads(self.model, counts)
        per_rank = [sum(layer[r] for layer in loads) for r in range(len(loads[0]))]
        total = sum(per_rank) or 1.0
        return {"per_expert": counts, "per_rank_per_layer": loads, "per_rank": per_rank,
                "per_rank_share": [round(x / total, 4) for x in per_rank]}
