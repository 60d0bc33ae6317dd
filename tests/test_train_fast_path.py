"""The fast training path gives the old path's numbers (CPU, fp32 unless said otherwise):

  - the chunked LM-head cross-entropy equals full-logit cross-entropy in loss and gradients, and never
    creates an [N, V] tensor;
  - attention with SDPA's causal flag (no positions given) equals the masked path, and is taken only when
    nothing else restricts attention;
  - a few AdamW steps through `lm_and_router_losses` (chunked CE, causal attention) give the losses and
    weights of the old path (full logits, explicit positions and mask);
  - selective activation checkpointing recomputes attention and the experts' up-projection and changes
    no gradient;
  - fused AdamW on CUDA only, and the ZeRO-2 defaults.
"""
from __future__ import annotations

import json
import os

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

import epkit
from conftest import tiny_args
from epkit.data import IGNORE
from epkit.train.losses import linear_cross_entropy

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class _Shapes(TorchDispatchMode):
    """Records the shape of every tensor an operator returns."""

    def __init__(self):
        super().__init__()
        self.shapes = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else [out]:
            if isinstance(t, torch.Tensor):
                self.shapes.append(tuple(t.shape))
        return out


def _head_inputs(dtype, n=37, d=16, v=50):
    g = torch.Generator().manual_seed(0)
    h = torch.randn(n, d, generator=g).to(dtype).requires_grad_()
    w = (torch.randn(v, d, generator=g) * 0.3).to(dtype).requires_grad_()
    t = torch.randint(0, v, (n,), generator=g)
    t[::5] = IGNORE
    return h, w, t


def _full_ce(h, w, t):
    return F.cross_entropy((h @ w.t()).float(), t, ignore_index=IGNORE, reduction="sum")


@pytest.mark.parametrize("chunk", [1, 7, 37, 100])
def test_chunked_cross_entropy_equals_full_logits(chunk):
    h, w, t = _head_inputs(torch.float32)
    count = (t != IGNORE).sum()
    (_full_ce(h, w, t) / count).backward()
    ref = _full_ce(h, w, t).detach(), h.grad.clone(), w.grad.clone()
    h.grad = w.grad = None
    with _Shapes() as seen:
        out = linear_cross_entropy(h, w, t, chunk=chunk)
        (out / count).backward()
    torch.testing.assert_close(out.detach(), ref[0], atol=1e-5, rtol=1e-6)
    torch.testing.assert_close(h.grad, ref[1], atol=1e-7, rtol=1e-5)
    torch.testing.assert_close(w.grad, ref[2], atol=1e-7, rtol=1e-5)
    rows = max(s[0] for s in seen.shapes if len(s) == 2 and s[1] == w.shape[0] and s != w.t().shape)  # not w.T
    assert rows == min(chunk, h.shape[0]), f"logits of {rows} rows at once, chunk {chunk}"
    with torch.no_grad():  # evaluation: the loss alone
        torch.testing.assert_close(linear_cross_entropy(h, w, t, chunk=chunk), ref[0], atol=1e-5, rtol=1e-6)


def test_chunked_cross_entropy_in_bf16_within_rounding():
    h, w, t = _head_inputs(torch.bfloat16)
    _full_ce(h, w, t).backward()
    gh, gw = h.grad.clone(), w.grad.clone()
    h.grad = w.grad = None
    out = linear_cross_entropy(h, w, t, chunk=8)
    out.backward()
    torch.testing.assert_close(out.detach(), _full_ce(h, w, t).detach(), atol=1e-3, rtol=1e-5)
    assert h.grad.dtype == w.grad.dtype == torch.bfloat16
    torch.testing.assert_close(h.grad, gh, atol=2 ** -8 * gh.abs().max().item(), rtol=0)
    torch.testing.assert_close(w.grad, gw, atol=2 ** -7 * gw.abs().max().item(), rtol=0)


def _model(seed=0, **overrides):
    torch.manual_seed(seed)
    return epkit.Mixtral(tiny_args(**overrides)).init_weights(seed=seed, router_std=0.5)


def _sdpa_calls(monkeypatch):
    calls = []
    real = F.scaled_dot_product_attention

    def spy(*args, **kw):
        calls.append((kw.get("attn_mask") is None, kw.get("is_causal", False)))
        return real(*args, **kw)

    monkeypatch.setattr(F, "scaled_dot_product_attention", spy)
    return calls


@pytest.mark.parametrize("window", [None, 16, 4])
def test_causal_attention_equals_the_masked_path(window, monkeypatch):
    """No positions: SDPA's causal flag and no mask, unless a window shorter than T needs one."""
    model = _model(sliding_window=window).train()
    tokens = torch.randint(0, 96, (2, 12), generator=torch.Generator().manual_seed(1))
    calls = _sdpa_calls(monkeypatch)
    fast, _ = model(tokens)
    fast_grads = torch.autograd.grad(fast.square().sum(), list(model.parameters()))
    assert calls == [(window != 4, window != 4)] * 2, calls  # two layers
    calls.clear()
    slow, _ = model(tokens, torch.arange(12).expand(2, 12))
    assert calls == [(False, False)] * 2
    torch.testing.assert_close(fast, slow, atol=1e-6, rtol=0)
    for a, b in zip(fast_grads, torch.autograd.grad(slow.square().sum(), list(model.parameters()))):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)


