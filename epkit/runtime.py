"""What a launched epkit process sets up for itself: CPU threads per rank, quiet output, a word before
DeepSpeed's one-time CPU build.

    cpu_threads_per_rank()   each rank on a CPU machine gets its share of the cores (OMP_NUM_THREADS wins)
    quiet(verbose)           hide DeepSpeed's and torch's known chatter unless --verbose (or EPKIT_VERBOSE=1)
    quiet_stdout()           a block whose prints are dropped when quiet (DeepSpeed's "... built successfully")
    note_cpu_op_build()      "building DeepSpeed's CPU communication op, about a minute, once", when it must
    check_writable_dir(path) a folder the run will write (or create) must be writable: checked before any work
    rank_device(device)      this rank's device, or one sentence for a bad --device
    release_cpu_shm_names()  unlink DeepSpeed's per-rank /dev/shm buffers once mapped, so no run leaks 66 MB a rank
    exit_now(code)           end a finished multi-rank script without the interpreter's teardown (gloo's exit abort)
    comm_failure_message(e)  a collective that timed out: one line naming the rank that stopped answering
"""
from __future__ import annotations

import contextlib
import io
import os
import re
import sys
import time
import warnings

import torch
import torch.distributed as dist

CPU_OP = "deepspeed_shm_comm"  # the op DeepSpeed's CPU accelerator compiles at its first init_distributed
# Warnings a run cannot act on: deprecations inside DeepSpeed's and Accelerate's own calls into torch.
KNOWN_WARNINGS = (r"`torch\.distributed\.\w+` is deprecated",)
_verbose = False
dist_timeout_s: float | None = None  # set by parallel.init_distributed


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


def check_writable_dir(path: str, flag: str, value: str | None = None) -> None:
    """`path` is, or can be created as, a writable folder: else one sentence naming `flag`, its `value` (default
    `path`) and the culprit. Checked by a real write (a permission check says yes to root on a read-only file
    system); nothing stays."""
    import tempfile
    value = value or path
    if os.path.exists(path) and not os.path.isdir(path):
        raise ValueError(f"{flag} {value}: {path} is a file, not a directory")
    probe = os.path.abspath(path)
    while not os.path.exists(probe):
        probe = os.path.dirname(probe)
    if not os.path.isdir(probe):
        raise ValueError(f"{flag} {value}: {probe} is a file, not a directory")
    try:
        with tempfile.NamedTemporaryFile(dir=probe, prefix=".epkit-probe-"):
            pass
    except OSError as e:
        raise ValueError(f"{flag} {value}: {probe} is not writable ({e.strerror})") from None


def rank_device(device=None) -> torch.device:
    """This rank's device: `device` checked (one sentence for a bad name or a GPU this machine lacks), or by
    default the launcher's GPU (LOCAL_RANK) when CUDA is there, else the CPU."""
    if device is None:
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if torch.cuda.is_available() \
            else torch.device("cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError, ValueError):
        raise ValueError(f"device {device!r} is not a device; use cpu, cuda or cuda:N") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device {device!r}: this machine has no CUDA device (or torch {torch.__version__} is "
                             f"a CPU build); use cpu")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ValueError(f"device {device!r}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    elif dev.type != "cpu":
        raise ValueError(f"device {device!r}: epkit runs on cpu or cuda")
    return dev


_COMM_FAILURES = ("Timed out", "timed out", "Connection closed by peer", "Connection reset by peer",
                  "Watchdog caught collective operation timeout", "NCCL communicator was aborted")


def is_comm_failure(e: BaseException) -> bool:
    """Whether `e` is a collective that timed out or lost its peer (gloo raises these; NCCL with blocking wait)."""
    return (isinstance(e, RuntimeError) and dist.is_available() and dist.is_initialized()
            and any(s in str(e) for s in _COMM_FAILURES))


def silent_ranks(window_s: float) -> list[int] | None:
    """After a communication failure: the ranks that do not check in through the launch's rendezvous store
    within `window_s` (every rank that caught the failure checks in). None when the store does not answer."""
    import datetime
    import threading
    rank, world = dist.get_rank(), dist.get_world_size()
    keys = [f"epkit/alive/{r}" for r in range(world)]
    found: list = []
    deadline = time.monotonic() + window_s

    def probe():  # in a thread: a store whose host is frozen can block a client past its own timeout
        try:
            store = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), is_master=False,
                                  timeout=datetime.timedelta(seconds=window_s))
            store.set(keys[rank], "1")
            while not store.check(keys) and time.monotonic() < deadline:  # polled: a timed-out wait logs warnings
                time.sleep(0.2)
            found.append([r for r in range(world) if not store.check([keys[r]])])
        except Exception:
            pass  # no store, or it does not answer

    thread = threading.Thread(target=probe, daemon=True)
    thread.start()
    thread.join(window_s + 5)
    return found[0] if found else None


