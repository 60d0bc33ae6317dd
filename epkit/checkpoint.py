"""Hugging Face Mixtral checkpoints in and out.

Reading: a directory with `config.json` and safetensors (one file, or sharded with
`model.safetensors.index.json`), tensors named as the hub spells them or as transformers 5 fuses
them in memory (the tables in `hub_names`). The model is built on the meta device (`build.build_model`),
each tensor is read memory-mapped and assigned, so peak RAM is about one copy of the model. Under
expert parallelism each rank reads only the experts its plan gives it. Everything is checked before
anything is assigned, so a bad checkpoint loads nothing half-way.

Writing: hub names, sharded by size, an index over all files. Under expert parallelism every rank
writes the experts it owns into its own files, rank 0 writes the shared tensors, config and plan.
The directory is written under a temporary name and renamed when whole. `epkit_plan.json` beside
the tensors is a `Manifest` (plan and routing counts).
"""
from __future__ import annotations

import errno
import json
import os
import shutil
import uuid
from dataclasses import dataclass, field

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from .args import ModelArgs
from .hub_names import IGNORED, dense_sources, expert_pieces, fill, is_expert_tensor
from .model import Mixtral
from .plan import ShardingPlan

INDEX_FILE = "model.safetensors.index.json"
PLAN_FILE = "epkit_plan.json"

class CheckpointError(ValueError):
    """A checkpoint that cannot be loaded or written; the message names the file and the tensor."""


def write_error(e: BaseException, file: str) -> CheckpointError:
    """One line for a failed write (a full disk names the file; the previous checkpoint stays whole)."""
    if getattr(e, "errno", None) == errno.ENOSPC or "No space left" in str(e):
        return CheckpointError(f"no space left while writing {file}")
    return CheckpointError(f"could not write {file}: {getattr(e, 'strerror', None) or e}")


@dataclass
class LoadReport:
    bytes_read: int = 0
    tensors_read: int = 0


@dataclass
class Manifest:
    """`epkit_plan.json`, written beside every checkpoint epkit saves: the sharding plan it was saved with,
    the tokens routed to each expert of each layer over the run that saved it, and (training) the step.

    `ShardingPlan.from_manifest` turns it into a plan for any EP size (the only way a plan comes from a
    checkpoint); `launch/heatmap.py` and `--resume` read its routing counts.
    """

    plan: dict | None = None  # ShardingPlan.to_dict()
    routed_tokens: list[list[int]] | None = None  # [layers][experts]
    trainer_state: dict | None = None  # {"step", "tokens_seen"} of a training checkpoint
    file: str | None = field(default=None, compare=False)  # where it was read from (for messages)

    @classmethod
    def read(cls, directory: str) -> "Manifest | None":
        """The manifest of checkpoint `directory`, or None when it has none (e.g. a transformers checkpoint).
        A file that is not a manifest raises CheckpointError naming it."""
        file = os.path.join(directory, PLAN_FILE)
        if not os.path.isfile(file):
            return None
        try:
            with open(file) as f:
                d = json.load(f)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise CheckpointError(f"{file}: not valid JSON ({e})") from None
        if not isinstance(d, dict):
            raise CheckpointError(f"{file}: expected a JSON object, got {type(d).__name__}")
        plan, routed = d.get("plan"), d.get("routed_tokens")
        if plan is not None and not isinstance(plan, dict):
            raise CheckpointError(f"{file}: 'plan' is not a JSON object")
        if routed is not None and not (isinstance(routed, list) and all(
                isinstance(row, list) and all(isinstance(c, int) for c in row) for row in routed)):
            raise CheckpointError(f"{file}: 'routed_tokens' is not a list of per-layer lists of token counts")
        return cls(plan, routed, d.get("trainer_state"), file)

    @classmethod
    def for_model(cls, args: ModelArgs, directory: str | None = None) -> "Manifest":
        """What a checkpoint without a manifest amounts to: one device holds every expert, nothing recorded."""
        plan = ShardingPlan(args.num_experts, 1, num_layers=args.num_layers).to_dict()
        return cls(plan, file=os.path.join(directory, PLAN_FILE) if directory else None)

    @classmethod
    def of_model(cls, model: Mixtral, trainer_state: dict | None = None) -> "Manifest":
        """What saving `model` now records: its plan and the tokens routed to each expert, summed over every
        rank. NOTE: collective (call on every rank)."""
        from .parallel import gather_routing_counts
        info = getattr(model, "expert_parallel", None)
        plan = info.plan.to_dict() if info else cls.for_model(model.args).plan
        return cls(plan, gather_routing_counts(model), trainer_state)

    def write(self, directory: str) -> None:
        d = {"plan": self.plan, "routed_tokens": self.routed_tokens}
        if self.trainer_state is not None:
            d["trainer_state"] = self.trainer_state
        with open(os.path.join(directory, PLAN_FILE), "w") as f:
            json.dump(d, f, indent=2)

    def check_matches(self, args: ModelArgs) -> None:
        """A saved plan that disagrees with config.json means the directory was tampered with or mixed up."""
        if self.plan is None:
            raise CheckpointError(f"{self.file}: has no 'plan' entry")
        try:
            ShardingPlan.from_dict(self.plan).check_matches(args.num_experts, args.num_layers, source=self.file)
        except (ValueError, TypeError) as e:
            msg = str(e)
            raise CheckpointError(msg if msg.startswith(f"{self.file}:") else f"{self.file}: {msg}") from None


