"""Mixtral's sparse mixture-of-experts layer: router, stacked experts, grouped compute, aux loss.

The layer never knows how tokens crossed ranks: it calls `self.dispatcher`, which is None on one
device and an object from `epkit.parallel` under expert parallelism. The router's math (softmax,
top-k, renormalise) is Mixtral's and is the same under any dispatcher.

Legend: N tokens, D hidden, I intermediate, E experts (global), L local experts, K experts per
token, M routed (token, expert) pairs.
"""
from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch import nn

from . import moe_kernels

_HAS_GROUPED_MM = hasattr(F, "grouped_mm") or hasattr(torch, "_grouped_mm")


@functools.cache
def _capability(device: torch.device) -> int:
    return torch.cuda.get_device_capability(device)[0]


def route(router_logits: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Mixtral routing: softmax over all experts in fp32, top-k, renormalise to sum 1.

    router_logits [N, E] -> (weights [N, K] fp32, expert ids [N, K] int64)
    """
    probs = torch.softmax(router_logits.float(), dim=-1)
    weights, experts = torch.topk(probs, k, dim=-1)
    weights = weights / weights.sum(dim=-1, keepdim=True)
    return weights, experts


def count_per_bucket(ids: torch.Tensor, n: int) -> torch.Tensor:
    """How many entries of `ids` fall in each of n buckets, [n] int64. Unlike torch.bincount on CUDA,
    which reads the maximum back to size its output, this never syncs with the host."""
    ids = ids.reshape(-1)
    return torch.zeros(n, dtype=torch.int64, device=ids.device).scatter_add_(0, ids, torch.ones_like(ids))


def _grouped_mm(x: torch.Tensor, w: torch.Tensor, offs: torch.Tensor) -> torch.Tensor:
    fn = getattr(F, "grouped_mm", None) or torch._grouped_mm
    return fn(x, w, offs=offs)


class Experts(nn.Module):
    """L SwiGLU experts stored stacked.

    w13 [L, 2I, D]: rows 0..I-1 are w1 (gate), rows I..2I-1 are w3 (up), as transformers 5 fuses them.
    w2  [L, D, I]:  down projection.
    `expert_ids` lists the global expert id held in each local slot (all of them on one device).
    """

    def __init__(self, num_experts: int, hidden_size: int, intermediate_size: int, expert_ids=None,
                 device=None, dtype=None):
        super().__init__()
        self.expert_ids = list(range(num_experts)) if expert_ids is None else list(expert_ids)
        L, D, I = len(self.expert_ids), hidden_size, intermediate_size
        self.intermediate_size = I
        self.w13 = nn.Parameter(torch.empty(L, 2 * I, D, device=device, dtype=dtype))
        self.w2 = nn.Parameter(torch.empty(L, D, I, device=device, dtype=dtype))
        self.impl = "grouped"  # or "loop", the readable reference
        # Up to this many routed pairs, CUDA inference uses the 16-row Triton kernels (moe_kernels.py)
        # instead of torch's grouped GEMM, whose 64-128-row tiles waste most of their work when decoding.
        self.small_m_max = 256

    @property
    def num_local(self) -> int:
        return len(self.expert_ids)

    def _use_grouped_mm(self, x: torch.Tensor) -> bool:
        if not _HAS_GROUPED_MM:
            return False
        if x.is_cuda:
            # Hopper-class kernels: bf16, rows 16-byte aligned.
            return (x.dtype == torch.bfloat16 and _capability(x.device) >= 9
                    and x.shape[-1] % 8 == 0 and self.intermediate_size % 8 == 0)
        # NOTE: the CPU kernel's backward fails on empty groups (torch 2.13), so only forward uses it.
        return x.device.type == "cpu" and not (torch.is_grad_enabled() and self.w13.requires_grad)

    def _use_small_m(self, x: torch.Tensor, rows: int) -> bool:
        return (rows <= self.small_m_max and not (torch.is_grad_enabled() and self.w13.requires_grad)
                and x.is_cuda and moe_kernels.available(x))

    def sync_free(self, x: torch.Tensor, rows: int) -> bool:
        """Whether computing `rows` routed pairs of tensors like x needs no host sync (so a CUDA graph
        can capture it): true for the Triton and grouped-GEMM paths, false for the per-expert fallback."""
        return self._use_small_m(x, rows) or self._use_grouped_mm(x)

    def compute(self, x: torch.Tensor, rows: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        """Expert outputs for x[rows] [M, D], where `rows` lists x's rows grouped by local slot and
        counts [L] (or [L+1], see forward_sorted) says how many belong to each slot."""
        if self._use_small_m(x, rows.shape[0]):
            return moe_kernels.experts_small_m(x, rows, counts, self.w13, self.w2)
        return self.forward_sorted(x[rows], counts)

    def forward_sorted(self, x: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        """Grouped path. x [M, D] sorted by local slot; counts [L] (or [L+1]: a last group of rows that
        belong to no local expert) -> [M, D]. Rows of that last group come back undefined."""
        if self._use_grouped_mm(x):
            offs = torch.cumsum(counts[: self.num_local], 0, dtype=torch.int32)
            h = _grouped_mm(x, self.w13.transpose(1, 2), offs)  # [M, 2I]
            gate, up = h.split(self.intermediate_size, dim=-1)
            return _grouped_mm(F.silu(gate) * up, self.w2.transpose(1, 2), offs)  # [M, D]
        # NOTE: .tolist() is a device-to-host sync; this fallback serves CPUs and old GPUs.
        # Empty groups still run their (empty) matmuls: the output then always depends on x and on
        # every local weight, so backward reaches every collective behind x even on a rank that
        # received no tokens, and every expert gets a (zero) gradient for the optimizer's reduction.
        outs = []
        for slot, xs in enumerate(x.split(counts.tolist())):
            outs.append(self._expert(slot, xs) if slot < self.num_local else torch.zeros_like(xs))
        return torch.cat(outs)

    def _expert(self, slot: int, x: torch.Tensor) -> torch.Tensor:
        gate, up = F.linear(x, self.w13[slot]).split(self.intermediate_size, dim=-1)
        return F.linear(F.silu(gate) * up, self.w2[slot])

    def forward(self, x: torch.Tensor, weights: torch.Tensor, slots: torch.Tensor, out_dtype=None) -> torch.Tensor:
        """x [N, D]; weights [N, K]; slots [N, K] local slot of each choice, -1 where another rank owns it.

        Returns this rank's share of the weighted expert sum, [N, D] in `out_dtype` (default x's dtype;
        expert-parallel callers keep fp32 so partial sums add up as on one device). The grouped path has
        no device-to-host sync: choices owned elsewhere sort last, are computed by no expert and masked.
        """
        if self.impl == "loop":
            return self.forward_loop(x, weights, slots, out_dtype)
        K = slots.shape[1]
        if self._use_small_m(x, slots.numel()):  # decoding: sort, experts and combine in four kernels
            return moe_kernels.fused_experts_small(x, weights, slots, self.w13, self.w2).to(out_dtype or x.dtype)
        flat = slots.reshape(-1)  # [N*K]
        key = torch.where(flat < 0, self.num_local, flat)
        order = torch.argsort(key, stable=True)  # [N*K]
        counts = count_per_bucket(key, self.num_local + 1)  # [L+1]
        token = order // K
        out = self.compute(x, token, counts)  # [N*K, D]
        local = (key[order] < self.num_local)[:, None]
        out = torch.where(local, out * weights.reshape(-1)[order, None], 0.0)
        y = torch.zeros_like(x, dtype=out.dtype).index_add_(0, token, out)
        return y.to(out_dtype or x.dtype)

    def forward_loop(self, x: torch.Tensor, weights: torch.Tensor, slots: torch.Tensor, out_dtype=None
                     ) -> torch.Tensor:
        """Reference path: one readable loop over local experts (kept for tests and comparison)."""
        y = torch.zeros_like(x, dtype=torch.promote_types(x.dtype, weights.dtype))
        for slot in range(self.num_local):
            token, which = torch.where(slots == slot)
            if token.numel():
                y.index_add_(0, token, self._expert(slot, x[token]) * weights[token, which, None])
        return y.to(out_dtype or x.dtype)


class MoE(nn.Module):
    """Router + experts. forward(x [B, T, D]) -> (y [B, T, D], router_logits [B*T, E])."""

    def __init__(self, hidden_size: int, intermediate_size: int, num_experts: int, experts_per_token: int,
                 jitter_noise: float = 0.0, device=None, dtype=None):
        super().__init__()
        self.num_experts = num_experts
        self.top_k = experts_per_token
        self.jitter_noise = jitter_noise
        self.gate = nn.Linear(hidden_size, num_experts, bias=False, device=device, dtype=dtype)
        self.experts = Experts(num_experts, hidden_size, intermediate_size, device=device, dtype=dtype)
        self.dispatcher = None  # set by epkit.parallel.apply_expert_parallel
        # Routing telemetry: tokens routed to each global expert since the last reset.
        self.register_buffer("routed_tokens", torch.zeros(num_experts, dtype=torch.int64, device=device),
                             persistent=False)
        self.track_routing = True

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        shape = x.shape
        if self.training and self.jitter_noise > 0:
            x = x * torch.empty_like(x).uniform_(1.0 - self.jitter_noise, 1.0 + self.jitter_noise)
        x = x.reshape(-1, shape[-1])  # [N, D]
        router_logits = self.gate(x)  # [N, E]
        weights, experts = route(router_logits, self.top_k)  # [N, K], [N, K]
        if self.track_routing:
            with torch.no_grad():
                self.routed_tokens += count_per_bucket(experts, self.num_experts)
        return self.dispatch(x, weights, experts).reshape(shape), router_logits

    def dispatch(self, x: torch.Tensor, weights: torch.Tensor, experts: torch.Tensor) -> torch.Tensor:
        """The experts' weighted sum for routed tokens x [N, D] (weights, expert ids [N, K]) -> [N, D]."""
        if self.dispatcher is None:
            return self.experts(x, weights, experts)
        return self.dispatcher(self.experts, x, weights, experts)


