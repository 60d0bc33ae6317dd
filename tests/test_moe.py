"""Units of epkit/moe.py against values computed here: routing, per-bucket counts, the router losses, the
expert module's settings and dtypes, the MoE layer's counters, jitter and dispatcher hand-off, and which
compute path each kind of input takes. (Parity of whole layers with transformers: test_model.py.)
"""
from types import SimpleNamespace

import numpy as np
import pytest
import torch

import epkit.moe as moe_lib
from epkit.moe import Experts, MoE, count_per_bucket, load_balancing_loss, route, router_z_loss


def test_route_by_hand():
    logits = torch.tensor([[0.0, 1.0, 2.0, 3.0], [3.0, 0.0, 0.0, 2.0]])
    weights, ids = route(logits.to(torch.bfloat16), 2)
    assert weights.dtype == torch.float32 and ids.tolist() == [[3, 2], [0, 3]]
    e = np.exp([3.0, 2.0])
    torch.testing.assert_close(weights[0], torch.tensor(e / e.sum(), dtype=torch.float32))
    e = np.exp([3.0, 2.0])
    torch.testing.assert_close(weights[1], torch.tensor(e / e.sum(), dtype=torch.float32))
    w3, ids3 = route(logits, 3)  # renormalised over the chosen three, not over all four
    p = np.exp([0.0, 1.0, 2.0, 3.0]) / np.exp([0.0, 1.0, 2.0, 3.0]).sum()
    torch.testing.assert_close(w3[0], torch.tensor(p[[3, 2, 1]] / p[[3, 2, 1]].sum(), dtype=torch.float32))
    assert ids3[0].tolist() == [3, 2, 1] and torch.allclose(w3.sum(-1), torch.ones(2))


def test_count_per_bucket():
    ids = torch.tensor([[0, 3], [3, 3], [1, 0]])
    out = count_per_bucket(ids, 6)
    assert out.dtype == torch.int64 and out.tolist() == [2, 1, 0, 3, 0, 0]
    assert count_per_bucket(torch.zeros(0, dtype=torch.int64), 3).tolist() == [0, 0, 0]
    assert count_per_bucket(ids.to("meta"), 6).device.type == "meta"  # stays on the ids' device


def test_router_z_loss_formula():
    g = torch.Generator().manual_seed(0)
    layers = [torch.randn(5, 4, generator=g) * 3, torch.randn(3, 4, generator=g)]  # different token counts
    want = np.mean([np.mean(np.log(np.exp(x.double().numpy()).sum(-1)) ** 2) for x in layers])
    got = router_z_loss([x.to(torch.bfloat16).float() for x in layers])
    assert got.dtype == torch.float32
    assert float(router_z_loss(layers)) == pytest.approx(want, rel=1e-6)
    assert float(router_z_loss(layers[:1])) == pytest.approx(np.mean(np.log(np.exp(layers[0].double().numpy())
                                                                             .sum(-1)) ** 2), rel=1e-6)


def test_load_balancing_loss_when_some_experts_are_never_chosen():
    """Experts no token picks still count in E (the loss is E * sum_e tokens_e * prob_e)."""
    from transformers.models.mixtral.modeling_mixtral import load_balancing_loss_func
    g = torch.Generator().manual_seed(1)
    layers = [torch.randn(6, 8, generator=g) for _ in range(2)]
    for x in layers:
        x[:, 6:] -= 100.0  # experts 6 and 7: never in the top 2
    mask = torch.tensor([[1, 1, 0], [1, 1, 1]])
    for m in (None, mask):
        want = load_balancing_loss_func(tuple(layers), 8, 2, m)
        torch.testing.assert_close(load_balancing_loss(layers, 8, 2, m), want, atol=1e-6, rtol=1e-6)
    # by hand for one layer, all tokens: E * sum_e (share of choices for e) * (mean router prob of e)
    p = torch.softmax(layers[0], -1)
    share = torch.zeros(8).index_add_(0, p.topk(2).indices.reshape(-1), torch.ones(12)) / 6
    torch.testing.assert_close(load_balancing_loss(layers[:1], 8, 2), 8 * (share * p.mean(0)).sum())


