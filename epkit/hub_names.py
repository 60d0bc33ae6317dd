"""Checkpoint tensor names as tables: epkit parameter <-> Hugging Face Mixtral tensor names.

Two spellings of a checkpoint are read: the hub's (`model.layers.{l}.block_sparse_moe.experts.{e}.w1.weight`,
one tensor per expert, what `save_pretrained` of transformers writes and epkit writes) and transformers 5's
fused in-memory names (`model.layers.{l}.mlp.experts.gate_up_proj` [E, 2I, D]). A naming change is an
edit of these tables; `checkpoint` reads and writes through them.
"""
from __future__ import annotations

import re

# epkit parameter -> checkpoint tensor names that may hold it (first found wins; the first is written).
DENSE_NAMES: list[tuple[str, list[str]]] = [
    ("embed.weight", ["model.embed_tokens.weight"]),
    ("norm.weight", ["model.norm.weight"]),
    ("lm_head.weight", ["lm_head.weight"]),
    ("layers.{l}.attn_norm.weight", ["model.layers.{l}.input_layernorm.weight"]),
    ("layers.{l}.moe_norm.weight", ["model.layers.{l}.post_attention_layernorm.weight"]),
    ("layers.{l}.attn.{p}_proj.weight", ["model.layers.{l}.self_attn.{p}_proj.weight"]),
    ("layers.{l}.moe.gate.weight", ["model.layers.{l}.block_sparse_moe.gate.weight",
                                    "model.layers.{l}.mlp.gate.weight"]),
]

# Stacked expert parameters, one row per piece:
# (epkit parameter, half of its rows or None, hub per-expert name, fused name, half of the fused rows)
EXPERT_PIECES: list[tuple[str, int | None, str, str, int | None]] = [
    ("layers.{l}.moe.experts.w13", 0, "model.layers.{l}.block_sparse_moe.experts.{e}.w1.weight",
     "model.layers.{l}.mlp.experts.gate_up_proj", 0),
    ("layers.{l}.moe.experts.w13", 1, "model.layers.{l}.block_sparse_moe.experts.{e}.w3.weight",
     "model.layers.{l}.mlp.experts.gate_up_proj", 1),
    ("layers.{l}.moe.experts.w2", None, "model.layers.{l}.block_sparse_moe.experts.{e}.w2.weight",
     "model.layers.{l}.mlp.experts.down_proj", None),
]

IGNORED = re.compile(r".*rotary_emb\.inv_freq$")  # checkpoint tensors that hold no weight


def _pattern(template: str) -> re.Pattern:
    return re.compile("^" + re.escape(template).replace(r"\{l\}", r"(?P<l>\d+)").replace(r"\{p\}", r"(?P<p>[qkvo])")
                      .replace(r"\{e\}", r"(?P<e>\d+)") + "$")


_DENSE = [(_pattern(ours), theirs) for ours, theirs in DENSE_NAMES]
_PIECES = [(_pattern(piece[0]), piece) for piece in EXPERT_PIECES]
_HUB_EXPERT = re.compile(r"^model\.layers\.(\d+)\.block_sparse_moe\.experts\.(\d+)\.w[123]\.weight$")
_FUSED_EXPERTS = re.compile(r"^model\.layers\.\d+\.mlp\.experts\.(gate_up_proj|down_proj)$")


def fill(template: str, **groups) -> str:
    return template.format(**groups)


def dense_sources(param: str) -> list[str] | None:
    """The checkpoint names that may hold dense parameter `param`, or None if it is not a dense one."""
    for pat, theirs in _DENSE:
        if m := pat.match(param):
            return [fill(t, **m.groupdict()) for t in theirs]
    return None


def expert_pieces(param: str) -> list[tuple[str, int | None, str, str, int | None]]:
    """The EXPERT_PIECES rows of stacked expert parameter `param` ([] if it is not one)."""
    return [piece for pat, piece in _PIECES if pat.match(param)]


def is_expert_tensor(name: str, num_layers: int, num_experts: int) -> bool:
    """Whether checkpoint tensor `name` holds expert weights of a model this size (possibly another rank's)."""
    m = _HUB_EXPERT.match(name)
    if m:
        return int(m.group(1)) < num_layers and int(m.group(2)) < num_experts
    return bool(_FUSED_EXPERTS.match(name))
