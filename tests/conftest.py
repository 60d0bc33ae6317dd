"""Shared helpers: tiny configs, transformers' own Mixtral with random weights, checkpoints on disk."""
from __future__ import annotations

import json
import os
import warnings

import pytest
import torch

warnings.filterwarnings("ignore")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from epkit import ModelArgs  # noqa: E402


def tiny_args(**overrides) -> ModelArgs:
    base = dict(vocab_size=96, hidden_size=32, intermediate_size=48, num_layers=2, num_heads=4, num_kv_heads=2,
                num_experts=8, experts_per_token=2, rope_theta=10000.0, max_position_embeddings=256)
    base.update(overrides)
    return ModelArgs(**base)


def hf_model(args: ModelArgs, seed: int = 0):
    """transformers' MixtralForCausalLM with random weights (fp32, eval)."""
    from transformers import MixtralConfig, MixtralForCausalLM
    torch.manual_seed(seed)
    cfg = MixtralConfig(**{k: v for k, v in args.to_hf_config().items() if k not in ("architectures", "model_type")})
    cfg._attn_implementation = "eager"
    model = MixtralForCausalLM(cfg).eval()
    # transformers' default init is tiny (std 0.02): widen the router so top-k choices are well separated.
    with torch.no_grad():
        for layer in model.model.layers:
            layer.mlp.gate.weight.normal_(0, 0.5)
    return model


def save_fused(hf, path: str) -> str:
    """Write transformers' in-memory (fused) tensor names, as a transformers 5 user might."""
    from safetensors.torch import save_file
    os.makedirs(path, exist_ok=True)
    sd = {k: v.contiguous().clone() for k, v in hf.state_dict().items()}
    if hf.config.tie_word_embeddings:
        sd.pop("lm_head.weight", None)
    save_file(sd, os.path.join(path, "model.safetensors"), metadata={"format": "pt"})
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(hf.config.to_dict(), f)
    return path


def hf_logits(hf, tokens, attention_mask=None, position_ids=None):
    with torch.no_grad():
        out = hf(input_ids=tokens, attention_mask=attention_mask, position_ids=position_ids,
                 output_router_logits=True)
    return out.logits, out.router_logits


def eval_loss_with_transformers(final, eval_file, seq_len):
    """Mean next-token loss over the eval set's trained tokens, by transformers' own loss (labels -100
    ignored), each packed row on its own: (loss, number of trained tokens)."""
    from transformers import AutoModelForCausalLM

    from epkit import data as data_lib
    from epkit import ModelArgs
    args = ModelArgs.load(final)
    hf = AutoModelForCausalLM.from_pretrained(final, dtype=torch.float32).eval()
    packed = data_lib.load_packed(eval_file, data_lib.Tokenizer(final), seq_len, bos_id=args.bos_token_id,
                                  eos_id=args.eos_token_id, pad_id=args.pad_token_id or 0,
                                  vocab_size=args.vocab_size, seed=0)
    total, count = 0.0, 0
    with torch.no_grad():
        for tokens, labels, positions in zip(packed.tokens, packed.labels, packed.positions):
            n = int((positions >= 0).sum())
            k = int((labels[1:n] != data_lib.IGNORE).sum())
            if k:
                total += float(hf(input_ids=tokens[None, :n], labels=labels[None, :n]).loss) * k
                count += k
    return total / count, count


@pytest.fixture
def tmp_ckpt(tmp_path):
    return str(tmp_path / "ckpt")


# ---- what a checkpoint load really reads -------------------------------------------------------------

class _CountingSlice:
    def __init__(self, sl, name, log):
        self._sl, self._name, self._log = sl, name, log

    def __getitem__(self, index):
        t = self._sl[index]
        self._log.append((self._name, index, t.numel() * t.element_size()))
        return t

    def __getattr__(self, attr):  # get_shape, get_dtype: metadata only
        return getattr(self._sl, attr)


class _CountingFile:
    def __init__(self, f, log):
        self._f, self._log = f, log

    def get_slice(self, name):
        return _CountingSlice(self._f.get_slice(name), name, self._log)

    def get_tensor(self, name):
        t = self._f.get_tensor(name)
        self._log.append((name, None, t.numel() * t.element_size()))
        return t

    def __enter__(self):
        self._f.__enter__()
        return self

    def __exit__(self, *exc):
        return self._f.__exit__(*exc)

    def __getattr__(self, attr):  # keys, metadata
        return getattr(self._f, attr)


def count_safetensors_reads():
    """Wrap the safetensors files epkit.checkpoint opens: every tensor (or slice of one) materialised from
    them is logged as (name, index, bytes). Returns (log, undo). Independent of epkit's own LoadReport:
    a reader that read whole tensors and sliced them afterwards would show here."""
    import epkit.checkpoint as ck
    log, real = [], ck.safe_open
    ck.safe_open = lambda *a, **k: _CountingFile(real(*a, **k), log)

    def undo():
        ck.safe_open = real
    return log, undo


def expected_read_bytes(path: str, local: list[list[int]]) -> int:
    """Bytes a rank holding experts local[layer] must read from the checkpoint at `path`: every shared tensor
    whole, and of the expert tensors only its experts' (hub names: whole per-expert tensors; fused names:
    their rows of the [E, ...] tensor). Worked out from the files' own headers."""
    import re

    from safetensors import safe_open
    size = {"F32": 4, "BF16": 2, "F16": 2, "F64": 8, "I64": 8}
    total = 0
    for file in sorted(f for f in os.listdir(path) if f.endswith(".safetensors")):
        with safe_open(os.path.join(path, file), "pt") as f:
            for name in f.keys():
                sl = f.get_slice(name)
                shape, nbytes = sl.get_shape(), size[sl.get_dtype()]
                for n in sl.get_shape():
                    nbytes *= n
                hub = re.match(r"model\.layers\.(\d+)\.block_sparse_moe\.experts\.(\d+)\.", name)
                fused = re.match(r"model\.layers\.(\d+)\.mlp\.experts\.(gate_up_proj|down_proj)$", name)
                if hub:
                    total += nbytes if int(hub.group(2)) in local[int(hub.group(1))] else 0
                elif fused:
                    total += nbytes // shape[0] * len(local[int(fused.group(1))])
                else:
                    total += nbytes
    return total


def saved_tensors(path: str) -> dict:
    """Every tensor of the .safetensors files in directory `path`, by name (read back from disk)."""
    from safetensors.torch import load_file
    out = {}
    for f in sorted(os.listdir(path)):
        if f.endswith(".safetensors"):
            out.update(load_file(os.path.join(path, f)))
    return out
