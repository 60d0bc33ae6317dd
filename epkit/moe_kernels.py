"""Triton kernels for the expert compute: small-M GEMMs when few tokens reach each expert (decoding), and
the two memory-bound steps around torch's grouped GEMM when many do (prefill): `swiglu` and `combine`.

torch's grouped GEMM (CUTLASS) tiles M by 64-128 rows, so a decode step that sends one or two rows
to an expert spends its time on empty tiles and runs ~2x above the weight-reading floor. These
kernels tile M by 16: (pair) rows are gathered straight from the token matrix, each program computes
one 16-row block of one expert against one N-tile of its weights, and every weight byte is read once
per block. Block bookkeeping is done on the device, so the call has no host sync and a fixed launch
size (CUDA-graph friendly).

`fused_experts_small` is the whole local MoE of a decode step in three kernels: a one-program counting
sort of the (token, expert) pairs by local expert (with the block bookkeeping), gate/up, and a down
projection that weights each row and adds it into its token's output (fp32 atomics: with top-2 a
token gets at most two adds into zero, which commute, so the sum does not depend on their order).

Legend: N tokens, K choices per token, P routed (token, expert) pairs sorted by local expert, L local
experts, D hidden, I intermediate.
"""
from __future__ import annotations

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs
    triton = None

BLOCK_M = 16
# (gate/up N tile, its K tile, down N tile, its K tile), launch options. Checked on an H200 inside a
# CUDA graph: 0.134 ms for one token on one of 4 local experts (floor 0.082), 0.273 ms for 4 tokens
# (floor 0.246), 0.352 ms for 32 (floor 0.328); narrower tiles and other stage counts were no faster.
TILES = ((64, 128, 64, 128), {})
# Up to FEW_PAIRS pairs (a few 16-row blocks) the down projection takes one of these launch configurations,
# (N tile, K tile, pipeline stages, warps): narrower N tiles spread one block over every SM (D / 64 = 64
# programs would leave half of an H200's 132 idle), longer K tiles and more stages keep more weight bytes in
# flight per SM. Every one of them sums each output over K in the same 16-wide steps, so they give the same
# bits; `epkit.infer.decode.tune_expert_tiles` times them on the GPU at set-up, keeps the fastest whose output
# is bit-equal to the first's, and records it here (measured on an H200: the first reads 117 MB in 49 us,
# 2.4 TB/s, where the gate/up kernel reaches the 4.2 TB/s copy rate).
FEW_PAIRS = 32
FEW_PAIRS_DOWN = [(32, 128, 3, 4), (32, 256, 4, 4), (32, 512, 3, 4), (16, 1024, 3, 4), (64, 256, 4, 4)]
few_pairs_down: dict[tuple, tuple] = {}  # (device, w2 shape) -> the chosen configuration


def available(device) -> bool:
    """Whether the kernels can run on `device` (a CUDA device with Triton installed, or Triton's CPU interpreter)."""
    return triton is not None and (torch.device(device).type == "cuda" or _interpreting())


def _interpreting() -> bool:
    import os
    return os.environ.get("TRITON_INTERPRET") == "1"


