"""Checkpoints of a run: the model as a Hugging Face directory plus the state for exact resume.

    OUTPUT_DIR/epkit_run.json       the run's identity: run id, start time, the settings it was started with
    OUTPUT_DIR/checkpoint-000050/   config.json, safetensors (experts written by their owners), index,
                                    epkit_plan.json (records the run id), tokenizer files <- epkit.save_pretrained
        engine/rank00000.pt         this rank's optimizer state (ZeRO partition or plain AdamW), scheduler,
                                    RNG states
        trainer_state.json          step, data position, config
        epkit_checkpoint.json       written LAST: run id, step and the size of every file; its presence marks
                                    the checkpoint complete, the sizes tell a truncated file
    OUTPUT_DIR/final/               the same at the end of the run (the checkpoint to serve)

Only this run's checkpoints are resumed from or pruned. Before step 1 (`check_run_dir`, on every rank) a new
run refuses a directory that holds an earlier run's checkpoints or a final/, and `--resume` refuses one whose
checkpoints belong to another run or were started with other settings. Directories that epkit did not write
(a transformers Trainer `checkpoint-500/`) are left alone.

LoRA runs (`--lora-rank`) write a PEFT adapter directory in place of the model (adapter_config.json,
adapter_model.safetensors, epkit_plan.json: `epkit.lora_io.save_adapter`), with the same engine/ and
trainer_state.json beside it; `--merge` adds OUTPUT_DIR/merged/, the base with the adapters folded in.

DeepSpeed's `engine.save_checkpoint` is not used: with MoE layers it assumes DeepSpeed's own expert
parameter names (`deepspeed_moe.experts.deepspeed_experts.N`). Each write is atomic: the model directory
by `save_pretrained` (temporary name + rename), the engine folder and trainer_state.json likewise, so a
crash mid-save leaves an incomplete checkpoint that `--resume` skips, and the previous one whole.
"""
from __future__ import annotations

import dataclasses
import json
import os
import random
import re
import shutil
import time
import uuid
from dataclasses import dataclass, field

import torch

from ..checkpoint import CheckpointError, Manifest, save_pretrained, write_error
from ..parallel import all_ranks_ok, barrier, broadcast_object, world_rank, world_size

STATE_FILE = "trainer_state.json"
ENGINE_DIR = "engine"
RUN_FILE = "epkit_run.json"
MARKER_FILE = "epkit_checkpoint.json"
_STEP_DIR = re.compile(r"^checkpoint-(\d{6,})$")  # epkit's names (transformers' Trainer writes checkpoint-500)
# Settings a --resume may change: they do not change what the run computed up to its checkpoint.
RESUMABLE = frozenset({"output_dir", "resume", "progress", "tensorboard", "log_every", "save_every", "keep_last",
                       "eval_every", "eval_data", "max_steps", "dist_timeout", "skip_nonfinite", "verbose", "merge"})


def rng_state() -> dict:
    import numpy as np
    out = {"torch": torch.get_rng_state(), "python": random.getstate(), "numpy": np.random.get_state()}
    if torch.cuda.is_available():
        out["cuda"] = torch.cuda.get_rng_state()
    return out


def set_rng_state(state: dict) -> None:
    import numpy as np
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def save(engine, model, directory: str, trainer_state: dict, tokenizer_dir: str | None) -> None:
    """Write a complete checkpoint of run `trainer_state["run_id"]` into `directory` (call on every rank): the
    model (`save_pretrained`), or a LoRA run's adapters (`epkit.lora_io.save_adapter`), then the engine state.

    A failed write on any rank (a full disk) fails every rank with one line naming the file; the checkpoint
    stays incomplete (no marker), so `--resume` skips it and the previous one is whole."""
    rank, run_id = world_rank(), trainer_state["run_id"]
    if os.path.isdir(directory) and os.listdir(directory) and _owner(directory) != run_id:
        raise ValueError(f"refusing to replace {directory}: this run did not write it (move it away)")
    step = {k: trainer_state[k] for k in ("step", "tokens_seen", "run_id")}
    if model.lora is not None:
        from ..lora_io import save_adapter
        base = trainer_state["config"]["model"]  # PEFT's base_model_name_or_path: a loadable base, not a preset
        save_adapter(model, directory, os.path.abspath(base) if os.path.isdir(base) else None, tokenizer_dir, step)
    else:
        save_pretrained(model, directory, tokenizer_dir=tokenizer_dir, trainer_state=step)
    tmp = broadcast_object(os.path.join(directory, f".{ENGINE_DIR}.tmp-{uuid.uuid4().hex[:8]}") if rank == 0 else None)
    if rank == 0:
        os.makedirs(tmp)
    barrier()
    info = model.expert_parallel
    name = f"rank{rank:05d}.pt"
    failure = None
    try:
        torch.save({"optimizer": engine.optimizer.state_dict(),  # ZeRO: this rank's partition
                    "scheduler": engine.lr_scheduler.state_dict() if engine.lr_scheduler is not None else None,
                    "engine": {"global_steps": engine.global_steps, "global_samples": engine.global_samples,
                               "micro_steps": engine.micro_steps},
                    "rng": rng_state(), "world_size": world_size(), "ep": info.plan.ep_size if info else 1,
                    "zero_stage": engine.zero_optimization_stage()},
                   os.path.join(tmp, name))
    except Exception as e:  # every rank learns of it below, so none waits forever in a collective
        failure = write_error(e, os.path.join(directory, ENGINE_DIR, name))
    ok = all_ranks_ok(failure is None)  # NOTE: collective (every rank's engine file is written)
    if ok and rank == 0:
        try:
            final = os.path.join(directory, ENGINE_DIR)
            if os.path.exists(final):
                shutil.rmtree(final)
            os.rename(tmp, final)
            _write_json_atomic(os.path.join(directory, STATE_FILE), trainer_state)
            _write_json_atomic(os.path.join(directory, MARKER_FILE),
                               {"run_id": run_id, "step": trainer_state["step"], "files": _file_sizes(directory)})
        except Exception as e:
            failure = e if isinstance(e, CheckpointError) else write_error(e, directory)
    if not ok or not all_ranks_ok(failure is None):  # NOTE: collective
        if rank == 0:
            shutil.rmtree(tmp, ignore_errors=True)
        raise failure or CheckpointError(f"saving {directory} failed on another rank (see its error); the previous "
                                         f"checkpoint is whole")


