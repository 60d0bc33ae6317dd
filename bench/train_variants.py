"""What bench/train.py trains: the shape, the data, and each variant's model, engine and loss.

Every variant's model goes through epkit's `initialize` (torch AdamW, fused on CUDA, over the same parameter groups
rule; the same LambdaLR; `deepspeed_config`: ZeRO stage, overlap_comm, buckets, bf16, clipping), so the
optimizer and DeepSpeed settings are the same by construction; only the model and its loss differ:

  epkit_ep2           epkit's Mixtral, experts split over 2 ranks, all-to-all dispatch (the training path)
  epkit_ep2_fixed_capacity
                      the same with the fixed-capacity all-to-all (--all-to-all fixed_capacity: every token
                      to every EP rank in fixed-size blocks, no host sync per layer; fp32 partial sums back)
  epkit_ep1           the same model with every expert on every rank (plain data parallel)
  transformers_zero2  transformers' MixtralForCausalLM (sdpa attention, grouped_mm experts on GPU), plain
                      data parallel; its own loss (logits materialised) + its load-balancing loss
  epkit_ep2_reference epkit_ep2 with the loss as computed before issue 12 (attention with a materialised
                      mask, full [N, V] logits, fp32 cross-entropy): same weights and tokens, so its loss
                      curve must match epkit_ep2's to bf16 noise; its speed is the "before" figure
  deepspeed_moe_ep2   transformers' Mixtral with each sparse block replaced by deepspeed.moe.layer.MoE at
                      ep_size=2: top-2, drop_tokens=False (no capacity drops), no random token selection,
                      no sampled second expert, SwiGLU experts; loss + DeepSpeed's l_aux per layer

Legend: L layers, T sequence length, B micro batch, A gradient accumulation, V vocab, E experts, K top-k.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch
from torch import nn

from epkit import ModelArgs

# the comparison the issue asks for first: if a time limit cuts the run short, the JSON already holds it
DEFAULT_VARIANTS = ("epkit_ep2", "transformers_zero2", "deepspeed_moe_ep2", "epkit_ep1", "epkit_ep2_fixed_capacity")
VARIANTS = DEFAULT_VARIANTS + ("epkit_ep2_reference", "epkit_ep4", "epkit_ep1_compile", "epkit_ep2_compile",
                              "epkit_ep1_unfused")  # epkit_ep4: 4 ranks (or 8: EP=4 x DP=2)


@dataclass
class Setup:
    args: ModelArgs
    seq_len: int
    micro_batch: int
    grad_accum: int
    steps: int
    warmup: int
    profile_steps: int
    lr: float
    seed: int
    activation_checkpointing: str
    zero_stage: int
    device: torch.device
    dtype: torch.dtype

    @classmethod
    def create(cls, a, device, dtype) -> "Setup":
        base = "tiny" if a.cpu else "mixtral-8x7b"
        args = ModelArgs.from_name(base, num_layers=a.layers)
        args.max_position_embeddings = max(args.max_position_embeddings, a.seq_len)
        return cls(args, a.seq_len, a.micro_batch, a.grad_accum, a.steps, a.warmup, a.profile_steps, a.lr, a.seed,
                   a.activation_checkpointing, a.zero_stage, device, dtype)

    @property
    def active_params(self) -> int:
        """Weights one token multiplies by: attention, router, K experts per layer, and the LM head."""
        a = self.args
        attn = a.hidden_size * a.head_dim * 2 * (a.num_heads + a.num_kv_heads)  # q, o and k, v
        per_layer = attn + a.hidden_size * a.num_experts + a.experts_per_token * 3 * a.hidden_size * a.intermediate_size
        return a.num_layers * per_layer + a.vocab_size * a.hidden_size

    @property
    def flops_per_token(self) -> int:
        """Forward + backward: 6 x active params, plus causal attention's scores and values."""
        a = self.args
        return 6 * self.active_params + 6 * a.num_layers * self.seq_len * a.num_heads * a.head_dim

    def tokens_per_step(self, world: int) -> int:
        return self.micro_batch * self.seq_len * self.grad_accum * world

    def train_config(self, ep: int, all_to_all: str = "exact"):
        from epkit.train import TrainConfig
        return TrainConfig(model="tiny", ep_size=ep, all_to_all=all_to_all, zero_stage=self.zero_stage,
                           max_steps=self.steps + self.profile_steps, seq_len=self.seq_len,
                           micro_batch=self.micro_batch, grad_accum=self.grad_accum, lr=self.lr, warmup_steps=0,
                           grad_clip=1.0, seed=self.seed, activation_checkpointing=self.activation_checkpointing,
                           progress=False)

    def describe(self) -> dict:
        a = self.args
        return {"layers": a.num_layers, "hidden": a.hidden_size, "intermediate": a.intermediate_size,
                "experts": a.num_experts, "top_k": a.experts_per_token, "heads": a.num_heads,
                "kv_heads": a.num_kv_heads, "head_dim": a.head_dim, "vocab": a.vocab_size, "seq_len": self.seq_len,
                "micro_batch": self.micro_batch, "grad_accum": self.grad_accum, "steps": self.steps,
                "timed_steps": self.steps - self.warmup, "warmup_steps": self.warmup,
                "profile_steps": self.profile_steps, "lr": self.lr, "seed": self.seed, "zero_stage": self.zero_stage,
                "dtype": str(self.dtype).replace("torch.", ""), "activation_checkpointing_epkit":
                self.activation_checkpointing, "optimizer": "torch AdamW (fused on CUDA), betas 0.9/0.95, wd 0.01, "
                "cosine from lr without warm-up, clip 1.0",
                "data": "token ids drawn i.i.d. from p(k) ~ 1/(k+10) (seeded per rank and micro-step); every row "
                        "holds positions 0..T-1, labels = tokens"}


