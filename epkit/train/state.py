"""Checkpoints of a run: the model as a Hugging Face directory plus the state for exact resume.

    OUTPUT_DIR/checkpoint-000050/   config.json, safetensors (experts written by their owners), index,
                                    epkit_plan.json, tokenizer files   <- epkit.save_pretrained
        engine/rank00000.pt         this rank's optimizer state (ZeRO partition or plain AdamW), scheduler,
                                    RNG states
        trainer_state.json          step, data position, config; written LAST: its presence marks the
                                    checkpoint complete
    OUTPUT_DIR/final/               the same at the end of the run (the checkpoint to serve)

DeepSpeed's `engine.save_checkpoint` is not used: with MoE layers it assumes DeepSpeed's own expert
parameter names (`deepspeed_moe.experts.deepspeed_experts.N`). Each write is atomic: the model directory
by `save_pretrained` (temporary name + rename), the engine folder and trainer_state.json likewise, so a
crash mid-save leaves an incomplete checkpoint that `--resume` skips, and the previous one whole.
"""
from __future__ import annotations

import json
import os
import random
import re
import shutil
import uuid

import torch

from ..checkpoint import save_pretrained
from ..parallel import barrier, broadcast_object, world_rank, world_size

STATE_FILE = "trainer_state.json"
ENGINE_DIR = "engine"
_STEP_DIR = re.compile(r"^checkpoint-(\d+)$")


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
    """Write a complete checkpoint into `directory` (call on every rank)."""
    rank = world_rank()
    save_pretrained(model, directory, tokenizer_dir=tokenizer_dir,
                    trainer_state={k: trainer_state[k] for k in ("step", "tokens_seen")})
    tmp = broadcast_object(os.path.join(directory, f".{ENGINE_DIR}.tmp-{uuid.uuid4().hex[:8]}") if rank == 0 else None)
    if rank == 0:
        os.makedirs(tmp)
    barrier()
    info = getattr(model, "expert_parallel", None)
    torch.save({"optimizer": engine.optimizer.state_dict(),  # ZeRO: this rank's partition
                "scheduler": engine.lr_scheduler.state_dict() if engine.lr_scheduler is not None else None,
                "engine": {"global_steps": engine.global_steps, "global_samples": engine.global_samples,
                           "micro_steps": engine.micro_steps},
                "rng": rng_state(), "world_size": world_size(), "ep": info.plan.ep_size if info else 1,
                "zero_stage": engine.zero_optimization_stage()},
               os.path.join(tmp, f"rank{rank:05d}.pt"))
    barrier()
    if rank == 0:
        final = os.path.join(directory, ENGINE_DIR)
        if os.path.exists(final):
            shutil.rmtree(final)
        os.rename(tmp, final)
        _write_json_atomic(os.path.join(directory, STATE_FILE), trainer_state)
    barrier()


def _write_json_atomic(path: str, obj: dict) -> None:
    tmp = f"{path}.tmp-{uuid.uuid4().hex[:8]}"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=2)
    os.replace(tmp, path)


def load_engine_state(engine, model, directory: str) -> dict:
    """Restore optimizer, scheduler, engine counters and RNG from `directory`; return trainer_state."""
    rank, world = world_rank(), world_size()
    file = os.path.join(directory, ENGINE_DIR, f"rank{rank:05d}.pt")
    if not os.path.isfile(file):
        raise ValueError(f"--resume: {file} is missing (was the checkpoint written by {world} ranks?)")
    state = torch.load(file, map_location="cpu", weights_only=False)
    info = getattr(model, "expert_parallel", None)
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


def complete_checkpoints(output_dir: str) -> list[tuple[int, str]]:
    """(step, path) of every complete checkpoint (step checkpoints and final/), oldest first."""
    out = []
    if not os.path.isdir(output_dir):
        return out
    for name in os.listdir(output_dir):
        path = os.path.join(output_dir, name)
        if (_STEP_DIR.match(name) or name == "final") and os.path.isfile(os.path.join(path, STATE_FILE)):
            with open(os.path.join(path, STATE_FILE)) as f:
                out.append((json.load(f)["step"], path))
    return sorted(out)


def latest_checkpoint(output_dir: str) -> str | None:
    found = complete_checkpoints(output_dir)
    return found[-1][1] if found else None


def step_dir(output_dir: str, step: int) -> str:
    return os.path.join(output_dir, f"checkpoint-{step:06d}")


# save_pretrained's temporary directory; never its ".old-" one, which may hold the only copy after a crash
_LEFTOVER = re.compile(r"^(checkpoint-\d+|final)\.tmp-[0-9a-f]{8}$")


def prune(output_dir: str, keep_last: int) -> None:
    """Delete step checkpoints beyond the newest `keep_last` complete ones, and leftovers of crashed saves
    (rank 0 only, between saves: no save is in flight)."""
    steps = [(s, p) for s, p in complete_checkpoints(output_dir) if _STEP_DIR.match(os.path.basename(p))]
    for _, path in steps[:-keep_last]:
        shutil.rmtree(path, ignore_errors=True)
    kept = {p for _, p in steps[-keep_last:]}
    oldest_kept = min((s for s, _ in steps[-keep_last:]), default=None)
    for name in os.listdir(output_dir):
        m = _STEP_DIR.match(name)
        path = os.path.join(output_dir, name)
        if m and path not in kept and oldest_kept is not None and int(m.group(1)) < oldest_kept:
            shutil.rmtree(path, ignore_errors=True)  # incomplete (crashed) save
        elif _LEFTOVER.match(name):
            shutil.rmtree(path, ignore_errors=True)  # temporary directory of a crashed save