def checkpoint_plan(path: str, args: ModelArgs, ep_size: int, strategy: str = "contiguous") -> ShardingPlan:
    """The plan to load checkpoint `path` over `ep_size` ranks with `strategy`, from its manifest (checked
    against config.json; `balanced` places experts by its routing counts)."""
    manifest = Manifest.read(path)
    if manifest is None:
        manifest = Manifest.for_model(args, path)
    else:
        manifest.check_matches(args)
    return ShardingPlan.from_manifest(manifest, ep_size, strategy)


def _safe_open(file: str):
    """safe_open, with a damaged file (truncated, corrupt header) as one line naming it."""
    try:
        return safe_open(file, "pt")
    except Exception as e:  # safetensors' SafetensorError, or an OSError
        detail = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise CheckpointError(f"{file}: not a readable safetensors file ({detail}); it may be truncated or "
                              f"corrupt") from None


class _Reader:
    """Memory-mapped access to every tensor of a checkpoint directory, by name."""

    def __init__(self, path: str):
        if not os.path.isdir(path):
            raise CheckpointError(f"{path}: not a directory")
        self.path = path
        index = os.path.join(path, INDEX_FILE)
        if os.path.isfile(index):
            with open(index) as f:
                try:
                    weight_map = json.load(f)["weight_map"]
                except (json.JSONDecodeError, KeyError) as e:
                    raise CheckpointError(f"{index}: not a safetensors index ({e})") from None
            self.where = {name: os.path.join(path, file) for name, file in weight_map.items()}
            for file in set(self.where.values()):
                if not os.path.isfile(file):
                    raise CheckpointError(f"{index}: lists {os.path.basename(file)}, which is missing")
        else:
            files = sorted(f for f in os.listdir(path) if f.endswith(".safetensors"))
            if not files:
                raise CheckpointError(f"{path}: no *.safetensors files, so this is not a checkpoint directory")
            self.where = {}
            for file in files:
                with _safe_open(os.path.join(path, file)) as f:
                    for name in f.keys():
                        self.where[name] = os.path.join(path, file)
        self._open: dict[str, object] = {}
        self.report = LoadReport()

    def __contains__(self, name: str) -> bool:
        return name in self.where

    def _file(self, name: str):
        file = self.where[name]
        if file not in self._open:
            self._open[file] = _safe_open(file)
        return self._open[file]

    def shape(self, name: str) -> list[int]:
        return list(self._file(name).get_slice(name).get_shape())

    def read(self, name: str, index=None) -> torch.Tensor:
        """The tensor, or `index` of it (read from the mapped file, not the whole tensor)."""
        sl = self._file(name).get_slice(name)
        t = sl[index] if index is not None else sl[:]
        self.report.bytes_read += t.numel() * t.element_size()
        self.report.tensors_read += 1
        return t