def split_variant(name: str, zero_stage: int) -> tuple[str, int]:
    """"epkit_ep1@z1" -> ("epkit_ep1", 1): a variant with its own ZeRO stage; no suffix: `zero_stage`."""
    base, _, stage = name.partition("@z")
    return base, int(stage) if stage.isdigit() else (zero_stage if not stage else -1)


def make_batches(s: Setup, rank: int, world: int, steps: int) -> list[list[dict]]:
    """[step][micro] -> {"tokens", "labels", "positions"} [B, T] on the device: this rank's rows, the same
    for every variant (drawn on the CPU from seed, step, micro-step and rank)."""
    V, B, T = s.args.vocab_size, s.micro_batch, s.seq_len
    probs = 1.0 / (torch.arange(V, dtype=torch.float64) + 10.0)
    out = []
    for step in range(steps):
        micro = []
        for m in range(s.grad_accum):
            g = torch.Generator().manual_seed(s.seed * 1_000_003 + (step * s.grad_accum + m) * world + rank)
            tokens = torch.multinomial(probs, B * T, replacement=True, generator=g).view(B, T)
            micro.append({"tokens": tokens.to(s.device), "labels": tokens.to(s.device),
                          "positions": torch.arange(T).expand(B, T).to(s.device)})
        out.append(micro)
    return out


# ---- the variants: each builds its model (no collective) and says how to take its loss ------------------

@dataclass
class Built:
    """A variant's model before `epkit.train.optim.initialize` wraps it (the same call for every variant,
    with `cfg`), and `loss_fn(engine, batch) -> (loss to backpropagate, LM loss)`."""

    model: nn.Module
    cfg: object  # TrainConfig
    loss_fn: Callable
    notes: dict = field(default_factory=dict)
    fused_kernels: bool = True  # epkit.moe.FUSED_KERNELS while this variant trains


def build_epkit(s: Setup, ep: int, reference: bool = False, all_to_all: str = "exact",
                compile_dense: bool = False, fused: bool = True) -> Built:
    from epkit.train.optim import freeze, model_for
    from epkit.train.loop import lm_and_router_losses
    cfg = s.train_config(ep, all_to_all)
    model = model_for(cfg, s.args, s.device, s.dtype)  # EP groups exist already (bench/train.py main)
    freeze(model, "none")
    aux = s.args.router_aux_loss_coef

    def loss_fn(engine, batch):
        # make_batches' rows are 0..T-1: causal attention without a mask, as the loop picks for such rows
        loss, parts = lm_and_router_losses(engine, batch, aux, 0.0, causal=True)
        return loss, parts[0] / parts[1].clamp(min=1)

    if reference:
        loss_fn = _reference_loss(s.args)
    if compile_dense:
        from epkit.train.optim import compile_dense as compile_layers
        compile_layers(model)
    notes = {"ep_size": ep, "loss_path": "reference (mask, full logits)" if reference else
             "causal SDPA, chunked linear cross-entropy",
             "dispatch": f"all_to_all ({all_to_all})" if ep > 1 else "none: experts replicated, data parallel",
             "activation_checkpointing": model.activation_checkpointing,
             "compiled": "torch.compile of each layer's norm + attention block and MoE norm" if compile_dense else None,
             "moe_kernels": "fused SwiGLU and combine (Triton, forward and backward)" if fused else "torch ops"}
    return Built(model, cfg, loss_fn, notes, fused_kernels=fused)


def _reference_loss(args: ModelArgs):
    """The training loss as epkit computed it before issue 12."""
    import torch.nn.functional as F

    from epkit.data import IGNORE
    from epkit.moe import load_balancing_loss

    def loss_fn(engine, batch):
        logits, router = engine(batch["tokens"], batch["positions"])  # positions given: masked attention
        targets = batch["labels"][:, 1:]
        lm_sum = F.cross_entropy(logits[:, :-1].float().reshape(-1, logits.shape[-1]), targets.reshape(-1),
                                 ignore_index=IGNORE, reduction="sum")
        lm = lm_sum / (targets != IGNORE).sum().clamp(min=1)
        aux = load_balancing_loss(router, args.num_experts, args.experts_per_token, mask=batch["positions"] >= 0)
        return lm + args.router_aux_loss_coef * aux, lm.detach()

    return loss_fn


