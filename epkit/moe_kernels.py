"""Triton kernels for the expert compute when few tokens reach each expert (decoding).

torch's grouped GEMM (CUTLASS) tiles M by 64-128 rows, so a decode step that sends one or two rows
to an expert spends its time on empty tiles and runs ~2x above the weight-reading floor. These
kernels tile M by 16: (pair) rows are gathered straight from the token matrix, each program computes
one 16-row block of one expert against one N-tile of its weights, and every weight byte is read once
per block. Block bookkeeping is done on the device, so the call has no host sync and a fixed launch
size (CUDA-graph friendly).

Legend: P routed (token, expert) pairs sorted by local expert, L local experts, D hidden, I intermediate.
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
    (bn1, bk1, bn2, bk2), kw = TILES if x.is_cuda else ((16, 16, 16, 16), {})
    _gate_up_kernel[(max_blocks, triton.cdiv(I, bn1))](x.contiguous(), token, w13, h, block_end, row_end, counts,
                                                        D, I, L=L, LP=LP, BM=BLOCK_M, BN=bn1, BK=bk1, **kw)
    _down_kernel[(max_blocks, triton.cdiv(D, bn2))](h, w2, out, block_end, row_end, counts, D, I,
                                                     L=L, LP=LP, BM=BLOCK_M, BN=bn2, BK=bk2, **kw)
    return out
