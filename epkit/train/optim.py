"""The model, optimizer and DeepSpeed engine a fine-tune runs on, and the per-step gradient work (exact
clipping, reductions on the run's device).

Order:
  1. `epkit.build.build_model` (meta, shard, materialise, retie, mark): a checkpoint loads through
     `load_pretrained(ep_size=E, dispatch="all_to_all")` (each rank reads its own experts); a preset is then
     filled by `Mixtral.init_weights` (every tensor and expert drawn from its own seeded generator, so every
     EP size starts from the same weights);
  2. freeze what `--train-only` leaves out, or (`--lora-rank`) freeze the whole base and add LoRA adapters
     (`epkit.lora.apply_lora`; restored from the checkpoint when resuming: a LoRA checkpoint holds only them);
  3. AdamW over parameter groups where expert parameters form DeepSpeed's MoE groups
     (`split_params_into_different_moe_groups_for_optimizer`), warm-up + cosine LambdaLR;
  4. `deepspeed.initialize`, or Accelerate's `prepare` (its DeepSpeed plugin calls the same thing).

Gradients under EP x DP: the engine averages dense gradients over the world and expert gradients over
the expert-data-parallel group, dividing both by the world size (engine `_reduce_expert_gradients`,
ZeRO `average_tensor`). Each expert's gradient already sums its EP group's tokens (all-to-all), so
both are the gradient of the world-mean loss; tests/test_train_ep.py checks EP=1/2/4 agree.

Clipping: ZeRO 1/2 compute the exact global norm (checked on CPU in fp32 by the EP equality test).
ZeRO 0's `clip_grad_norm_` averages per-rank norms, which differ under EP (each rank sees other experts),
so with ZeRO 0 (fp32 or bf16) epkit clips itself with the exact norm (`clip_exact`) and DeepSpeed's
clipping is off. bf16 at ZeRO 0 (DeepSpeed 0.19.8): the engine wraps AdamW in FP16_UnfusedOptimizer
(`DDP_BFLOAT16`, loss scale 1), which copies the bf16 `p.grad` into the fp32 masters' gradients inside
`optimizer.step()`, i.e. after `clip_exact` scaled them, so AdamW sees the clipped gradients
(tests/test_train.py checks it on CPU). BF16_Optimizer, which accumulates `p.grad` into fp32 buffers
during backward (before `clip_exact` could act), comes only with ZeRO 1 and fp32 gradient accumulation,
where DeepSpeed clips; `uses_exact_clip` refuses it at ZeRO 0.

LoRA: the adapters are fp32 Parameters (their own fp32 masters; AdamW state exists for them only) over a
frozen base in the training dtype (bf16 on GPU). DeepSpeed's bf16 mode would cast them to bf16 and add
masters of its own, so it is off for LoRA runs: the engine then sees a plain fp32 optimizer over fp32
parameters, and leaves the frozen bf16 base as it is.
"""
from __future__ import annotations

import contextlib
import math
import os

import torch

from ..args import ModelArgs
from ..model import Mixtral
from ..build import build_model
from ..parallel import is_distributed, set_dispatch_capacity, world_size
from ..plan import ShardingPlan
from .config import TrainConfig


def resolve_dtype(cfg: TrainConfig) -> torch.dtype:
    if cfg.dtype == "bf16" or (cfg.dtype == "auto" and torch.cuda.is_available()):
        return torch.bfloat16
    return torch.float32


def model_args_for(cfg: TrainConfig) -> ModelArgs:
    if os.path.isdir(cfg.model):
        return ModelArgs.load(cfg.model)
    if os.path.sep in cfg.model or cfg.model.startswith("."):
        raise ValueError(f"--model {cfg.model!r}: no such checkpoint directory")
    return ModelArgs.from_name(cfg.model)


def plan_loads(cfg: TrainConfig) -> list[list[int]] | None:
    """Tokens per expert per layer for `--plan-strategy balanced`: the `routed_tokens` that --model's
    manifest records (a training run's checkpoint). Always --model's, never a --resume checkpoint's,
    so a resumed run places the experts as the run it continues did. None for other strategies."""
    if cfg.plan_strategy != "balanced" or not os.path.isdir(cfg.model):
        return None
    from ..checkpoint import Manifest
    manifest = Manifest.read(cfg.model)
    return (manifest.routed_tokens or None) if manifest is not None else None


def check_plan_strategy(cfg: TrainConfig) -> None:
    """`balanced` places experts by their measured load, which only a checkpoint that recorded routing has."""
    if cfg.plan_strategy == "balanced" and cfg.ep_size > 1 and plan_loads(cfg) is None:
        raise ValueError(f"--plan-strategy balanced places experts by their load (routed_tokens in the checkpoint's "
                         f"epkit_plan.json), and --model {cfg.model!r} records none; use a checkpoint written by "
                         f"epkit (e.g. a run's final/) or --plan-strategy contiguous/round_robin")


