"""A single-device Mixtral: embeddings, RMSNorm, RoPE, grouped-query attention with an optional
sliding window, sparse-MoE decoder blocks and the LM head.

This file never imports torch.distributed or deepspeed: expert parallelism is applied afterwards by
`epkit.parallel.apply_expert_parallel`, which only swaps the MoE layers' dispatcher and experts and sets
`Mixtral.expert_parallel`.

A forward returns the logits, the router logits and what every MoE layer routed, and counts the routed
real tokens into `Mixtral.routing_stats` (the one routing counter; see `epkit.moe.RoutingStats`).

Positions drive everything: a token at position p attends to keys at positions q <= p (and
p - q < sliding_window). A position of -1 marks padding, which no token attends to. When the caller
gives no positions (every row is 0..T-1), no cache and no window shorter than T, attention runs SDPA
with `is_causal=True` and no materialised mask (the flash kernel on GPU): the same mask, not built. So
does a cache that answers `update` without key positions (a fresh prompt: its keys are its own).

Legend: B batch, T tokens, S keys, D hidden, H query heads, G KV heads, Dh head dim, V vocab, E experts.
"""
from __future__ import annotations

import zlib
from typing import Protocol

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from .args import ModelArgs
from .moe import MoE, Routed, RoutingStats


class KVCache(Protocol):
    """What attention needs from a cache. The inference engine's paged cache implements it. A cache may also
    offer `attention_mask(positions, window)`: the mask of `attention_mask` against the keys `update`
    returns, the same for every layer of a forward, so it can build it once (without it each layer does)."""

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor, positions: torch.Tensor
               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Store k, v [B, G, T, Dh] at `positions` [B, T]; return all keys/values [B, G, S, Dh] of each row
        and their positions [B, S] (-1 for empty slots), or (k, v, None) when the keys are exactly these and
        every row starts at position 0 (causal attention: no mask needed)."""
        ...


def _seeded(device: torch.device, seed: int, key: str) -> torch.Generator:
    return torch.Generator(device=device).manual_seed(zlib.crc32(f"{seed}:{key}".encode()))


class ModelOutput(tuple):
    """(logits, router_logits) as a tuple, plus `routed`: what each MoE layer routed (`moe.Routed`:
    router logits, expert ids, token mask), which the aux loss reuses."""

    def __new__(cls, items, routed: list[Routed] | None = None):
        self = super().__new__(cls, items)
        self.routed = routed
        return self

    @property
    def logits(self) -> torch.Tensor:
        return self[0]

    @property
    def router_logits(self) -> list[torch.Tensor]:
        return self[1]

    @property
    def expert_ids(self) -> list[torch.Tensor]:
        return [r.expert_ids for r in self.routed]


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float, device=None, dtype=None):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim, device=device, dtype=dtype))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * h.to(x.dtype)


def rope_cos_sin(positions: torch.Tensor, head_dim: int, theta: float, dtype: torch.dtype):
    """positions [B, T] -> cos, sin [B, 1, T, Dh] (the half-split layout transformers uses)."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, device=positions.device, dtype=torch.float32)
                                / head_dim))
    freqs = positions.clamp(min=0)[..., None].float() * inv_freq  # [B, T, Dh/2]
    emb = torch.cat((freqs, freqs), dim=-1)[:, None]  # [B, 1, T, Dh]
    return emb.cos().to(dtype), emb.sin().to(dtype)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat((-x2, x1), dim=-1) * sin


def attention_mask(q_pos: torch.Tensor, k_pos: torch.Tensor, window: int | None) -> torch.Tensor:
    """q_pos [B, T], k_pos [B, S] -> bool [B, 1, T, S], True where the query may see the key."""
    q, k = q_pos[:, :, None], k_pos[:, None, :]
    mask = (k >= 0) & (k <= q)
    if window is not None:
        mask &= (q - k) < window
    # A padding query sees nothing; let it see everything so softmax stays finite (its output is unused).
    mask |= ~mask.any(-1, keepdim=True)
    return mask[:, None]


