"""`NoHostSync()`: a torch-function mode that raises on every tensor operation that reads device data
on the host (or sizes an output from device data), so a CPU test can show that a code path would run
without a device-to-host sync on a GPU, i.e. that a CUDA graph could capture it.

    with NoHostSync():
        y = layer(x)          # raises HostSync("Tensor.tolist") if the layer calls .tolist()

It sees what Python calls on tensors: .item(), .tolist(), bool()/int()/float() of a tensor,
nonzero/unique/masked_select/bincount, boolean-mask indexing, one-argument torch.where, .cpu() and
.numpy(), and repeat_interleave without output_size.
"""
from __future__ import annotations

import torch
from torch.overrides import TorchFunctionMode

T = torch.Tensor
_SYNCS = {T.item, T.tolist, T.__bool__, T.__int__, T.__float__, T.__index__, T.nonzero, torch.nonzero,
          T.unique, torch.unique, T.unique_consecutive, torch.unique_consecutive, T.masked_select,
          torch.masked_select, T.bincount, torch.bincount, T.cpu, T.numpy, torch.argwhere, T.argwhere}
_INDEXING = {T.__getitem__, T.__setitem__, T.index_put_, T.index_put, torch.index_put}


class HostSync(RuntimeError):
    pass


def _bool_index(args) -> bool:
    idx = args[1] if len(args) > 1 else None
    items = idx if isinstance(idx, (tuple, list)) else (idx,)
    return any(isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in items)


class NoHostSync(TorchFunctionMode):
    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = getattr(func, "__name__", str(func))
        if func in _SYNCS:
            raise HostSync(name)
        if func in _INDEXING and _bool_index(args):
            raise HostSync(f"{name} with a boolean mask")
        if func is torch.where and len(args) + len(kwargs) == 1:
            raise HostSync("torch.where(condition)")
        if func in (torch.repeat_interleave, T.repeat_interleave) and "output_size" not in kwargs \
                and len(args) > 1 and isinstance(args[1], torch.Tensor):
            raise HostSync(f"{name} without output_size")
        return func(*args, **kwargs)
