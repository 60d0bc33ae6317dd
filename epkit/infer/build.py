"""Random-weight models built straight on their devices, for demos and benchmarks.

`random_model(args, ep_size, device, dtype, seed)` builds on meta, shards the experts with the
replicated dispatch, materialises only this rank's tensors and fills them from generators seeded by
the parameter name (and, for experts, the global expert id). So every rank holds the same shared
weights, and expert e holds the same numbers at any EP size: outputs agree across EP sizes.
"""
from __future__ import annotations

import torch

from ..config import ModelArgs
from ..model import Mixtral


@torch.no_grad()
def random_model(args: ModelArgs, ep_size: int = 1, device="cpu", dtype=torch.float32, seed: int = 0,
                 std: float = 0.02, router_std: float | None = None) -> Mixtral:
    """A Mixtral with Normal(0, std) weights (norms 1), experts split over `ep_size` ranks (needs a
    distributed run of that size when > 1). `router_std` widens the router (None: `std`)."""
    from ..parallel import apply_expert_parallel, setup_expert_parallel
    from ..plan import ShardingPlan
    device = torch.device(device)
    with torch.device("meta"):
        model = Mixtral(args, dtype=dtype)
    if ep_size > 1:
        plan = ShardingPlan(args.num_experts, ep_size, num_layers=args.num_layers)
        apply_expert_parallel(model, plan, setup_expert_parallel(ep_size), dispatch="replicated")
    model.to_empty(device=device)
    if args.tie_word_embeddings:  # to_empty made two tensors of the tied one
        model.lm_head.weight = model.embed.weight
    model.init_weights(std, seed, router_std)
    return model.eval()