class Attention(nn.Module):
    def __init__(self, args: ModelArgs, layer: int, device=None, dtype=None):
        super().__init__()
        self.layer = layer
        self.n_heads, self.n_kv, self.head_dim = args.num_heads, args.num_kv_heads, args.head_dim
        self.window, self.theta = args.sliding_window, args.rope_theta
        D, Dh = args.hidden_size, args.head_dim
        kw = dict(bias=False, device=device, dtype=dtype)
        self.q_proj = nn.Linear(D, self.n_heads * Dh, **kw)
        self.k_proj = nn.Linear(D, self.n_kv * Dh, **kw)
        self.v_proj = nn.Linear(D, self.n_kv * Dh, **kw)
        self.o_proj = nn.Linear(self.n_heads * Dh, D, **kw)

    def forward(self, x: torch.Tensor, positions: torch.Tensor, rope, cache: KVCache | None = None,
                causal: bool = False):
        """`causal`: positions are 0..T-1 in every row and nothing else restricts attention (no cache,
        no window shorter than T), so SDPA applies the causal mask itself."""
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.n_heads, self.head_dim).transpose(1, 2)  # [B, H, T, Dh]
        k = self.k_proj(x).view(B, T, self.n_kv, self.head_dim).transpose(1, 2)  # [B, G, T, Dh]
        v = self.v_proj(x).view(B, T, self.n_kv, self.head_dim).transpose(1, 2)
        cos, sin = rope
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        gqa = self.n_kv != self.n_heads
        k_pos = positions
        if cache is not None:
            k, v, k_pos = cache.update(self.layer, k, v, positions)
        if causal or k_pos is None:  # (the cache says: a fresh prompt, padded at the end)
            out = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=gqa)
        else:
            mask = (cache.attention_mask(positions, self.window) if hasattr(cache, "attention_mask")
                    else attention_mask(positions, k_pos, self.window))
            if gqa:  # with a mask, SDPA's fused kernels (not cuDNN's) need one key head per query head
                k = k.repeat_interleave(self.n_heads // self.n_kv, dim=1)
                v = v.repeat_interleave(self.n_heads // self.n_kv, dim=1)
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        return self.o_proj(out.transpose(1, 2).reshape(B, T, -1))


class DecoderLayer(nn.Module):
    def __init__(self, args: ModelArgs, layer: int, device=None, dtype=None):
        super().__init__()
        self.attn_norm = RMSNorm(args.hidden_size, args.rms_norm_eps, device, dtype)
        self.attn = Attention(args, layer, device, dtype)
        self.moe_norm = RMSNorm(args.hidden_size, args.rms_norm_eps, device, dtype)
        self.moe = MoE(args.hidden_size, args.intermediate_size, args.num_experts, args.experts_per_token,
                       args.router_jitter_noise, device, dtype)

    def attention(self, x, positions, rope, cache=None, causal=False):
        return self.attn(self.attn_norm(x), positions, rope, cache, causal)

    def forward(self, x, positions, rope, cache=None, mask=None, causal=False, recompute_attention=False):
        """`recompute_attention`: keep only the block's input and recompute norm + attention in backward
        (selective activation checkpointing: no collective runs twice)."""
        if recompute_attention:
            x = x + checkpoint(self.attention, x, positions, rope, cache, causal, use_reentrant=False)
        else:
            x = x + self.attention(x, positions, rope, cache, causal)
        return self.moe_block(x, mask)

    def moe_block(self, x, mask=None):
        """x + MoE(RMSNorm(x)) -> (that, what the MoE routed)."""
        y, routed = self.moe(self.moe_norm(x), mask)
        return x + y, routed


CHECKPOINT_MODES = ("none", "layers", "selective")


class Mixtral(nn.Module):
    """forward(tokens [B, T], positions [B, T] | None, cache | None) -> ModelOutput: (logits [B, T, V],
    router logits per layer [B*T, E]) and what each layer routed.

    `activation_checkpointing` (training only): "none"; "layers" recomputes whole decoder layers in backward
    (the MoE's collectives run again); "selective" recomputes each layer's attention block and its experts'
    up-projection (w13 and SwiGLU), so only the activations that are cheap to recompute are dropped.
    """

    expert_parallel = None  # epkit.parallel.ExpertParallelInfo once apply_expert_parallel has run
    lora = None  # epkit.lora.LoraSpec while LoRA adapters are applied (epkit.lora.apply_lora)

    def __init__(self, args: ModelArgs, device=None, dtype=None):
        super().__init__()
        self.args = args
        self.routing_stats = RoutingStats(args.num_layers, args.num_experts)
        self.embed = nn.Embedding(args.vocab_size, args.hidden_size, device=device, dtype=dtype)
        self.layers = nn.ModuleList(DecoderLayer(args, i, device, dtype) for i in range(args.num_layers))
        self.norm = RMSNorm(args.hidden_size, args.rms_norm_eps, device, dtype)
        self.lm_head = nn.Linear(args.hidden_size, args.vocab_size, bias=False, device=device, dtype=dtype)
        if args.tie_word_embeddings:
            self.lm_head.weight = self.embed.weight
        self.activation_checkpointing = "none"  # one of CHECKPOINT_MODES (True/False mean "layers"/"none")

    def moe_layers(self) -> list[MoE]:
        return [layer.moe for layer in self.layers]

    def sync_free(self, tokens: int) -> bool:
        """Whether an inference forward of `tokens` tokens runs without a host sync, so a CUDA graph can
        capture it (attention never syncs; each MoE layer's dispatcher and expert backend decide)."""
        return all(moe.sync_free(tokens) for moe in self.moe_layers())

    @torch.no_grad()
    def init_weights(self, std: float = 0.02, seed: int = 0, router_std: float | None = None) -> "Mixtral":
        """Normal(0, std) matrices (the router: `router_std` if given), ones for the norms, as
        transformers initialises. Every tensor, and every expert, draws from its own generator seeded
        by (seed, name, expert id): the weights are the same whichever EP size the experts are split
        over and whichever rank holds them. Works on the parameters' own device."""
        for name, p in self.named_parameters():
            if name.endswith("norm.weight"):
                p.fill_(1.0)
                continue
            s = router_std if router_std is not None and name.endswith("moe.gate.weight") else std
            if ".moe.experts." in name:
                layer = int(name.split(".")[1])
                experts = self.layers[layer].moe.experts
                for slot, e in enumerate(experts.expert_ids):
                    if experts.rows is None:
                        p[slot].normal_(0.0, s, generator=_seeded(p.device, seed, f"{name}.{e}"))
                        continue  # a part of the rows: draw the whole expert, keep the part
                    kind = name.rsplit(".", 1)[1]
                    I, D = experts.intermediate_size * experts.rows[1], p.shape[1 if kind == "w2" else 2]
                    full = torch.empty((2 * I, D) if kind == "w13" else (D, I), device=p.device, dtype=p.dtype)
                    full.normal_(0.0, s, generator=_seeded(p.device, seed, f"{name}.{e}"))
                    p[slot].copy_(experts.take_rows(kind, full))
            else:
                p.normal_(0.0, s, generator=_seeded(p.device, seed, name))
        self.routing_stats.reset()
        return self

    def checkpoint_mode(self) -> str:
        mode = self.activation_checkpointing
        mode = {True: "layers", False: "none"}.get(mode, mode)
        if mode not in CHECKPOINT_MODES:
            raise ValueError(f"activation_checkpointing={mode!r} is not one of {', '.join(CHECKPOINT_MODES)}")
        return mode if self.training and torch.is_grad_enabled() else "none"

    def forward(self, tokens: torch.Tensor, positions: torch.Tensor | None = None, cache: KVCache | None = None,
                logits_rows: torch.Tensor | None = None, count_routing: bool = True,
                return_hidden: bool = False) -> ModelOutput:
        """`logits_rows` (flattened B*T indices) limits the LM head to those rows: logits [R, V] then.
        Routed real tokens (position >= 0) are added to `routing_stats` unless `count_routing` is False
        (e.g. evaluation during training). `return_hidden`: skip the LM head; the output's first item is
        then the final normed hidden states [B, T, D] (a loss that applies the head chunk by chunk,
        epkit.train.losses, takes it from there)."""
        B, T = tokens.shape
        mask = None  # [B*T] real tokens; None: all
        window = self.args.sliding_window
        causal = positions is None and cache is None and (window is None or T <= window)
        if positions is None:
            positions = torch.arange(T, device=tokens.device).expand(B, T)
        else:
            mask = (positions >= 0).reshape(-1)
        h = self.embed(tokens)  # [B, T, D]
        rope = rope_cos_sin(positions, self.args.head_dim, self.args.rope_theta, h.dtype)
        mode = self.checkpoint_mode()
        for moe in self.moe_layers():
            moe.experts.recompute_up = mode == "selective"
        routed = []
        for layer in self.layers:
            if mode == "layers":
                h, r = checkpoint(layer, h, positions, rope, cache, mask, causal, use_reentrant=False)
            else:
                h, r = layer(h, positions, rope, cache, mask, causal, recompute_attention=mode == "selective")
            routed.append(r)
        if count_routing:  # here, outside the checkpointed layers: each token is counted once
            self.routing_stats.add(routed)
        h = self.norm(h)
        if logits_rows is not None:
            h = h.reshape(B * T, -1)[logits_rows]
        return ModelOutput((h if return_hidden else self.lm_head(h), [r.logits for r in routed]), routed)

    def forward_segments(self, segments: list[tuple]) -> list[torch.Tensor]:
        """Several batches in one pass over the weights (inference): segment i is (tokens [B_i, T_i], positions
        [B_i, T_i], cache_i, logits_rows_i). Each segment runs its own attention against its own cache; each
        MoE layer takes every segment's tokens at once, so the experts' weights (most of the model) are read
        once per step, not once per batch. Returns each segment's logits [R_i, V]; counts routing as forward."""
        hs, inputs = [], []
        for tokens, positions, cache, _ in segments:
            hs.append(self.embed(tokens))
            inputs.append((positions, rope_cos_sin(positions, self.args.head_dim, self.args.rope_theta,
                                                   hs[-1].dtype), cache))
        mask = torch.cat([positions.reshape(-1) >= 0 for positions, _, _ in inputs])  # [sum B_i*T_i]
        sizes = [h.shape[0] * h.shape[1] for h in hs]
        routed = []
        for layer in self.layers:
            hs = [h + layer.attention(h, positions, rope, cache) for h, (positions, rope, cache) in zip(hs, inputs)]
            flat, r = layer.moe_block(torch.cat([h.reshape(-1, h.shape[-1]) for h in hs]), mask)
            hs = [part.view_as(h) for part, h in zip(flat.split(sizes), hs)]
            routed.append(r)
        self.routing_stats.add(routed)
        return [self.lm_head(self.norm(h).reshape(-1, h.shape[-1])[rows]) for h, (*_, rows) in zip(hs, segments)]