def hf_config(args: ModelArgs, **overrides):
    from transformers import MixtralConfig
    values = {k: v for k, v in args.to_hf_config().items() if k not in ("architectures", "model_type", "dtype",
                                                                        "torch_dtype")}
    cfg = MixtralConfig(**{**values, **overrides, "use_cache": False})
    cfg._attn_implementation = "sdpa"
    return cfg


def materialise(fn, s: Setup):
    """fn() with parameters created on s.device in s.dtype (no fp32 copy on the host first)."""
    old = torch.get_default_dtype()
    torch.set_default_dtype(s.dtype)
    try:
        with torch.device(s.device):
            return fn()
    finally:
        torch.set_default_dtype(old)


def build_transformers(s: Setup) -> Built:
    from transformers import MixtralForCausalLM
    cfg = hf_config(s.args)
    experts = "grouped_mm" if s.device.type == "cuda" else "eager"  # torch's CPU grouped_mm has no backward
    cfg._experts_implementation = experts
    model = materialise(lambda: MixtralForCausalLM(cfg), s).train()
    coef = cfg.router_aux_loss_coef

    def loss_fn(engine, batch):
        out = engine(input_ids=batch["tokens"], labels=batch["labels"], output_router_logits=True)
        return out.loss, (out.loss - coef * out.aux_loss).detach()

    return Built(model, s.train_config(1), loss_fn, {"attention": cfg._attn_implementation, "experts": experts,
                                                     "data_parallel": True})


class DeepSpeedMoEBlock(nn.Module):
    """Stands where transformers' decoder layer keeps its sparse block: it calls mlp(h) and wants h back;
    DeepSpeed's MoE returns (h, l_aux, expert counts). Keeps l_aux for the loss."""

    def __init__(self, moe: nn.Module):
        super().__init__()
        self.moe = moe
        self.l_aux = None

    def forward(self, h):
        out, self.l_aux, _ = self.moe(h)
        return out.to(h.dtype)


def build_deepspeed_moe(s: Setup) -> Built:
    import torch.distributed as dist
    from deepspeed.moe.layer import MoE as DeepSpeedMoE
    from bench.peers import SwiGLU
    from transformers import MixtralForCausalLM
    a = s.args
    ep = dist.get_world_size()
    # transformers' skeleton (embedding, attention, norms, head) with placeholder experts, replaced below
    model = materialise(lambda: MixtralForCausalLM(hf_config(a, intermediate_size=8)), s).train()
    blocks = []
    for layer in model.model.layers:
        moe = materialise(lambda: DeepSpeedMoE(
            a.hidden_size, SwiGLU(a.hidden_size, a.intermediate_size), num_experts=a.num_experts, ep_size=ep,
            k=a.experts_per_token, capacity_factor=1.0, drop_tokens=False, use_rts=False,
            top2_2nd_expert_sampling=False), s)
        with torch.no_grad():  # transformers' init scale (each local expert its own draw)
            for p in moe.deepspeed_moe.experts.parameters():
                p.normal_(0.0, 0.02)
            moe.deepspeed_moe.gate.wg.weight.normal_(0.0, 0.02)
        layer.mlp = DeepSpeedMoEBlock(moe)
        blocks.append(layer.mlp)
    coef = a.router_aux_loss_coef

    def loss_fn(engine, batch):
        out = engine(input_ids=batch["tokens"], labels=batch["labels"])
        return out.loss + coef * sum(b.l_aux for b in blocks), out.loss.detach()

    return Built(model, s.train_config(ep), loss_fn, {
        "ep_size": ep, "drop_tokens": False, "use_rts": False, "top2_2nd_expert_sampling": False,
        "experts": "SwiGLU (w1, w3, w2)", "attention": "transformers sdpa"})


BUILDERS = {
    "epkit_ep2": lambda s: build_epkit(s, 2),
    "epkit_ep2_fixed_capacity": lambda s: build_epkit(s, 2, all_to_all="fixed_capacity"),
    "epkit_ep1": lambda s: build_epkit(s, 1),
    "epkit_ep1_compile": lambda s: build_epkit(s, 1, compile_dense=True),
    "epkit_ep1_unfused": lambda s: build_epkit(s, 1, fused=False),
    "epkit_ep2_compile": lambda s: build_epkit(s, 2, compile_dense=True),
    "epkit_ep4": lambda s: build_epkit(s, 4),
    "epkit_ep2_reference": lambda s: build_epkit(s, 2, reference=True),
    "transformers_zero2": build_transformers,
    "deepspeed_moe_ep2": build_deepspeed_moe,
}
