"""`undefined_padding()`: the experts train through a stand-in for torch's grouped GEMM that leaves the rows
past offs[-1] undefined, as the GPU kernel does, so a CPU test sees what a bf16 GPU run sees.

torch's grouped GEMM writes only the groups' rows. Rows past offs[-1] of its output, and of its input's
gradient in backward, keep whatever the fresh buffer held: NaN or inf on a GPU, often (not always) zero
on a CPU. The stand-in makes them NaN every time. Inside the context, `Experts` on the CPU also choose the
grouped GEMM for training (the backend a Hopper GPU gets), which the CPU backend otherwise keeps to
inference.

    with undefined_padding():   # in this process (in a gloo rank: inside the rank's function)
        loss.backward()         # a NaN here is a padding row reaching a gradient
"""
from __future__ import annotations

import contextlib

import torch


class _UndefinedGradPast(torch.autograd.Function):
    """Identity; backward leaves rows from `end` on as NaN (the kernel's input gradient there is unwritten)."""

    @staticmethod
    def forward(ctx, x, end: int):
        ctx.end = end
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        grad = grad.clone()
        grad[ctx.end:] = float("nan")
        return grad, None


def grouped_mm(x: torch.Tensor, w: torch.Tensor, offs: torch.Tensor) -> torch.Tensor:
    """x [M, K] grouped by offs (cumulative ends, [G]), w [G, K, N] -> [M, N]; rows past offs[-1] NaN, in the
    output and in x's gradient. (The only form epkit calls: 2-D x 3-D.)"""
    assert x.dim() == 2 and w.dim() == 3 and offs.shape == (w.shape[0],), (x.shape, w.shape, offs.shape)
    ends = offs.tolist()
    x = _UndefinedGradPast.apply(x, ends[-1])
    pieces = [x[s:e] @ w[g] for g, (s, e) in enumerate(zip([0] + ends[:-1], ends))]
    pieces.append(x.new_full((x.shape[0] - ends[-1], w.shape[2]), float("nan")))
    return torch.cat(pieces)


@contextlib.contextmanager
def undefined_padding():
    import epkit.lora as lora_lib
    import epkit.moe as moe_lib
    from epkit.moe import ComputeBackend
    saved = moe_lib._grouped_mm, lora_lib._grouped_mm, moe_lib.choose_backend

    def choose(device, dtype, hidden, intermediate, impl="grouped"):
        return ComputeBackend() if impl == "loop" else ComputeBackend(0, "train")

    moe_lib._grouped_mm = lora_lib._grouped_mm = lambda x, w, offs: grouped_mm(x, w, offs)
    moe_lib.choose_backend = choose
    try:
        yield
    finally:
        moe_lib._grouped_mm, lora_lib._grouped_mm, moe_lib.choose_backend = saved