def _batch(seed, rows=3, T=16, pad=0):
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, 96, (rows, T), generator=g)
    positions = torch.arange(T).expand(rows, T).clone()
    labels = tokens.clone()
    if pad:  # the last row ends in padding, as data.pack leaves it
        positions[-1, -pad:], labels[-1, -pad:] = -1, IGNORE
    return {"tokens": tokens, "labels": labels, "positions": positions}


def _old_losses(model, batch, aux_coef):
    """The loss as the training loop computed it before: full logits, explicit positions (mask)."""
    from epkit.moe import load_balancing_loss
    logits, router = model(batch["tokens"], batch["positions"])
    targets = batch["labels"][:, 1:]
    lm = F.cross_entropy(logits[:, :-1].float().reshape(-1, logits.shape[-1]), targets.reshape(-1),
                         ignore_index=IGNORE, reduction="sum") / (targets != IGNORE).sum()
    aux = load_balancing_loss(router, 8, 2, mask=batch["positions"] >= 0)
    return lm + aux_coef * aux


def test_new_loss_path_equals_the_old_one_over_steps():
    from epkit.train.loop import lm_and_router_losses, unpadded
    runs = {}
    for name in ("old", "new"):
        model = _model(seed=2).train()
        opt = torch.optim.AdamW(model.parameters(), lr=2e-3)
        losses = []
        for step in range(4):
            batch = _batch(0, pad=5 if step == 2 else 0)  # the same rows: the loss must fall
            if name == "old":
                loss = _old_losses(model, batch, 0.02)
            else:
                assert unpadded(batch) == (step != 2)
                loss, _ = lm_and_router_losses(model, batch, 0.02, 0.0, causal=unpadded(batch))
            opt.zero_grad()
            loss.backward()
            opt.step()
            losses.append(loss.item())
        runs[name] = losses, [p.detach().clone() for p in model.parameters()]
    assert runs["old"][0][-1] < runs["old"][0][0]  # it trains
    for step, (a, b) in enumerate(zip(runs["old"][0], runs["new"][0])):
        assert abs(a - b) < 1e-5, f"step {step}: new path {b} vs old {a}"
    # Adam normalises every element's step, so float rounding in a near-zero gradient can move that weight by
    # a visible part of lr (as in test_train_ep; the first step's gradients agree to 1e-7); 5e-5 is lr / 40
    for a, b in zip(runs["old"][1], runs["new"][1]):
        torch.testing.assert_close(a, b, atol=5e-5, rtol=0)


def test_selective_checkpointing_recomputes_and_keeps_the_gradients(monkeypatch):
    from epkit.moe import Experts
    from epkit.train.loop import lm_and_router_losses
    batch = _batch(7)
    ups, attns = [], []
    real_up, real_attn = Experts._up, epkit.model.Attention.forward
    monkeypatch.setattr(Experts, "_up", lambda self, *a: ups.append(1) or real_up(self, *a))
    monkeypatch.setattr(epkit.model.Attention, "forward",
                        lambda self, *a, **k: attns.append(1) or real_attn(self, *a, **k))
    grads, calls = {}, {}
    for mode in ("none", "selective", "layers"):
        model = _model(seed=4).train()
        model.activation_checkpointing = mode
        loss, _ = lm_and_router_losses(model, batch, 0.02, 0.0, causal=True)
        forward = (len(ups), len(attns))
        loss.backward()
        calls[mode] = (forward, (len(ups), len(attns)))
        ups.clear(), attns.clear()
        grads[mode] = [p.grad for p in model.parameters()]
    (f_ups, f_attn), (b_ups, b_attn) = calls["none"]
    assert (b_ups, b_attn) == (f_ups, f_attn), "without checkpointing nothing runs in backward"
    assert calls["selective"] == ((f_ups, f_attn), (2 * f_ups, 2 * f_attn)), calls
    assert calls["layers"] == ((f_ups, f_attn), (2 * f_ups, 2 * f_attn)), calls
    for mode in ("selective", "layers"):
        for a, b in zip(grads["none"], grads[mode]):
            torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)
    from epkit.train.config import TrainConfig
    assert TrainConfig(activation_checkpointing=True).activation_checkpointing == "layers"  # old recipes
    with pytest.raises(ValueError, match="activation-checkpointing='some'"):
        TrainConfig(activation_checkpointing="some").check()


def test_fused_adamw_on_cuda_only_and_zero2_defaults():
    from epkit.train.config import TrainConfig
    from epkit.train.optim import ZERO2_DEFAULTS, adamw, deepspeed_config
    cfg = TrainConfig()
    params = [torch.nn.Parameter(torch.zeros(2))]
    assert adamw([{"params": params}], cfg, "cuda").defaults["fused"] is True
    assert not adamw([{"params": params}], cfg, "cpu").defaults["fused"]
    ds = deepspeed_config(TrainConfig(zero_stage=2), torch.bfloat16)
    assert ds["zero_optimization"] == {"stage": 2, **ZERO2_DEFAULTS}
    assert "overlap_comm" not in deepspeed_config(TrainConfig(zero_stage=1), torch.bfloat16)["zero_optimization"]
    with open(os.path.join(ROOT, "configs", "deepspeed", "zero2.json")) as f:
        assert json.load(f)["zero_optimization"] == {"stage": 2, **ZERO2_DEFAULTS}
    user = deepspeed_config(TrainConfig(deepspeed_config=os.path.join(ROOT, "configs", "deepspeed", "zero2.json")),
                            torch.bfloat16)
    assert user["zero_optimization"] == {"stage": 2, **ZERO2_DEFAULTS}
