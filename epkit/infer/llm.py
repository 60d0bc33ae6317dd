"""`LLM`: the user-facing engine, the batch and streaming calls over the engine core (`engine.Engine`).

    llm = LLM("outputs/default", ep_size=2)            # inside `deepspeed --num_gpus 2 ...`
    outs = llm.generate(["Hello", [1, 15, 27]], SamplingParams(temperature=0, max_tokens=32))
    for out in llm.stream(prompts, params): print(out.new_text, end="")
    outs = llm.chat([[{"role": "user", "content": "Hi"}]], params)      # the tokenizer's chat template

Every rank calls the same method; rank 0 returns (or yields) the outputs, the other ranks run the steps.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Iterator

from .engine import Engine
from .request import RequestOutput
from .sampling import SamplingParams


class LLM(Engine):
    """Batched inference over a (possibly expert-parallel) `epkit.model.Mixtral`.

    Settings are an `EngineConfig` (`config`), its fields also accepted as keywords that override it:
    `ep_size` (alias `ep`), `device`, `dtype`, `strategy` (expert placement over EP ranks), `block_size`,
    `kv_cache_memory`, `gpu_memory_utilization`, `max_num_seqs`, `max_num_batched_tokens`,
    `long_prefill_tokens`, `max_tokens_while_decoding`, `max_model_len`, `cuda_graphs`, `seed`, `dp_attention`, `sync_free_max_tokens`,
    `dp_size` (alias `dp`: data-parallel replicas of `ep_size` ranks each, `epkit.infer.replicas`),
    `expert_split` (whole experts per rank, or a part of every expert's rows), `ep_all_reduce`;
    see `epkit/infer/config.py`. With `dp_attention` (EP > 1) each rank serves its own requests with its
    own KV cache and the experts exchange tokens by all-to-all (`epkit.infer.dp`; `max_num_seqs` and
    `max_num_batched_tokens` are then per rank) instead of every rank running every token's attention.
    The tokenizer is the checkpoint's (`epkit.tokenizer.load_tokenizer`) unless one is given.
    `lora` (a PEFT adapter directory, e.g. a `--lora-rank` run's final/) is merged into the weights at load,
    each rank merging only the experts it holds. `decode_kernels` picks the decode step's kernels
    (`epkit.infer.decode`) and `overlap` plans each step while the previous one runs (replicated mode).

    Sized from memory when left None: `max_num_batched_tokens` is 8192 on a GPU (2048 on CPU), halved
    while a step that size would take over a quarter of the memory left after the weights; the KV cache
    takes what `gpu_memory_utilization` leaves; `max_num_seqs` is as many sequences as it holds at 1024
    tokens each, in 16..512 (a decode step reads every expert from about 64 rows on, so more rows cost
    little until the KV cache runs out and sequences get preempted).
    """

    # ---- batch and streaming APIs -----------------------------------------------------------
    @staticmethod
    def as_lists(prompts, params) -> tuple[list, list]:
        """(prompts, params) as two lists of one entry per request (one prompt, or one params for all, spread)."""
        if isinstance(prompts, (str, dict)) or (isinstance(prompts, (list, tuple)) and prompts
                                                and all(isinstance(t, int) for t in prompts)):
            prompts = [prompts]
        prompts = list(prompts)
        if isinstance(params, (list, tuple)):
            if len(params) != len(prompts):
                raise ValueError(f"{len(params)} sampling params for {len(prompts)} prompts")
            return prompts, list(params)
        return prompts, [params] * len(prompts)

    def _add_all(self, prompts, params) -> list[str]:
        return [self.add_request(p, sp) for p, sp in zip(*self.as_lists(prompts, params))]

    def stream(self, prompts, params: SamplingParams | list | None = None) -> Iterator[RequestOutput]:
        """Yield an update each time a request gets tokens (`new_token_ids`, `new_text`) or finishes.

        Every rank iterates it; only rank 0 yields. Not with data-parallel replicas (use `generate`)."""
        if self.replicas is not None:
            raise ValueError(f"stream() serves one engine; with dp_size={self.config.dp_size} replicas use generate()")
        if not self.is_leader:
            self.follow()
            return
        ids: set[str] = set()
        try:
            ids = set(self._add_all(prompts, params))
            running = set(ids)
            while running:
                for out in self.step():
                    if out.request_id in ids:
                        if out.finished:
                            running.discard(out.request_id)
                        yield dataclasses.replace(out)
            self._drain()
        except GeneratorExit:  # the consumer stopped early: apply the step on its way, then abort below
            self._drain()
            raise
        finally:
            for i in ids:  # a consumer that stopped early: free its requests' blocks
                self.abort(i)
                self._outputs.pop(i, None)
            self._pending = [o for o in self._pending if o.request_id not in ids]
            self.release_followers()

    def generate(self, prompts, params: SamplingParams | list | None = None, use_tqdm: bool = False,
                 on_finish=None) -> list[RequestOutput]:
        """All outputs, in prompt order (rank 0); other ranks run the steps and return [].

        `on_finish(position, output)` is called as each request finishes (in finishing order), so a caller can
        keep finished results even if a later step fails. With data-parallel replicas (`dp_size` > 1) global
        rank 0's prompts are split over the replicas and its outputs are every replica's (`infer.replicas`)."""
        if self.replicas is not None:
            return self.replicas.generate(prompts, params, use_tqdm, on_finish)
        return self.generate_here(prompts, params, use_tqdm, on_finish)

    def generate_here(self, prompts, params: SamplingParams | list | None = None, use_tqdm: bool = False,
                      on_finish=None, between_steps=None) -> list[RequestOutput]:
        """`generate` on this engine alone (`between_steps()`: called by the leader after every step)."""
        if not self.is_leader:
            self.follow()
            return []
        bar, ids, done = None, [], {}
        self._incremental_text = False
        try:
            ids = self._add_all(prompts, params)
            if use_tqdm:
                from tqdm import tqdm
                bar = tqdm(total=len(ids), desc="generate", unit="req")
            wanted, position = set(ids), {rid: i for i, rid in enumerate(ids)}
            while len(done) < len(ids):
                new = {o.request_id: o for o in self.step()
                       if o.finished and o.request_id in wanted and o.request_id not in done}
                done.update(new)
                for rid, out in new.items():
                    if on_finish is not None:
                        on_finish(position[rid], out)
                if bar is not None:
                    bar.update(len(new))
                if between_steps is not None:
                    between_steps()
            self._drain()
        finally:
            self._incremental_text = True
            self.release_followers()
            if bar is not None:
                bar.close()
        outs = [done[i] for i in ids]
        for out in outs:
            out.new_token_ids, out.new_text = [], None
        return outs

    def chat(self, conversations, params: SamplingParams | list | None = None, use_tqdm: bool = False
             ) -> list[RequestOutput]:
        """`generate` for conversations (lists of {"role", "content"}), each rendered with the tokenizer's
        chat template and ready for the assistant's reply."""
        if conversations and isinstance(conversations[0], dict):
            conversations = [conversations]
        return self.generate([{"messages": c} for c in conversations], params, use_tqdm)

    def warmup(self) -> None:
        """Capture the decode CUDA graph of every rows bucket up to `max_num_seqs` (and compile the kernels)
        now rather than on first use, as a server does at start-up: each bucket's rows run one step as
        one-token prompts. Every rank calls it."""
        sizes = [1 << i for i in range(self.scheduler.max_num_seqs.bit_length()) if 1 << i < self.scheduler.max_num_seqs]
        for b in sizes + [self.scheduler.max_num_seqs]:
            self.generate_here([[self.args.bos_token_id or 1]] * b,
                               SamplingParams(temperature=0, max_tokens=1, ignore_eos=True))
