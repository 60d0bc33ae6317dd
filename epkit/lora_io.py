"""LoRA adapters in and out, as PEFT adapter directories that `peft` loads onto transformers' Mixtral.

    DIR/adapter_config.json         PEFT LoraConfig: r, lora_alpha, lora_dropout, target_modules (q/k/v/o_proj),
                                    target_parameters (mlp.gate.weight, mlp.experts.gate_up_proj / down_proj)
    DIR/adapter_model.safetensors   one file, PEFT's names and layouts (PEFT_MODULES), fp32
    DIR/epkit_plan.json             epkit's Manifest (plan, routing counts, step); PEFT ignores it

PEFT's layouts for an expert weight (lora.ParamWrapper on a stacked [E, out, in] parameter):
    lora_A.weight [E*r, in]   rows e*r .. e*r+r-1 are expert e's A [r, in]
    lora_B.weight [out, r*E]  column j*E + e is column j of expert e's B [out, r] (rank-major)

Writing under expert parallelism: each EP rank writes its experts' adapters (the first expert-data-parallel
replica, as full checkpoints do), then rank 0 gathers them through the checkpoint directory into the one
file PEFT reads. Adapters are small (Mixtral-8x7B at rank 16 on attention and experts: about 0.9 GB in fp32),
so one writer is fine here, unlike the base weights. Reading: every rank reads only its experts' rows of A
(and B whole, [out, r*E], to take its columns), so an adapter saved at one EP size loads at any other.

Legend: E experts, L local experts, r rank.
"""
from __future__ import annotations

import json
import os

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from .checkpoint import CheckpointError, Manifest, copy_tokenizer, write_directory
from .lora import ATTENTION, EXPERT_WEIGHTS, LoraSpec, adapted_modules, apply_lora, merge_lora

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
PEFT_PREFIX = "base_model.model."
_PART = ".adapter-rank{rank:05d}.safetensors"

# PEFT target -> the module path its lora_A / lora_B sit under (transformers 5 Mixtral names)
PEFT_MODULES = {
    **{t: f"model.layers.{{l}}.self_attn.{t}" for t in ATTENTION},
    "gate": "model.layers.{l}.mlp.gate",
    # Both expert weights adapted: PEFT nests two ParamWrappers on mlp.experts, gate_up_proj the inner one
    # (base_layer). One adapted alone sits on mlp.experts itself.
    "gate_up_proj": "model.layers.{l}.mlp.experts.base_layer",
    "down_proj": "model.layers.{l}.mlp.experts",
}
# PEFT target -> its entry in target_modules (attention) or target_parameters (the others)
PEFT_TARGET_PARAMETERS = {"gate": "mlp.gate.weight", "gate_up_proj": "mlp.experts.gate_up_proj",
                          "down_proj": "mlp.experts.down_proj"}


def peft_module(target: str, layer: int, spec: LoraSpec) -> str:
    if target in EXPERT_WEIGHTS and not set(EXPERT_WEIGHTS) <= set(spec.targets):
        return f"model.layers.{layer}.mlp.experts"
    return PEFT_MODULES[target].format(l=layer)


# ---- adapter_config.json ---------------------------------------------------------------------------

def peft_config(spec: LoraSpec, base: str | None) -> dict:
    """PEFT's LoraConfig fields for `spec` (the ones that matter; PEFT fills the rest with its defaults)."""
    return {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": base,
        "r": spec.rank, "lora_alpha": spec.alpha, "lora_dropout": spec.dropout, "use_rslora": spec.use_rslora,
        "target_modules": [t for t in ATTENTION if t in spec.targets],
        "target_parameters": [PEFT_TARGET_PARAMETERS[t] for t in PEFT_TARGET_PARAMETERS if t in spec.targets] or None,
        "bias": "none", "fan_in_fan_out": False, "init_lora_weights": True, "inference_mode": True, "use_dora": False,
        "lora_bias": False, "rank_pattern": {}, "alpha_pattern": {}, "modules_to_save": None,
        "layers_to_transform": None,
    }


def adapter_dir(path: str) -> str:
    """An adapter directory, or a LoRA run directory whose final/ is one."""
    for cand in (path, os.path.join(path, "final")):
        if os.path.isfile(os.path.join(cand, ADAPTER_CONFIG)):
            return cand
    raise FileNotFoundError(f"{path}: no {ADAPTER_CONFIG} (nor final/{ADAPTER_CONFIG}), so this is not a LoRA "
                            f"adapter directory")


