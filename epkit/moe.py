"""Mixtral's sparse mixture-of-experts layer: router, stacked experts, dispatch, aux loss.

A forward is route -> dispatch -> experts -> combine. The router's math (softmax, top-k, renormalise)
is Mixtral's under any dispatcher. The dispatcher owns how routed (token, expert) pairs reach the
experts and come back: `LocalDispatch` (here, EP=1) computes every pair on this device;
`epkit.parallel` adds the replicated and all-to-all dispatchers for expert parallelism. Every dispatcher is
called as dispatcher(experts, x [N, D], weights [N, K], ids [N, K], mask [N] | None) (mask: the real tokens; at
inference padding tokens need no expert, and the local and replicated dispatchers skip them). All of them
group pairs with `permute`, compute with `Experts.forward(x_sorted, counts)` (which only computes)
and combine with `unpermute`.

The experts' compute backend is chosen once per device and dtype (`choose_backend`): Triton
small-batch kernels (moe_kernels.py) for inference calls with few rows, torch's grouped GEMM, or the
per-expert loop (the readable reference, and the fallback). The same choice says whether a call has
no host sync, i.e. whether a CUDA graph can capture it (`MoE.sync_free`).

Legend: N tokens, D hidden, I intermediate, E experts (global), L local experts, K experts per
token, M routed (token, expert) pairs (M = N*K before any exchange), G groups.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from . import moe_kernels

_HAS_GROUPED_MM = hasattr(F, "grouped_mm") or hasattr(torch, "_grouped_mm")
# Up to this many routed pairs, CUDA inference uses the 16-row Triton kernels (moe_kernels.py) instead of
# torch's grouped GEMM, whose 64-128-row tiles waste most of their work when decoding.
SMALL_M_MAX = 256
# Where Triton runs, SwiGLU and the weighted combine run as fused kernels (moe_kernels.py), forward and backward;
# False: torch's ops everywhere (the reference the kernels are checked and timed against).
FUSED_KERNELS = True


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


def permute(keys: torch.Tensor, num_groups: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Group pairs by key. keys [M] (any shape, flattened) in 0..G-1 -> (order [M], counts [G]):
    order lists the pairs key by key (stable within a key), counts[g] pairs have key g. No host sync."""
    keys = keys.reshape(-1)
    return torch.argsort(keys, stable=True), count_per_bucket(keys, num_groups)