def model_for(cfg: TrainConfig, args: ModelArgs, device, dtype: torch.dtype = torch.float32,
              checkpoint: str | None = None) -> Mixtral:
    """The expert-parallel model on `device` in the training dtype (DeepSpeed's optimizer keeps fp32 masters),
    through `epkit.build.build_model` (a checkpoint: `load_pretrained`, which calls it), so no rank ever holds
    the whole model (Mixtral-8x7B at EP=2 fits where the full model would not)."""
    source = checkpoint or (cfg.model if os.path.isdir(cfg.model) else None)
    # EP=1 keeps the plain model: its experts are ordinary data-parallel parameters.
    plan = None
    if cfg.ep_size > 1 and os.path.isdir(cfg.model):  # placed from --model's manifest (see plan_loads)
        from ..checkpoint import checkpoint_plan
        plan = checkpoint_plan(cfg.model, args, cfg.ep_size, cfg.plan_strategy)
    elif cfg.ep_size > 1:
        plan = ShardingPlan(args.num_experts, cfg.ep_size, strategy=cfg.plan_strategy, num_layers=args.num_layers)
    if source is not None:
        from ..checkpoint import load_pretrained
        model = load_pretrained(source, device=device, dtype=dtype, ep_size=cfg.ep_size, plan=plan,
                                dispatch="all_to_all")
    else:
        model = build_model(args, plan, "all_to_all", device, dtype).init_weights(seed=cfg.seed)
    if plan is not None and cfg.all_to_all == "fixed_capacity":
        # every rank trains (and evaluates) micro-batches of one shape, micro_batch x seq_len tokens
        set_dispatch_capacity(model, cfg.micro_batch * cfg.seq_len)
    model.activation_checkpointing = cfg.activation_checkpointing
    return model


def compile_dense(model: Mixtral) -> Mixtral:
    """torch.compile (inductor) over the elementwise-heavy dense parts of every decoder layer: its attention block
    (RMSNorm, q/k/v, rotary, SDPA, o) and its MoE's RMSNorm, and the final norm. The MoE itself stays eager: its
    dispatch holds collectives and data-dependent sizes, and its SwiGLU and combine are fused kernels already
    (epkit.moe_kernels). Parameters and state-dict names are unchanged (only bound methods are replaced)."""
    for layer in model.layers:
        layer.attention = torch.compile(layer.attention, fullgraph=True)
        layer.moe_norm.forward = torch.compile(layer.moe_norm.forward, fullgraph=True)
    model.norm.forward = torch.compile(model.norm.forward, fullgraph=True)
    return model


@torch.no_grad()
def freeze(model: Mixtral, train_only: str) -> dict[str, int]:
    """Leave only `train_only` trainable ('none' trains everything); returns trainable counts by part."""
    def part(name: str) -> str:
        if ".attn." in name:
            return "attention"
        if ".moe.gate." in name:
            return "router"
        if ".moe.experts." in name:
            return "experts"
        return "other"

    counts: dict[str, int] = {}
    for name, p in model.named_parameters():
        train = train_only == "none" or part(name) == train_only
        p.requires_grad_(train)
        if train:
            counts[part(name)] = counts.get(part(name), 0) + p.numel()
    if not counts:
        raise ValueError(f"--train-only={train_only!r} leaves no parameter trainable")
    return counts


def make_trainable(model: Mixtral, cfg: TrainConfig, resume_from: str | None = None) -> dict[str, int]:
    """Freeze what `--train-only` leaves out, or freeze the base and add `--lora-rank` adapters (restored from
    `resume_from`); returns trainable parameter counts by part."""
    if cfg.lora_rank is not None:
        from ..lora import apply_lora
        counts = apply_lora(model, cfg.lora_spec(), seed=cfg.seed)
        if resume_from is not None:
            from ..lora_io import load_adapter
            load_adapter(model, resume_from)
    else:
        counts = freeze(model, cfg.train_only)
    if not any(p.requires_grad for moe in model.moe_layers() for p in moe.experts.parameters()):
        # No expert parameter trains, so no expert gradient needs reducing: DeepSpeed must see a dense model,
        # or ZeRO asserts that MoE layers come with MoE optimizer groups. Drop the borrowed DeepSpeed MoE type
        # (epkit.parallel._deepspeed_moe_class: epkit's MoE first in the MRO); forward is unchanged.
        from ..moe import MoE
        for moe in model.moe_layers():
            if type(moe) is not MoE and issubclass(type(moe), MoE):
                moe.__class__ = MoE
    return counts


