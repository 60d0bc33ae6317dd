"""What a launched epkit process sets up for itself: CPU threads per rank, quiet output, a word before
DeepSpeed's one-time CPU build.

    cpu_threads_per_rank()   each rank on a CPU machine gets its share of the cores (OMP_NUM_THREADS wins)
    quiet(verbose)           hide DeepSpeed's and torch's known chatter unless --verbose (or EPKIT_VERBOSE=1)
    quiet_stdout()           a block whose prints are dropped when quiet (DeepSpeed's "... built successfully")
    note_cpu_op_build()      "building DeepSpeed's CPU communication op, about a minute, once", when it must
"""
from __future__ import annotations

import contextlib
import io
import os
import sys
import warnings

import torch

CPU_OP = "deepspeed_shm_comm"  # the op DeepSpeed's CPU accelerator compiles at its first init_distributed
# Warnings a run cannot act on: deprecations inside DeepSpeed's and Accelerate's own calls into torch.
KNOWN_WARNINGS = (r"`torch\.distributed\.\w+` is deprecated",)
_verbose = False


def cpu_threads_per_rank() -> int:
    """On a machine without CUDA, ranks sharing the CPU would each start one thread per core and contend: give
    each of the LOCAL_WORLD_SIZE ranks its share, unless OMP_NUM_THREADS says otherwise. Returns the count."""
    if not torch.cuda.is_available() and "OMP_NUM_THREADS" not in os.environ:
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // int(os.environ.get("LOCAL_WORLD_SIZE", 1))))
    return torch.get_num_threads()


def quiet(verbose: bool = False) -> None:
    """Call before DeepSpeed is imported. Quiet: no per-rank "Setting accelerator to CPU" (the CPU is named
    instead of detected), no known deprecation warnings, no DeepSpeed build chatter (`quiet_stdout`)."""
    global _verbose
    _verbose = verbose or os.environ.get("EPKIT_VERBOSE") == "1"
    if _verbose:
        return
    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    for pattern in KNOWN_WARNINGS:
        warnings.filterwarnings("ignore", message=pattern)


@contextlib.contextmanager
def quiet_stdout():
    if _verbose:
        yield
        return
    with contextlib.redirect_stdout(io.StringIO()):
        yield


def cpu_op_cached() -> bool:
    """Whether DeepSpeed's CPU communication op is installed or already compiled (torch's extension cache)."""
    try:
        from deepspeed.git_version_info import installed_ops
        from torch.utils.cpp_extension import _get_build_directory
    except ImportError:
        return True  # nothing that epkit knows how to look for
    if installed_ops.get(CPU_OP):
        return True
    return os.path.isfile(os.path.join(_get_build_directory(CPU_OP, False), f"{CPU_OP}.so"))


def note_cpu_op_build() -> bool:
    """Before DeepSpeed's first CPU init_distributed: say once (local rank 0) that it compiles a C++ op.
    Returns whether it will."""
    if torch.cuda.is_available() or cpu_op_cached():
        return False
    if int(os.environ.get("LOCAL_RANK", 0)) == 0:
        print("building DeepSpeed's CPU communication op, about a minute, once (needs a C++ compiler and ninja)",
              file=sys.stderr, flush=True)
    return True
