"""Fused kernels for the decode path. Each module holds a Triton kernel and the torch function it
mirrors (the reference that CPU runs and tests compare against); callers choose between them once,
at set-up (`epkit.infer.decode.DecodeKernels`), never per step.

    attention  paged decode attention that reads the block table directly (no K/V gather, no mask)
    fused      RMSNorm + residual add; rotary embedding + paged KV write; Mixtral routing
"""
from __future__ import annotations

import os

import torch

try:
    import triton  # noqa: F401
    HAS_TRITON = True
except ImportError:  # CPU-only installs
    HAS_TRITON = False


def interpreting() -> bool:
    """Triton's CPU interpreter (TRITON_INTERPRET=1) runs the kernels on CPU tensors: how tests check them."""
    return os.environ.get("TRITON_INTERPRET") == "1"


def triton_runs_on(device: torch.device | str) -> bool:
    """Whether Triton kernels can run on tensors of this device."""
    return HAS_TRITON and (torch.device(device).type == "cuda" or interpreting())


def next_pow2(n: int) -> int:
    return 1 << max(0, n - 1).bit_length()