def unpermute(out: torch.Tensor, order: torch.Tensor, weights: torch.Tensor,
              keep: torch.Tensor | None = None) -> torch.Tensor:
    """Combine: y[t] = sum of weight * out over the pairs of token t.

    out [M, D] in `order` order (row i is choice order[i] % K of token order[i] // K); weights [N, K];
    keep [M] (bool) drops rows computed elsewhere (their values may be undefined). Returns [N, D] in the
    weights' precision (fp32), so partial sums from several ranks add up as on one device.
    """
    N, K = weights.shape
    if keep is not None:  # before the weights multiply: their gradient must never see an undefined row
        out = torch.where(keep[:, None], out, 0.0)
    out = out * weights.reshape(-1)[order, None]
    return torch.zeros(N, out.shape[1], dtype=out.dtype, device=out.device).index_add_(0, order // K, out)


def combine(out: torch.Tensor, order: torch.Tensor, weights: torch.Tensor,
            keep: torch.Tensor | None = None) -> torch.Tensor:
    """`unpermute`; where Triton runs, as one gather kernel (`moe_kernels.combine`; in training with its
    fused backward): many tokens otherwise spend longer on the fp32 [M, D] product and index_add, and on
    their gradients, than on the expert GEMMs' tail."""
    if moe_kernels.available(out.device) and FUSED_KERNELS:
        if torch.is_grad_enabled() and (out.requires_grad or weights.requires_grad):
            return moe_kernels.combine_autograd(out, order, weights, keep)
        return moe_kernels.combine(out, order, weights, keep)
    return unpermute(out, order, weights, keep)


def swiglu(h13: torch.Tensor, intermediate: int) -> torch.Tensor:
    """h13 [M, 2I] (gate | up) -> silu(gate) * up [M, I]; where Triton runs, one kernel each way."""
    if moe_kernels.available(h13.device) and FUSED_KERNELS:
        if torch.is_grad_enabled() and h13.requires_grad:
            return moe_kernels.swiglu_autograd(h13)
        return moe_kernels.swiglu(h13)
    gate, up = h13.split(intermediate, dim=-1)
    return F.silu(gate) * up


def _grouped_mm(x: torch.Tensor, w: torch.Tensor, offs: torch.Tensor) -> torch.Tensor:
    fn = getattr(F, "grouped_mm", None) or torch._grouped_mm
    return fn(x, w, offs=offs)


@dataclass(frozen=True)
class ComputeBackend:
    """Which kernels compute the experts on one device and dtype (see `choose_backend`).

    small_m_max: inference calls of at most this many rows use the Triton kernels (0: none);
    grouped: torch's grouped GEMM serves "train" (forward and backward), "infer" (forward only) or None.
    Everything else runs the per-expert loop, which reads the group sizes on the host.
    """

    small_m_max: int = 0
    grouped: str | None = None

    def kernel(self, rows: int, grad: bool) -> str:
        """"small_m", "grouped" or "loop" for a call of `rows` pairs (`grad`: the weights need gradients)."""
        if not grad and 0 < self.small_m_max and rows <= self.small_m_max:
            return "small_m"
        if self.grouped == "train" or (self.grouped == "infer" and not grad):
            return "grouped"
        return "loop"

    def sync_free(self, rows: int, grad: bool = False) -> bool:
        """Whether computing `rows` pairs needs no host sync (so a CUDA graph can capture it)."""
        return self.kernel(rows, grad) != "loop"


def choose_backend(device, dtype: torch.dtype, hidden: int, intermediate: int, impl: str = "grouped"
                   ) -> ComputeBackend:
    """The fastest expert kernels this device and dtype support; impl="loop" forces the reference loop."""
    device = torch.device(device)
    if impl == "loop":
        return ComputeBackend()
    if device.type == "cuda":
        # torch's grouped GEMM: Hopper-class kernels, bf16, rows 16-byte aligned.
        hopper = (_HAS_GROUPED_MM and dtype == torch.bfloat16 and _capability(device) >= 9
                  and hidden % 8 == 0 and intermediate % 8 == 0)
        return ComputeBackend(SMALL_M_MAX if moe_kernels.available(device) else 0, "train" if hopper else None)
    if device.type == "cpu" and _HAS_GROUPED_MM:
        # NOTE: the CPU kernel's backward fails on empty groups (torch 2.13), so only forward uses it.
        return ComputeBackend(0, "infer")
    return ComputeBackend()


class Experts(nn.Module):
    """L SwiGLU experts stored stacked.

    w13 [L, 2I, D]: rows 0..I-1 are w1 (gate), rows I..2I-1 are w3 (up), as transformers 5 fuses them.
    w2  [L, D, I]:  down projection.
    `expert_ids` lists the global expert id held in each local slot (all of them on one device).
    `rows` (r, R): this module holds only part r of R of every expert's intermediate rows (I = I_full / R:
    w1/w3 rows and w2 columns r*I .. (r+1)*I-1), so its outputs are partial sums (`take_rows`).
    """

    def __init__(self, num_experts: int, hidden_size: int, intermediate_size: int, expert_ids=None,
                 device=None, dtype=None, rows: tuple[int, int] | None = None):
        super().__init__()
        self.expert_ids = list(range(num_experts)) if expert_ids is None else list(expert_ids)
        self.rows = rows
        if rows is not None and intermediate_size % rows[1]:
            raise ValueError(f"intermediate_size={intermediate_size} does not split into {rows[1]} equal parts")
        L, D, I = len(self.expert_ids), hidden_size, intermediate_size // (rows[1] if rows else 1)
        self.intermediate_size = I
        self.w13 = nn.Parameter(torch.empty(L, 2 * I, D, device=device, dtype=dtype))
        self.w2 = nn.Parameter(torch.empty(L, D, I, device=device, dtype=dtype))
        self.impl = "grouped"  # the fastest backend available; "loop": the readable reference
        self._backend: tuple | None = None  # (device, dtype, impl) -> ComputeBackend, chosen once
        # Selective activation checkpointing (Mixtral.activation_checkpointing == "selective"): drop the
        # up-projection's [M, 2I] output and the SwiGLU intermediate after forward, recompute them in backward.
        self.recompute_up = False

    @property
    def num_local(self) -> int:
        return len(self.expert_ids)

    def take_rows(self, name: str, full: torch.Tensor) -> torch.Tensor:
        """This module's part of one full expert tensor (w13 [2I_full, D] or w2 [D, I_full]); all of it
        without `rows`. SwiGLU acts on each intermediate row alone, so the parts' outputs sum to the
        full expert's."""
        if self.rows is None:
            return full
        r, I = self.rows[0], self.intermediate_size
        if name == "w13":
            half = full.shape[0] // 2
            return torch.cat([full[r * I:(r + 1) * I], full[half + r * I:half + (r + 1) * I]])
        return full[:, r * I:(r + 1) * I]

    @property
    def trains(self) -> bool:
        """Whether any of this module's parameters (weights, or adapters added by epkit.lora) is trained."""
        return any(p.requires_grad for p in self.parameters())

    @property
    def backend(self) -> ComputeBackend:
        """The compute backend for the weights' device and dtype, chosen on first use and kept."""
        key = (self.w13.device, self.w13.dtype, self.impl)
        if self._backend is None or self._backend[0] != key:
            self._backend = (key, choose_backend(key[0], key[1], self.w13.shape[2], self.intermediate_size, self.impl))
        return self._backend[1]

    def forward(self, x: torch.Tensor, counts: torch.Tensor, rows: torch.Tensor | None = None,
                dense: bool = False) -> torch.Tensor:
        """Expert outputs of pairs grouped by local expert; only computes (no routing, weights or combine).

        x [M, D] sorted by local expert, or x [N, D] with rows [M] naming the sorted rows (a gather the
        Triton kernels fuse); counts [L] pairs per local expert. Rows past sum(counts) are padding (pairs
        for no expert here, or unused buffer): zero, and no gradient flows through them, from the grouped
        GEMM and the loop; the inference-only small-M kernels leave them undefined. `dense`: the caller
        knows sum(counts) == M (every pair is for a local expert), so there is no padding to zero.
        Returns [M, D].
        """
        M = x.shape[0] if rows is None else rows.shape[0]
        kernel = self.backend.kernel(M, torch.is_grad_enabled() and self.trains)
        if kernel == "small_m":
            rows = rows if rows is not None else torch.arange(M, device=x.device)
            return moe_kernels.experts_small_m(x, rows, counts, self.w13, self.w2)
        if rows is not None:
            x = x[rows]
        return self.forward_grouped(x, counts, dense) if kernel == "grouped" else self.forward_loop(x, counts)

    def forward_grouped(self, x: torch.Tensor, counts: torch.Tensor, dense: bool = False) -> torch.Tensor:
        """torch's grouped GEMM: x [M, D] sorted, counts [L] -> [M, D]; no host sync.

        The kernel writes only the groups' rows: rows past sum(counts) of its output, and of its input's
        gradient in backward, are left as uninitialised memory (NaN or inf on a GPU). Both are zeroed here,
        or the padding that the fixed-capacity and replicated dispatchers send (a pair for another rank's
        expert) would turn the tokens' and router weights' gradients into NaN (0 x inf), although its
        combine weight is 0.
        """
        offs = torch.cumsum(counts, 0, dtype=torch.int32)
        if dense:  # no padding rows (the caller's promise): nothing to zero
            return self.project(self._recomputed(self._up, x, offs), "w2", offs=offs)
        real = torch.arange(x.shape[0], device=x.device)[:, None] < offs[-1]  # [M, 1] rows in a group
        if torch.is_grad_enabled():  # backward: the gradient of padding rows is 0, not what the kernel left
            x = torch.where(real, x, 0)  # (forward never reads them: the GEMM computes the groups' rows only)
        act = self._recomputed(self._up, x, offs)  # [M, I]
        return torch.where(real, self.project(act, "w2", offs=offs), 0)  # [M, D]

    def forward_loop(self, x: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        """Reference: one readable loop over the local experts (also the fallback on CPUs and old GPUs).

        NOTE: .tolist() is a device-to-host sync. Empty groups still run their (empty) matmuls: the output
        then always depends on x and on every local weight, so backward reaches every collective behind x
        even on a rank that received no tokens, and every expert gets a (zero) gradient for the
        optimizer's reduction.
        """
        sizes = counts.tolist()
        sizes.append(x.shape[0] - sum(sizes))  # padding rows after the last group
        pieces = x.split(sizes)
        outs = [self._expert(slot, xs) for slot, xs in enumerate(pieces[:-1])]
        return torch.cat(outs + [torch.zeros_like(pieces[-1])])

    def _up(self, x: torch.Tensor, offs: torch.Tensor | None = None, slot: int | None = None) -> torch.Tensor:
        """SwiGLU of the up-projection: x [M, D] -> silu(x w1^T) * (x w3^T) [M, I] (one `slot`, or grouped)."""
        return swiglu(self.project(x, "w13", offs=offs, slot=slot), self.intermediate_size)

    def _recomputed(self, fn, *args) -> torch.Tensor:
        """fn(*args); with `recompute_up` (and autograd on) its activations are recomputed in backward."""
        if self.recompute_up and torch.is_grad_enabled():
            return checkpoint(fn, *args, use_reentrant=False)
        return fn(*args)

    def _expert(self, slot: int, x: torch.Tensor) -> torch.Tensor:
        return self.project(self._recomputed(self._up, x, None, slot), "w2", slot=slot)

    def project(self, x: torch.Tensor, name: str, offs: torch.Tensor | None = None, slot: int | None = None
                ) -> torch.Tensor:
        """x @ W^T for the stacked weight `name` ("w13" or "w2"): rows of one local `slot`, or rows grouped by
        slot with cumulative ends `offs` (grouped GEMM). The one place expert weights multiply activations
        (epkit.lora.LoRAExperts adds its low-rank term here)."""
        w = getattr(self, name)
        if slot is not None:
            return F.linear(x, w[slot])
        return _grouped_mm(x, w.transpose(1, 2), offs)


class LocalDispatch:
    """Computes the pairs of this device's experts: permute by local slot -> experts -> unpermute.

    `slots[e]` is expert e's local slot, -1 where another rank holds it (those pairs are dropped here:
    the replicated dispatcher sums every rank's share); None: every expert is here, slot = expert id.
    No host sync and no collective (`sync_free`).
    """

    sync_free = True

    def __init__(self, slots: list[int] | None = None):
        self.slot = None if slots is None else torch.tensor(slots)

    def __call__(self, experts: Experts, x: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor,
                 mask: torch.Tensor | None = None) -> torch.Tensor:
        """x [N, D], weights [N, K], ids [N, K] global expert ids -> y [N, D] in x's dtype. `mask` [N] (bool,
        True for real tokens): padding tokens reach no expert (y is 0 there)."""
        return self.partial(experts, x, weights, ids, mask).to(x.dtype)

    def partial(self, experts: Experts, x: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor,
                mask: torch.Tensor | None = None) -> torch.Tensor:
        """This device's share of the weighted expert sum, [N, D] fp32 (zero where no local expert was chosen,
        and for tokens `mask` marks as padding)."""
        L, K = experts.num_local, ids.shape[1]
        if self.slot is not None and self.slot.device != ids.device:
            self.slot = self.slot.to(ids.device)
        slot = ids if self.slot is None else self.slot[ids]
        if mask is not None:  # padding: as if another rank's expert, so its pairs are never computed
            slot = torch.where(mask.reshape(-1, 1), slot, -1)
        if experts.backend.kernel(ids.numel(), torch.is_grad_enabled() and experts.w13.requires_grad) == "small_m":
            # decoding: permute, experts and the weighted combine in four kernels (moe_kernels.py)
            return moe_kernels.fused_experts_small(x, weights, slot, experts.w13, experts.w2)
        if self.slot is None and mask is None:  # every pair is for a local expert
            order, counts = permute(ids, L)
            return combine(experts(x, counts, rows=order // K, dense=True), order, weights)
        key = torch.where(slot < 0, L, slot)  # pairs for other ranks' experts sort last, as padding
        order, counts = permute(key, L + 1)
        out = experts(x, counts[:L], rows=order // K)  # [N*K, D]
        return combine(out, order, weights, keep=key.reshape(-1)[order] < L)


@dataclass
class Routed:
    """What one MoE forward routed: router logits [N, E], Mixtral's top-k expert ids [N, K], and the
    token mask it was given ([N] bool, True for real tokens; None: every token is real)."""

    logits: torch.Tensor
    expert_ids: torch.Tensor
    mask: torch.Tensor | None = None


class RoutingStats:
    """Tokens routed to each expert of each layer since the last reset: `counts()` [layers, E] int64.

    The one routing counter: `Mixtral.forward` adds what its MoE layers routed (masked tokens left out)
    once per forward, outside any checkpointed region; training metrics, the serving load report and
    the checkpoint manifest read it (`epkit.parallel.gather_routing_counts` sums it over ranks).
    Counting runs on the device without a host sync, and the tensor is updated in place, never replaced
    once made, so a captured CUDA graph keeps counting into it.
    """

    def __init__(self, num_layers: int, num_experts: int):
        self.num_layers, self.num_experts = num_layers, num_experts
        self._counts: torch.Tensor | None = None  # made on the device of the first ids counted

    def counts(self, device=None) -> torch.Tensor:
        """The live counts tensor (moved to `device` first if given)."""
        if self._counts is None or (device is not None and self._counts.device != torch.device(device)):
            old = self._counts
            self._counts = torch.zeros(self.num_layers, self.num_experts, dtype=torch.int64, device=device)
            if old is not None:
                self._counts += old.to(self._counts.device)
        return self._counts

    def reset(self) -> None:
        if self._counts is not None:
            self._counts.zero_()

    @torch.no_grad()
    def add(self, routed: list[Routed]) -> None:
        """Count one forward: routed[l] is layer l's `Routed`."""
        ids = torch.stack([r.expert_ids for r in routed])  # [L, N, K]
        L, N, K = ids.shape
        counts = self.counts(ids.device)
        real = torch.stack([torch.ones(N, dtype=torch.bool, device=ids.device) if r.mask is None
                            else r.mask.reshape(-1) for r in routed]).to(torch.int64)  # [L, N]
        key = ids + torch.arange(L, device=ids.device)[:, None, None] * self.num_experts  # [L, N, K]
        counts.view(-1).scatter_add_(0, key.reshape(-1), real[:, :, None].expand(L, N, K).reshape(-1))


class MoE(nn.Module):
    """Router + experts. forward(x [B, T, D], mask [B*T] | None) -> (y [B, T, D], Routed)."""

    def __init__(self, hidden_size: int, intermediate_size: int, num_experts: int, experts_per_token: int,
                 jitter_noise: float = 0.0, device=None, dtype=None):
        super().__init__()
        self.num_experts = num_experts
        self.top_k = experts_per_token
        self.jitter_noise = jitter_noise
        self.gate = nn.Linear(hidden_size, num_experts, bias=False, device=device, dtype=dtype)
        self.experts = Experts(num_experts, hidden_size, intermediate_size, device=device, dtype=dtype)
        self.dispatcher = LocalDispatch()  # epkit.parallel.apply_expert_parallel sets an EP dispatcher

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> tuple[torch.Tensor, Routed]:
        shape = x.shape
        if self.training and self.jitter_noise > 0:
            x = x * torch.empty_like(x).uniform_(1.0 - self.jitter_noise, 1.0 + self.jitter_noise)
        x = x.reshape(-1, shape[-1])  # [N, D]
        router_logits = self.gate(x)  # [N, E]
        weights, experts = route(router_logits, self.top_k)  # [N, K], [N, K]
        # At inference padding tokens (a batch's rows padded to its longest) skip the experts; in training they
        # keep them, so a padded batch trains exactly as before
        y = self.dispatcher(self.experts, x, weights, experts, None if torch.is_grad_enabled() else mask)
        return y.reshape(shape), Routed(router_logits, experts, mask)

    def sync_free(self, tokens: int) -> bool:
        """Whether an inference forward of `tokens` tokens has no host sync, so a CUDA graph can capture
        it: the dispatcher and the experts' backend decide."""
        return self.dispatcher.sync_free and self.experts.backend.sync_free(tokens * self.top_k)


def load_balancing_loss(router_logits: list[torch.Tensor], num_experts: int, top_k: int,
                        mask: torch.Tensor | None = None, expert_ids: list[torch.Tensor] | None = None
                        ) -> torch.Tensor:
    """Switch-style auxiliary loss, the same formula and scaling as transformers' Mixtral.

    router_logits: one [N, E] tensor per layer; mask [N] (1 = real token) or None; expert_ids: the [N, K]
    choices each layer routed (`Routed.expert_ids`; None: take Mixtral's top-k of the logits again).
    """
    tokens = torch.zeros(num_experts, dtype=torch.float32, device=router_logits[0].device)
    probs_sum = torch.zeros_like(tokens)
    rows = 0.0
    m = None if mask is None else mask.reshape(-1).to(torch.float32)
    for layer, logits in enumerate(router_logits):
        probs = torch.softmax(logits.float(), dim=-1)  # [N, E]
        chosen = expert_ids[layer] if expert_ids is not None else torch.topk(probs, top_k, dim=-1).indices  # [N, K]
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