def read_state_dict(path: str, model: Mixtral, device=None, dtype=None) -> tuple[dict, LoadReport]:
    """Read the tensors `model` (possibly a meta, expert-sharded model) needs. Raises CheckpointError."""
    reader = _Reader(path)
    args = model.args
    used: set[str] = set()
    out: dict[str, torch.Tensor] = {}

    def convert(t: torch.Tensor) -> torch.Tensor:
        return t.to(device=device, dtype=dtype or t.dtype)

    def check(name: str, src: str, got, want) -> None:
        if list(got) != list(want):
            raise CheckpointError(f"{reader.where[src]}: tensor {src} has shape {list(got)}, but config.json "
                                  f"implies {list(want)} for {name}")

    params = dict(model.named_parameters(remove_duplicate=True))
    for name, p in params.items():
        if args.tie_word_embeddings and name == "lm_head.weight":
            continue
        dense = dense_sources(name)
        if dense is not None:
            src = next((s for s in dense if s in reader), None)
            if src is None:
                raise CheckpointError(f"{path}: tensor {dense[0]} is missing")
            check(name, src, reader.shape(src), p.shape)
            used.add(src)
            out[name] = convert(reader.read(src))
            continue
        if not expert_pieces(name):
            raise CheckpointError(f"internal: no checkpoint name is known for parameter {name}")
        out[name] = _read_experts(reader, name, p, args, used, check, convert)

    leftovers = [n for n in reader.where if n not in used and not IGNORED.match(n)]
    if args.tie_word_embeddings:
        leftovers = [n for n in leftovers if n != "lm_head.weight"]
    unknown = sorted(n for n in leftovers if not is_expert_tensor(n, args.num_layers, args.num_experts))
    if unknown:
        raise CheckpointError(f"{reader.where[unknown[0]]}: tensor {unknown[0]} is not described by config.json "
                              f"({len(unknown)} such tensor(s); does config.json match the weights?)")
    return out, reader.report


def _read_experts(reader, name, p, args, used, check, convert) -> torch.Tensor:
    """Assemble a stacked expert parameter [L, ...] for the experts this module holds."""
    layer = int(name.split(".")[1])
    module_ids = p._epkit_expert_ids  # set by _tag_expert_params
    # a part of every expert's rows (parallel.apply_expert_rows): read full shapes' slices
    part, parts_n = p._epkit_rows or (0, 1)
    slots = []
    for e in module_ids:
        parts = []
        for _, half, hub, fused, fused_half in expert_pieces(name):
            hub_name, fused_name = fill(hub, l=layer, e=e), fill(fused, l=layer, e=e)
            is_w2 = half is None  # w2 [D, I]: its columns are the intermediate rows
            rows = p.shape[1] // (2 if half is not None else 1)  # of this rank's part
            cols = p.shape[2]
            want = [rows, cols * parts_n] if is_w2 else [rows * parts_n, cols]
            mine = ((slice(None), slice(part * cols, (part + 1) * cols)) if is_w2
                    else (slice(part * rows, (part + 1) * rows),))
            if hub_name in reader:
                check(name, hub_name, reader.shape(hub_name), want)
                used.add(hub_name)
                parts.append(convert(reader.read(hub_name, mine if parts_n > 1 else None)))
            elif fused_name in reader:
                shape = reader.shape(fused_name)
                n_rows = want[0] * (2 if fused_half is not None else 1)
                check(name, fused_name, shape, [args.num_experts, n_rows, want[1]])
                used.add(fused_name)
                lo = (0 if fused_half in (None, 0) else want[0]) + (0 if is_w2 else part * rows)
                n = want[0] if is_w2 else rows
                cut = (slice(e, e + 1), slice(lo, lo + n)) + ((mine[1],) if is_w2 and parts_n > 1 else ())
                parts.append(convert(reader.read(fused_name, cut)[0]))
            else:
                raise CheckpointError(f"{reader.path}: tensor {hub_name} is missing (nor is {fused_name} there)")
        slots.append(torch.cat(parts, 0) if len(parts) > 1 else parts[0])
    return torch.stack(slots)


def _tag_expert_params(model: Mixtral) -> None:
    for layer in model.layers:
        for p in (layer.moe.experts.w13, layer.moe.experts.w2):
            p._epkit_expert_ids = layer.moe.experts.expert_ids
            p._epkit_rows = layer.moe.experts.rows


def load_state_into(model: Mixtral, path: str, device=None, dtype=None) -> LoadReport:
    """Read a checkpoint directory's tensors for a meta (possibly expert-sharded) model and assign them
    (assign=True): only reads and assigns; `build.build_model` reties and marks afterwards."""
    _tag_expert_params(model)
    sd, report = read_state_dict(path, model, device, dtype)
    missing, unexpected = model.load_state_dict(sd, strict=False, assign=True)
    missing = [m for m in missing if not (model.args.tie_word_embeddings and m == "lm_head.weight")]
    if missing or unexpected:
        raise CheckpointError(f"{path}: internal name mismatch, missing {missing[:3]} unexpected {unexpected[:3]}")
    return report