if triton is not None:

    @triton.jit
    def _block_of(pid_m, block_end, row_end, counts, L: tl.constexpr, LP: tl.constexpr, BM: tl.constexpr):
        """Which local expert block `pid_m` serves, its first sorted row and its number of rows."""
        offs = tl.arange(0, LP)
        ends = tl.load(block_end + offs, mask=offs < L, other=2**30)
        e = tl.sum((ends <= pid_m).to(tl.int32))  # first expert whose block range contains pid_m
        e_safe = tl.minimum(e, L - 1)
        n_e = tl.load(counts + e_safe)
        blocks_e = (n_e + BM - 1) // BM
        first_block = tl.load(block_end + e_safe) - blocks_e
        row0 = tl.load(row_end + e_safe) - n_e + (pid_m - first_block) * BM
        rows = tl.minimum(BM, n_e - (pid_m - first_block) * BM)
        rows = tl.where(e < L, rows, 0)
        return e_safe, row0, rows

    @triton.jit
    def _gate_up_kernel(x, token, w13, h, block_end, row_end, counts, D: tl.constexpr, I: tl.constexpr,
                        L: tl.constexpr, LP: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr):
        """h[rows, n-tile] = silu(x[token] @ w1[e].T) * (x[token] @ w3[e].T)."""
        pid_m, pid_n = tl.program_id(0), tl.program_id(1)
        e, row0, rows = _block_of(pid_m, block_end, row_end, counts, L, LP, BM)
        if rows <= 0:
            return
        offs_m = tl.arange(0, BM)
        m_mask = offs_m < rows
        tok = tl.load(token + row0 + offs_m, mask=m_mask, other=0)
        offs_n = pid_n * BN + tl.arange(0, BN)
        n_mask = offs_n < I
        offs_k = tl.arange(0, BK)
        w_base = w13 + e.to(tl.int64) * 2 * I * D
        acc_g = tl.zeros((BM, BN), dtype=tl.float32)
        acc_u = tl.zeros((BM, BN), dtype=tl.float32)
        for k0 in range(0, D, BK):
            k = k0 + offs_k
            k_mask = k < D
            xa = tl.load(x + tok[:, None].to(tl.int64) * D + k[None, :], mask=m_mask[:, None] & k_mask[None, :],
                         other=0.0)
            wg = tl.load(w_base + offs_n[None, :].to(tl.int64) * D + k[:, None],
                         mask=n_mask[None, :] & k_mask[:, None], other=0.0)  # [BK, BN]
            wu = tl.load(w_base + (offs_n[None, :] + I).to(tl.int64) * D + k[:, None],
                         mask=n_mask[None, :] & k_mask[:, None], other=0.0)
            acc_g = tl.dot(xa, wg, acc_g)
            acc_u = tl.dot(xa, wu, acc_u)
        out = acc_g * tl.sigmoid(acc_g) * acc_u
        rows_idx = (row0 + offs_m).to(tl.int64)
        tl.store(h + rows_idx[:, None] * I + offs_n[None, :], out.to(h.dtype.element_ty),
                 mask=m_mask[:, None] & n_mask[None, :])

    @triton.jit
    def _down_kernel(h, w2, out, block_end, row_end, counts, D: tl.constexpr, I: tl.constexpr,
                     L: tl.constexpr, LP: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr):
        """out[rows, n-tile] = h[rows] @ w2[e].T."""
        pid_m, pid_n = tl.program_id(0), tl.program_id(1)
        e, row0, rows = _block_of(pid_m, block_end, row_end, counts, L, LP, BM)
        if rows <= 0:
            return
        offs_m = tl.arange(0, BM)
        m_mask = offs_m < rows
        rows_idx = (row0 + offs_m).to(tl.int64)
        offs_n = pid_n * BN + tl.arange(0, BN)
        n_mask = offs_n < D
        offs_k = tl.arange(0, BK)
        w_base = w2 + e.to(tl.int64) * D * I
        acc = tl.zeros((BM, BN), dtype=tl.float32)
        for k0 in range(0, I, BK):
            k = k0 + offs_k
            k_mask = k < I
            ha = tl.load(h + rows_idx[:, None] * I + k[None, :], mask=m_mask[:, None] & k_mask[None, :], other=0.0)
            wd = tl.load(w_base + offs_n[None, :].to(tl.int64) * I + k[:, None],
                         mask=n_mask[None, :] & k_mask[:, None], other=0.0)
            acc = tl.dot(ha, wd, acc)
        tl.store(out + rows_idx[:, None] * D + offs_n[None, :], acc.to(out.dtype.element_ty),
                 mask=m_mask[:, None] & n_mask[None, :])


    @triton.jit
    def _down_combine_kernel(h, w2, y, token, pair_w, block_end, row_end, counts, D: tl.constexpr,
                             I: tl.constexpr, L: tl.constexpr, LP: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr,
                             BK: tl.constexpr):
        """y[token[rows], n-tile] += pair_w[rows] * round(h[rows] @ w2[e].T): the down projection and the
        weighted combine (the rounding to h's dtype is where the unfused path stores its output)."""
        pid_m, pid_n = tl.program_id(0), tl.program_id(1)
        e, row0, rows = _block_of(pid_m, block_end, row_end, counts, L, LP, BM)
        if rows <= 0:
            return
        offs_m = tl.arange(0, BM)
        m_mask = offs_m < rows
        rows_idx = (row0 + offs_m).to(tl.int64)
        offs_n = pid_n * BN + tl.arange(0, BN)
        n_mask = offs_n < D
        offs_k = tl.arange(0, BK)
        w_base = w2 + e.to(tl.int64) * D * I
        acc = tl.zeros((BM, BN), dtype=tl.float32)
        for k0 in range(0, I, BK):
            k = k0 + offs_k
            k_mask = k < I
            ha = tl.load(h + rows_idx[:, None] * I + k[None, :], mask=m_mask[:, None] & k_mask[None, :], other=0.0)
            wd = tl.load(w_base + offs_n[None, :].to(tl.int64) * I + k[:, None],
                         mask=n_mask[None, :] & k_mask[:, None], other=0.0)
            acc = tl.dot(ha, wd, acc)
        tok = tl.load(token + rows_idx, mask=m_mask, other=0).to(tl.int64)
        wt = tl.load(pair_w + rows_idx, mask=m_mask, other=0.0)
        out = acc.to(h.dtype.element_ty).to(tl.float32) * wt[:, None]
        tl.atomic_add(y + tok[:, None] * D + offs_n[None, :], out, mask=m_mask[:, None] & n_mask[None, :])

    @triton.jit
    def _permute_kernel(slots, weights, token, pair_w, counts, row_end, block_end, PK, K: tl.constexpr,
                        L: tl.constexpr, LB: tl.constexpr, BLOCK_P: tl.constexpr, BM: tl.constexpr):
        """One program: a stable counting sort of the PK (token, choice) pairs by local slot (-1, another
        rank's expert, sorts last and is dropped), with the per-expert row and block ends."""
        p = tl.arange(0, BLOCK_P)
        ok = p < PK
        s = tl.load(slots + p, mask=ok, other=-1)
        key = tl.where(s < 0, L, s)
        b = tl.arange(0, LB)
        onehot = ((key[:, None] == b[None, :]) & ok[:, None]).to(tl.int32)  # [BLOCK_P, LB]
        n_b = tl.sum(onehot, 0)  # [LB] pairs per bucket
        before = tl.cumsum(onehot, 0) - onehot  # earlier pairs in the same bucket
        start = tl.cumsum(n_b, 0) - n_b
        dest = tl.sum(onehot * (before + start[None, :]), 1)  # [BLOCK_P] sorted position
        local = ok & (key < L)
        tl.store(token + dest, (p // K).to(tl.int32), mask=local)
        tl.store(pair_w + dest, tl.load(weights + p, mask=ok, other=0.0), mask=local)
        is_l = b < L
        c = tl.where(is_l, n_b, 0)
        tl.store(counts + b, c, mask=is_l)
        tl.store(row_end + b, tl.cumsum(c, 0), mask=is_l)
        tl.store(block_end + b, tl.cumsum((c + BM - 1) // BM, 0), mask=is_l)

    @triton.jit
    def _swiglu_kernel(h13, out, I, BLOCK: tl.constexpr):
        """out[row, cols] = silu(gate) * up, h13's row = [gate | up]; rounds where torch's two ops round."""
        row = tl.program_id(0).to(tl.int64)
        offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        m = offs < I
        g = tl.load(h13 + row * 2 * I + offs, mask=m, other=0.0).to(tl.float32)
        u = tl.load(h13 + row * 2 * I + I + offs, mask=m, other=0.0).to(tl.float32)
        silu = (g / (1.0 + tl.exp(-g))).to(out.dtype.element_ty, fp_downcast_rounding="rtne").to(tl.float32)
        tl.store(out + row * I + offs, (silu * u).to(out.dtype.element_ty, fp_downcast_rounding="rtne"), mask=m)

    @triton.jit
    def _swiglu_bwd_kernel(h13, g, dh13, I, BLOCK: tl.constexpr):
        """dh13[row] = [d gate | d up] of out = silu(gate) * up, given g = d out: the products and silu's
        derivative in fp32, rounded where torch's autograd rounds (its saved silu output, the gradient it
        passes from the product to silu, each result), both halves written straight into h13's layout."""
        row = tl.program_id(0).to(tl.int64)
        offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        m = offs < I
        dt = dh13.dtype.element_ty
        gate = tl.load(h13 + row * 2 * I + offs, mask=m, other=0.0).to(tl.float32)
        up = tl.load(h13 + row * 2 * I + I + offs, mask=m, other=0.0).to(tl.float32)
        gg = tl.load(g + row * I + offs, mask=m, other=0.0).to(tl.float32)
        sig = 1.0 / (1.0 + tl.exp(-gate))
        silu = (gate / (1.0 + tl.exp(-gate))).to(dt, fp_downcast_rounding="rtne").to(tl.float32)
        d_silu = (gg * up).to(dt, fp_downcast_rounding="rtne").to(tl.float32)
        d_gate = d_silu * (sig * (1.0 + gate * (1.0 - sig)))
        tl.store(dh13 + row * 2 * I + offs, d_gate.to(dt, fp_downcast_rounding="rtne"), mask=m)
        tl.store(dh13 + row * 2 * I + I + offs, (gg * silu).to(dt, fp_downcast_rounding="rtne"), mask=m)

    @triton.jit
    def _combine_bwd_kernel(out, inv, weights, keep, gy, dout, dw, D, K: tl.constexpr, HAS_KEEP: tl.constexpr,
                            BLOCK: tl.constexpr):
        """Backward of `_combine_kernel` for token t: each of its K rows r gets d out[r] = w * gy[t] (in out's
        dtype) and its weight d w = sum over D of out[r] * gy[t] (fp32); a row whose keep is False gets 0 for
        both and is not read."""
        t = tl.program_id(0).to(tl.int64)
        dt = dout.dtype.element_ty
        for k in tl.static_range(K):
            r = tl.load(inv + t * K + k).to(tl.int64)
            w = tl.load(weights + t * K + k).to(tl.float32)
            kept = tl.full([BLOCK], 1, tl.int32)
            if HAS_KEEP:
                kept = kept * tl.load(keep + r).to(tl.int32)  # a block of the row's keep flag
            acc = tl.zeros([BLOCK], dtype=tl.float32)
            for d0 in range(0, D, BLOCK):
                offs = d0 + tl.arange(0, BLOCK)
                m = offs < D
                g = tl.load(gy + t * D + offs, mask=m, other=0.0).to(tl.float32)
                o = tl.load(out + r * D + offs, mask=m & (kept != 0), other=0.0).to(tl.float32)
                tl.store(dout + r * D + offs, tl.where(kept != 0, g * w, 0.0).to(dt), mask=m)
                acc += g * o
            tl.store(dw + t * K + k, tl.sum(acc, 0))

    @triton.jit
    def _combine_kernel(out, inv, weights, keep, y, D, K: tl.constexpr, HAS_KEEP: tl.constexpr,
                        BLOCK: tl.constexpr):
        """y[t, cols] = sum over k of weights[t, k] * out[inv[t*K + k], cols] in fp32; a row whose keep is
        False is not read (it may hold anything)."""
        t = tl.program_id(0).to(tl.int64)
        offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        m = offs < D
        acc = tl.zeros([BLOCK], dtype=tl.float32)
        for k in tl.static_range(K):
            r = tl.load(inv + t * K + k).to(tl.int64)
            w = tl.load(weights + t * K + k).to(tl.float32)
            load = m
            if HAS_KEEP:
                load = m & ((offs * 0 + tl.load(keep + r).to(tl.int32)) != 0)  # a block mask
            acc += tl.load(out + r * D + offs, mask=load, other=0.0).to(tl.float32) * w
        tl.store(y + t * D + offs, acc, mask=m)


def _tiles(x: torch.Tensor, w2: torch.Tensor, pairs: int):
    """((gate/up N tile, K tile), launch options), ((down N tile, K tile), launch options)."""
    if not x.is_cuda:
        return ((16, 16), {}), ((16, 16), {})
    (bn1, bk1, bn2, bk2), kw = TILES
    if pairs > FEW_PAIRS:
        return ((bn1, bk1), kw), ((bn2, bk2), kw)
    bn, bk, stages, warps = few_pairs_down.get((w2.device, tuple(w2.shape)), FEW_PAIRS_DOWN[0])
    return ((bn1, bk1), kw), ((bn, bk), dict(num_stages=stages, num_warps=warps))


def experts_small_m(x: torch.Tensor, token: torch.Tensor, counts: torch.Tensor, w13: torch.Tensor,
                    w2: torch.Tensor) -> torch.Tensor:
    """SwiGLU experts over routed pairs sorted by local expert.

    x [N, D] tokens (not gathered); token [P] the token of each sorted pair; counts [L] pairs per local
    expert (rows past their sum are padding and stay undefined; a longer counts is cut to L).
    Returns [P, D].
    """
    L, two_i, D = w13.shape
    I = two_i // 2
    P = token.shape[0]
    counts = counts[:L].to(torch.int32)
    row_end = torch.cumsum(counts, 0, dtype=torch.int32)
    block_end = torch.cumsum((counts + BLOCK_M - 1) // BLOCK_M, 0, dtype=torch.int32)
    max_blocks = triton.cdiv(P, BLOCK_M) + L  # a fixed upper bound: no need to read block_end back
    LP = triton.next_power_of_2(L)
    token = token.to(torch.int32).contiguous()
    h = torch.empty(P, I, dtype=x.dtype, device=x.device)
    out = torch.empty(P, D, dtype=x.dtype, device=x.device)
    ((bn1, bk1), kw1), ((bn2, bk2), kw2) = _tiles(x, w2, P)
    _gate_up_kernel[(max_blocks, triton.cdiv(I, bn1))](x.contiguous(), token, w13, h, block_end, row_end, counts,
                                                        D, I, L=L, LP=LP, BM=BLOCK_M, BN=bn1, BK=bk1, **kw1)
    _down_kernel[(max_blocks, triton.cdiv(D, bn2))](h, w2, out, block_end, row_end, counts, D, I,
                                                     L=L, LP=LP, BM=BLOCK_M, BN=bn2, BK=bk2, **kw2)
    return out


def fused_experts_small(x: torch.Tensor, weights: torch.Tensor, slots: torch.Tensor, w13: torch.Tensor,
                        w2: torch.Tensor) -> torch.Tensor:
    """This rank's weighted expert sum for every token, [N, D] fp32, as `Experts.forward` computes it.

    x [N, D]; weights [N, K] fp32; slots [N, K] local slot of each choice, -1 where another rank owns it.
    Four kernels, no host sync: sort pairs, zero the output, gate/up, down + combine.
    """
    L, two_i, D = w13.shape
    I = two_i // 2
    N, K = slots.shape
    P = N * K
    dev = x.device
    token = torch.empty(P, dtype=torch.int32, device=dev)
    pair_w = torch.empty(P, dtype=torch.float32, device=dev)
    meta = torch.empty(3, L, dtype=torch.int32, device=dev)  # counts, row ends, block ends
    counts, row_end, block_end = meta[0], meta[1], meta[2]
    _permute_kernel[(1,)](slots.reshape(-1).contiguous(), weights.reshape(-1).float().contiguous(), token, pair_w,
                          counts, row_end, block_end, P, K=K, L=L, LB=triton.next_power_of_2(L + 1),
                          BLOCK_P=triton.next_power_of_2(P), BM=BLOCK_M)
    max_blocks = triton.cdiv(P, BLOCK_M) + L
    LP = triton.next_power_of_2(L)
    h = torch.empty(P, I, dtype=x.dtype, device=dev)
    y = torch.zeros(N, D, dtype=torch.float32, device=dev)
    ((bn1, bk1), kw1), ((bn2, bk2), kw2) = _tiles(x, w2, P)
    _gate_up_kernel[(max_blocks, triton.cdiv(I, bn1))](x.contiguous(), token, w13, h, block_end, row_end, counts,
                                                        D, I, L=L, LP=LP, BM=BLOCK_M, BN=bn1, BK=bk1, **kw1)
    _down_combine_kernel[(max_blocks, triton.cdiv(D, bn2))](h, w2, y, token, pair_w, block_end, row_end, counts,
                                                             D, I, L=L, LP=LP, BM=BLOCK_M, BN=bn2, BK=bk2, **kw2)
    return y


def swiglu(h13: torch.Tensor) -> torch.Tensor:
    """h13 [M, 2I] (gate | up, as the w13 projection writes them) -> silu(gate) * up [M, I] in h13's dtype: one
    pass over h13 instead of torch's silu and multiply (three). Rounds where torch rounds (silu's result, then
    the product), so bf16 results match torch's bits up to the exponential's last fp32 bit."""
    M, two_i = h13.shape
    I = two_i // 2
    out = torch.empty(M, I, dtype=h13.dtype, device=h13.device)
    block = min(1024, triton.next_power_of_2(I))
    if M:
        _swiglu_kernel[(M, triton.cdiv(I, block))](h13.contiguous(), out, I, BLOCK=block)
    return out


def swiglu_backward(h13: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """Gradient of `swiglu` for h13 [M, 2I] given g [M, I]: [M, 2I] (d gate | d up), one pass where torch's
    autograd takes four (the product's two halves, silu's derivative, the concatenation for the GEMM)."""
    M, two_i = h13.shape
    I = two_i // 2
    dh13 = torch.empty_like(h13)
    block = min(1024, triton.next_power_of_2(I))
    if M:
        _swiglu_bwd_kernel[(M, triton.cdiv(I, block))](h13.contiguous(), g.contiguous(), dh13, I, BLOCK=block)
    return dh13


class _SwiGLU(torch.autograd.Function):
    """`swiglu` with its fused backward; keeps h13 alone for backward (torch's ops also keep silu's output)."""

    @staticmethod
    def forward(ctx, h13):
        ctx.save_for_backward(h13)
        return swiglu(h13)

    @staticmethod
    def backward(ctx, g):
        (h13,) = ctx.saved_tensors
        return swiglu_backward(h13, g)


def swiglu_autograd(h13: torch.Tensor) -> torch.Tensor:
    """`swiglu` for training: the same forward, differentiable through `swiglu_backward`."""
    return _SwiGLU.apply(h13)


def _inverse(order: torch.Tensor) -> torch.Tensor:
    """order [M] (a permutation) -> inv [M], inv[order[i]] = i: the row where each pair sits."""
    return torch.empty_like(order).scatter_(0, order, torch.arange(order.shape[0], device=order.device))


def combine(out: torch.Tensor, order: torch.Tensor, weights: torch.Tensor, keep: torch.Tensor | None = None
            ) -> torch.Tensor:
    """`epkit.moe.unpermute` as one gather kernel (and one scatter for the inverse of `order`): each token reads
    its K rows of `out` and adds them, weighted, in fp32; no [M, D] fp32 product, no atomics. Rows whose `keep`
    is False are never read. out [M, D] in `order` order, weights [N, K] -> [N, D] fp32."""
    return _combine(out, _inverse(order), weights, keep)


def _combine(out, inv, weights, keep):
    N, K = weights.shape
    M, D = out.shape
    y = torch.empty(N, D, dtype=torch.float32, device=out.device)
    block = min(1024, triton.next_power_of_2(D))
    if N:
        _combine_kernel[(N, triton.cdiv(D, block))](out.contiguous(), inv, weights.contiguous(),
                                                    keep.to(torch.int8) if keep is not None else inv, y, D, K=K,
                                                    HAS_KEEP=keep is not None, BLOCK=block)
    return y


def combine_backward(out: torch.Tensor, inv: torch.Tensor, weights: torch.Tensor, keep: torch.Tensor | None,
                     gy: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Gradients of `combine` for gy [N, D]: (d out [M, D] in out's dtype, d weights [N, K] fp32); rows whose
    keep is False get zeros (their values are never read)."""
    N, K = weights.shape
    M, D = out.shape
    dout = torch.empty_like(out)
    dw = torch.empty(N, K, dtype=torch.float32, device=out.device)
    if N:
        _combine_bwd_kernel[(N,)](out.contiguous(), inv, weights.contiguous(),
                                  keep.to(torch.int8) if keep is not None else inv, gy.contiguous(), dout, dw, D,
                                  K=K, HAS_KEEP=keep is not None, BLOCK=min(1024, triton.next_power_of_2(D)))
    return dout, dw


class _Combine(torch.autograd.Function):
    """`combine` differentiable in out and weights: one gather kernel each way, no [M, D] fp32 product."""

    @staticmethod
    def forward(ctx, out, order, weights, keep):
        inv = _inverse(order)
        ctx.save_for_backward(out, inv, weights, keep)
        return _combine(out, inv, weights, keep)

    @staticmethod
    def backward(ctx, gy):
        out, inv, weights, keep = ctx.saved_tensors
        dout, dw = combine_backward(out, inv, weights, keep, gy)
        return dout, None, dw.to(weights.dtype), None


def combine_autograd(out: torch.Tensor, order: torch.Tensor, weights: torch.Tensor,
                     keep: torch.Tensor | None = None) -> torch.Tensor:
    """`combine` for training: the same forward, differentiable through `combine_backward`."""
    return _Combine.apply(out, order, weights, keep)
