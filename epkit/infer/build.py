"""Random-weight models built straight on their devices, for demos and benchmarks.

`random_model(args, ep_size, device, dtype, seed)` builds through `epkit.build.build_model` (meta, experts
sharded with the replicated dispatch, only this rank's tensors materialised) and fills them from generators
seeded by the parameter name (and, for experts, the global expert id). So every rank holds the same shared
weights, and expert e holds the same numbers at any EP size: outputs agree across EP sizes.
"""
from __future__ import annotations

import torch

from ..build import build_model
from ..args import ModelArgs
from ..model import Mixtral
from ..plan import ShardingPlan


@torch.no_grad()
def random_model(args: ModelArgs, ep_size: int = 1, device="cpu", dtype=torch.float32, seed: int = 0,
                 std: float = 0.02, router_std: float | None = None, split: str = "experts") -> Mixtral:
    """A Mixtral with Normal(0, std) weights (norms 1), experts split over `ep_size` ranks (needs a
    distributed run of that size when > 1), whole (`split` "experts") or by rows. `router_std` widens the
    router (None: `std`)."""
    plan = ShardingPlan(args.num_experts, ep_size, num_layers=args.num_layers) if ep_size > 1 else None
    model = build_model(args, plan, "replicated", device, dtype, split=split)
    return model.init_weights(std, seed, router_std).eval()