def load_pretrained(path: str, device="cpu", dtype: torch.dtype | None = None, ep_size: int = 1,
                    plan=None, strategy: str = "contiguous", dispatch: str = "replicated",
                    return_report: bool = False, split: str = "experts"):
    """Load a Hugging Face Mixtral directory into epkit (built by `build.build_model`).

    With ep_size > 1 (inside a `torchrun` or `deepspeed` launch, which it joins through `init_distributed`)
    the model is expert-parallel: each rank builds and reads only the experts that `plan` (default: a
    `strategy` plan from the checkpoint's manifest) gives it; with `split="rows"` (inference) each rank reads
    its part of every expert's rows instead (`parallel.apply_expert_rows`).
    """
    from .build import build_model
    from .parallel import all_ranks_ok, init_distributed
    from .runtime import rank_device
    if isinstance(ep_size, bool) or not isinstance(ep_size, int) or ep_size < 1:
        raise ValueError(f"ep_size={ep_size!r} must be an integer of at least 1")
    device = rank_device(device)
    args = ModelArgs.load(path)
    if ep_size > 1 or plan is not None:
        init_distributed()  # inside `torchrun` / `deepspeed`: join the launch (no-op if joined or not launched)
    if plan is None and ep_size > 1:
        plan = checkpoint_plan(path, args, ep_size, strategy)
    elif plan is not None and (manifest := Manifest.read(path)) is not None:
        manifest.check_matches(args)
    reports = []

    def read_and_assign(model: Mixtral) -> None:
        failure = None
        try:  # a rank may miss only its own experts' tensors: every rank must hear of it
            reports.append(load_state_into(model, path, device, dtype))
        except (CheckpointError, OSError, ValueError) as e:
            failure = e
        if plan is not None and not all_ranks_ok(failure is None):  # NOTE: collective under EP
            raise failure or CheckpointError(f"{path}: another rank could not load its experts (see its error)")
        if failure is not None:
            raise failure

    model = build_model(args, plan, dispatch, device, dtype, load=read_and_assign, split=split)
    return (model, reports[0]) if return_report else model


# ---- writing ----------------------------------------------------------------------------------

def hub_tensors(model: Mixtral, shared: bool = True, experts: bool = True):
    """Yield (hub name, tensor getter) for what this rank holds, in hub naming."""
    args = model.args
    for name, p in model.named_parameters(remove_duplicate=True):
        if args.tie_word_embeddings and name == "lm_head.weight":
            continue
        dense = dense_sources(name)
        if dense is not None:
            if shared:
                yield dense[0], (lambda p=p: p.detach())
            continue
        if not experts:
            continue
        layer = int(name.split(".")[1])
        ids = model.layers[layer].moe.experts.expert_ids
        for _, half, hub, _, _ in expert_pieces(name):
            for slot, e in enumerate(ids):
                def get(p=p, slot=slot, half=half):
                    t = p.detach()[slot]
                    return t if half is None else t.chunk(2, 0)[half]
                yield fill(hub, l=layer, e=e), get


def _write_shards(items, directory: str, prefix: str, max_shard_bytes: int) -> dict[str, str]:
    """Write (name, getter) pairs into size-bounded safetensors files; return name -> file."""
    weight_map: dict[str, str] = {}
    shard, size, k = {}, 0, 0

    def flush():
        nonlocal shard, size, k
        if shard:
            file = f"{prefix}-{k:05d}.safetensors"
            try:
                save_file(shard, os.path.join(directory, file), metadata={"format": "pt"})
            except Exception as e:
                raise write_error(e, os.path.join(directory, file)) from None
            weight_map.update({n: file for n in shard})
            shard, size, k = {}, 0, k + 1

    for name, get in items:
        t = get().to("cpu").contiguous().clone()  # clone: safetensors refuses shared storage
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            raise CheckpointError(f"refusing to save {directory}: tensor {name} holds NaN or inf values")
        if shard and size + t.numel() * t.element_size() > max_shard_bytes:
            flush()
        shard[name] = t
        size += t.numel() * t.element_size()
    flush()
    return weight_map


