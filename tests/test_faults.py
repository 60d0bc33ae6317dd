"""Faults a run must survive: a directory holding another run, damaged checkpoints, a full disk, a frozen rank.

One real single-process fine-tune (4 steps, a checkpoint after each; its third save hits an injected full disk)
gives the run directory the in-process checks copy and damage. Only the frozen-rank tests start more processes.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TRAIN = os.path.join(ROOT, "launch", "train.py")
SMALL = ["--seq-len", "32", "--micro-batch", "2", "--no-progress"]


def _env(**extra):
    env = dict(os.environ, OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false", PYTHONWARNINGS="ignore",
               PYTHONPATH=ROOT)
    for k in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)
    return {**env, **extra}


def _launcher():
    sys.path.insert(0, os.path.join(ROOT, "launch"))
    import train
    return train


# The run's third save (checkpoint-000003) meets a full disk: every other write goes through.
_FULL_DISK_AT_STEP_3 = """
import errno, runpy, sys
import epkit.checkpoint as c
real = c.save_file
def save_file(tensors, path, *a, **k):
    if "checkpoint-000003" in path:
        raise OSError(errno.ENOSPC, "No space left on device", path)
    return real(tensors, path, *a, **k)
c.save_file = save_file
sys.exit(runpy.run_path(%r, run_name="not_main")["run"](sys.argv[1:]))
""" % TRAIN


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """A real run: checkpoints after steps 1 and 2, then a full disk while saving step 3."""
    out = str(tmp_path_factory.mktemp("run") / "out")
    p = subprocess.run([sys.executable, "-c", _FULL_DISK_AT_STEP_3, "--max-steps", "4", "--save-every", "1",
                        "--keep-last", "3", "--output-dir", out, *SMALL],
                       cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=300)
    return out, p


def _copy(run_dir, tmp_path) -> str:
    out = str(tmp_path / "out")
    shutil.copytree(run_dir[0], out)
    return out


def _cfg(out, *argv):
    from epkit.train.config import parse_config
    return parse_config(["--max-steps", "4", "--save-every", "1", "--keep-last", "3", "--output-dir", out, *SMALL,
                         *argv])


def _listing(path) -> dict:
    return {os.path.relpath(os.path.join(r, f), path): os.path.getsize(os.path.join(r, f))
            for r, _, files in os.walk(path) for f in files}


# ---- item 1: a run directory holds one run -------------------------------------------------------------------

def test_new_run_refuses_a_directory_holding_an_earlier_run(run_dir, tmp_path, capsys):
    out = _copy(run_dir, tmp_path)
    before = _listing(out)
    launcher = _launcher()
    assert launcher.run(["--output-dir", out, *SMALL]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "holds an earlier run's checkpoints (checkpoint-000001/, checkpoint-000002/)" in err[0] \
        and "--resume" in err[0], err
    # --resume with other settings is another run too
    assert launcher.run(["--output-dir", out, "--resume", "--lr", "0.01", *SMALL]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "was started with --lr=0.003, this run has 0.01" in err[0], err
    # a checkpoint of another run beside this run's
    from epkit.train import state
    other = os.path.join(out, "checkpoint-000009")
    shutil.copytree(os.path.join(out, "checkpoint-000002"), other)
    marker = json.load(open(os.path.join(other, state.MARKER_FILE)))
    json.dump({**marker, "run_id": "someone-else"}, open(os.path.join(other, state.MARKER_FILE), "w"))
    assert launcher.run(["--output-dir", out, "--resume", *SMALL]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"{other} belongs to another run" in err[0], err
    shutil.rmtree(other)
    assert _listing(out) == before, "a refused run wrote or deleted something"


def test_unrelated_final_is_refused_before_step_1(tmp_path, capsys):
    from epkit import Mixtral, save_pretrained
    from tests.conftest import tiny_args
    out = tmp_path / "out"
    save_pretrained(Mixtral(tiny_args()).init_weights(), str(out / "final"))  # somebody's model, not a run's
    before = _listing(str(out))
    launcher = _launcher()
    for extra in ([], ["--resume"]):
        assert launcher.run(["--output-dir", str(out), *extra, *SMALL]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and "holds a final/ that epkit's trainer did not write" in err[0], err
    assert _listing(str(out)) == before


def test_resume_and_prune_touch_only_this_runs_checkpoints(run_dir, tmp_path):
    """Trainer-style checkpoint-500/trainer_state.json is not epkit's: no KeyError, never deleted."""
    from epkit.train import state
    out = _copy(run_dir, tmp_path)
    trainer = os.path.join(out, "checkpoint-500")
    os.makedirs(trainer)
    with open(os.path.join(trainer, "trainer_state.json"), "w") as f:
        json.dump({"global_step": 500, "log_history": []}, f)
    run = state.check_run_dir(_cfg(out, "--resume"))
    assert run.resume_from == os.path.join(out, "checkpoint-000002") and not run.notes
    assert run.run_id == json.load(open(os.path.join(out, state.RUN_FILE)))["run_id"]
    state.prune(out, 1, run.run_id)
    assert sorted(n for n in os.listdir(out) if n.startswith("checkpoint")) == ["checkpoint-000002", "checkpoint-500"]
    state.prune(out, 1, "another-run")  # nothing of this run is another run's to prune
    assert sorted(n for n in os.listdir(out) if n.startswith("checkpoint")) == ["checkpoint-000002", "checkpoint-500"]


