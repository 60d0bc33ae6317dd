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


@pytest.fixture
def tmp_ckpt(tmp_path):
    return str(tmp_path / "ckpt")
