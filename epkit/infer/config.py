"""Inference engine settings: one dataclass, read by `LLM` and by `launch/infer.py`, whose flags are generated
from its fields (`epkit.settings`); configs/infer/default.yaml gives the command line's defaults.

    LLM(path, ep_size=2, max_num_seqs=64)                    # settings as keywords (`ep`, `dp` are accepted too)
    LLM(path, EngineConfig(block_size=32), seed=1)           # or a config, keywords overriding it
"""
from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass

import torch

from ..plan import EXPERT_SPLITS, STRATEGIES
from ..settings import setting

DTYPES = {"auto": None, "bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


@dataclass
class EngineConfig:
    # where the model runs
    ep_size: int | None = setting(1, "expert-parallel size: ranks that split the experts of one engine (null: the "
                                     "launched ranks / dp)", flag="ep")
    dp_size: int = setting(1, "data-parallel replicas: the launched ranks are dp engines of ep ranks each (ep x dp "
                              "must be the launched ranks); generate() splits the prompts over them", flag="dp")
    device: str | None = setting(None, "cuda:N or cpu (default: this rank's GPU, else cpu)")
    dtype: str = setting("auto", "auto (bf16 on GPU, fp32 on CPU), bf16, fp16 or fp32", choices=tuple(DTYPES))
    strategy: str = setting("contiguous", "expert placement over EP ranks: contiguous, round_robin or balanced "
                                          "(by the routing counts stored with the checkpoint)", choices=STRATEGIES)
    # memory and batching
    block_size: int = setting(16, "tokens per KV-cache block")
    kv_cache_memory: int | None = setting(None, "bytes of KV cache (default: what gpu_memory_utilization of the GPU "
                                                "leaves after the weights and a profiled forward; 256 MiB on CPU)",
                                          cli=False)
    gpu_memory_utilization: float = setting(0.85, "share of the GPU the weights, activations and KV cache may use")
    max_num_seqs: int | None = setting(None, "most sequences in one step (default: as many as the KV cache holds at "
                                             "1024 tokens each, 16..512)")
    max_num_batched_tokens: int | None = setting(None, "most tokens in one step, the chunked-prefill budget (default: "
                                                       "8192 on a GPU, less if its activations would not fit a "
                                                       "quarter of the memory after the weights; 2048 on CPU)")
    long_prefill_tokens: int | None = setting(None, "most tokens of one prompt's chunk while others wait (default: a "
                                                    "quarter of the step budget)")
    max_tokens_while_decoding: int | None = setting(None, "most tokens in a step that also decodes: bounds running "
                                                          "requests' inter-token latency while prompts prefill "
                                                          "(default: max_num_batched_tokens)")
    max_model_len: int | None = setting(None, "prompt + output cap (default: the model's max positions, within the "
                                              "KV cache)")
    cuda_graphs: bool | None = setting(None, "replay decode steps as CUDA graphs on GPUs (default on; "
                                             "EPKIT_CUDA_GRAPHS=0 turns it off)")
    decode_kernels: str | None = setting(None, "the decode step's kernels: auto (triton on GPUs, torch on CPUs), "
                                               "reference, torch, triton or compile (epkit/infer/decode.py; "
                                               "default: EPKIT_DECODE_KERNELS, else auto)",
                                         choices=("auto", "reference", "torch", "triton", "compile"))
    overlap: bool = setting(True, "plan each step while the previous one runs on the GPU (replicated mode)")
    seed: int = setting(0, "seeds the per-request seeds of requests that set none", cli=False)
    dist_timeout: float = setting(120.0, "seconds a collective waits for the other EP ranks; then the job ends with "
                                         "a line naming the rank that stopped answering")
    follower_wait: float | None = setting(None, "seconds EP followers wait for the leader's next step (None: "
                                                "dist_timeout); a server waits unbounded: its watchdog decides",
                                          cli=False)
    # expert parallelism (README: Serving modes)
    dp_attention: bool = setting(False, "with ep > 1: each rank serves its own requests (its own KV cache, attention "
                                        "for its own tokens) and the experts exchange tokens by all-to-all; "
                                        "max_num_seqs and max_num_batched_tokens are then per rank")
    expert_split: str = setting("experts", "with ep > 1: experts (each rank holds whole experts of the plan) or rows "
                                           "(each holds 1/ep of every expert's rows: the same memory, every "
                                           "rank does an equal share of every token's experts; for small-batch "
                                           "decode; replicated mode, no LoRA)", choices=EXPERT_SPLITS)
    ep_all_reduce: str = setting("auto", "replicated mode's sum over EP ranks: auto (symm_mem on CUDA GPUs, else "
                                         "nccl), nccl, or symm_mem (torch's one-shot kernel over NVLink: one "
                                         "kernel per layer, for sums up to 8 MiB)",
                                 choices=("auto", "nccl", "symm_mem"))
    sync_free_max_tokens: int = setting(256, "dp attention: forwards of up to this many tokens per rank use the "
                                             "fixed-capacity all-to-all (no host sync, CUDA graphs), larger ones "
                                             "the uneven one")

    def replace(self, **settings) -> "EngineConfig":
        """A copy with `settings` changed (`ep`, `dp` are accepted for `ep_size`, `dp_size`); an unknown name is an
        error."""
        for short in ("ep", "dp"):
            if short in settings:
                settings[f"{short}_size"] = settings.pop(short)
        unknown = sorted(set(settings) - {f.name for f in dataclasses.fields(self)})
        if unknown:
            raise TypeError(f"unknown engine setting(s) {', '.join(unknown)}; see epkit.infer.EngineConfig")
        return dataclasses.replace(self, **settings)

    def check(self) -> None:
        """Settings that are wrong whatever the model: one sentence naming the value (the KV cache and the
        scheduler check their own sizes)."""
        if self.ep_size is not None and (not isinstance(self.ep_size, int) or self.ep_size < 1):
            raise ValueError(f"ep_size={self.ep_size!r} must be a positive integer")
        if isinstance(self.dp_size, bool) or not isinstance(self.dp_size, int) or self.dp_size < 1:
            raise ValueError(f"dp_size={self.dp_size!r} must be a positive integer")
        if not (isinstance(self.dtype, torch.dtype) or self.dtype in DTYPES):
            raise ValueError(f"dtype={self.dtype!r} is not one of {', '.join(DTYPES)}")
        if self.strategy not in STRATEGIES:
            raise ValueError(f"strategy={self.strategy!r} is not one of {', '.join(STRATEGIES)}")
        if self.expert_split not in EXPERT_SPLITS:
            raise ValueError(f"expert_split={self.expert_split!r} is not one of {', '.join(EXPERT_SPLITS)}")
        if self.expert_split == "rows" and self.dp_attention:
            raise ValueError("expert_split='rows' needs the replicated mode: every rank computes every token's "
                             "experts on its rows; drop --dp-attention or use --expert-split experts")
        if self.max_model_len is not None and (isinstance(self.max_model_len, bool)
                                               or not isinstance(self.max_model_len, int) or self.max_model_len < 1):
            raise ValueError(f"max_model_len={self.max_model_len!r} must be a positive integer")
        if isinstance(self.dist_timeout, bool) or not isinstance(self.dist_timeout, (int, float)) \
                or not self.dist_timeout > 0:
            raise ValueError(f"dist_timeout={self.dist_timeout!r} must be a positive number of seconds")
        if isinstance(self.sync_free_max_tokens, bool) or not isinstance(self.sync_free_max_tokens, int) \
                or self.sync_free_max_tokens < 0:
            raise ValueError(f"sync_free_max_tokens={self.sync_free_max_tokens!r} must be an integer >= 0")
        self.resolve_device()  # a bad device name, or CUDA this machine lacks: one sentence

    def check_model(self, args) -> None:
        """Settings the model bounds (`args`: its ModelArgs), before its weights are read."""
        if self.max_model_len is not None and self.max_model_len > args.max_position_embeddings:
            raise ValueError(f"max_model_len={self.max_model_len} is beyond the model's context "
                             f"(max_position_embeddings={args.max_position_embeddings})")

    def resolve_ep_size(self) -> int:
        """`ep_size`, or the launched ranks / `dp_size` when it is None."""
        return self.ep_size or max(1, int(os.environ.get("WORLD_SIZE", 1)) // self.dp_size)

    def check_world(self, world: int, ep: int | None = None) -> None:
        """ep x dp must be the launched ranks (`world`): else one sentence, raised on every rank alike before any
        collective. `ep`: the size of an already-built model (default: `resolve_ep_size()`)."""
        ep = ep or self.resolve_ep_size()
        if ep * self.dp_size != world:
            hint = f", or pass --dp {world // ep}" if world % ep == 0 and world > ep else ""
            raise ValueError(f"--ep {ep} x --dp {self.dp_size} = {ep * self.dp_size} rank(s), but {world} rank(s) were "
                             f"launched; launch ep x dp ranks (e.g. deepspeed --num_gpus {ep * self.dp_size}){hint}")

    def resolve_device(self) -> torch.device:
        from ..runtime import rank_device
        return rank_device(self.device)

    def resolve_dtype(self, device: torch.device) -> torch.dtype:
        """`dtype` as a torch dtype; auto: bf16 on GPUs, fp32 on CPUs."""
        if isinstance(self.dtype, torch.dtype):
            return self.dtype
        return DTYPES[self.dtype] or (torch.bfloat16 if device.type == "cuda" else torch.float32)