def _file_sizes(directory: str) -> dict[str, int]:
    """Size of every file of a checkpoint (relative paths), for the marker: a truncated file shows."""
    out = {}
    for root, _, files in os.walk(directory):
        for f in files:
            path = os.path.join(root, f)
            rel = os.path.relpath(path, directory)
            if rel != MARKER_FILE:
                out[rel] = os.path.getsize(path)
    return dict(sorted(out.items()))


def save_merged(model, directory: str, tokenizer_dir: str | None) -> None:
    """`--merge`: fold the adapters into the base (in place: the run is over) and write a Hugging Face checkpoint;
    every rank merges and writes only its experts."""
    from ..lora import merge_lora
    merge_lora(model)
    save_pretrained(model, directory, tokenizer_dir=tokenizer_dir)


def _write_json_atomic(path: str, obj: dict) -> None:
    tmp = f"{path}.tmp-{uuid.uuid4().hex[:8]}"
    try:
        with open(tmp, "w") as f:
            json.dump(obj, f, indent=2)
        os.replace(tmp, path)
    except Exception as e:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise write_error(e, path) from None


def load_engine_state(engine, model, directory: str) -> dict:
    """Restore optimizer, scheduler, engine counters and RNG from `directory`; return trainer_state."""
    rank, world = world_rank(), world_size()
    file = os.path.join(directory, ENGINE_DIR, f"rank{rank:05d}.pt")
    failure = state = None
    if not os.path.isfile(file):
        failure = ValueError(f"--resume: {file} is missing (was the checkpoint written by {world} ranks?)")
    else:
        try:
            state = torch.load(file, map_location="cpu", weights_only=False)
        except Exception as e:  # a damaged file whose size is right (a short one was skipped by check_run_dir)
            failure = CheckpointError(f"--resume: {file} cannot be read ({str(e).splitlines()[0][:120]}); resume "
                                      f"from an earlier checkpoint by moving {directory} away")
    if not all_ranks_ok(failure is None):  # NOTE: collective: a rank that cannot read its file fails them all
        raise failure or CheckpointError(f"--resume: another rank cannot read its part of {directory} "
                                         f"(see its error)")
    info = model.expert_parallel
    now = {"world_size": world, "ep": info.plan.ep_size if info else 1, "zero_stage": engine.zero_optimization_stage()}
    for key, value in now.items():
        if state[key] != value:
            raise ValueError(f"--resume: {directory} was written with {key}={state[key]}, this run has {value}; resume "
                             f"with the same layout, or start a new run from it with --model {directory}")
    opt = engine.optimizer
    if hasattr(opt, "_load_legacy_checkpoint"):  # ZeRO 1/2 and BF16_Optimizer take a list indexed by dp rank
        import torch.distributed as dist
        dp_rank = dist.get_rank(group=opt.dp_process_group) if dist.is_initialized() else 0
        states = [None] * (dp_rank + 1)
        states[dp_rank] = state["optimizer"]
        opt.load_state_dict(states, load_optimizer_states=True, load_from_fp32_weights=True)
    else:
        opt.load_state_dict(state["optimizer"])
    if state["scheduler"] is not None and engine.lr_scheduler is not None:
        engine.lr_scheduler.load_state_dict(state["scheduler"])
    engine.global_steps = state["engine"]["global_steps"]
    engine.global_samples = state["engine"]["global_samples"]
    engine.micro_steps = state["engine"]["micro_steps"]
    set_rng_state(state["rng"])
    with open(os.path.join(directory, STATE_FILE)) as f:
        return json.load(f)