def load_balancing_loss(router_logits: list[torch.Tensor], num_experts: int, top_k: int,
                        mask: torch.Tensor | None = None) -> torch.Tensor:
    """Switch-style auxiliary loss, the same formula and scaling as transformers' Mixtral.

    router_logits: one [N, E] tensor per layer; mask [N] (1 = real token) or None.
    """
    tokens = torch.zeros(num_experts, dtype=torch.float32, device=router_logits[0].device)
    probs_sum = torch.zeros_like(tokens)
    rows = 0.0
    m = None if mask is None else mask.reshape(-1).to(torch.float32)
    for logits in router_logits:
        probs = torch.softmax(logits.float(), dim=-1)  # [N, E]
        chosen = torch.topk(probs, top_k, dim=-1).indices  # [N, K]
        one_hot = F.one_hot(chosen, num_experts).sum(1).float()  # [N, E]
        if m is None:
            tokens = tokens + one_hot.sum(0)
            probs_sum = probs_sum + probs.sum(0)
            rows = rows + probs.shape[0]
        else:
            tokens = tokens + (one_hot * m[:, None]).sum(0)
            probs_sum = probs_sum + (probs * m[:, None]).sum(0)
            rows = rows + m.sum()
    return (tokens / rows * probs_sum / rows).sum() * num_experts


def router_z_loss(router_logits: list[torch.Tensor]) -> torch.Tensor:
    """ST-MoE router z-loss: mean over tokens of logsumexp(logits)^2, averaged over layers."""
    return torch.stack([torch.logsumexp(l.float(), dim=-1).pow(2).mean() for l in router_logits]).mean()