def read_spec(path: str) -> LoraSpec:
    """The LoraSpec of a PEFT adapter directory; anything epkit cannot apply is one sentence naming it."""
    file = os.path.join(path, ADAPTER_CONFIG)
    try:
        with open(file) as f:
            cfg = json.load(f)
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: no {ADAPTER_CONFIG}, so this is not a LoRA adapter directory") from None
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{file}: not valid JSON ({e})") from None
    if not isinstance(cfg, dict) or cfg.get("peft_type", "LORA") != "LORA":
        raise CheckpointError(f"{file}: peft_type={cfg.get('peft_type') if isinstance(cfg, dict) else None!r} "
                              f"is not LORA")
    for key, off in (("use_dora", False), ("lora_bias", False), ("bias", "none"), ("fan_in_fan_out", False)):
        if cfg.get(key, off) not in (off, None):
            raise CheckpointError(f"{file}: {key}={cfg[key]!r} is not supported (epkit applies plain LoRA)")
    for key in ("rank_pattern", "alpha_pattern", "modules_to_save", "layers_to_transform", "layer_replication"):
        if cfg.get(key):
            raise CheckpointError(f"{file}: {key}={cfg[key]!r} is not supported (epkit applies one rank and "
                                  f"alpha to every targeted layer)")
    modules = cfg.get("target_modules") or []
    if isinstance(modules, str):
        raise CheckpointError(f"{file}: target_modules={modules!r} (a pattern) is not supported; list the modules")
    legacy = [m for m in modules if m.rsplit(".", 1)[-1] in ("w1", "w2", "w3")]
    if legacy:
        raise CheckpointError(f"{file}: target {legacy[0]!r} is transformers 4's per-expert module; epkit reads "
                              f"PEFT's transformers 5 format (target_parameters mlp.experts.gate_up_proj/down_proj)")
    targets = [m.rsplit(".", 1)[-1] if m.rsplit(".", 1)[-1] in ATTENTION else m for m in modules]
    for p in cfg.get("target_parameters") or []:  # "mlp.experts.down_proj", "experts.down_proj", "gate.weight", ...
        targets.append(next((t for t in PEFT_TARGET_PARAMETERS if ("." + p).endswith(
            "." + PEFT_TARGET_PARAMETERS[t].split(".", 1)[1])), p))
    spec = LoraSpec(cfg.get("r"), cfg.get("lora_alpha"), cfg.get("lora_dropout") or 0.0, tuple(targets),
                    bool(cfg.get("use_rslora", False)))
    try:
        spec.check(source=file)
    except ValueError as e:
        raise CheckpointError(str(e)) from None
    return spec


# ---- reading --------------------------------------------------------------------------------------

def read_adapter(path: str, model) -> tuple[LoraSpec, dict[str, torch.Tensor]]:
    """(spec, {epkit adapter parameter name: tensor}) for what `model` holds: every rank only its experts.
    Shapes are checked against the model before anything is returned. Raises CheckpointError."""
    spec = read_spec(path)
    file = os.path.join(path, ADAPTER_WEIGHTS)
    if not os.path.isfile(file):
        raise CheckpointError(f"{path}: {ADAPTER_WEIGHTS} is missing")
    args, r = model.args, spec.rank
    out: dict[str, torch.Tensor] = {}
    with safe_open(file, "pt") as f:
        present, used = set(f.keys()), set()

        def get(name: str, want: list[int]):
            if name not in present:
                raise CheckpointError(f"{file}: tensor {name} is missing ({ADAPTER_CONFIG} targets it)")
            got = list(f.get_slice(name).get_shape())
            if got != want:
                raise CheckpointError(f"{file}: tensor {name} has shape {got}, but the base model implies {want}; "
                                      f"was the adapter made for another model?")
            used.add(name)
            return f.get_slice(name)

        for l, layer in enumerate(model.layers):
            for t in spec.targets:
                module = PEFT_PREFIX + peft_module(t, l, spec)
                if t in EXPERT_WEIGHTS:
                    w = EXPERT_WEIGHTS[t]
                    experts = layer.moe.experts
                    o, i = getattr(experts, w).shape[1:]
                    ids, E = experts.expert_ids, args.num_experts
                    a = get(f"{module}.lora_A.weight", [E * r, i])
                    b = get(f"{module}.lora_B.weight", [o, r * E])[:].reshape(o, r, E)
                    out[f"layers.{l}.moe.experts.{w}_lora_A"] = torch.stack([a[e * r:(e + 1) * r] for e in ids])
                    out[f"layers.{l}.moe.experts.{w}_lora_B"] = b[:, :, ids].permute(2, 0, 1).contiguous()
                else:
                    ours = f"layers.{l}.moe.gate" if t == "gate" else f"layers.{l}.attn.{t}"
                    o, i = model.get_submodule(ours).weight.shape
                    out[f"{ours}.lora_A"] = get(f"{module}.lora_A.weight", [r, i])[:]
                    out[f"{ours}.lora_B"] = get(f"{module}.lora_B.weight", [o, r])[:]
        unknown = sorted(present - used)
        if unknown:
            raise CheckpointError(f"{file}: tensor {unknown[0]} does not belong to this base model "
                                  f"({args.num_layers} layers, targets {','.join(spec.targets)}); was the adapter "
                                  f"made for another model?")
    return spec, out