def param_groups(model: Mixtral, weight_decay: float) -> list[dict]:
    """AdamW groups (decay / no decay for norms), with expert parameters split into DeepSpeed MoE groups."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            (no_decay if name.endswith("norm.weight") else decay).append(p)
    groups = [{"params": decay, "weight_decay": weight_decay, "name": "decay"},
              {"params": no_decay, "weight_decay": 0.0, "name": "no_decay"}]
    groups = [g for g in groups if g["params"]]
    if any(hasattr(p, "allreduce") and not p.allreduce for g in groups for p in g["params"]):
        from deepspeed.moe.utils import split_params_into_different_moe_groups_for_optimizer
        groups = split_params_into_different_moe_groups_for_optimizer(groups)
        groups = [g for g in groups if g["params"]]
    return groups


def lr_lambda(cfg: TrainConfig):
    """Linear warm-up to 1, then cosine down to min_lr_ratio at max_steps."""
    def f(step: int) -> float:
        if step < cfg.warmup_steps:
            return (step + 1) / (cfg.warmup_steps + 1)
        span = max(1, cfg.max_steps - cfg.warmup_steps)
        progress = min(1.0, (step - cfg.warmup_steps) / span)
        return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))
    return f


def _merge(base: dict, user: dict) -> dict:
    """`user` values override `base`, recursively; "auto" leaves epkit's value."""
    out = dict(base)
    for k, v in user.items():
        if v == "auto":
            continue
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


# ZeRO 2: gradients reduce-scatter in 200M-element buckets (400 MB in bf16) on a side stream while backward
# runs (overlap_comm), into one contiguous buffer. DeepSpeed's defaults are 500M-element buckets and no
# overlap. configs/deepspeed/zero2.json spells the same values.
ZERO2_DEFAULTS = {"overlap_comm": True, "contiguous_gradients": True, "reduce_scatter": True,
                  "reduce_bucket_size": 200_000_000, "allgather_bucket_size": 200_000_000}


def deepspeed_config(cfg: TrainConfig, dtype: torch.dtype, base: dict | None = None) -> dict:
    """The engine config from epkit's settings; a `--deepspeed-config` file (or Accelerate's, `base`) may add
    or override keys, except that clipping is always epkit's (see the module doc)."""
    ds = {
        "train_micro_batch_size_per_gpu": cfg.micro_batch,
        "gradient_accumulation_steps": cfg.grad_accum,
        "train_batch_size": cfg.micro_batch * cfg.grad_accum * world_size(),
        "zero_optimization": {"stage": 0},
        "zero_allow_untested_optimizer": True,
        "bf16": {"enabled": dtype == torch.bfloat16},
        "steps_per_print": 1 << 30,
        "wall_clock_breakdown": False,
    }
    user = dict(base or {})
    if cfg.deepspeed_config:
        import json
        if not os.path.isfile(cfg.deepspeed_config):
            raise ValueError(f"--deepspeed-config {cfg.deepspeed_config!r}: no such file")
        with open(cfg.deepspeed_config) as f:
            user = _merge(user, json.load(f))
    # epkit's own flags win over the files for what they name
    for key in ("train_micro_batch_size_per_gpu", "gradient_accumulation_steps", "train_batch_size"):
        user.pop(key, None)
    ds = _merge(ds, user)
    if cfg.zero_stage is not None:
        ds["zero_optimization"]["stage"] = cfg.zero_stage
    if ds["zero_optimization"]["stage"] not in (0, 1, 2):
        raise ValueError(f"ZeRO stage {ds['zero_optimization']['stage']} is not supported; use 0, 1 or 2")
    if ds["zero_optimization"]["stage"] == 2:  # what the files leave unset
        ds["zero_optimization"] = {**ZERO2_DEFAULTS, **ds["zero_optimization"]}
    # ZeRO 0 clips in epkit (exact norm under EP); ZeRO 1/2 clip in DeepSpeed (exact there).
    ds["gradient_clipping"] = cfg.grad_clip if ds["zero_optimization"]["stage"] > 0 else 0.0
    if cfg.lora_rank is not None:  # fp32 adapters are their own masters (module doc)
        ds["bf16"], ds["fp16"] = {"enabled": False}, {"enabled": False}
    return ds


def uses_exact_clip(engine) -> bool:
    """True with ZeRO 0: the engine has reduced the gradients into p.grad (fp32, or bf16 under DeepSpeed's
    bf16 wrapper) before `engine.step()`, so epkit measures and clips them there."""
    if engine.zero_optimization_stage() != 0:
        return False
    from deepspeed.runtime.bf16_optimizer import BF16_Optimizer
    if isinstance(engine.optimizer, BF16_Optimizer):
        # its fp32 gradient buffers are filled in backward: scaling p.grad afterwards would not clip them
        raise ValueError("ZeRO 0 with DeepSpeed's BF16_Optimizer (fp32 gradient accumulation) is not supported: "
                         "epkit's exact clipping would not reach its fp32 gradients; use --zero-stage 1 or 2")
    return True


