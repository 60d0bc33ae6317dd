"""The peers epkit's benchmarks measure against, built with given weights, and the library versions a
result records.

    build_transformers  transformers' own MixtralSparseMoeBlock (all experts, one GPU)
    build_deepspeed     deepspeed.moe.layer.MoE with Mixtral's routing and a SwiGLU expert

`shape` is bench/moe_layer.py's Shape (hidden, intermediate, experts, top_k); `w` holds the router [E, D],
w13 [E, 2I, D] (w1 rows then w3 rows) and w2 [E, D, I].
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

import epkit


@torch.no_grad()
def build_transformers(shape: Shape, w, device, dtype):
    """transformers' own MixtralSparseMoeBlock holding all experts (fused gate_up_proj / down_proj)."""
    from transformers import MixtralConfig
    from transformers.models.mixtral.modeling_mixtral import MixtralSparseMoeBlock
    cfg = MixtralConfig(hidden_size=shape.hidden, intermediate_size=shape.intermediate,
                        num_local_experts=shape.experts, num_experts_per_tok=shape.top_k, router_jitter_noise=0.0)
    cfg._experts_implementation = "eager"
    with torch.device("meta"):
        block = MixtralSparseMoeBlock(cfg)
    block = block.to(dtype).to_empty(device=device)
    block.gate.weight.copy_(w["gate"])
    block.experts.gate_up_proj.copy_(w["w13"])
    block.experts.down_proj.copy_(w["w2"])
    return block.eval()


class SwiGLU(nn.Module):
    """Mixtral's expert MLP (w1 gate, w3 up, w2 down), as DeepSpeed's MoE wants one expert module."""

    def __init__(self, hidden: int, intermediate: int, device=None, dtype=None):
        super().__init__()
        self.w1 = nn.Linear(hidden, intermediate, bias=False, device=device, dtype=dtype)
        self.w3 = nn.Linear(hidden, intermediate, bias=False, device=device, dtype=dtype)
        self.w2 = nn.Linear(intermediate, hidden, bias=False, device=device, dtype=dtype)

    def forward(self, x):
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


@torch.no_grad()
def build_deepspeed(shape: Shape, w, ep_size: int, ep_rank: int, device, dtype):
    """deepspeed.moe.layer.MoE with Mixtral's routing: top-2, no capacity drops, no sampled second
    expert, no random token selection. DeepSpeed places experts contiguously: rank r holds r*L..r*L+L-1."""
    from deepspeed.moe.layer import MoE as DeepSpeedMoE
    D, I = shape.hidden, shape.intermediate
    layer = DeepSpeedMoE(D, SwiGLU(D, I, device="meta", dtype=dtype), num_experts=shape.experts, ep_size=ep_size,
                         k=shape.top_k, drop_tokens=False, use_rts=False, top2_2nd_expert_sampling=False)
    layer = layer.to("meta").to(dtype).to_empty(device=device)
    layer.set_deepspeed_parallelism()  # joins the "ep_size_{ep}" group that setup_expert_parallel built
    layer.deepspeed_moe.gate.wg.weight.copy_(w["gate"])
    L = layer.num_local_experts
    for slot, expert in enumerate(layer.deepspeed_moe.experts.deepspeed_experts):
        e = ep_rank * L + slot
        expert.w1.weight.copy_(w["w13"][e, :I])
        expert.w3.weight.copy_(w["w13"][e, I:])
        expert.w2.weight.copy_(w["w2"][e])
    return layer.eval()


def versions() -> dict:
    """Versions of torch, epkit and the peers (a JSON result records them)."""
    v = {"torch": torch.__version__, "epkit": epkit.__version__,
         "cuda": torch.version.cuda, "nccl": None}
    if torch.cuda.is_available():
        try:
            v["nccl"] = ".".join(map(str, torch.cuda.nccl.version()))
        except Exception:
            pass
    for name in ("deepspeed", "transformers"):
        try:
            v[name] = __import__(name).__version__
        except Exception as e:
            v[name] = f"unavailable ({type(e).__name__})"
    return v