def saved_routing_counts(directory: str, num_layers: int, num_experts: int) -> list[list[int]]:
    """Run totals of tokens per expert per layer, as the checkpoint's manifest records them.

    Called on every rank, so every rank reaches the same verdict: a checkpoint without the record (written
    before epkit kept it, or by hand) resumes with zeros and a warning; a record of the wrong shape is an
    error naming it."""
    import warnings

    from ..checkpoint import PLAN_FILE, Manifest
    file = os.path.join(directory, PLAN_FILE)
    manifest = Manifest.read(directory)
    counts = manifest.routed_tokens if manifest is not None else None
    if counts is None:
        warnings.warn(f"--resume: {file} records no routed_tokens; the run's routing totals restart from zero",
                      stacklevel=2)
        return [[0] * num_experts for _ in range(num_layers)]
    if len(counts) != num_layers or any(len(row) != num_experts for row in counts):
        raise ValueError(f"--resume: {file} routed_tokens is not {num_layers} layers x {num_experts} experts "
                         f"(got {len(counts)} rows of {sorted({len(r) for r in counts})})")
    return counts


# ---- the run directory: identity, checks before step 1, resume, pruning --------------------------------

@dataclass
class RunDir:
    """What `check_run_dir` decided: the run's id, the checkpoint to resume from, and notes for the log."""

    run_id: str
    resume_from: str | None
    config: dict
    notes: list[str] = field(default_factory=list)


def run_settings(cfg) -> dict:
    """The settings that define a run (JSON values), compared on --resume."""
    d = {k: v for k, v in dataclasses.asdict(cfg).items() if k not in RESUMABLE}
    return json.loads(json.dumps(d))


def check_output_dir(path: str) -> None:
    """The run directory must be (or become) a writable directory: refuse it before step 1."""
    from ..runtime import check_writable_dir
    check_writable_dir(path, "--output-dir")


def _read_json(path: str):
    """The JSON object in `path`; None if there is no such file or it is not a whole JSON object."""
    try:
        with open(path) as f:
            obj = json.load(f)
    except (OSError, ValueError):
        return None
    return obj if isinstance(obj, dict) else None


def _owner(path: str) -> str | None:
    """The run id of an epkit training checkpoint (complete or not), "" for one written before epkit
    recorded run ids; None when epkit's trainer did not write `path`."""
    marker = _read_json(os.path.join(path, MARKER_FILE))
    if marker is not None:
        return str(marker.get("run_id", ""))
    try:
        manifest = Manifest.read(path)
    except CheckpointError:
        manifest = None
    saved = manifest.trainer_state if manifest is not None else None
    if isinstance(saved, dict):
        return str(saved.get("run_id", ""))
    return None


def _checkpoints(output_dir: str) -> list[tuple[str, str, str]]:
    """(name, path, run id) of every epkit training checkpoint in `output_dir` (complete or not), any run."""
    out = []
    if os.path.isdir(output_dir):
        for name in sorted(os.listdir(output_dir)):
            path = os.path.join(output_dir, name)
            if (_STEP_DIR.match(name) or name == "final") and os.path.isdir(path):
                owner = _owner(path)
                if owner is not None:
                    out.append((name, path, owner))
    return out


def _damage(path: str) -> str | None:
    """Why a complete-looking checkpoint cannot be resumed from (a file missing or of the wrong size, a torn
    trainer_state.json), or None when it is whole."""
    marker = _read_json(os.path.join(path, MARKER_FILE))
    if marker is None:
        return f"{os.path.join(path, MARKER_FILE)} is not readable JSON"
    for rel, size in (marker.get("files") or {}).items():
        file = os.path.join(path, rel)
        if not os.path.isfile(file):
            return f"{file} is missing"
        if os.path.getsize(file) != size:
            return f"{file} has {os.path.getsize(file)} bytes, {size} were written"
    if not isinstance((_read_json(os.path.join(path, STATE_FILE)) or {}).get("step"), int):
        return f"{os.path.join(path, STATE_FILE)} is torn"
    return None


def complete_checkpoints(output_dir: str, run_id: str) -> list[tuple[int, str]]:
    """(step, path) of run `run_id`'s complete checkpoints (step checkpoints and final/), oldest first."""
    out = []
    for _, path, owner in _checkpoints(output_dir):
        marker = _read_json(os.path.join(path, MARKER_FILE))
        if owner == run_id and marker is not None and isinstance(marker.get("step"), int):
            out.append((marker["step"], path))
    return sorted(out)