def comm_failure_message(e: BaseException) -> str:
    """One line for a collective that failed: which rank stopped answering, after how long."""
    timeout = dist_timeout_s
    silent = silent_ranks(min(timeout or 30.0, 30.0))
    if silent is None:
        host = "the launcher's" if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True" else "rank 0's"
        who = "rank 0" if host == "rank 0's" else "a rank"
        who += f" stopped answering ({host} rendezvous store does not answer either)"
    elif silent:
        who = f"rank {', '.join(map(str, silent))} stopped answering"
    else:
        who = "a rank stopped answering"
    limit = f"within --dist-timeout {timeout:g}s" if timeout else "in time"
    detail = re.sub(r"^\[[^\]]*\]\s*", "", str(e).strip().splitlines()[0]) if str(e).strip() else type(e).__name__
    return f"{who}: a collective got no reply {limit}; ending the job ({detail[:160]})"


SHM_PREFIX = "/dev/shm/deepspeed_allreduce_buffer"  # DeepSpeed's CPU all-reduce: one 66 MB file per rank


def cpu_shm_name(rank: int) -> str:
    """The /dev/shm file DeepSpeed's CPU all-reduce op gives `rank` in this launch (its shm.cpp names it for the
    user, MASTER_ADDR, MASTER_PORT and the global rank)."""
    return (f"{SHM_PREFIX}_{os.getuid()}_{os.environ.get('MASTER_ADDR', '')}_"
            f"{os.environ.get('MASTER_PORT', '')}_{rank}")


def release_cpu_shm_names() -> None:
    """Right after deepspeed.init_distributed on CPU. DeepSpeed's shared-memory all-reduce creates a 66 MB
    /dev/shm file per rank and maps every rank's file, and nothing ever unlinks them: /dev/shm is memory, so
    each CPU launch left 66 MB x ranks behind, for good (a CI machine's whole test suite ran out of its 24 GiB
    that way). Once every rank has mapped every file (init returned on all ranks: the barrier), each rank unlinks
    its own name; the mappings stay valid and the memory goes back when the last rank exits, even by SIGKILL."""
    if torch.cuda.is_available() or not dist.is_initialized():
        return
    dist.barrier()  # NOTE: collective, once at start-up: no rank unlinks a file a peer has not mapped yet
    with contextlib.suppress(FileNotFoundError):
        os.unlink(cpu_shm_name(dist.get_rank()))


def _close_process_group() -> None:
    """After a run that succeeded on this rank: wait for the others (bounded by the group's timeout), then tear
    the process group down, so no rank's exit destroys communicators a peer still uses (gloo aborted about one
    4-rank exit in six with `terminate called without an active exception`)."""
    if dist.is_available() and dist.is_initialized():
        dist.barrier()  # NOTE: collective, once at exit
        dist.destroy_process_group()


def exit_now(code: int):
    """End a finished multi-rank script at once, skipping interpreter finalization. After the process group is
    destroyed, gloo's worker threads can still be joinable when the interpreter tears down, and the process
    aborts (SIGABRT, `terminate called without an active exception`) after every result was written: 1 run in
    12 of `torchrun --nproc_per_node 2 bench/moe_layer.py --small` on a loaded 2-core machine, and 1 in 20 at
    6cffc93. Files the script wrote are closed by then; stdout and stderr are flushed here."""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def run_entry(fn, user_errors: tuple = ()) -> int:
    """Run a launch/ entry point: a bad input on any rank is one line `error (rank R): ...` and exit 2, a
    collective that timed out or lost a peer is one line naming the silent rank and exit 4; anything
    else (a bug) keeps its traceback. EPKIT_DEBUG=1 re-raises everything."""
    from .checkpoint import CheckpointError
    rank = os.environ.get("RANK", "0")
    try:
        code = fn() or 0
        if code == 0:
            _close_process_group()
        return code
    except (ValueError, CheckpointError, FileNotFoundError, ImportError, *user_errors) as e:
        if os.environ.get("EPKIT_DEBUG"):
            raise
        print(f"error (rank {rank}): {e}", file=sys.stderr, flush=True)
        return 2
    except RuntimeError as e:
        if not is_comm_failure(e) or os.environ.get("EPKIT_DEBUG"):
            raise
        print(f"error (rank {rank}): {comm_failure_message(e)}", file=sys.stderr, flush=True)
        return 4
