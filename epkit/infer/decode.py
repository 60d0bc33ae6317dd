"""The decode forward: `Mixtral.forward` for one new token per row, with its small ops fused.

A decode step of Mixtral-8x7B is a few hundred matrix-vector products and, in the readable model,
some 80 small kernels per layer around them (norms, rotary, KV gather and mask, routing, sorting).
This module runs the same math over the model's own parameters with fewer kernels. Which kernels is
chosen once, when the engine is built (`decode_kernels`, or the EPKIT_DECODE_KERNELS variable):

    reference  `Mixtral.forward` itself: the readable path (prefill chunks always take it)
    torch      this loop in plain torch ops: q/k/v in one projection, decode attention over the block
               table (gather, mask, SDPA); what CPUs run
    triton     Triton kernels (epkit.kernels): residual add + RMSNorm, rotary + KV write, paged
               attention, routing; the experts take their fused small-batch path (moe_kernels)
    compile    the torch ops around the attention torch.compile'd (inductor fuses them); paged
               attention in Triton where it runs
    auto       triton where Triton runs and the shapes suit it, else torch

Per layer, with x the normed input of a block and h the residual stream:

    h, x = add_norm(h, moe_out_of_previous_layer)      # fused with the previous layer's residual add
    q = rope_write_kv(x @ W_qkv)                        # k, v go straight to the paged pool
    o = paged_attention(q, pool, block table, lengths)
    h, x = add_norm(h, o @ W_o); weights, ids = route(x @ W_gate)
    moe_out = moe.dispatcher(moe.experts, x, weights, ids)   # experts (and the EP all-reduce)

NOTE: setting up packs each layer's q, k and v projection weights into one tensor, in place (the
three Linear weights become views of it), so one matrix product computes all three.

Legend: B rows, N = B tokens (one per row), D hidden, H query heads, G KV heads, Dh head dim,
NB block-table width, R rows sampled, V vocab.
"""
from __future__ import annotations

import os

import torch
import torch.nn.functional as F

from .. import moe_kernels
from ..kernels import attention as paged, fused, triton_runs_on
from ..model import rope_cos_sin
from ..moe import Routed

KERNEL_SETS = ("reference", "torch", "triton", "compile")


def choose_kernels(name: str | None, model, device) -> str:
    """Resolve `decode_kernels` ("auto" or None: the environment's EPKIT_DECODE_KERNELS, else the fastest
    set that runs here) to one of KERNEL_SETS; an unusable request is an error naming it."""
    name = name or os.environ.get("EPKIT_DECODE_KERNELS") or "auto"
    if name not in KERNEL_SETS + ("auto",):
        raise ValueError(f"decode_kernels={name!r}; choose one of auto, {', '.join(KERNEL_SETS)}")
    a = model.args
    dtype = next(model.parameters()).dtype
    usable = (triton_runs_on(device) and paged.supported(a.head_dim, a.num_heads, a.num_kv_heads, dtype)
              and fused.rope_supported(a.head_dim))
    if name == "auto":
        return "triton" if usable and torch.device(device).type == "cuda" else "torch"
    if name == "triton" and not usable:
        raise ValueError(f"decode_kernels='triton' needs Triton on a CUDA device and a power-of-two head_dim "
                         f">= 16 (device {device}, head_dim {a.head_dim}); use 'torch' or 'auto'")
    return name


def packed_qkv(attn) -> torch.Tensor:
    """[(H + 2G) * Dh, D]: the q, k and v projection weights as one tensor (packed in place on first use)."""
    q, k, v = attn.q_proj.weight, attn.k_proj.weight, attn.v_proj.weight
    rows = q.shape[0] + k.shape[0] + v.shape[0]
    same = q.untyped_storage().data_ptr() == k.untyped_storage().data_ptr() == v.untyped_storage().data_ptr()
    if (same and q.is_contiguous() and k.storage_offset() == q.storage_offset() + q.numel()
            and v.storage_offset() == k.storage_offset() + k.numel()):
        return q.detach().as_strided((rows, q.shape[1]), (q.shape[1], 1))
    with torch.no_grad():
        w = torch.cat([q, k, v])
        n_q, n_k = q.shape[0], k.shape[0]
        attn.q_proj.weight.data = w[:n_q]
        attn.k_proj.weight.data = w[n_q: n_q + n_k]
        attn.v_proj.weight.data = w[n_q + n_k:]
    return w


