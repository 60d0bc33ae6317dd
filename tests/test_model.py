"""Single-device parity with transformers' own Mixtral (fp32, CPU)."""
import pytest
import torch

import epkit
from conftest import hf_logits, hf_model, save_fused, tiny_args

CONFIGS = {
    "gqa": dict(),
    "sliding_window": dict(sliding_window=5),
    "tied": dict(tie_word_embeddings=True),
    "6_experts_top3": dict(num_experts=6, experts_per_token=3),
    "mha_3_layers": dict(num_kv_heads=4, num_layers=3, head_dim=16),
}


@pytest.mark.parametrize("name", list(CONFIGS))
def test_logits_match_transformers(name, tmp_path):
    args = tiny_args(**CONFIGS[name])
    hf = hf_model(args, seed=len(name))
    model = epkit.load_pretrained(save_fused(hf, str(tmp_path / "ck")))
    model.eval()
    tokens = torch.randint(0, args.vocab_size, (3, 12), generator=torch.Generator().manual_seed(1))
    ref, ref_router = hf_logits(hf, tokens)
    with torch.no_grad():
        logits, router = model(tokens)
    torch.testing.assert_close(logits, ref, atol=1e-5, rtol=0)
    for ours, theirs in zip(router, ref_router):
        torch.testing.assert_close(ours, theirs.reshape(ours.shape), atol=1e-5, rtol=0)


@pytest.mark.parametrize("window", [None, 4])
def test_rows_with_different_positions(window, tmp_path):
    """Left padding: row 1 starts 3 tokens later; positions -1 mark the padding."""
    args = tiny_args(sliding_window=window)
    hf = hf_model(args, seed=3)
    model = epkit.load_pretrained(save_fused(hf, str(tmp_path / "ck"))).eval()
    T = 10
    tokens = torch.randint(0, args.vocab_size, (2, T), generator=torch.Generator().manual_seed(2))
    mask = torch.ones(2, T, dtype=torch.long)
    mask[1, :3] = 0
    hf_pos = (mask.cumsum(-1) - 1).clamp(min=0)
    ref, _ = hf_logits(hf, tokens, attention_mask=mask, position_ids=hf_pos)
    positions = torch.where(mask.bool(), mask.cumsum(-1) - 1, -1)
    with torch.no_grad():
        logits, _ = model(tokens, positions)
    real = mask.bool()
    torch.testing.assert_close(logits[real], ref[real], atol=1e-5, rtol=0)


def test_offset_positions_match_transformers(tmp_path):
    """A row whose positions start at 7 (as after a prefix), next to a row starting at 0."""
    args = tiny_args()
    hf = hf_model(args, seed=4)
    model = epkit.load_pretrained(save_fused(hf, str(tmp_path / "ck"))).eval()
    tokens = torch.randint(0, args.vocab_size, (2, 8), generator=torch.Generator().manual_seed(3))
    positions = torch.stack([torch.arange(8), torch.arange(7, 15)])
    ref, _ = hf_logits(hf, tokens, position_ids=positions)
    with torch.no_grad():
        logits, _ = model(tokens, positions)
    torch.testing.assert_close(logits, ref, atol=1e-5, rtol=0)


def test_grouped_expert_path_equals_loop():
    args = tiny_args()
    torch.manual_seed(0)
    model = epkit.Mixtral(args).init_weights()
    moe = model.layers[0].moe
    with torch.no_grad():
        moe.gate.weight.normal_(0, 1.0)
    x = torch.randn(2, 9, args.hidden_size)
    for grad in (False, True):  # forward-only uses torch's grouped_mm on CPU; training the fallback
        with torch.set_grad_enabled(grad):
            moe.experts.impl = "grouped"
            y_grouped, _ = moe(x)
            moe.experts.impl = "loop"
            y_loop, _ = moe(x)
        torch.testing.assert_close(y_grouped, y_loop, atol=1e-6, rtol=1e-6)
    # odd experts held by "another rank" (slot -1): the grouped path must drop exactly those
    x = x.reshape(-1, args.hidden_size)
    w, ids = epkit.moe.route(moe.gate(x), 2)
    dispatch = epkit.moe.LocalDispatch([e if e % 2 == 0 else -1 for e in range(args.num_experts)])
    with torch.no_grad():
        moe.experts.impl = "grouped"
        a = dispatch(moe.experts, x, w, ids)
        moe.experts.impl = "loop"
        b = dispatch(moe.experts, x, w, ids)
        ref = torch.zeros_like(x)  # by hand: token by token, choice by choice
        for t, k in zip(*torch.where(ids % 2 == 0)):
            ref[t] += w[t, k] * moe.experts._expert(int(ids[t, k]), x[t][None])[0]
    torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(a, ref, atol=1e-6, rtol=1e-6)