def test_experts_settings():
    ex = Experts(8, 16, 24, expert_ids=[2, 5, 7], dtype=torch.bfloat16)
    assert ex.expert_ids == [2, 5, 7] and ex.num_local == 3 and ex.intermediate_size == 24
    assert ex.w13.shape == (3, 48, 16) and ex.w2.shape == (3, 16, 24)
    assert ex.w13.dtype == ex.w2.dtype == torch.bfloat16 and ex.impl == "grouped" and ex.small_m_max == 256
    meta = Experts(4, 16, 24, device="meta")
    assert meta.expert_ids == [0, 1, 2, 3] and meta.w13.device.type == meta.w2.device.type == "meta"
    layer = MoE(16, 24, 4, 2, device="meta", dtype=torch.bfloat16)
    assert layer.gate.weight.device.type == "meta" and layer.gate.weight.dtype == torch.bfloat16
    assert layer.gate.bias is None and layer.experts.w13.dtype == torch.bfloat16
    assert layer.experts.w13.device.type == "meta" and layer.routed_tokens.device.type == "meta"
    plain = MoE(16, 24, 4, 2)
    assert plain.jitter_noise == 0.0 and plain.track_routing is True and plain.dispatcher is None
    assert plain.routed_tokens.dtype == torch.int64 and "routed_tokens" not in plain.state_dict()