@torch.no_grad()
def tune_expert_tiles(model, iters: int = 10) -> dict | None:
    """Choose the down projection's launch configuration for few pairs (`moe_kernels.FEW_PAIRS_DOWN`) on
    this GPU: time each with the first MoE layer's weights (one token, top-2, in a CUDA graph) and keep the
    fastest whose output is bit-equal to the first configuration's. Once per device and weight shape; each
    rank for itself (no collective). Returns {"chosen": config, "ms": {config: ms}} or None (nothing to do)."""
    return tune_tiles_for(model.moe_layers()[0].experts, iters)


def tune_tiles_for(experts, iters: int = 10) -> dict | None:
    """`tune_expert_tiles` for one `Experts` module's weight shape."""
    w13, w2 = experts.w13, experts.w2
    key = (w2.device, tuple(w2.shape))
    if w2.device.type != "cuda" or experts.backend.small_m_max == 0 or key in moe_kernels.few_pairs_down:
        return None
    from .graphs import record
    g = torch.Generator(device=w2.device).manual_seed(0)
    x = torch.randn(1, w13.shape[2], device=w2.device, generator=g).to(w13.dtype)
    weights = torch.full((1, 2), 0.5, device=w2.device)
    slots = torch.tensor([[0, min(1, w13.shape[0] - 1)]], device=w2.device)
    times, first = {}, None
    for cfg in moe_kernels.FEW_PAIRS_DOWN:
        moe_kernels.few_pairs_down[key] = cfg
        try:
            y = moe_kernels.fused_experts_small(x, weights, slots, w13, w2)
            first = y if first is None else first
            if not torch.equal(y, first):  # NOTE: host sync, at set-up; a configuration that rounds differently
                continue
            graph, _ = record(lambda: [moe_kernels.fused_experts_small(x, weights, slots, w13, w2)
                                       for _ in range(iters)], w2.device)
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            graph.replay()
            end.record()
            end.synchronize()  # NOTE: host sync, at set-up
            times[cfg] = round(start.elapsed_time(end) / iters, 4)
        except Exception:  # noqa: BLE001 - a configuration this GPU cannot run (e.g. too much shared memory)
            continue
    chosen = min(times, key=times.get) if times else moe_kernels.FEW_PAIRS_DOWN[0]
    moe_kernels.few_pairs_down[key] = chosen
    return {"chosen": chosen, "ms": {str(c): t for c, t in times.items()}}