def test_a_forward_with_no_tokens():
    """A rank can get no rows (all-to-all, serving): every backend must return an empty result, not fail."""
    args = tiny_args()
    moe = epkit.Mixtral(args).init_weights().layers[0].moe
    for impl in ("grouped", "loop"):
        moe.experts.impl = impl
        with torch.no_grad():
            y, routed = moe(torch.randn(1, 0, args.hidden_size))
        assert y.shape == (1, 0, args.hidden_size) and routed.expert_ids.shape == (0, 2)


def test_gradients_flow_through_grouped_path():
    args = tiny_args()
    torch.manual_seed(0)
    model = epkit.Mixtral(args).init_weights()
    tokens = torch.randint(0, args.vocab_size, (2, 6))
    grads = {}
    for impl in ("grouped", "loop"):
        model.zero_grad()
        for moe in model.moe_layers():
            moe.experts.impl = impl
        logits, _ = model(tokens)
        logits.square().mean().backward()
        grads[impl] = {n: p.grad.clone() for n, p in model.named_parameters()}
    for n in grads["loop"]:
        torch.testing.assert_close(grads["grouped"][n], grads["loop"][n], atol=1e-6, rtol=1e-5)


def test_aux_loss_matches_transformers(tmp_path):
    from transformers.models.mixtral.modeling_mixtral import load_balancing_loss_func
    args = tiny_args()
    hf = hf_model(args)
    tokens = torch.randint(0, args.vocab_size, (2, 7))
    _, router = hf_logits(hf, tokens)
    mask = torch.ones(2, 7)
    mask[0, :2] = 0
    for m in (None, mask):
        ref = load_balancing_loss_func(tuple(router), args.num_experts, args.experts_per_token, m)
        ours = epkit.load_balancing_loss(list(router), args.num_experts, args.experts_per_token, m)
        torch.testing.assert_close(ours, ref, atol=1e-6, rtol=1e-6)


def test_model_file_is_single_device():
    import ast
    import inspect
    tree = ast.parse(inspect.getsource(epkit.model))
    imported = [a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names]
    imported += [n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module]
    assert imported and not [m for m in imported if "distributed" in m or "deepspeed" in m], imported


def test_unknown_preset():
    with pytest.raises(ValueError, match="unknown model preset 'nope'"):
        epkit.ModelArgs.from_name("nope")


def test_masked_attention_gives_sdpa_one_key_head_per_query_head(monkeypatch):
    """With a mask (padding, cached keys), SDPA's flash and memory-efficient kernels refuse enable_gqa and it
    falls back to the math kernel (fp32 scores of every head): the masked path hands it the key and value
    heads repeated per query head, as transformers' repeat_kv does, and the causal path keeps enable_gqa."""
    import torch.nn.functional as F

    from epkit import Mixtral
    from epkit import model as model_lib
    args = tiny_args()
    assert args.num_kv_heads < args.num_heads
    calls, sdpa = [], F.scaled_dot_product_attention

    def spy(q, k, v, attn_mask=None, is_causal=False, enable_gqa=False, **kw):
        calls.append((attn_mask is not None, k.shape[1], v.shape[1], enable_gqa))
        return sdpa(q, k, v, attn_mask=attn_mask, is_causal=is_causal, enable_gqa=enable_gqa, **kw)
    monkeypatch.setattr(model_lib.F, "scaled_dot_product_attention", spy)
    model = Mixtral(args).init_weights(seed=2).eval()
    tokens = torch.randint(0, args.vocab_size, (2, 6), generator=torch.Generator().manual_seed(0))
    positions = torch.tensor([[0, 1, 2, 3, 4, 5], [0, 1, 2, 3, -1, -1]])
    with torch.no_grad():
        masked = model(tokens, positions)[0]
        causal = model(tokens)[0]
    H, G = args.num_heads, args.num_kv_heads
    assert calls == [(True, H, H, False)] * args.num_layers + [(False, G, G, True)] * args.num_layers
    torch.testing.assert_close(masked[0], causal[0], atol=1e-5, rtol=1e-5)  # row 0 has no padding: the same