def check_run_dir(cfg) -> RunDir:
    """Decide, before step 1 and on every rank (same files, same verdict), which run this is and where it
    resumes from; refuse with one sentence when the directory holds work this run must not overwrite."""
    out = cfg.output_dir
    check_output_dir(out)
    settings = run_settings(cfg)
    found = _checkpoints(out)
    final = os.path.join(out, "final")
    if os.path.isdir(final) and os.listdir(final) and not any(p == final for _, p, _ in found):
        raise ValueError(f"--output-dir {out} holds a final/ that epkit's trainer did not write; move it away or "
                         f"choose another --output-dir")
    if not cfg.resume and found:
        names = ", ".join(n + "/" for n, _, _ in found[:3]) + (", ..." if len(found) > 3 else "")
        raise ValueError(f"--output-dir {out} holds an earlier run's checkpoints ({names}); continue that run with "
                         f"--resume, or choose another --output-dir")
    new = RunDir(uuid.uuid4().hex, None, settings)
    if not found:
        return new
    run_file = os.path.join(out, RUN_FILE)
    run = _read_json(run_file)
    if run is None or not isinstance(run.get("run_id"), str) or not isinstance(run.get("config"), dict):
        raise ValueError(f"--resume: {run_file} is missing or unreadable, so the checkpoints in {out} cannot be "
                         f"told apart from another run's; choose another --output-dir")
    foreign = [p for _, p, owner in found if owner != run["run_id"]]
    if foreign:
        raise ValueError(f"--resume: {foreign[0]} belongs to another run than {run_file} describes; move it away "
                         f"or choose another --output-dir")
    for key in sorted(set(settings) | set(run["config"])):
        if settings.get(key) != run["config"].get(key):
            raise ValueError(f"--resume: {out} was started with --{key.replace('_', '-')}={run['config'].get(key)!r}, "
                             f"this run has {settings.get(key)!r}; resume with the run's settings, or start a new "
                             f"run in another --output-dir")
    rundir = RunDir(run["run_id"], None, settings)
    complete = complete_checkpoints(out, run["run_id"])
    damaged = []
    for _, path in reversed(complete):
        why = _damage(path)
        if why is None:
            rundir.resume_from = path
            break
        damaged.append(why)
        rundir.notes.append(f"warning: --resume: skipping {path}, {why}; resuming from the checkpoint before it")
    if complete and rundir.resume_from is None:
        raise ValueError(f"--resume: no whole checkpoint in {out} ({damaged[0]})")
    return rundir


def write_run_file(output_dir: str, rundir: RunDir) -> None:
    """Record the run's identity (rank 0, after every rank passed check_run_dir); kept on --resume."""
    path = os.path.join(output_dir, RUN_FILE)
    run = _read_json(path)
    if run is not None and run.get("run_id") == rundir.run_id:
        return
    os.makedirs(output_dir, exist_ok=True)
    _write_json_atomic(path, {"run_id": rundir.run_id, "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                              "config": rundir.config})


def latest_checkpoint(output_dir: str, run_id: str) -> str | None:
    found = complete_checkpoints(output_dir, run_id)
    return found[-1][1] if found else None


def step_dir(output_dir: str, step: int) -> str:
    return os.path.join(output_dir, f"checkpoint-{step:06d}")


# save_pretrained's temporary directory; never its ".old-" one, which may hold the only copy after a crash
_LEFTOVER = re.compile(r"^(checkpoint-\d{6,}|final)\.tmp-[0-9a-f]{8}$")


def prune(output_dir: str, keep_last: int, run_id: str) -> None:
    """Delete run `run_id`'s step checkpoints beyond its newest `keep_last` complete ones, its older
    incomplete ones, and leftovers of crashed saves (rank 0 only, between saves: no save is in flight).
    Nothing another run or another program wrote is touched."""
    steps = [(s, p) for s, p in complete_checkpoints(output_dir, run_id) if _STEP_DIR.match(os.path.basename(p))]
    for _, path in steps[:-keep_last]:
        shutil.rmtree(path, ignore_errors=True)
    kept = {p for _, p in steps[-keep_last:]}
    oldest_kept = min((s for s, _ in steps[-keep_last:]), default=None)
    for name, path, owner in _checkpoints(output_dir):
        m = _STEP_DIR.match(name)
        if m and owner == run_id and path not in kept and oldest_kept is not None and int(m.group(1)) < oldest_kept:
            shutil.rmtree(path, ignore_errors=True)  # this run's incomplete (crashed) save
    for name in os.listdir(output_dir):
        if _LEFTOVER.match(name):
            shutil.rmtree(os.path.join(output_dir, name), ignore_errors=True)  # temporary directory of a crashed save
