"""One way to build a model, in one order, for training, serving, loading and benchmarks.

`build_model(args, plan, dispatch, device, dtype, load=None)`:
  1. build a `Mixtral` on the meta device (no memory);
  2. apply expert parallelism from `plan` (`epkit.parallel.apply_expert_parallel`: this rank keeps its
     experts, its MoE layers get the `dispatch` dispatcher); no plan: the plain single-device model;
  3. materialise on `device`: `load(model)` reads and assigns tensors (`checkpoint.load_pretrained`,
     which reads only this rank's experts), else empty tensors for the caller to fill
     (`Mixtral.init_weights`);
  4. retie the embeddings (`tie_word_embeddings`): materialising made two tensors of the tied one;
  5. mark the expert parameters for DeepSpeed: materialising made Parameters without the markers.

No rank ever holds more than its own experts, so Mixtral-8x7B at EP=2 fits where the whole model would not.
"""
from __future__ import annotations

from collections.abc import Callable

import torch

from .args import ModelArgs
from .model import Mixtral
from .plan import EXPERT_SPLITS


def build_model(args: ModelArgs, plan=None, dispatch: str = "all_to_all", device="cpu",
                dtype: torch.dtype | None = None, load: Callable[[Mixtral], None] | None = None,
                groups=None, split: str = "experts") -> Mixtral:
    """A Mixtral on `device`, sharded by `plan` (a `ShardingPlan`, or None for one device), its tensors read
    by `load` or left empty. `dtype` None: the checkpoint's (with `load`), else fp32. `groups`: the
    `parallel.ExpertGroups` to use (default: DeepSpeed's groups for the plan's EP size). `split` "rows":
    instead of whole experts by `plan`, every rank keeps a part of every expert's rows over the plan's EP size
    (`parallel.apply_expert_rows`; inference, replicated dispatch)."""
    if split not in EXPERT_SPLITS:
        raise ValueError(f"split={split!r} is not one of {', '.join(EXPERT_SPLITS)}")
    with torch.device("meta"):  # 1
        model = Mixtral(args, dtype=dtype)
    if plan is not None and split == "rows":  # 2
        from .parallel import apply_expert_rows, setup_expert_parallel
        apply_expert_rows(model, plan.ep_size, groups or setup_expert_parallel(plan.ep_size))
    elif plan is not None:
        from .parallel import apply_expert_parallel, setup_expert_parallel
        apply_expert_parallel(model, plan, groups or setup_expert_parallel(plan.ep_size), dispatch=dispatch)
    if load is not None:  # 3
        load(model)
    else:
        model.to_empty(device=torch.device(device))
    if args.tie_word_embeddings:  # 4
        model.lm_head.weight = model.embed.weight
    if model.expert_parallel is not None:  # 5
        from .parallel import mark_expert_params
        mark_expert_params(model)
    return model