def _experts(D=16, I=24, L=4, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    ex = Experts(L, D, I)
    with torch.no_grad():
        ex.w13.copy_(torch.randn(ex.w13.shape, generator=g) * 0.3)
        ex.w2.copy_(torch.randn(ex.w2.shape, generator=g) * 0.3)
    return ex.to(dtype)


def test_expert_output_dtypes():
    """bf16 activations with fp32 router weights: the output is x's dtype unless out_dtype says otherwise,
    on both paths, and the paths agree."""
    ex = _experts(dtype=torch.bfloat16)
    g = torch.Generator().manual_seed(3)
    x = torch.randn(7, 16, generator=g).to(torch.bfloat16)
    w = torch.rand(7, 2, generator=g)
    slots = torch.randint(-1, 4, (7, 2), generator=g)
    with torch.no_grad():
        for impl in ("grouped", "loop"):
            ex.impl = impl
            assert ex(x, w, slots).dtype == torch.bfloat16
            assert ex(x, w, slots, out_dtype=torch.float32).dtype == torch.float32
        ex.impl = "grouped"
        a = ex(x, w, slots, out_dtype=torch.float32)
        ex.impl = "loop"
        b = ex(x, w, slots, out_dtype=torch.float32)
    torch.testing.assert_close(a, b, atol=2e-2, rtol=2e-2)


def test_slots_owned_elsewhere_contribute_nothing():
    """-1 marks a choice another rank computes: the grouped path must drop exactly those (compared with the
    loop, and with a hand sum over the local choices)."""
    ex = _experts()
    g = torch.Generator().manual_seed(4)
    x, w = torch.randn(6, 16, generator=g), torch.rand(6, 2, generator=g)
    slots = torch.tensor([[0, -1], [-1, -1], [3, 1], [2, -1], [-1, 0], [1, 3]])
    by_hand = torch.zeros(6, 16)
    for n in range(6):
        for k in range(2):
            if slots[n, k] >= 0:
                by_hand[n] += w[n, k] * ex._expert(int(slots[n, k]), x[n:n + 1])[0]
    for grad in (False, True):
        with torch.set_grad_enabled(grad):
            ex.impl = "grouped"
            got = ex(x, w, slots)
        torch.testing.assert_close(got.detach(), by_hand, atol=1e-5, rtol=1e-5)
    ex.impl = "loop"
    torch.testing.assert_close(ex(x, w, slots).detach(), by_hand, atol=1e-5, rtol=1e-5)


def test_impl_picks_the_path(monkeypatch):
    ex = _experts()
    x, w, slots = torch.randn(3, 16), torch.rand(3, 2), torch.tensor([[0, 1], [2, 3], [1, 0]])
    monkeypatch.setattr(Experts, "forward_loop", lambda *a, **k: pytest.fail("grouped impl ran the loop"))
    with torch.no_grad():
        ex(x, w, slots)
    monkeypatch.undo()
    ex.impl = "loop"
    monkeypatch.setattr(Experts, "forward_sorted", lambda *a, **k: pytest.fail("loop impl ran the grouped path"))
    with torch.no_grad():
        ex(x, w, slots)


def _layer(jitter=0.0):
    torch.manual_seed(0)
    layer = MoE(16, 24, 4, 2, jitter_noise=jitter)
    with torch.no_grad():
        layer.gate.weight.normal_(0, 1.0)
        layer.experts.w13.normal_(0, 0.3)
        layer.experts.w2.normal_(0, 0.3)
    return layer


def test_moe_counts_routed_tokens():
    layer = _layer().eval()
    x = torch.randn(2, 5, 16)
    with torch.no_grad():
        _, logits = layer(x)
        _, logits2 = layer(x[:, :2])
    want = torch.bincount(torch.cat([logits.topk(2).indices.reshape(-1), logits2.topk(2).indices.reshape(-1)]),
                          minlength=4)
    assert layer.routed_tokens.dtype == torch.int64 and layer.routed_tokens.tolist() == want.tolist()
    assert int(layer.routed_tokens.sum()) == (10 + 4) * 2
    layer.track_routing = False
    layer(x)
    assert layer.routed_tokens.tolist() == want.tolist()


def test_moe_hands_its_tokens_to_the_dispatcher():
    layer = _layer().eval()
    x = torch.randn(2, 3, 16)
    with torch.no_grad():
        want, logits = layer(x)
    seen = []

    def dispatcher(experts, flat, weights, ids):
        seen.append((experts, flat, weights, ids))
        return experts(flat, weights, ids) * 2.0
    layer.dispatcher = dispatcher
    with torch.no_grad():
        got, logits2 = layer(x)
    (experts, flat, weights, ids), = seen
    assert experts is layer.experts and torch.equal(flat, x.reshape(6, 16)) and got.shape == (2, 3, 16)
    w, i = route(logits, 2)
    assert torch.equal(ids, i) and torch.equal(weights, w) and torch.equal(logits2, logits)
    torch.testing.assert_close(got, 2.0 * want)


def test_router_jitter_in_training_only():
    layer = _layer(jitter=0.3)
    x = torch.randn(4, 8, 16)
    seen = []
    layer.gate.register_forward_hook(lambda mod, inp, out: seen.append(inp[0].detach().clone()))
    layer.train()
    layer(x)
    layer(x)
    ratio = seen[0] / x.reshape(-1, 16)
    assert 0.7 <= float(ratio.min()) < 0.75 and 1.25 < float(ratio.max()) <= 1.3  # uniform in [1 - j, 1 + j]
    assert not torch.equal(seen[0], seen[1])  # fresh noise each forward
    layer.eval()
    layer(x)
    assert torch.equal(seen[2], x.reshape(-1, 16))
    plain = _layer(jitter=0.0).train()
    plain.gate.register_forward_hook(lambda mod, inp, out: seen.append(inp[0].detach().clone()))
    plain(x)
    assert torch.equal(seen[3], x.reshape(-1, 16))


def test_compute_path_choice(monkeypatch):
    """Which path a forward takes: Triton small-M kernels for small CUDA inference batches, grouped GEMM on
    Hopper-class GPUs in bf16 with 8-aligned sizes and for CPU inference, else the per-expert loop (which
    syncs with the host, so a CUDA graph cannot capture it). CUDA inputs are stand-ins here: only their
    device, dtype and shape are read."""
    ex = Experts(4, 64, 128)
    cpu = torch.zeros(3, 64)
    with torch.no_grad():
        assert ex._use_grouped_mm(cpu) == moe_lib._HAS_GROUPED_MM and not ex._use_small_m(cpu, 4)
        assert ex.sync_free(cpu, 4) == moe_lib._HAS_GROUPED_MM
    assert not ex._use_grouped_mm(cpu) and not ex.sync_free(cpu, 4)  # training: the fallback (backward)
    ex.w13.requires_grad_(False)
    assert ex._use_grouped_mm(cpu) == moe_lib._HAS_GROUPED_MM  # frozen experts: forward only
    ex.w13.requires_grad_(True)

    def cuda(dtype=torch.bfloat16, D=64):
        return SimpleNamespace(is_cuda=True, dtype=dtype, device="cuda:0", shape=(3, D))
    monkeypatch.setattr(moe_lib, "_HAS_GROUPED_MM", True)
    monkeypatch.setattr(moe_lib, "_capability", lambda device: 9 if device == "cuda:0" else 0)
    monkeypatch.setattr(moe_lib.moe_kernels, "available", lambda x: x.is_cuda)
    assert ex._use_grouped_mm(cuda())
    assert not ex._use_grouped_mm(cuda(torch.float16)) and not ex._use_grouped_mm(cuda(D=60))
    assert not Experts(4, 64, 100)._use_grouped_mm(cuda())  # intermediate size not 8-aligned
    monkeypatch.setattr(moe_lib, "_capability", lambda device: 8)
    assert not ex._use_grouped_mm(cuda())  # Ampere: no grouped GEMM kernel
    monkeypatch.setattr(moe_lib, "_HAS_GROUPED_MM", False)
    assert not ex._use_grouped_mm(cuda()) and not ex._use_grouped_mm(cpu)
    with torch.no_grad():
        assert ex._use_small_m(cuda(), 256) and not ex._use_small_m(cuda(), 257)
        assert ex.sync_free(cuda(), 256) and not ex.sync_free(cuda(), 257)  # no grouped GEMM here: fallback
    assert not ex._use_small_m(cuda(), 4)  # training
    monkeypatch.setattr(moe_lib.moe_kernels, "available", lambda x: False)
    with torch.no_grad():
        assert not ex._use_small_m(cuda(), 4)
