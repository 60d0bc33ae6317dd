"""Small fused kernels of the decode path, each beside the torch function it mirrors.

    add_rms_norm    h + delta, then RMSNorm of the sum (the residual add of one block fused with the
                    norm that opens the next): one kernel instead of about eight
    rope_write_kv   rotary embedding of q and k straight out of the fused qkv projection, and the
                    write of k and v into the paged pool: one kernel instead of about sixteen
    route           Mixtral routing (softmax in fp32, top-k, renormalise): one kernel instead of five

The kernels round where the torch code rounds (each bf16 op of `epkit.model` rounds its result),
so they agree with it to the last bit where the math is elementwise (rotary embedding, the
residual add) and to fp32 rounding where it reduces (the norm's mean, the softmax).

Legend: N tokens, D hidden, H query heads, G KV heads, Dh head dim, P pool slots, E experts, K top-k.
"""
from __future__ import annotations

import torch

from ..moe import route as route_torch
from . import HAS_TRITON, next_pow2


# ---- torch references ------------------------------------------------------------------------------

def add_rms_norm_torch(h: torch.Tensor, delta: torch.Tensor | None, weight: torch.Tensor, eps: float
                       ) -> tuple[torch.Tensor, torch.Tensor]:
    """h [N, D], delta [N, D] (any float dtype, cast to h's first, as the model adds it) or None ->
    (h + delta, RMSNorm(h + delta)), the same ops as `epkit.model.RMSNorm`."""
    if delta is not None:
        h = h + delta.to(h.dtype)
    x = h.float()
    x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)
    return h, weight * x.to(h.dtype)