def reduce_on_device(t: torch.Tensor, device, group=None) -> torch.Tensor:
    """Sum `t` over `group` (default: the world) on `device`; returns the reduced tensor (`t` itself when it is
    already there). Every collective of epkit/train goes through here: NCCL takes only CUDA tensors, gloo
    CPU ones, so the tensor must sit on the device the run computes on. A world of one returns `t` moved."""
    t = t.to(device)
    if is_distributed():
        import torch.distributed as dist
        dist.all_reduce(t, group=group)  # NOTE: collective
    return t


@torch.no_grad()
def clip_exact(model: Mixtral, max_norm: float) -> float:
    """Global gradient norm (dense params counted once, each expert once), then clip. Call after the engine
    has reduced the gradients (every rank then holds the averaged dense and its experts' gradients).

    Squared norms accumulate on the gradients' device; one all-reduce of the experts' share over the
    expert-parallel group (each expert once: the group splits the experts between its ranks; dense gradients
    are equal on every rank and counted once), then one read of the norm. NOTE: collective (EP > 1)."""
    dense, expert = [], []
    for p in model.parameters():
        if p.grad is not None:
            (expert if getattr(p, "allreduce", True) is False else dense).append(p.grad)
    device = next(model.parameters()).device

    def squared(grads):  # sum of squared norms, fp64, on device
        if not grads:
            return torch.zeros((), dtype=torch.float64, device=device)
        norms = torch._foreach_norm(grads, 2, dtype=torch.float32)
        return torch.stack(norms).double().pow(2).sum().to(device)

    dense_sq, expert_sq = squared(dense), squared(expert)
    info = model.expert_parallel
    if info is not None and info.plan.ep_size > 1:
        expert_sq = reduce_on_device(expert_sq.reshape(1), device, group=info.groups.ep_group)[0]
    norm = float((dense_sq + expert_sq).sqrt())  # the one device-to-host sync
    if max_norm > 0 and norm > max_norm:
        torch._foreach_mul_(dense + expert, max_norm / (norm + 1e-6))
    return norm


def adamw(groups: list[dict], cfg: TrainConfig, device) -> torch.optim.AdamW:
    """torch's AdamW; on CUDA its fused kernel (one launch for all tensors of a step, same update rule).
    The CPU keeps the default implementation, which the CPU equality tests were written against."""
    fused = torch.device(device).type == "cuda"
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=tuple(cfg.betas), eps=1e-8, fused=fused or None)


def initialize(cfg: TrainConfig, model: Mixtral, dtype: torch.dtype, accelerator=None):
    """(engine, optimizer, scheduler) through DeepSpeed, or Accelerate's DeepSpeed plugin when given."""
    groups = param_groups(model, cfg.weight_decay)
    optimizer = adamw(groups, cfg, next(model.parameters()).device)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(cfg))
    if accelerator is not None:
        plugin = accelerator.state.deepspeed_plugin
        ds = deepspeed_config(cfg, dtype, base=plugin.deepspeed_config)
        plugin.deepspeed_config.clear()
        plugin.deepspeed_config.update(ds)
        engine, optimizer, prepared = accelerator.prepare(model, optimizer, scheduler)
        # Accelerate hands DeepSpeed only DeepSpeed's own schedulers and wraps ours (its wrapper would step it
        # once per process per call): give it to the engine, which steps it at each optimizer step and saves
        # its state, exactly as on the deepspeed path.
        if engine.lr_scheduler is None:
            engine.lr_scheduler = getattr(prepared, "scheduler", prepared)
        return engine, optimizer, engine.lr_scheduler
    ds = deepspeed_config(cfg, dtype)
    import deepspeed
    engine, optimizer, _, scheduler = deepspeed.initialize(model=model, optimizer=optimizer, lr_scheduler=scheduler,
                                                           config=ds, dist_init_required=False)
    return engine, optimizer, scheduler


@contextlib.contextmanager
def trained_engine(cfg: TrainConfig, model: Mixtral, dtype: torch.dtype, accelerator=None):
    """`initialize`'s (engine, optimizer, scheduler) for the `with` block; afterwards, also when it raises,
    `engine.destroy()`. DeepSpeed registers the engine in a hook that outlives it, so without this the model,
    its gradients and the optimizer's fp32 states stay allocated for the rest of the process (a fine-tune
    followed by serving in the same Python process kept the training memory on the GPU)."""
    engine, optimizer, scheduler = initialize(cfg, model, dtype, accelerator)
    try:
        yield engine, optimizer, scheduler
    finally:
        engine.destroy()