@torch.no_grad()
def load_adapter(model, path: str) -> None:
    """Copy a saved adapter into a model that has the same adapters (`--resume`)."""
    spec, tensors = read_adapter(path, model)
    if spec != model.lora:
        raise ValueError(f"--resume: {path} holds a {spec} adapter, but this run trains {model.lora}; resume with "
                         f"the same --lora-* settings")
    params = dict(model.named_parameters())
    for name, t in tensors.items():
        params[name].copy_(t)


def merge_adapter(model, path: str):
    """Fold a PEFT adapter into `model`'s weights (serving, export): each rank reads and merges only the experts
    it holds. A failure on one rank fails every rank (a collective when distributed)."""
    from .parallel import all_ranks_ok
    path = adapter_dir(path)
    failure = None
    try:
        spec, tensors = read_adapter(path, model)
    except (CheckpointError, OSError, ValueError) as e:
        failure = e
    if not all_ranks_ok(failure is None):
        raise failure or CheckpointError(f"{path}: another rank could not read the adapter (see its error)")
    apply_lora(model, spec)
    load = dict(model.named_parameters())
    with torch.no_grad():
        for name, t in tensors.items():
            load[name].copy_(t)
    return merge_lora(model)


# ---- writing --------------------------------------------------------------------------------------

def save_adapter(model, path: str, base: str | None, tokenizer_dir: str | None = None,
                 trainer_state: dict | None = None) -> None:
    """Write `model`'s adapters as a PEFT adapter directory (atomically; call on every rank)."""
    from .parallel import world_rank
    spec, info, rank = model.lora, model.expert_parallel, world_rank()
    record = Manifest.of_model(model, trainer_state)  # NOTE: collective (routing counts)

    def write_part(tmp: str) -> None:
        tensors = {}
        for l, t, m in adapted_modules(model):
            module = peft_module(t, l, spec)
            if t in EXPERT_WEIGHTS:
                if not (info.writes_experts if info is not None else rank == 0):
                    continue
                w = EXPERT_WEIGHTS[t]
                for slot, e in enumerate(m.expert_ids):
                    tensors[f"{module}.lora_A|{e}"] = getattr(m, f"{w}_lora_A")[slot]
                    tensors[f"{module}.lora_B|{e}"] = getattr(m, f"{w}_lora_B")[slot]
            elif rank == 0:
                tensors[f"{module}.lora_A"], tensors[f"{module}.lora_B"] = m.lora_A, m.lora_B
        tensors = {k: v.detach().float().cpu().contiguous().clone() for k, v in tensors.items()}
        bad = next((k for k, v in tensors.items() if not bool(torch.isfinite(v).all())), None)
        if bad is not None:  # as save_pretrained: a diverged adapter is not written over a good one
            raise CheckpointError(f"refusing to save {path}: tensor {bad.split('|')[0]} holds NaN or inf values")
        if tensors:
            save_file(tensors, os.path.join(tmp, _PART.format(rank=rank)))

    def finish(tmp: str) -> None:
        out, experts = {}, {}
        for part in sorted(p for p in os.listdir(tmp) if p.startswith(".adapter-rank")):
            for k, v in load_file(os.path.join(tmp, part)).items():
                if "|" in k:
                    name, e = k.rsplit("|", 1)
                    experts.setdefault(name, {})[int(e)] = v
                else:
                    out[f"{PEFT_PREFIX}{k}.weight"] = v
            os.remove(os.path.join(tmp, part))
        E = model.args.num_experts
        for name, by_expert in experts.items():
            if sorted(by_expert) != list(range(E)):
                raise RuntimeError(f"internal: adapters of experts {sorted(set(range(E)) - set(by_expert))} of "
                                   f"{name} were written by no rank")
            pieces = [by_expert[e] for e in range(E)]
            full = torch.cat(pieces) if name.endswith("lora_A") else \
                torch.stack(pieces, -1).reshape(pieces[0].shape[0], -1)  # [E*r, in] / [out, r, E] -> [out, r*E]
            out[f"{PEFT_PREFIX}{name}.weight"] = full
        save_file(dict(sorted(out.items())), os.path.join(tmp, ADAPTER_WEIGHTS), metadata={"format": "pt"})
        with open(os.path.join(tmp, ADAPTER_CONFIG), "w") as f:
            json.dump(peft_config(spec, base), f, indent=2)
        record.write(tmp)
        copy_tokenizer(tokenizer_dir, tmp)

    write_directory(path, write_part, finish)


def export_merged(base: str, adapter: str, output: str, ep_size: int = 1, dtype: torch.dtype | None = None) -> str:
    """Base checkpoint + adapter -> a merged Hugging Face checkpoint at `output` (call on every rank; with
    ep_size > 1 each rank reads, merges and writes only its experts)."""
    from .checkpoint import load_pretrained, save_pretrained
    from .tokenizer import tokenizer_dir_for
    adapter = adapter_dir(adapter)
    model = load_pretrained(base, dtype=dtype, ep_size=ep_size, dispatch="replicated")
    merge_adapter(model, adapter)
    save_pretrained(model, output, tokenizer_dir=tokenizer_dir_for(base) or tokenizer_dir_for(adapter))
    return output
