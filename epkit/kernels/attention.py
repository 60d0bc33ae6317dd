"""Paged attention for decoding: one query per row, keys and values read through the block table.

The model's readable path (`PagedKVCache.update`) gathers every row's keys into a dense [B, S] copy
and builds a [B, 1, T, S] mask for SDPA: per layer, two gathers, a mask and a masked SDPA. Here a
Triton program per (row, KV head, key split) walks the row's blocks straight from the pool, with an
online softmax (flash-decoding); when a row's keys are split over several programs a second small
kernel merges the partial results. Both are a fixed launch for a given (rows, table width), so a
CUDA graph captures them.

`paged_decode_attention_torch` is the same computation in torch (gather through the table, mask,
SDPA): the CPU path and the reference the kernel is tested against.

Legend: N rows (one query each), H query heads, G KV heads, Dh head dim, NB block-table width,
bs block size, S = NB * bs key slots per row, P pool slots, SP key splits.
"""
from __future__ import annotations

import functools
import math

import torch
import torch.nn.functional as F

from . import HAS_TRITON, next_pow2

BLOCK_S = 64  # keys per inner step of the kernel


def paged_decode_attention_torch(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, table: torch.Tensor,
                                 seq_lens: torch.Tensor, block_size: int, window: int | None = None) -> torch.Tensor:
    """q [N, H, Dh]; k_cache, v_cache [P, G, Dh] (one layer's pool); table [N, NB]; seq_lens [N] keys each row
    holds (its query sits at position seq_len - 1; 0 marks padding) -> [N, H, Dh]."""
    N, H, Dh = q.shape
    s = torch.arange(table.shape[1] * block_size, device=q.device)  # [S]
    slots = table[:, s // block_size] * block_size + s % block_size  # [N, S]
    k = k_cache[slots].transpose(1, 2)  # [N, G, S, Dh]
    v = v_cache[slots].transpose(1, 2)
    visible = s[None, :] < seq_lens[:, None]  # [N, S]
    if window is not None:
        visible &= s[None, :] >= seq_lens[:, None] - window
    visible |= ~visible.any(-1, keepdim=True)  # padding rows see everything: finite, unused
    out = F.scaled_dot_product_attention(q[:, :, None], k, v, attn_mask=visible[:, None, None],
                                         enable_gqa=k.shape[1] != H)  # [N, H, 1, Dh]
    return out[:, :, 0]


def supported(head_dim: int, num_heads: int, num_kv_heads: int, dtype: torch.dtype) -> bool:
    """Shapes the kernel handles (tl.dot needs power-of-two dims of at least 16)."""
    return (HAS_TRITON and head_dim >= 16 and head_dim == next_pow2(head_dim) and num_heads % num_kv_heads == 0
            and dtype in (torch.bfloat16, torch.float16, torch.float32))


@functools.cache
def _programs_wanted(device: torch.device) -> int:
    """About two programs per SM keep the memory system busy; the interpreter only needs a few."""
    if device.type == "cuda":
        return 2 * torch.cuda.get_device_properties(device).multi_processor_count
    return 4


def split_plan(rows: int, kv_heads: int, key_slots: int, device: torch.device) -> tuple[int, int]:
    """(splits, keys per split) for a launch: split a row's keys over programs only while rows x KV heads
    alone leave the GPU idle. Depends only on shapes, so a captured graph keeps its plan."""
    steps = -(-key_slots // BLOCK_S)
    want = -(-_programs_wanted(torch.device(device)) // max(1, rows * kv_heads))
    splits = max(1, min(steps, want))
    per_split = -(-steps // splits) * BLOCK_S
    return -(-key_slots // per_split), per_split


def paged_decode_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, table: torch.Tensor,
                           seq_lens: torch.Tensor, block_size: int, window: int | None = None) -> torch.Tensor:
    """The Triton kernel; same arguments and result as `paged_decode_attention_torch`, except that padding
    rows (seq_len 0) come back as zeros."""
    N, H, Dh = q.shape
    G = k_cache.shape[1]
    NB = table.shape[1]
    splits, per_split = split_plan(N, G, NB * block_size, q.device)
    q = q.contiguous()
    out = torch.empty_like(q)
    qpg = H // G
    meta = dict(H=H, G=G, DH=Dh, QPG=qpg, QP=max(16, next_pow2(qpg)), BS=block_size, BLOCK_S=BLOCK_S,
                SPLIT=splits > 1)
    if splits > 1:
        part_acc = torch.empty(N, H, splits, Dh, dtype=torch.float32, device=q.device)
        part_ml = torch.empty(N, H, splits, 2, dtype=torch.float32, device=q.device)
    else:
        part_acc = part_ml = out  # unused
    _decode_kernel[(N, G, splits)](q, k_cache, v_cache, table.contiguous(), seq_lens.contiguous(), out, part_acc,
                                   part_ml, 1.0 / math.sqrt(Dh), window or 0, NB, splits, per_split, **meta)
    if splits > 1:
        _merge_kernel[(N, H)](part_acc, part_ml, out, splits, DH=Dh, SP=next_pow2(splits))
    return out


if HAS_TRITON:
    import triton
    import triton.language as tl

    @triton.jit
    def _decode_kernel(q_ptr, k_ptr, v_ptr, table_ptr, lens_ptr, out_ptr, acc_ptr, ml_ptr, scale, window, NB,
                       splits, per_split, H: tl.constexpr, G: tl.constexpr, DH: tl.constexpr, QPG: tl.constexpr,
                       QP: tl.constexpr, BS: tl.constexpr, BLOCK_S: tl.constexpr, SPLIT: tl.constexpr):
        """Program (row n, KV head g, split sp): the QPG query heads of g against keys [lo, hi) of row n."""
        n = tl.program_id(0)
        g = tl.program_id(1)
        sp = tl.program_id(2)
        length = tl.load(lens_ptr + n).to(tl.int32)
        lo = sp * per_split
        hi = tl.minimum(length, lo + per_split)
        if window > 0:
            lo = tl.maximum(lo, length - window)
        start = lo - lo % BLOCK_S
        end = tl.where(hi > lo, hi, start)  # an empty range runs no step (an all-masked step would give NaN)
        h = tl.arange(0, QP)
        head_ok = h < QPG
        head = g * QPG + h
        d = tl.arange(0, DH)
        q = tl.load(q_ptr + (n * H + head)[:, None].to(tl.int64) * DH + d[None, :], mask=head_ok[:, None],
                    other=0.0)  # [QP, DH]
        m_i = tl.full([QP], float("-inf"), tl.float32)
        l_i = tl.zeros([QP], tl.float32)
        acc = tl.zeros([QP, DH], tl.float32)
        for s0 in range(start, end, BLOCK_S):
            s = s0 + tl.arange(0, BLOCK_S)
            key_ok = (s >= lo) & (s < hi)
            block = tl.load(table_ptr + n.to(tl.int64) * NB + s // BS, mask=key_ok, other=0)
            row = (block.to(tl.int64) * BS + s % BS) * G + g  # [BLOCK_S] row of the [P*G, DH] pool
            k_t = tl.load(k_ptr + row[None, :] * DH + d[:, None], mask=key_ok[None, :], other=0.0)  # [DH, BLOCK_S]
            scores = tl.dot(q, k_t) * scale  # [QP, BLOCK_S] fp32
            scores = tl.where(key_ok[None, :], scores, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(scores, 1))
            alpha = tl.exp(m_i - m_new)
            p = tl.exp(scores - m_new[:, None])
            l_i = l_i * alpha + tl.sum(p, 1)
            v = tl.load(v_ptr + row[:, None] * DH + d[None, :], mask=key_ok[:, None], other=0.0)  # [BLOCK_S, DH]
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
            m_i = m_new
        if SPLIT:
            part = (n * H + head).to(tl.int64) * splits + sp  # [QP]
            tl.store(acc_ptr + part[:, None] * DH + d[None, :], acc, mask=head_ok[:, None])
            tl.store(ml_ptr + part * 2, m_i, mask=head_ok)
            tl.store(ml_ptr + part * 2 + 1, l_i, mask=head_ok)
        else:
            o = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]
            tl.store(out_ptr + (n * H + head)[:, None].to(tl.int64) * DH + d[None, :], o.to(out_ptr.dtype.element_ty),
                     mask=head_ok[:, None])

    @triton.jit
    def _merge_kernel(acc_ptr, ml_ptr, out_ptr, splits, DH: tl.constexpr, SP: tl.constexpr):
        """Program (row n, head h): combine the splits' partial softmax sums."""
        n = tl.program_id(0)
        h = tl.program_id(1)
        H = tl.num_programs(1)
        sp = tl.arange(0, SP)
        ok = sp < splits
        part = (n * H + h).to(tl.int64) * splits + sp
        m = tl.load(ml_ptr + part * 2, mask=ok, other=float("-inf"))
        l = tl.load(ml_ptr + part * 2 + 1, mask=ok, other=0.0)
        m_max = tl.max(m, 0)
        w = tl.where(m > float("-inf"), tl.exp(m - m_max), 0.0)  # splits that saw no key weigh nothing
        total = tl.sum(w * l, 0)
        d = tl.arange(0, DH)
        acc = tl.load(acc_ptr + part[:, None] * DH + d[None, :], mask=ok[:, None], other=0.0)  # [SP, DH]
        o = tl.sum(acc * w[:, None], 0) / tl.where(total > 0, total, 1.0)
        tl.store(out_ptr + (n * H + h).to(tl.int64) * DH + d, o.to(out_ptr.dtype.element_ty))