def save_pretrained(model: Mixtral, path: str, max_shard_size: int = 2 << 30, trainer_state: dict | None = None,
                    tokenizer_dir: str | None = None) -> None:
    """Write a Hugging Face Mixtral directory and its `Manifest` (`trainer_state`: a training step's
    record). Under expert parallelism call it on every rank."""
    from . import parallel  # collectives only when a distributed run is going
    info = model.expert_parallel
    if info is not None and info.split == "rows":
        raise ValueError(f"cannot save to {path}: this model's experts are split by rows (an inference layout); "
                         f"save from a model loaded with whole experts per rank")
    rank, world = parallel.world_rank(), parallel.world_size()
    record = Manifest.of_model(model, trainer_state)  # NOTE: collective (every rank is here)

    def finish(tmp: str) -> None:
        weight_map = {}
        for r in range(world):
            part = os.path.join(tmp, f".part-{r}.json")
            with open(part) as f:
                weight_map.update(json.load(f))
            os.remove(part)
        total = sum(os.path.getsize(os.path.join(tmp, f)) for f in set(weight_map.values()))
        with open(os.path.join(tmp, INDEX_FILE), "w") as f:
            json.dump({"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}, f,
                      indent=2)
        model.args.save(tmp, dtype=str(next(model.parameters()).dtype).removeprefix("torch."))
        record.write(tmp)
        copy_tokenizer(tokenizer_dir, tmp)

    write_directory(path, lambda tmp: _write_rank_files(model, tmp, info, rank, max_shard_size), finish)


def copy_tokenizer(tokenizer_dir: str | None, directory: str) -> None:
    if tokenizer_dir:
        for name in os.listdir(tokenizer_dir):
            if name.startswith("tokenizer") or name in ("special_tokens_map.json",):
                shutil.copy(os.path.join(tokenizer_dir, name), directory)


def write_directory(path: str, write_part, finish) -> None:
    """The one way epkit writes a checkpoint or adapter directory from every rank (call on every rank).

    Rank 0 makes a temporary directory beside `path`; every rank calls write_part(tmp); then rank 0 calls
    finish(tmp) and moves it over `path`. A failure on any rank, in either step, fails every rank (no rank
    waits forever in a collective) and leaves an existing `path` whole."""
    from . import parallel
    rank = parallel.world_rank()
    path = os.path.abspath(path)
    err = tmp = None
    if rank == 0:
        if os.path.exists(path) and not (os.path.isdir(path) and (not os.listdir(path) or _is_checkpoint(path))):
            err = f"{path} exists and is not a checkpoint directory; refusing to replace it (pick another path)"
        else:
            tmp = f"{path}.tmp-{uuid.uuid4().hex[:8]}"
            os.makedirs(tmp)
    err, tmp = parallel.broadcast_object((err, tmp))  # NOTE: collective
    if err:
        raise ValueError(err)

    def everywhere(step, elsewhere: str) -> None:  # run `step` here; if it failed on any rank, fail on every rank
        failure = None
        try:
            step()
        except CheckpointError as e:
            failure = CheckpointError(str(e).replace(tmp, path))
        except OSError as e:  # a full disk: one line naming the file
            failure = write_error(e, str(getattr(e, "filename", None) or path).replace(tmp, path))
        except Exception as e:
            failure = e
        if not parallel.all_ranks_ok(failure is None):  # NOTE: collective
            if rank == 0:
                shutil.rmtree(tmp, ignore_errors=True)  # the previous checkpoint at `path` is untouched
            raise failure or CheckpointError(elsewhere)

    everywhere(lambda: write_part(tmp), f"saving {path} failed on another rank; nothing was replaced")
    everywhere(lambda: (finish(tmp), _atomic_replace(tmp, path)) if rank == 0 else None,
               f"saving {path} failed on rank 0 (see its error); nothing was replaced")


def _write_rank_files(model, tmp: str, info, rank: int, max_shard_size: int) -> None:
    """This rank's safetensors files, and a small JSON of the tensors it wrote (merged by rank 0)."""
    writes_experts = info is None or info.writes_experts
    if info is None:
        writes_shared, prefix = rank == 0, "model"
    else:
        writes_shared, prefix = rank == 0, f"model-ep{info.ep_rank:03d}-of-{info.plan.ep_size:03d}"
    parts: dict[str, str] = {}
    if writes_shared:
        parts.update(_write_shards(hub_tensors(model, shared=True, experts=False), tmp,
                                   "model-shared" if info else "model", max_shard_bytes=max_shard_size))
    if writes_experts and (info is not None or rank == 0):
        parts.update(_write_shards(hub_tensors(model, shared=False, experts=True), tmp,
                                   prefix + "-experts" if info else "model-experts", max_shard_bytes=max_shard_size))
    with open(os.path.join(tmp, f".part-{rank}.json"), "w") as f:
        json.dump(parts, f)


def _is_checkpoint(path: str) -> bool:
    """A model checkpoint, or a LoRA adapter directory (epkit.lora_io)."""
    if os.path.isfile(os.path.join(path, "adapter_config.json")):
        return True
    return os.path.isfile(os.path.join(path, "config.json")) and (
        os.path.isfile(os.path.join(path, INDEX_FILE)) or any(f.endswith(".safetensors") for f in os.listdir(path)))


def _atomic_replace(tmp: str, path: str) -> None:
    """Move a finished directory into place; an existing one is kept until the new one is there."""
    old = None
    if os.path.exists(path):
        old = f"{path}.old-{uuid.uuid4().hex[:8]}"
        os.rename(path, old)
    os.rename(tmp, path)
    if old:
        shutil.rmtree(old)

