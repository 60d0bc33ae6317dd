"""The inference-time EP sum through symmetric memory: replicated dispatch's all-reduce as one NVLink kernel.

`set_ep_all_reduce(model, "auto")` (the engine calls it at set-up) gives every replicated MoE layer of an
expert-parallel model on CUDA GPUs a `SymmMemAllReduce`: torch's one-shot all-reduce over a buffer every rank
of the EP group can address. Training (grad enabled) and sums larger than the buffer keep NCCL's.

Legend: N tokens, D hidden.
"""
from __future__ import annotations

import torch
import torch.distributed as dist

from .parallel import ReplicatedDispatch


class SymmMemAllReduce:
    """Sum of fp32 tensors over a group through symmetric memory: torch's one-shot kernel copies this rank's
    rows into a buffer every rank can address over NVLink, waits for the peers (a device-side barrier), and
    adds all ranks' buffers in rank order, so every rank gets the same bits. One kernel of a few
    microseconds where NCCL's ring takes ~12; capturable in a CUDA graph. CUDA only; no NVLink multicast.
    Sums larger than the buffer (`max_bytes`) are NCCL's (the caller asks `fits`)."""

    def __init__(self, group, device: torch.device, max_bytes: int):
        import torch.distributed._symmetric_memory as symm_mem
        self.group_name = group.group_name
        self.capacity = max_bytes // 4
        self.buffer = symm_mem.empty(self.capacity, dtype=torch.float32, device=device)
        symm_mem.rendezvous(self.buffer, self.group_name)  # NOTE: collective, once per group (set-up)

    def fits(self, y: torch.Tensor) -> bool:
        return y.dtype == torch.float32 and y.is_contiguous() and y.numel() <= self.capacity

    def __call__(self, y: torch.Tensor) -> torch.Tensor:
        out = torch.empty_like(y)
        n = y.numel()
        # NOTE: collective (device-side barrier with the peers inside the kernel)
        torch.ops.symm_mem.one_shot_all_reduce_copy_out(self.buffer[:n], y.view(-1), "sum", self.group_name,
                                                        out.view(-1))
        return out


_SYMM_MEM: dict = {}  # (group name, device) -> SymmMemAllReduce: one buffer and rendezvous per group
EP_ALL_REDUCE = ("auto", "nccl", "symm_mem")
SYMM_MEM_MAX_BYTES = 8 << 20  # decode and small prefill steps: up to 512 tokens of hidden 4096 in fp32


def set_ep_all_reduce(model, kind: str = "auto", max_bytes: int = SYMM_MEM_MAX_BYTES) -> str:
    """Choose how the replicated layers of `model` sum their experts' outputs at inference (no grad):
    `nccl`, `symm_mem` (an error where it cannot run), or `auto` (symm_mem on CUDA GPUs where torch has it,
    else nccl). Every EP rank must make the same choice. Returns the one made."""
    if kind not in EP_ALL_REDUCE:
        raise ValueError(f"ep_all_reduce={kind!r} is not one of {', '.join(EP_ALL_REDUCE)}")
    info = model.expert_parallel
    layers = [m.dispatcher for m in model.moe_layers() if isinstance(m.dispatcher, ReplicatedDispatch)]
    if info is None or info.groups.ep_group is None or not layers:
        return "nccl"  # nothing to sum
    device = next(model.parameters()).device
    usable = device.type == "cuda" and hasattr(torch.ops.symm_mem, "one_shot_all_reduce_copy_out")
    if kind == "symm_mem" and not usable:
        raise ValueError(f"ep_all_reduce='symm_mem' needs CUDA GPUs and a torch with symmetric memory "
                         f"(the model is on {device}, torch {torch.__version__})")
    fast = None
    if kind == "symm_mem" or (kind == "auto" and usable):
        group, key = info.groups.ep_group, (info.groups.ep_group.group_name, str(device))
        try:
            if key not in _SYMM_MEM or _SYMM_MEM[key].capacity * 4 < max_bytes:
                _SYMM_MEM[key] = SymmMemAllReduce(group, device, max_bytes)
            fast = _SYMM_MEM[key]
        except Exception as e:  # noqa: BLE001 - "auto" falls back; "symm_mem" re-raises below
            if kind == "symm_mem":
                raise
            import warnings
            warnings.warn(f"symmetric memory unavailable ({type(e).__name__}: {e}); the EP sum stays NCCL's")
        # every rank must sum the same way (a mix waits forever): all use symm_mem only if all could
        agreed = torch.tensor([fast is not None], dtype=torch.int32, device=device)
        dist.all_reduce(agreed, op=dist.ReduceOp.MIN, group=group)  # NOTE: collective, once at set-up
        fast = fast if int(agreed.item()) else None  # NOTE: host sync (set-up)
    for d in layers:
        d.fast_sum = fast
    return "nccl" if fast is None else "symm_mem"
