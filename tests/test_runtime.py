"""epkit.runtime: CPU threads per rank, the one-time notice before DeepSpeed's CPU build (issue 9 items 14, 15)."""
import os

import pytest
import torch

from epkit import runtime


@pytest.fixture
def threads():
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


@pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU thread split applies to CPU-only machines")
def test_cpu_ranks_share_the_cores(monkeypatch, threads):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(8)))  # the cores this process may use
    monkeypatch.setenv("LOCAL_SIZE", "2")  # what the deepspeed launcher sets
    assert runtime.cpu_threads_per_rank() == 4 == torch.get_num_threads()
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "16")  # what torchrun sets
    assert runtime.cpu_threads_per_rank() == 1
    monkeypatch.setenv("OMP_NUM_THREADS", "3")  # the user's setting wins
    torch.set_num_threads(3)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    assert runtime.cpu_threads_per_rank() == 3


@pytest.mark.skipif(torch.cuda.is_available(), reason="DeepSpeed builds its CPU op only on CPU machines")
def test_cpu_op_build_is_announced_once_when_not_cached(monkeypatch, tmp_path, capsys):
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))  # an empty extension cache
    monkeypatch.setenv("LOCAL_RANK", "0")
    assert runtime.note_cpu_op_build()
    assert capsys.readouterr().err.startswith("building DeepSpeed's CPU communication op, about a minute, once")
    monkeypatch.setenv("LOCAL_RANK", "1")  # said once per machine, by local rank 0
    assert runtime.note_cpu_op_build() and capsys.readouterr().err == ""
    from torch.utils.cpp_extension import _get_build_directory
    built = _get_build_directory(runtime.CPU_OP, False)
    open(os.path.join(built, f"{runtime.CPU_OP}.so"), "w").close()  # as after the first build
    monkeypatch.setenv("LOCAL_RANK", "0")
    assert not runtime.note_cpu_op_build() and capsys.readouterr().err == ""


def _entry_then_state(rank, world, fail_on):
    import torch.distributed as dist

    def body():
        if rank == fail_on:
            raise ValueError("bad input")
        return 0
    code = runtime.run_entry(body)
    return code, dist.is_initialized()


def test_a_successful_entry_closes_the_process_group_and_a_failed_one_leaves_it():
    """After a launch/ entry succeeds on every rank, run_entry waits for the others and destroys the process
    group (gloo aborted about one 4-rank exit in six when ranks exited with it alive); after a user error the
    rank returns 2 at once, without waiting in a collective for ranks that may never come."""
    from distributed import run
    assert run(_entry_then_state, 2, None) == [(0, False), (0, False)]
    assert run(_entry_then_state, 2, 0)[0] == (2, True)


def _after_deepspeed_init(rank, world):
    import glob

    import deepspeed.comm as ds_comm

    from epkit import parallel
    os.environ["LOCAL_SIZE"] = str(world)  # as the `deepspeed` launcher sets it: all ranks on this machine
    parallel.setup_expert_parallel(world)  # starts DeepSpeed's communication (and its CPU shm all-reduce)
    t = torch.full((4,), float(rank + 1))
    ds_comm.inference_all_reduce(t)  # through the shared-memory buffers, after their names are gone
    port = os.environ["MASTER_PORT"]
    return sorted(glob.glob(f"{runtime.SHM_PREFIX}_*_{port}_*")), t.tolist()


def test_deepspeed_cpu_init_leaves_no_shared_memory_behind():
    """DeepSpeed's CPU all-reduce gave every rank a 66 MB /dev/shm file it never removed: each CPU launch leaked
    66 MB x ranks of memory until reboot, and the CI's test suite died of it (OOM, exit 137). Once started, no file
    of this launch is left, and the shared-memory all-reduce still adds."""
    from distributed import run
    assert run(_after_deepspeed_init, 2) == [([], [3.0] * 4)] * 2


def test_exit_now_flushes_and_keeps_the_exit_code():
    """runtime.exit_now ends a finished script without interpreter teardown (gloo's exit abort): what it printed
    still arrives, and its exit code is the script's."""
    import subprocess
    import sys
    code = "import sys; from epkit.runtime import exit_now; print('done', end=''); print('err', file=sys.stderr, end=''); exit_now(3)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert (out.returncode, out.stdout, out.stderr.endswith("err")) == (3, "done", True)