# ---- item 11: an output directory that cannot be written, a full disk during a save -----------------------------

def test_unwritable_output_dir_is_refused_before_step_1(tmp_path, capsys):
    a_file = tmp_path / "a_file"
    a_file.write_text("x")
    launcher = _launcher()
    for out, message in [(str(a_file), f"--output-dir {a_file}: {a_file} is a file, not a directory"),
                         (str(a_file / "run"), f"--output-dir {a_file / 'run'}: {a_file} is a file, not a directory"),
                         ("/proc/epkit-run", "--output-dir /proc/epkit-run: /proc is not writable")]:
        assert launcher.run(["--output-dir", out, *SMALL]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and message in err[0], err
    assert sorted(os.listdir(tmp_path)) == ["a_file"]


def test_full_disk_during_save_is_one_line_and_keeps_the_previous_checkpoint(run_dir):
    out, p = run_dir
    lines = [line for line in p.stderr.splitlines() if line.startswith("error")]
    assert p.returncode == 2, p.stderr[-3000:]
    assert lines == [f"error (rank 0): no space left while writing "
                     f"{os.path.join(out, 'checkpoint-000003', 'model-00000.safetensors')}"], p.stderr[-3000:]
    assert "Traceback" not in p.stderr
    # quiet by default (issue 9 item 17) and one thread count per rank on CPU (item 14), said in the start line
    assert "Setting accelerator to CPU" not in p.stderr + p.stdout and "built successfully" not in p.stdout
    assert "1 CPU thread(s) per rank" in p.stdout  # OMP_NUM_THREADS=1 in this test's environment wins
    assert sorted(n for n in os.listdir(out) if n.startswith("checkpoint")) == ["checkpoint-000001",
                                                                                "checkpoint-000002"]
    from epkit.train import state
    run = state.check_run_dir(_cfg(out, "--resume"))
    assert run.resume_from == os.path.join(out, "checkpoint-000002") and not run.notes  # whole


# ---- item 6: divergence stops the run; non-finite weights are never saved nor served ------------------------

def test_divergence_stops_before_saving_and_nan_weights_are_refused(tmp_path, capsys):
    from safetensors.torch import load_file

    out = str(tmp_path / "out")
    p = subprocess.run([sys.executable, TRAIN, "--lr", "1e30", "--warmup-steps", "0", "--max-steps", "4",
                        "--save-every", "1", "--output-dir", out, *SMALL],
                       cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=300)
    errors = [line for line in p.stderr.splitlines() if line.startswith("error")]
    assert p.returncode == 2 and len(errors) == 1, p.stdout[-2000:] + p.stderr[-2000:]
    assert "training diverged; stopping without saving" in errors[0] and "--skip-nonfinite" in errors[0], errors
    assert not os.path.exists(os.path.join(out, "final"))
    for name in os.listdir(out):  # what was saved before the divergence is finite
        for f in os.listdir(os.path.join(out, name)) if name.startswith("checkpoint") else []:
            if f.endswith(".safetensors"):
                assert all(t.isfinite().all() for t in load_file(os.path.join(out, name, f)).values()), (name, f)
    # the library refuses to write NaN weights, and the engine to serve them
    import torch

    from epkit import CheckpointError, Mixtral, save_pretrained
    from epkit.infer import LLM
    from tests.conftest import tiny_args
    model = Mixtral(tiny_args()).init_weights()
    save_pretrained(model, str(tmp_path / "ck"))
    with torch.no_grad():
        model.layers[1].moe.experts.w2[3, 0, 0] = float("nan")
    with pytest.raises(CheckpointError, match=r"tensor model\.layers\.1\.block_sparse_moe\.experts\.3\.w2\.weight "
                                              r"holds NaN or inf"):
        save_pretrained(model, str(tmp_path / "ck"))
    assert LLM(str(tmp_path / "ck")) is not None  # the previous save is whole
    from safetensors.torch import save_file
    shard = str(tmp_path / "ck" / "model-00000.safetensors")
    tensors = load_file(shard)
    name = next(n for n in tensors if n.endswith("self_attn.q_proj.weight"))
    tensors[name][0, 0] = float("inf")
    save_file(tensors, shard, metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match=r"tensor layers\.\d\.attn\.q_proj\.weight holds NaN or inf values"):
        LLM(str(tmp_path / "ck"))


# ---- item 9: a frozen rank ends the job with one line naming it ---------------------------------------------

def _freeze_one_rank(argv, victim: int, started, timeout_s: float = 10):
    """Start 2 ranks of `argv` (gloo, --dist-timeout timeout_s), SIGSTOP rank `victim` once `started()`, and return
    (exit code, seconds to exit, stderr) of the other rank. Every process is killed at the end, stopped or not."""
    import signal
    import time

    from tests.distributed import free_port
    port, procs = str(free_port()), []
    try:
        for r in range(2):
            env = _env(RANK=str(r), LOCAL_RANK=str(r), WORLD_SIZE="2", LOCAL_WORLD_SIZE="2", MASTER_ADDR="127.0.0.1",
                       MASTER_PORT=port)
            procs.append(subprocess.Popen([sys.executable, *argv, "--dist-timeout", str(timeout_s)], cwd=ROOT,
                                          env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True))
        deadline = time.time() + 240
        while not started() and time.time() < deadline and all(p.poll() is None for p in procs):
            time.sleep(0.1)
        assert all(p.poll() is None for p in procs) and started(), \
            "the job did not get going: " + "".join(p.communicate(timeout=60)[1][-2000:] for p in procs)
        os.kill(procs[victim].pid, signal.SIGSTOP)
        t0 = time.time()
        _, err = procs[1 - victim].communicate(timeout=120)  # bounded: a hang fails here, it does not hang the suite
        return procs[1 - victim].returncode, time.time() - t0, err
    finally:
        for p in procs:
            p.kill()  # SIGKILL ends a stopped process too
            p.wait(timeout=60)


def test_frozen_training_rank_ends_the_job_naming_it(tmp_path):
    """EP=2 training, rank 1 frozen mid-run (its peer waits in an all-to-all of DeepSpeed's expert group)."""
    out = str(tmp_path / "out")

    def started():
        try:
            with open(os.path.join(out, "metrics.jsonl")) as f:
                return len(f.readlines()) >= 2
        except FileNotFoundError:
            return False

    code, seconds, err = _freeze_one_rank([TRAIN, "--ep", "2", "--max-steps", "100000", "--output-dir", out, *SMALL],
                                          victim=1, started=started)
    errors = [line for line in err.splitlines() if line.startswith("error")]
    assert code == 4 and seconds < 90, (code, seconds, err[-3000:])
    assert len(errors) == 1 and errors[0].startswith("error (rank 0): rank 1 stopped answering: a collective got no "
                                                     "reply within --dist-timeout 10s"), err[-3000:]
    assert "Traceback" not in err


def test_frozen_inference_leader_ends_the_job_naming_it(tmp_path):
    """EP=2 serving, the leader (rank 0, which also hosts the rendezvous store) frozen mid-run; the finished
    results stay in OUTPUT.partial."""
    prompts, out = tmp_path / "p.jsonl", str(tmp_path / "out.jsonl")
    lines = [{"prompt_token_ids": [1, 5, 6], "max_tokens": 1}]
    lines += [{"prompt_token_ids": [1, 5 + i, 7], "max_tokens": 500, "ignore_eos": True} for i in range(20)]
    prompts.write_text("".join(json.dumps(line) + "\n" for line in lines))

    def started():
        return os.path.isfile(out + ".partial") and os.path.getsize(out + ".partial") > 0

    code, seconds, err = _freeze_one_rank([os.path.join(ROOT, "launch", "infer.py"), "--ep", "2", "--preset", "tiny",
                                           "--prompts", str(prompts), "--output", out, "--max-num-seqs", "2",
                                           "--no-progress"], victim=0, started=started)
    errors = [line for line in err.splitlines() if line.startswith("error")]
    assert code == 4 and seconds < 90, (code, seconds, err[-3000:])
    assert len(errors) == 1 and errors[0].startswith("error (rank 1): rank 0 stopped answering"), err[-3000:]
    assert [json.loads(line)["index"] for line in open(out + ".partial")] == [0]


# ---- item 10: damaged checkpoints on --resume ----------------------------------------------------------------

def test_resume_skips_a_damaged_newest_checkpoint(run_dir, tmp_path):
    """A truncated engine/rank00000.pt or a torn trainer_state.json: fall back to the checkpoint before it,
    with a warning naming the file; nothing whole left: one line naming it."""
    from epkit.train import state
    out = _copy(run_dir, tmp_path)
    engine_file = os.path.join(out, "checkpoint-000002", "engine", "rank00000.pt")
    with open(engine_file, "r+b") as f:
        f.truncate(os.path.getsize(engine_file) // 2)
    run = state.check_run_dir(_cfg(out, "--resume"))
    assert run.resume_from == os.path.join(out, "checkpoint-000001")
    assert len(run.notes) == 1 and f"skipping {os.path.join(out, 'checkpoint-000002')}, {engine_file} has" in \
        run.notes[0], run.notes
    torn = os.path.join(out, "checkpoint-000001", "trainer_state.json")
    with open(torn, "r+") as f:
        f.truncate(10)
    with pytest.raises(ValueError, match=f"--resume: no whole checkpoint in {out} \\({engine_file} has"):
        state.check_run_dir(_cfg(out, "--resume"))
    assert state._damage(os.path.join(out, "checkpoint-000001")).startswith(f"{torn} has 10 bytes")


def test_corrupt_engine_file_of_the_right_size_fails_naming_it(run_dir, tmp_path):
    from epkit import CheckpointError
    from epkit.train import state
    out = _copy(run_dir, tmp_path)
    ck = os.path.join(out, "checkpoint-000002")
    engine_file = os.path.join(ck, "engine", "rank00000.pt")
    size = os.path.getsize(engine_file)
    with open(engine_file, "wb") as f:
        f.write(b"\0" * size)
    assert state.check_run_dir(_cfg(out, "--resume")).resume_from == ck  # the size is right: it looks whole
    with pytest.raises(CheckpointError, match=f"--resume: {engine_file} cannot be read .*moving {ck} away"):
        state.load_engine_state(None, None, ck)


def test_full_disk_while_writing_the_engine_state(tmp_path, monkeypatch):
    """The optimizer-state file hits a full disk: one line naming it, the checkpoint stays unmarked (incomplete)."""
    import errno
    import types

    import torch

    from epkit import CheckpointError, Mixtral
    from epkit.train import state
    from tests.conftest import tiny_args
    model = Mixtral(tiny_args()).init_weights()
    engine = types.SimpleNamespace(optimizer=torch.optim.AdamW(model.parameters()), lr_scheduler=None, global_steps=0,
                                   global_samples=0, micro_steps=0, zero_optimization_stage=lambda: 0)
    ck = str(tmp_path / "checkpoint-000001")

    def full(obj, file, *a, **k):
        raise OSError(errno.ENOSPC, "No space left on device", file)

    monkeypatch.setattr(state.torch, "save", full)
    with pytest.raises(CheckpointError, match=f"^no space left while writing {ck}/engine/rank00000.pt$"):
        state.save(engine, model, ck, {"step": 1, "tokens_seen": 0, "run_id": "R"}, None)
    assert not os.path.exists(os.path.join(ck, state.MARKER_FILE))
    assert state.complete_checkpoints(str(tmp_path), "R") == []
    assert not [n for n in os.listdir(ck) if ".tmp-" in n]  # no temporary engine folder left
