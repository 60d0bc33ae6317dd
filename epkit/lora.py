"""LoRA adapters on epkit's Mixtral: trained under expert parallelism, stored in PEFT's format.

An adapter adds a low-rank term to a frozen weight, PEFT's LoRA with scaling s = alpha / r:

    attention q/k/v/o and the router (W [out, in])    y = x W^T + s * dropout(x) A^T B^T
        lora_A [r, in], lora_B [out, r], computed in fp32 as PEFT's lora.Linear does (x cast up, sum cast back)
    experts (stacked W [L, out, in]; one A, B per expert, stacked and sharded like W)
        w13 [L, 2I, D]: w13_lora_A [L, r, D], w13_lora_B [L, 2I, r]   (one A for the fused gate and up rows)
        w2  [L, D, I]:  w2_lora_A  [L, r, I], w2_lora_B  [L, D, r]
        y_e = x W_e^T + s * x A_e^T B_e^T in the base dtype

The expert math is PEFT's `target_parameters` LoRA (lora.ParamWrapper) on transformers 5's fused Mixtral
experts (`mlp.experts.gate_up_proj` [E, 2I, D], `down_proj` [E, D, I]): PEFT folds W_e + s * B_e A_e in W's
dtype, epkit computes the same sum without materialising it (no base weight gradient, a third of the
backward GEMM work saved). PEFT's ParamWrapper has no dropout, so `dropout` > 0 is for attention-only
adapters. The router is PEFT's ParamWrapper on `mlp.gate.weight`, a plain 2-D LoRA.

Expert adapters live in the experts module and are sliced by the same ShardingPlan as the experts: a rank
holds and trains only its experts' adapters, and they carry DeepSpeed's expert markers (`allreduce=False`,
`group_name`) so their gradients reduce over the expert-data-parallel group.

Adapters are fp32 Parameters over a base in any dtype (bf16 on GPU): they are their own fp32 masters, and
the optimizer keeps fp32 state for them only.

Files (`epkit.lora_io`): a PEFT adapter directory, `adapter_config.json` + `adapter_model.safetensors`, that
`peft.PeftModel.from_pretrained(transformers_mixtral, dir)` loads.

Legend: L local experts, E experts, r rank, D hidden, I intermediate, M routed rows.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .model import _seeded
from .moe import ComputeBackend, Experts, _grouped_mm

ATTENTION = ("q_proj", "k_proj", "v_proj", "o_proj")
# --lora-targets groups -> PEFT target names (attention: target_modules; the rest: target_parameters)
TARGET_GROUPS = {"attention": ATTENTION, "experts": ("gate_up_proj", "down_proj"), "router": ("gate",)}
TARGETS = ATTENTION + ("gate", "gate_up_proj", "down_proj")
EXPERT_WEIGHTS = {"gate_up_proj": "w13", "down_proj": "w2"}  # PEFT target -> epkit stacked weight


@dataclass(frozen=True)
class LoraSpec:
    """What an adapter is: rank, alpha, dropout and the PEFT target names it adapts (TARGETS)."""

    rank: int
    alpha: float
    dropout: float = 0.0
    targets: tuple[str, ...] = ATTENTION + ("gate_up_proj", "down_proj")
    use_rslora: bool = False

    def __post_init__(self):  # one order (TARGETS'), so equal specs compare equal; unknown names last
        order = {t: i for i, t in enumerate(TARGETS)}
        object.__setattr__(self, "targets", tuple(sorted(dict.fromkeys(self.targets),
                                                         key=lambda t: order.get(t, len(order)))))

    @property
    def scaling(self) -> float:
        return self.alpha / (math.sqrt(self.rank) if self.use_rslora else self.rank)

    @classmethod
    def from_groups(cls, rank, alpha=None, dropout: float = 0.0, groups: str = "attention,experts") -> "LoraSpec":
        """From the command line: `groups` is a comma list of attention, experts, router."""
        names = [g.strip() for g in str(groups).split(",") if g.strip()]
        unknown = [g for g in names if g not in TARGET_GROUPS]
        if unknown or not names:
            raise ValueError(f"--lora-targets {groups!r}: unknown target {unknown[0] if unknown else '(none)'!r}; "
                             f"use a comma list of {', '.join(TARGET_GROUPS)}")
        spec = cls(rank, rank if alpha is None else alpha, dropout, tuple(t for g in names for t in TARGET_GROUPS[g]))
        spec.check()
        return spec

    def check(self, source: str | None = None) -> None:
        """One sentence naming the bad value: as a command-line flag, or as the adapter_config.json field of
        `source` (a file)."""
        def name(flag: str, field: str) -> str:
            return f"--lora-{flag}" if source is None else f"{source}: {field}"
        if isinstance(self.rank, bool) or not isinstance(self.rank, int) or self.rank < 1:
            raise ValueError(f"{name('rank', 'r')}={self.rank!r} must be a positive integer")
        if isinstance(self.alpha, bool) or not isinstance(self.alpha, (int, float)) or not self.alpha > 0:
            raise ValueError(f"{name('alpha', 'lora_alpha')}={self.alpha!r} must be a positive number")
        if not (isinstance(self.dropout, (int, float)) and 0.0 <= self.dropout < 1.0):
            raise ValueError(f"{name('dropout', 'lora_dropout')}={self.dropout!r} must be in [0, 1)")
        bad = [t for t in self.targets if t not in TARGETS]
        if bad or not self.targets:
            raise ValueError(f"{name('targets', 'targets')}: unknown target {bad[0] if bad else '(none)'!r}; epkit "
                             f"adapts {', '.join(TARGETS)}")
        if self.dropout > 0 and set(self.targets) - set(ATTENTION):
            raise ValueError(f"{name('dropout', 'lora_dropout')}={self.dropout} needs attention-only targets: "
                             f"PEFT's LoRA on the router and experts (target_parameters, lora.ParamWrapper) has no "
                             f"dropout")

    def __str__(self) -> str:
        return f"LoRA r={self.rank} alpha={self.alpha:g} dropout={self.dropout:g} on {','.join(self.targets)}"


# ---- modules ---------------------------------------------------------------------------------------

class LoRALinear(nn.Module):
    """A bias-free nn.Linear plus an adapter. Holds the wrapped layer's own `weight` Parameter under the same
    name, so checkpoint names do not change."""

    def __init__(self, base: nn.Linear, spec: LoraSpec):
        super().__init__()
        if base.bias is not None:
            raise ValueError("LoRA on a linear layer with a bias is not supported (Mixtral has none)")
        self.weight = base.weight
        self.scaling = spec.scaling
        self.dropout = nn.Dropout(spec.dropout) if spec.dropout > 0 else nn.Identity()
        out, inp = base.weight.shape
        kw = dict(device=base.weight.device, dtype=torch.float32)
        self.lora_A = nn.Parameter(torch.zeros(spec.rank, inp, **kw))  # [r, in]
        self.lora_B = nn.Parameter(torch.zeros(out, spec.rank, **kw))  # [out, r]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.linear(x, self.weight)
        low = F.linear(F.linear(self.dropout(x).to(self.lora_A.dtype), self.lora_A), self.lora_B)
        return (y.to(low.dtype) + low * self.scaling).to(y.dtype)

    @torch.no_grad()
    def merged(self) -> nn.Linear:
        """A plain nn.Linear whose weight (this module's Parameter, updated in place) includes the adapter."""
        fold(self.weight, self.lora_A, self.lora_B, self.scaling)
        out, inp = self.weight.shape
        layer = nn.Linear(inp, out, bias=False, device="meta")
        layer.weight = self.weight
        return layer


class LoRAExperts(Experts):
    """Experts plus stacked per-expert adapters on some of w13 / w2 (`adapted`). Shares the wrapped module's
    weights and expert ids; adds its term wherever the experts multiply (Experts.project), on every path."""

    def __init__(self, base: Experts, spec: LoraSpec):
        D, I = base.w13.shape[2], base.intermediate_size
        super().__init__(len(base.expert_ids), D, I, expert_ids=base.expert_ids, device="meta")
        self.w13, self.w2 = base.w13, base.w2
        self.impl = base.impl
        self.scaling, self.rank = spec.scaling, spec.rank
        self.adapted = tuple(w for t, w in EXPERT_WEIGHTS.items() if t in spec.targets)
        kw = dict(device=base.w13.device, dtype=torch.float32)
        L, r = self.num_local, spec.rank
        for name in self.adapted:
            out, inp = getattr(self, name).shape[1:]
            setattr(self, f"{name}_lora_A", nn.Parameter(torch.zeros(L, r, inp, **kw)))  # [L, r, in]
            setattr(self, f"{name}_lora_B", nn.Parameter(torch.zeros(L, out, r, **kw)))  # [L, out, r]

    @property
    def backend(self) -> ComputeBackend:
        """The experts' backend without the Triton kernels (they read w13/w2 only; a served adapter is merged
        first, see LLM(..., lora=)); grouped GEMM on GPU needs 16-byte rows of the [M, r] intermediate: r a
        multiple of 8 in bf16, else the loop."""
        base = super().backend
        aligned = self.w13.device.type != "cuda" or self.rank % 8 == 0
        return dataclasses.replace(base, small_m_max=0, grouped=base.grouped if aligned else None)

    def project(self, x, name, offs=None, slot=None):
        y = super().project(x, name, offs, slot)
        if name not in self.adapted:
            return y
        # base dtype, as PEFT's ParamWrapper folds the delta in W's dtype; the masters stay fp32
        a = getattr(self, f"{name}_lora_A").to(x.dtype)
        b = getattr(self, f"{name}_lora_B").to(x.dtype)
        if slot is not None:
            low = F.linear(F.linear(x, a[slot]), b[slot])
        else:
            low = _grouped_mm(_grouped_mm(x, a.transpose(1, 2), offs), b.transpose(1, 2), offs)  # [M, r], [M, out]
        return y + low * self.scaling

    @torch.no_grad()
    def merged(self) -> Experts:
        """Plain Experts whose weights (this module's Parameters, updated in place) include the adapters."""
        for name in self.adapted:
            w, a, b = getattr(self, name), getattr(self, f"{name}_lora_A"), getattr(self, f"{name}_lora_B")
            for slot in range(self.num_local):
                fold(w[slot], a[slot], b[slot], self.scaling)
        plain = Experts(self.num_local, self.w13.shape[2], self.intermediate_size, expert_ids=self.expert_ids,
                        device="meta")
        plain.w13, plain.w2 = self.w13, self.w2
        plain.impl = self.impl
        return plain


@torch.no_grad()
def fold(w: torch.Tensor, a: torch.Tensor, b: torch.Tensor, scaling: float) -> None:
    """w [out, in] += scaling * b [out, r] @ a [r, in], summed in fp32 and rounded once to w's dtype."""
    w.copy_((w.float() + (b.float() @ a.float()) * scaling).to(w.dtype))


# ---- applying, initialising, merging -----------------------------------------------------------------

def adapted_modules(model):
    """(layer, PEFT target, module) for every adapted place; experts appear once per adapted weight."""
    for l, layer in enumerate(model.layers):
        for t in ATTENTION:
            m = getattr(layer.attn, t)
            if isinstance(m, LoRALinear):
                yield l, t, m
        if isinstance(layer.moe.gate, LoRALinear):
            yield l, "gate", layer.moe.gate
        if isinstance(layer.moe.experts, LoRAExperts):
            for t, w in EXPERT_WEIGHTS.items():
                if w in layer.moe.experts.adapted:
                    yield l, t, layer.moe.experts


def apply_lora(model, spec: LoraSpec, seed: int = 0) -> dict[str, int]:
    """Freeze every base parameter and add `spec`'s adapters (A seeded per name and expert id, B zero, as PEFT
    initialises: the adapter starts as a no-op and the same at every EP size). Sets `model.lora`. Returns
    the trainable parameter counts by part. Apply after expert parallelism and loading."""
    spec.check()
    if model.lora is not None:
        raise ValueError("the model already has LoRA adapters")
    for p in model.parameters():
        p.requires_grad_(False)
    for layer in model.layers:
        for t in ATTENTION:
            if t in spec.targets:
                setattr(layer.attn, t, LoRALinear(getattr(layer.attn, t), spec))
        if "gate" in spec.targets:
            layer.moe.gate = LoRALinear(layer.moe.gate, spec)
        if set(EXPERT_WEIGHTS) & set(spec.targets):
            layer.moe.experts = LoRAExperts(layer.moe.experts, spec)
    if model.expert_parallel is not None:
        from .parallel import mark_expert_params
        mark_expert_params(model)  # the expert adapters reduce over the expert-data-parallel group
    model.lora = spec
    model.train(model.training)  # the new modules follow the model's train/eval mode (dropout)
    init_adapters(model, seed)
    counts: dict[str, int] = {}
    for _, t, m in adapted_modules(model):
        part = "experts" if t in EXPERT_WEIGHTS else "router" if t == "gate" else "attention"
        names = [f"{EXPERT_WEIGHTS[t]}_lora_A", f"{EXPERT_WEIGHTS[t]}_lora_B"] if part == "experts" else \
            ["lora_A", "lora_B"]
        counts[f"lora_{part}"] = counts.get(f"lora_{part}", 0) + sum(getattr(m, n).numel() for n in names)
    return counts


@torch.no_grad()
def init_adapters(model, seed: int) -> None:
    """A ~ U(-1/sqrt(in), 1/sqrt(in)) (PEFT's kaiming_uniform(a=sqrt(5))), B = 0. Each tensor, and each expert's
    slice, draws from its own generator seeded by (seed, name, expert id)."""
    for name, p in model.named_parameters():
        if "lora_" not in name:
            continue
        if "lora_B" in name:
            p.zero_()
            continue
        bound = 1.0 / math.sqrt(p.shape[-1])
        if ".moe.experts." in name:
            ids = model.layers[int(name.split(".")[1])].moe.experts.expert_ids
            for slot, e in enumerate(ids):
                p[slot].uniform_(-bound, bound, generator=_seeded(p.device, seed, f"{name}.{e}"))
        else:
            p.uniform_(-bound, bound, generator=_seeded(p.device, seed, name))


def merge_lora(model):
    """Fold every adapter into its base weight (fp32 sum, one rounding) and unwrap: a plain model again, with
    the parameter names and expert markers it had. Each rank merges only the experts it holds."""
    for layer in model.layers:
        for t in ATTENTION:
            if isinstance(getattr(layer.attn, t), LoRALinear):
                setattr(layer.attn, t, getattr(layer.attn, t).merged())
        if isinstance(layer.moe.gate, LoRALinear):
            layer.moe.gate = layer.moe.gate.merged()
        if isinstance(layer.moe.experts, LoRAExperts):
            layer.moe.experts = layer.moe.experts.merged()
    model.lora = None
    return model