def rope_torch(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [N, heads, Dh]; cos, sin [N, 1, Dh]: `epkit.model.apply_rope` on a token-major layout."""
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat((-x2, x1), dim=-1) * sin


def split_qkv_rope(qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, H: int, G: int
                   ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """qkv [N, (H + 2G) * Dh] -> q [N, H, Dh], k [N, G, Dh] (both rotated), v [N, G, Dh]."""
    N = qkv.shape[0]
    q, k, v = qkv.view(N, H + 2 * G, -1).split([H, G, G], dim=1)
    return rope_torch(q, cos, sin), rope_torch(k, cos, sin), v


def rope_write_kv_torch(qkv, cos_table, sin_table, positions, slots, k_pool, v_pool, H: int, G: int):
    """qkv [N, (H + 2G) * Dh]; cos/sin tables [max positions, Dh]; positions [N] (-1 padding, rotated as 0);
    slots [N] pool slot of each token; k_pool, v_pool [P, G, Dh] -> q [N, H, Dh], k and v written to the pool."""
    pos = positions.clamp(min=0)
    q, k, v = split_qkv_rope(qkv, cos_table[pos][:, None], sin_table[pos][:, None], H, G)
    k_pool.index_copy_(0, slots, k)
    v_pool.index_copy_(0, slots, v)
    return q


# ---- dispatch (the kernel where Triton runs, else the reference) ---------------------------------

def add_rms_norm(h, delta, weight, eps):
    h = h.contiguous()
    N, D = h.shape
    h_out = torch.empty_like(h) if delta is not None else h
    x = torch.empty_like(h)
    d = delta.contiguous() if delta is not None else h
    _add_rms_norm_kernel[(N,)](h, d, weight, h_out, x, eps, D, BLOCK=next_pow2(D), HAS_DELTA=delta is not None)
    return h_out, x


def rope_write_kv(qkv, cos_table, sin_table, positions, slots, k_pool, v_pool, H: int, G: int):
    N = qkv.shape[0]
    Dh = k_pool.shape[-1]
    q = torch.empty(N, H, Dh, dtype=qkv.dtype, device=qkv.device)
    _rope_write_kv_kernel[(N, H + G)](qkv.contiguous(), cos_table, sin_table, positions, slots, k_pool, v_pool, q,
                                       H=H, G=G, HALF=Dh // 2)
    return q


def route(logits: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """logits [N, E] -> (weights [N, K] fp32, expert ids [N, K] int64), as `epkit.moe.route`."""
    N, E = logits.shape
    weights = torch.empty(N, k, dtype=torch.float32, device=logits.device)
    ids = torch.empty(N, k, dtype=torch.int64, device=logits.device)
    block_n = 16
    _route_kernel[(-(-N // block_n),)](logits.contiguous(), weights, ids, N, E=E, EP=next_pow2(E), K=k,
                                       KP=next_pow2(k), BLOCK_N=block_n)
    return weights, ids


def rope_supported(head_dim: int) -> bool:
    return HAS_TRITON and head_dim % 2 == 0 and head_dim // 2 == next_pow2(head_dim // 2)


__all__ = ["add_rms_norm", "add_rms_norm_torch", "rope_write_kv", "rope_write_kv_torch", "route", "route_torch",
           "split_qkv_rope", "rope_supported"]


if HAS_TRITON:
    import triton
    import triton.language as tl

    @triton.jit
    def _add_rms_norm_kernel(h_ptr, d_ptr, w_ptr, h_out_ptr, x_ptr, eps, D, BLOCK: tl.constexpr,
                             HAS_DELTA: tl.constexpr):
        """One row: h = h + delta (rounded to h's dtype), x = w * round(h * rsqrt(mean(h^2) + eps))."""
        row = tl.program_id(0).to(tl.int64) * D
        offs = tl.arange(0, BLOCK)
        ok = offs < D
        dt = h_out_ptr.dtype.element_ty
        h = tl.load(h_ptr + row + offs, mask=ok, other=0.0)
        if HAS_DELTA:
            delta = tl.load(d_ptr + row + offs, mask=ok, other=0.0).to(dt)
            h = (h.to(tl.float32) + delta.to(tl.float32)).to(dt)
            tl.store(h_out_ptr + row + offs, h, mask=ok)
        hf = h.to(tl.float32)
        inv = 1.0 / tl.sqrt_rn(tl.sum(hf * hf, 0) / D + eps)
        x = (hf * inv).to(dt)
        w = tl.load(w_ptr + offs, mask=ok, other=0.0)
        tl.store(x_ptr + row + offs, (w.to(tl.float32) * x.to(tl.float32)).to(dt), mask=ok)

    @triton.jit
    def _rope_half(x1, x2, c1, c2, s1, s2, dt: tl.constexpr):
        """x * cos + cat(-x2, x1) * sin, each product and the sum rounded to dt as in torch."""
        a1 = (x1.to(tl.float32) * c1.to(tl.float32)).to(dt)
        b1 = (-x2.to(tl.float32) * s1.to(tl.float32)).to(dt)
        a2 = (x2.to(tl.float32) * c2.to(tl.float32)).to(dt)
        b2 = (x1.to(tl.float32) * s2.to(tl.float32)).to(dt)
        return (a1.to(tl.float32) + b1.to(tl.float32)).to(dt), (a2.to(tl.float32) + b2.to(tl.float32)).to(dt)

    @triton.jit
    def _rope_write_kv_kernel(qkv_ptr, cos_ptr, sin_ptr, pos_ptr, slot_ptr, k_ptr, v_ptr, q_ptr,
                              H: tl.constexpr, G: tl.constexpr, HALF: tl.constexpr):
        """Program (token n, head j): j < H rotates query head j into q; j >= H rotates KV head j - H and
        writes it, with its value, to the token's pool slot."""
        n = tl.program_id(0).to(tl.int64)
        j = tl.program_id(1)
        DH: tl.constexpr = 2 * HALF
        dt = q_ptr.dtype.element_ty
        pos = tl.maximum(tl.load(pos_ptr + n), 0)
        i = tl.arange(0, HALF)
        c1 = tl.load(cos_ptr + pos * DH + i)
        c2 = tl.load(cos_ptr + pos * DH + HALF + i)
        s1 = tl.load(sin_ptr + pos * DH + i)
        s2 = tl.load(sin_ptr + pos * DH + HALF + i)
        src = qkv_ptr + n * (H + 2 * G) * DH + j * DH
        o1, o2 = _rope_half(tl.load(src + i), tl.load(src + HALF + i), c1, c2, s1, s2, dt)
        if j < H:
            q_dst = q_ptr + (n * H + j) * DH
            tl.store(q_dst + i, o1)
            tl.store(q_dst + HALF + i, o2)
        else:
            kv = tl.load(slot_ptr + n) * G * DH + (j - H) * DH  # offset of (slot, KV head) in the pools
            tl.store(k_ptr + kv + i, o1)
            tl.store(k_ptr + kv + HALF + i, o2)
            v_src = src + G * DH
            tl.store(v_ptr + kv + i, tl.load(v_src + i))
            tl.store(v_ptr + kv + HALF + i, tl.load(v_src + HALF + i))

    @triton.jit
    def _route_kernel(logits_ptr, w_ptr, id_ptr, N, E: tl.constexpr, EP: tl.constexpr, K: tl.constexpr,
                      KP: tl.constexpr, BLOCK_N: tl.constexpr):
        """BLOCK_N tokens: softmax over E experts in fp32, K rounds of arg-max, renormalise."""
        rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
        row_ok = rows < N
        e = tl.arange(0, EP)
        logits = tl.load(logits_ptr + rows[:, None].to(tl.int64) * E + e[None, :],
                         mask=row_ok[:, None] & (e[None, :] < E), other=float("-inf")).to(tl.float32)
        z = tl.exp(logits - tl.max(logits, 1)[:, None])
        probs = z / tl.sum(z, 1)[:, None]  # [BLOCK_N, EP], 0 in the padding columns
        probs = tl.where(e[None, :] < E, probs, -1.0)
        kk = tl.arange(0, KP)
        weights = tl.zeros([BLOCK_N, KP], tl.float32)
        ids = tl.zeros([BLOCK_N, KP], tl.int32)
        total = tl.zeros([BLOCK_N], tl.float32)
        for r in tl.static_range(K):
            best = tl.max(probs, 1)
            pick = tl.min(tl.where(probs == best[:, None], e[None, :], EP), 1)  # lowest id among ties
            weights = tl.where(kk[None, :] == r, best[:, None], weights)
            ids = tl.where(kk[None, :] == r, pick[:, None], ids)
            total += best
            probs = tl.where(e[None, :] == pick[:, None], -1.0, probs)
        out = rows[:, None].to(tl.int64) * K + kk[None, :]
        ok = row_ok[:, None] & (kk[None, :] < K)
        tl.store(w_ptr + out, weights / total[:, None], mask=ok)
        tl.store(id_ptr + out, ids.to(tl.int64), mask=ok)
