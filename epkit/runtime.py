"""What a launched epkit process sets up for itself: CPU threads per rank, quiet output, a word before
DeepSpeed's one-time CPU build.

    cpu_threads_per_rank()   each rank on a CPU machine gets its share of the cores (OMP_NUM_THREADS wins)
    quiet(verbose)           hide DeepSpeed's and torch's known chatter unless --verbose (or EPKIT_VERBOSE=1)
    quiet_stdout()           a block whose prints are dropped when quiet (DeepSpeed's "... built successfully")
    note_cpu_op_build()      "building DeepSpeed's CPU communication op, about a minute, once", when it must
    check_writable_dir(path) a folder the run will write (or create) must be writable: checked before any work
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
    each rank of this machine (torchrun's LOCAL_WORLD_SIZE, DeepSpeed's LOCAL_SIZE) its share of the cores this
    process may use, unless OMP_NUM_THREADS says otherwise. Returns the count."""
    if not torch.cuda.is_available() and "OMP_NUM_THREADS" not in os.environ:
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
        local = int(os.environ.get("LOCAL_WORLD_SIZE") or os.environ.get("LOCAL_SIZE") or 1)
        torch.set_num_threads(max(1, cores // local))
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


def check_writable_dir(path: str, flag: str) -> None:
    """`path` is, or can be created as, a writable folder: else one sentence naming `flag` and the culprit.
    Checked by a real write (a permission check says yes to root on a read-only file system); nothing stays."""
    import tempfile
    if os.path.exists(path) and not os.path.isdir(path):
        raise ValueError(f"{flag} {path} is a file, not a directory")
    probe = os.path.abspath(path)
    while not os.path.exists(probe):
        probe = os.path.dirname(probe)
    if not os.path.isdir(probe):
        raise ValueError(f"{flag} {path}: {probe} is a file, not a directory")
    try:
        with tempfile.NamedTemporaryFile(dir=probe, prefix=".epkit-probe-"):
            pass
    except OSError as e:
        raise ValueError(f"{flag} {path}: {probe} is not writable ({e.strerror})") from None