class DecodeForward:
    """forward(tokens [B, 1], positions [B, 1], table [B, NB], rows [R]) -> logits [R, V], writing the new
    keys and values into `cache` and counting the routed real tokens into `model.routing_stats`, as
    `Mixtral.forward` does. Free of host syncs."""

    def __init__(self, model, cache, kernels: str, compile_backend: str = "inductor"):
        if kernels not in KERNEL_SETS[1:]:
            raise ValueError(f"DecodeForward runs {', '.join(KERNEL_SETS[1:])}, not {kernels!r}")
        self.model, self.cache, self.kernels = model, cache, kernels
        a = model.args
        self.H, self.G, self.eps, self.window, self.top_k = (a.num_heads, a.num_kv_heads, a.rms_norm_eps,
                                                             a.sliding_window, a.experts_per_token)
        dev = model.embed.weight.device
        dtype = model.embed.weight.dtype
        self.w_qkv = [packed_qkv(layer.attn) for layer in model.layers]
        cos, sin = rope_cos_sin(torch.arange(a.max_position_embeddings, device=dev)[None], a.head_dim,
                                a.rope_theta, dtype)  # the model's own numbers, [1, 1, positions, Dh]
        self.cos, self.sin = cos[0, 0].contiguous(), sin[0, 0].contiguous()
        device_triton = triton_runs_on(dev) and paged.supported(a.head_dim, a.num_heads, a.num_kv_heads, dtype)
        use_paged = kernels == "triton" or (kernels == "compile" and device_triton)
        self.attention = paged.paged_decode_attention if use_paged else paged.paged_decode_attention_torch
        self.reads_table = self.attention is paged.paged_decode_attention  # cost independent of the table width
        self.add_norm = fused.add_rms_norm if kernels == "triton" else fused.add_rms_norm_torch
        self.route = fused.route if kernels == "triton" else fused.route_torch
        self._pre, self._post = self._qkv_torch, self._post_attention
        if kernels == "compile":
            import torch._dynamo.config as dynamo_config
            # every batch bucket is a shape; the default limit of 8 would fall back to eager
            for knob in ("recompile_limit", "cache_size_limit"):
                if hasattr(dynamo_config, knob):
                    setattr(dynamo_config, knob, max(64, getattr(dynamo_config, knob)))
            self._pre = torch.compile(self._qkv_torch, fullgraph=True, backend=compile_backend)
            self._post = torch.compile(self._post_attention, fullgraph=True, backend=compile_backend)

    # ---- the per-layer pieces ----------------------------------------------------------------
    def _qkv_torch(self, h, delta, norm_w, w_qkv, pos):
        """(h + delta, its norm) through the qkv projection and rotary: h [N, D], q [N, H, Dh], k, v [N, G, Dh]."""
        h, x = fused.add_rms_norm_torch(h, delta, norm_w, self.eps)
        p = pos.clamp(min=0)  # padding rotates as position 0, as in the model
        q, k, v = fused.split_qkv_rope(F.linear(x, w_qkv), self.cos[p][:, None], self.sin[p][:, None], self.H, self.G)
        return h, q, k, v

    def _post_attention(self, h, o, w_o, norm_w, w_gate):
        """Output projection, residual add, the MoE's norm, router and routing."""
        h, x = self.add_norm(h, F.linear(o, w_o), norm_w, self.eps)
        router_logits = F.linear(x, w_gate)
        weights, ids = self.route(router_logits, self.top_k)
        return h, x, router_logits, weights, ids

    def _attention_input(self, i, h, delta, layer, pos, slots):
        """Layer i up to the queries: residual add + norm, qkv, rotary; k and v written to the pool."""
        k_pool, v_pool = self.cache.k[i], self.cache.v[i]
        if self.kernels == "triton":
            h, x = fused.add_rms_norm(h, delta, layer.attn_norm.weight, self.eps)
            return h, fused.rope_write_kv(F.linear(x, self.w_qkv[i]), self.cos, self.sin, pos, slots, k_pool,
                                          v_pool, self.H, self.G)
        h, q, k, v = self._pre(h, delta, layer.attn_norm.weight, self.w_qkv[i], pos)
        k_pool.index_copy_(0, slots, k)
        v_pool.index_copy_(0, slots, v)
        return h, q

    # ---- the step ----------------------------------------------------------------------------
    @torch.no_grad()
    def __call__(self, tokens, positions, table, rows):
        model, cache = self.model, self.cache
        N = tokens.shape[0]
        pos = positions.reshape(-1)  # [N]
        slots = cache.write_slots(table, positions).reshape(-1)  # [N]
        lengths = torch.where(pos >= 0, pos + 1, 0)  # keys each row holds after this step
        real = pos >= 0
        h = model.embed(tokens.reshape(-1))  # [N, D]
        delta, routed = None, []
        for i, layer in enumerate(model.layers):
            h, q = self._attention_input(i, h, delta, layer, pos, slots)  # q [N, H, Dh]
            o = self.attention(q, cache.k[i], cache.v[i], table, lengths, cache.block_size, self.window)
            h, x, logits, weights, ids = self._post(h, o.reshape(N, -1), layer.attn.o_proj.weight,
                                                    layer.moe_norm.weight, layer.moe.gate.weight)
            moe = layer.moe
            delta = moe.dispatcher(moe.experts, x, weights, ids)  # NOTE: an all-reduce per layer under EP
            routed.append(Routed(logits, ids, real))
        model.routing_stats.add(routed)
        h, x = self.add_norm(h, delta, model.norm.weight, self.eps)
        return model.lm_head(x[rows])
