"""Model arguments: one dataclass (`ModelArgs`), named presets, Hugging Face `config.json` in and out.

Nothing here knows about ranks or devices.
"""
from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass


@dataclass
class ModelArgs:
    """Every Mixtral setting that changes the math.

    Legend used in shape comments across epkit:
      B batch, T tokens (per sequence), N flattened tokens, D hidden, I expert intermediate,
      E experts, K experts per token, H query heads, G KV heads, Dh head dim, V vocab.
    """

    vocab_size: int = 32000
    hidden_size: int = 4096
    intermediate_size: int = 14336
    num_layers: int = 32
    num_heads: int = 32
    num_kv_heads: int = 8
    head_dim: int | None = None  # None -> hidden_size // num_heads
    num_experts: int = 8
    experts_per_token: int = 2
    rope_theta: float = 1e6
    rms_norm_eps: float = 1e-5
    sliding_window: int | None = None
    max_position_embeddings: int = 32768
    tie_word_embeddings: bool = False
    router_aux_loss_coef: float = 0.02
    router_jitter_noise: float = 0.0
    # token ids the tokenizer uses; they do not change the math but travel with config.json
    bos_token_id: int | None = 1
    eos_token_id: int | None = 2
    pad_token_id: int | None = None

    def __post_init__(self):
        if self.head_dim is None:
            if self.hidden_size % self.num_heads:
                raise ValueError(
                    f"hidden_size={self.hidden_size} is not divisible by num_heads={self.num_heads}; set head_dim"
                )
            self.head_dim = self.hidden_size // self.num_heads
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"num_heads={self.num_heads} is not a multiple of num_kv_heads={self.num_kv_heads}")
        if not 1 <= self.experts_per_token <= self.num_experts:
            raise ValueError(
                f"experts_per_token={self.experts_per_token} must be between 1 and num_experts={self.num_experts}"
            )
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_layers", "num_heads", "num_kv_heads"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}={getattr(self, name)} must be positive")

    # ---- presets -------------------------------------------------------------------------
    @classmethod
    def from_name(cls, name: str, **overrides) -> "ModelArgs":
        if name not in PRESETS:
            raise ValueError(f"unknown model preset {name!r}; known presets: {', '.join(sorted(PRESETS))}")
        return dataclasses.replace(PRESETS[name], **overrides)

    def num_parameters(self) -> int:
        D, I, E, L, V = self.hidden_size, self.intermediate_size, self.num_experts, self.num_layers, self.vocab_size
        attn = D * self.head_dim * (self.num_heads * 2 + self.num_kv_heads * 2)
        per_layer = attn + E * 3 * D * I + E * D + 2 * D
        head = 0 if self.tie_word_embeddings else V * D
        return L * per_layer + V * D + D + head

    # ---- Hugging Face config.json --------------------------------------------------------
    def to_hf_config(self, dtype: str = "float32") -> dict:
        return {
            "architectures": ["MixtralForCausalLM"],
            "model_type": "mixtral",
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_layers,
            "num_attention_heads": self.num_heads,
            "num_key_value_heads": self.num_kv_heads,
            "head_dim": self.head_dim,
            "num_local_experts": self.num_experts,
            "num_experts_per_tok": self.experts_per_token,
            "rope_theta": self.rope_theta,
            "rms_norm_eps": self.rms_norm_eps,
            "sliding_window": self.sliding_window,
            "max_position_embeddings": self.max_position_embeddings,
            "tie_word_embeddings": self.tie_word_embeddings,
            "router_aux_loss_coef": self.router_aux_loss_coef,
            "router_jitter_noise": self.router_jitter_noise,
            "hidden_act": "silu",
            "attention_dropout": 0.0,
            "output_router_logits": False,
            "bos_token_id": self.bos_token_id,
            "eos_token_id": self.eos_token_id,
            "pad_token_id": self.pad_token_id,
            "torch_dtype": dtype,  # transformers 4.x reads this key, 5.x reads "dtype"
            "dtype": dtype,
        }

    @classmethod
    def from_hf_config(cls, cfg: dict, source: str = "config") -> "ModelArgs":
        if cfg.get("model_type", "mixtral") != "mixtral":
            raise ValueError(f"{source}: model_type={cfg.get('model_type')!r} is not 'mixtral'")
        if cfg.get("hidden_act", "silu") != "silu":
            raise ValueError(f"{source}: hidden_act={cfg['hidden_act']!r} is not supported (Mixtral uses 'silu')")
        rope = cfg.get("rope_parameters") or cfg.get("rope_scaling") or {}
        if rope.get("rope_type", "default") not in ("default", None):
            raise ValueError(f"{source}: rope_type={rope.get('rope_type')!r} is not supported")
        theta = cfg.get("rope_theta", rope.get("rope_theta", 1e6))
        required = ["vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads"]
        missing = [k for k in required if k not in cfg]
        if missing:
            raise ValueError(f"{source}: missing key(s) {', '.join(missing)}")
        eos = cfg.get("eos_token_id", 2)
        return cls(
            vocab_size=cfg["vocab_size"],
            hidden_size=cfg["hidden_size"],
            intermediate_size=cfg["intermediate_size"],
            num_layers=cfg["num_hidden_layers"],
            num_heads=cfg["num_attention_heads"],
            num_kv_heads=cfg.get("num_key_value_heads") or cfg["num_attention_heads"],
            head_dim=cfg.get("head_dim"),
            num_experts=cfg.get("num_local_experts", 8),
            experts_per_token=cfg.get("num_experts_per_tok", 2),
            rope_theta=float(theta),
            rms_norm_eps=cfg.get("rms_norm_eps", 1e-5),
            sliding_window=cfg.get("sliding_window"),
            max_position_embeddings=cfg.get("max_position_embeddings", 32768),
            tie_word_embeddings=cfg.get("tie_word_embeddings", False),
            router_aux_loss_coef=cfg.get("router_aux_loss_coef", 0.02),
            router_jitter_noise=cfg.get("router_jitter_noise", 0.0),
            bos_token_id=cfg.get("bos_token_id"),
            eos_token_id=eos[0] if isinstance(eos, list) and eos else eos,
            pad_token_id=cfg.get("pad_token_id"),
        )

    @classmethod
    def load(cls, path: str) -> "ModelArgs":
        """Read `config.json` from a checkpoint directory (or the file itself)."""
        file = os.path.join(path, "config.json") if os.path.isdir(path) else path
        if not os.path.isfile(file):
            raise FileNotFoundError(f"{path}: no config.json, so this is not a checkpoint directory")
        with open(file) as f:
            try:
                cfg = json.load(f)
            except json.JSONDecodeError as e:
                raise ValueError(f"{file}: not valid JSON ({e})") from None
        return cls.from_hf_config(cfg, source=file)

    def save(self, path: str, dtype: str = "float32") -> None:
        """Write `config.json`; `dtype` names the saved tensors' dtype ("bfloat16", ...)."""
        os.makedirs(path, exist_ok=True)
        with open(os.path.join(path, "config.json"), "w") as f:
            json.dump(self.to_hf_config(dtype), f, indent=2)


PRESETS: dict[str, ModelArgs] = {
    # Small enough for CPU tests and the embedded demo; every Mixtral feature is exercised.
    "tiny": ModelArgs(
        vocab_size=512, hidden_size=64, intermediate_size=128, num_layers=2, num_heads=4, num_kv_heads=2,
        num_experts=8, experts_per_token=2, rope_theta=10000.0, max_position_embeddings=512,
    ),
    "mixtral-8x7b": ModelArgs(),
    "mixtral-8x22b": ModelArgs(
        hidden_size=6144, intermediate_size=16384, num_layers=56, num_heads=48, num_kv_heads=8,
        vocab_size=32768, max_position_embeddings=65536,
    ),
}
