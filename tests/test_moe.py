"""Units of epkit/moe.py against values computed here: routing, per-bucket counts, permute/unpermute, the
router losses, the expert module's settings, backends and dtypes, local dispatch with experts held
elsewhere, the routing counter, and the MoE layer's jitter and dispatcher hand-off.
(Parity of whole layers with transformers: test_model.py.)
"""
import numpy as np
import pytest
import torch

import epkit.moe as moe_lib
from epkit.moe import (ComputeBackend, Experts, LocalDispatch, MoE, Routed, RoutingStats, choose_backend,
                       count_per_bucket, load_balancing_loss, permute, route, router_z_loss, unpermute)


def test_route_by_hand():
    logits = torch.tensor([[0.0, 1.0, 2.0, 3.0], [3.0, 0.0, 0.0, 2.0]])
    weights, ids = route(logits.to(torch.bfloat16), 2)
    assert weights.dtype == torch.float32 and ids.tolist() == [[3, 2], [0, 3]]
    e = np.exp([3.0, 2.0])
    torch.testing.assert_close(weights, torch.tensor(np.stack([e / e.sum()] * 2), dtype=torch.float32))
    w3, ids3 = route(logits, 3)  # renormalised over the chosen three, not over all four
    p = np.exp([0.0, 1.0, 2.0, 3.0]) / np.exp([0.0, 1.0, 2.0, 3.0]).sum()
    torch.testing.assert_close(w3[0], torch.tensor(p[[3, 2, 1]] / p[[3, 2, 1]].sum(), dtype=torch.float32))
    assert ids3[0].tolist() == [3, 2, 1] and torch.allclose(w3.sum(-1), torch.ones(2))


def test_count_per_bucket_permute_unpermute():
    ids = torch.tensor([[0, 3], [3, 3], [1, 0]])
    out = count_per_bucket(ids, 6)
    assert out.dtype == torch.int64 and out.tolist() == [2, 1, 0, 3, 0, 0]
    assert count_per_bucket(torch.zeros(0, dtype=torch.int64), 3).tolist() == [0, 0, 0]
    assert count_per_bucket(ids.to("meta"), 6).device.type == "meta"  # stays on the ids' device
    order, counts = permute(ids, 4)
    assert counts.tolist() == [2, 1, 0, 3] and order.tolist() == [0, 5, 4, 1, 2, 3]  # stable within a key
    many = torch.randint(0, 5, (200,), generator=torch.Generator().manual_seed(0))  # an unstable sort shows here
    assert permute(many, 6)[0].tolist() == sorted(range(200), key=lambda i: int(many[i]))  # Python's sort: stable
    # unpermute: y[t] = sum over t's pairs of weight * row, fp32, with `keep` dropping rows
    out = torch.arange(6, dtype=torch.bfloat16)[:, None].expand(6, 2) + 1  # row i of `order` holds i + 1
    weights = torch.tensor([[0.5, 0.25], [1.0, 2.0], [3.0, 4.0]])
    y = unpermute(out, order, weights)
    # pair p = order[i] -> token p // 2, choice p % 2, value i + 1
    want = torch.zeros(3)
    for i, p in enumerate(order.tolist()):
        want[p // 2] += weights[p // 2, p % 2] * (i + 1)
    assert y.dtype == torch.float32 and y.shape == (3, 2)
    torch.testing.assert_close(y[:, 0], want)
    torch.testing.assert_close(unpermute(out.double(), order, weights.double())[:, 0], want.double())  # fp64 weights
    keep = torch.tensor([True, False, True, True, False, True])
    want_kept = torch.zeros(3)
    for i, p in enumerate(order.tolist()):
        if keep[i]:
            want_kept[p // 2] += weights[p // 2, p % 2] * (i + 1)
    torch.testing.assert_close(unpermute(out, order, weights, keep)[:, 1], want_kept)


def test_combine_losses_and_grouped_experts_stay_on_the_inputs_device():
    """Grouped-GEMM experts (their padding mask), unpermute and the load-balancing loss make their tensors on the inputs'
    device. The meta device stands in for an accelerator, where a tensor made on the CPU would not mix."""
    bf16 = dict(device="meta", dtype=torch.bfloat16)  # what grouped GEMM takes on a GPU
    out = Experts(4, 16, 24, **bf16).forward_grouped(torch.randn(5, 16, **bf16), torch.tensor([2, 0, 1, 1]).to("meta"))
    y = unpermute(torch.randn(6, 3, device="meta"), torch.arange(6, device="meta"), torch.rand(3, 2, device="meta"))
    logits = [torch.randn(5, 4, device="meta")] * 2
    losses = [load_balancing_loss(logits, 4, 2), load_balancing_loss(logits, 4, 2, mask=torch.ones(5, device="meta"))]
    assert [t.device.type for t in (out, y, *losses)] == ["meta"] * 4 and out.shape == (5, 16) and y.shape == (3, 3)


def test_router_z_loss_formula():
    g = torch.Generator().manual_seed(0)
    layers = [torch.randn(5, 4, generator=g) * 3, torch.randn(3, 4, generator=g)]  # different token counts
    want = np.mean([np.mean(np.log(np.exp(x.double().numpy()).sum(-1)) ** 2) for x in layers])
    assert router_z_loss([x.to(torch.bfloat16) for x in layers]).dtype == torch.float32
    assert float(router_z_loss(layers)) == pytest.approx(want, rel=1e-6)
    one = np.mean(np.log(np.exp(layers[0].double().numpy()).sum(-1)) ** 2)
    assert float(router_z_loss(layers[:1])) == pytest.approx(one, rel=1e-6)


def test_load_balancing_loss_with_idle_experts_and_given_choices():
    """Experts no token picks still count in E (the loss is E * sum_e share_e * mean prob_e); choices passed
    in (`expert_ids`) replace the top-k of the logits."""
    from transformers.models.mixtral.modeling_mixtral import load_balancing_loss_func
    g = torch.Generator().manual_seed(1)
    layers = [torch.randn(6, 8, generator=g) for _ in range(2)]
    for x in layers:
        x[:, 6:] -= 100.0  # experts 6 and 7: never in the top 2
    mask = torch.tensor([[1, 1, 0], [1, 1, 1]])
    for m in (None, mask):
        want = load_balancing_loss_func(tuple(layers), 8, 2, m)
        torch.testing.assert_close(load_balancing_loss(layers, 8, 2, m), want, atol=1e-6, rtol=1e-6)
    p = torch.softmax(layers[0], -1)
    share = torch.zeros(8).index_add_(0, p.topk(2).indices.reshape(-1), torch.ones(12)) / 6
    torch.testing.assert_close(load_balancing_loss(layers[:1], 8, 2), 8 * (share * p.mean(0)).sum())
    chosen = torch.tensor([[6, 7]] * 6)  # say a router chose the idle experts
    share = torch.zeros(8).index_add_(0, chosen.reshape(-1), torch.ones(12)) / 6
    torch.testing.assert_close(load_balancing_loss(layers[:1], 8, 2, expert_ids=[chosen]), 8 * (share * p.mean(0)).sum())
    # the mask counts real tokens exactly whatever its dtype: 301 is not a bfloat16 number (a bf16 sum rounds it)
    many, real = [torch.randn(320, 4, generator=g)], torch.arange(320) < 301
    want = load_balancing_loss_func((many[0],), 4, 2, real[None].long())
    for dtype in (torch.bool, torch.int64, torch.bfloat16):
        torch.testing.assert_close(load_balancing_loss(many, 4, 2, real.to(dtype)), want, atol=1e-6, rtol=1e-6)


# ---- experts and their backends ----------------------------------------------------------------------

def test_backend_kernel_choice():
    both = ComputeBackend(small_m_max=256, grouped="train")
    assert [both.kernel(n, False) for n in (1, 256, 257)] == ["small_m", "small_m", "grouped"]
    assert both.kernel(4, True) == "grouped" and both.sync_free(4, True) and both.sync_free(300)
    infer = ComputeBackend(0, "infer")
    assert infer.kernel(4, False) == "grouped" and infer.kernel(4, True) == "loop"
    assert infer.sync_free(4) and not infer.sync_free(4, grad=True)
    small = ComputeBackend(small_m_max=8)
    assert small.kernel(8, False) == "small_m" and small.kernel(9, False) == "loop" and small.kernel(1, True) == "loop"
    assert not small.sync_free(9) and ComputeBackend().kernel(1, False) == "loop" and not ComputeBackend().sync_free(1)
    assert ComputeBackend(small_m_max=1).kernel(1, False) == "small_m"


def test_choose_backend(monkeypatch):
    """CPU: grouped GEMM for inference only; CUDA: Triton small-M where Triton runs, grouped GEMM on Hopper-class
    GPUs in bf16 with 8-aligned sizes; impl="loop" forces the reference. (CUDA capability and Triton are
    stood in for: only the choice is checked here.)"""
    cpu = choose_backend("cpu", torch.float32, 64, 128)
    assert cpu == ComputeBackend(0, "infer" if moe_lib._HAS_GROUPED_MM else None)
    assert choose_backend("cpu", torch.float32, 64, 128, impl="loop") == ComputeBackend()
    cuda = torch.device("cuda", 0)

    def capability(major):  # a stand-in that must be asked about the GPU in question
        return lambda device: {cuda: major}[device]
    monkeypatch.setattr(moe_lib, "_HAS_GROUPED_MM", True)
    monkeypatch.setattr(moe_lib, "_capability", capability(9))
    monkeypatch.setattr(moe_lib.moe_kernels, "available", lambda device: torch.device(device) == cuda)
    assert choose_backend(cuda, torch.bfloat16, 64, 128) == ComputeBackend(256, "train")
    assert choose_backend(cuda, torch.float16, 64, 128) == ComputeBackend(256, None)
    assert choose_backend(cuda, torch.bfloat16, 60, 128) == ComputeBackend(256, None)
    assert choose_backend(cuda, torch.bfloat16, 64, 100) == ComputeBackend(256, None)
    assert choose_backend(cuda, torch.bfloat16, 64, 128, impl="loop") == ComputeBackend()
    monkeypatch.setattr(moe_lib, "_capability", capability(8))
    assert choose_backend(cuda, torch.bfloat16, 64, 128) == ComputeBackend(256, None)  # Ampere: no grouped GEMM
    monkeypatch.setattr(moe_lib.moe_kernels, "available", lambda device: False)
    monkeypatch.setattr(moe_lib, "_capability", capability(9))
    assert choose_backend(cuda, torch.bfloat16, 64, 128) == ComputeBackend(0, "train")
    monkeypatch.setattr(moe_lib, "_HAS_GROUPED_MM", False)
    assert choose_backend(cuda, torch.bfloat16, 64, 128) == ComputeBackend() == choose_backend("cpu", torch.float32, 8, 8)


def test_experts_settings_and_backend_follows_device_dtype_and_impl():
    ex = Experts(8, 16, 24, expert_ids=[2, 5, 7], dtype=torch.bfloat16)
    assert ex.expert_ids == [2, 5, 7] and ex.num_local == 3 and ex.intermediate_size == 24
    assert ex.w13.shape == (3, 48, 16) and ex.w2.shape == (3, 16, 24)
    assert ex.w13.dtype == ex.w2.dtype == torch.bfloat16 and ex.impl == "grouped" and not ex.recompute_up
    meta = Experts(4, 16, 24, device="meta")
    assert meta.expert_ids == [0, 1, 2, 3] and meta.w13.device.type == meta.w2.device.type == "meta"
    ex = Experts(4, 16, 24)
    assert ex.backend == choose_backend("cpu", torch.float32, 16, 24) and ex.trains
    ex.impl = "loop"
    assert ex.backend == ComputeBackend()
    ex.impl = "grouped"
    assert ex.backend == choose_backend("cpu", torch.float32, 16, 24)
    ex.requires_grad_(False)
    assert not ex.trains
    layer = MoE(16, 24, 4, 2, device="meta", dtype=torch.bfloat16)
    assert layer.gate.weight.device.type == "meta" and layer.gate.weight.dtype == torch.bfloat16
    assert layer.gate.bias is None and layer.experts.w13.dtype == torch.bfloat16
    assert layer.experts.w13.device.type == "meta" and isinstance(layer.dispatcher, LocalDispatch)
    plain = MoE(16, 24, 4, 2)
    assert plain.jitter_noise == 0.0 and plain.top_k == 2 and plain.num_experts == 4


def _experts(D=16, I=24, L=4, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    ex = Experts(L, D, I)
    with torch.no_grad():
        ex.w13.copy_(torch.randn(ex.w13.shape, generator=g) * 0.3)
        ex.w2.copy_(torch.randn(ex.w2.shape, generator=g) * 0.3)
    return ex.to(dtype)


def _by_hand(ex, x, weights, slots):
    """sum over choices of weight * expert(slot)(x), token by token; slot -1 contributes nothing."""
    y = torch.zeros(x.shape[0], x.shape[1])
    for n in range(x.shape[0]):
        for k in range(slots.shape[1]):
            if slots[n, k] >= 0:
                h = x[n].float() @ ex.w13[slots[n, k]].float().T
                act = torch.nn.functional.silu(h[: ex.intermediate_size]) * h[ex.intermediate_size:]
                y[n] += weights[n, k] * (act @ ex.w2[slots[n, k]].float().T)
    return y


def test_experts_forward_rows_padding_and_paths():
    ex = _experts()
    g = torch.Generator().manual_seed(2)
    x = torch.randn(5, 16, generator=g)
    counts = torch.tensor([2, 0, 1, 1])  # 4 grouped rows, then one padding row
    rows = torch.tensor([4, 0, 3, 1, 2])
    want = torch.stack([_by_hand(ex, x[r:r + 1], torch.ones(1, 1), torch.tensor([[s]]))[0]
                        for r, s in zip([4, 0, 3, 1], [0, 0, 2, 3])])
    with torch.no_grad():
        for impl in ("grouped", "loop"):
            ex.impl = impl
            got = ex(x, counts, rows=rows)
            assert got.shape == (5, 16)
            torch.testing.assert_close(got[:4], want, atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(ex(x[rows], counts)[:4], want, atol=1e-5, rtol=1e-5)
        assert torch.equal(ex.forward_loop(x[rows], counts)[4], torch.zeros(16))  # padding: zeros in the loop
    ex.recompute_up = True  # selective recompute: same values, gradients too
    out = ex.forward_loop(x[rows], counts)
    out.sum().backward()
    g1 = ex.w13.grad.clone()
    ex.zero_grad()
    ex.recompute_up = False
    ex.forward_loop(x[rows], counts).sum().backward()
    torch.testing.assert_close(out[:4].detach(), want, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(g1, ex.w13.grad)


def test_local_dispatch_drops_experts_held_elsewhere():
    ex = _experts(L=4)
    g = torch.Generator().manual_seed(4)
    x, w = torch.randn(6, 16, generator=g), torch.rand(6, 2, generator=g)
    ids = torch.tensor([[0, 5], [5, 6], [3, 1], [2, 7], [4, 0], [1, 3]])  # global ids of 8 experts
    # this rank holds experts 0, 1, 2, 3 in slots 3, 2, 1, 0 (a placement that is not the identity)
    dispatch = LocalDispatch([3, 2, 1, 0, -1, -1, -1, -1])
    slots = torch.tensor([[3, 2, 1, 0, -1, -1, -1, -1][e] for e in ids.reshape(-1)]).reshape(6, 2)
    want = _by_hand(ex, x, w, slots)
    for grad in (False, True):
        for impl in ("grouped", "loop"):
            ex.impl = impl
            with torch.set_grad_enabled(grad):
                part = dispatch.partial(ex, x, w, ids)
                y = dispatch(ex, x.to(torch.bfloat16).float(), w, ids)
            assert part.dtype == torch.float32 and y.dtype == torch.float32
            torch.testing.assert_close(part.detach(), want, atol=1e-5, rtol=1e-5)
    with torch.no_grad():
        y16 = dispatch(ex.to(torch.bfloat16), x.to(torch.bfloat16), w, ids)
    assert y16.dtype == torch.bfloat16  # the combine returns x's dtype
    everything = LocalDispatch()  # all experts here, slot = expert id
    ex8 = _experts(L=8)
    with torch.no_grad():
        torch.testing.assert_close(everything(ex8, x, w, ids), _by_hand(ex8, x, w, ids), atol=1e-5, rtol=1e-5)
    assert LocalDispatch.sync_free


def test_padding_rows_reach_no_gradient_through_the_gpu_grouped_gemm():
    """Pairs for other ranks' experts are padding in LocalDispatch.partial (the fixed-capacity and replicated
    dispatchers). The GPU's grouped GEMM leaves padding rows undefined, in its output and its input's
    gradient (tests/gpu_grouped_mm.py); the bf16 GPU run with `--all-to-all fixed_capacity` had NaN/inf
    gradients every step from it (0 x inf in the combine's weight gradient, and the kernel's unwritten rows
    of the tokens' gradient). Through that kernel, the output and every gradient equal the loop's."""
    from gpu_grouped_mm import grouped_mm, undefined_padding
    g = torch.Generator().manual_seed(6)
    x0, w0 = torch.randn(7, 16, generator=g), torch.rand(7, 2, generator=g)
    ids = torch.stack([torch.randperm(8, generator=g)[:2] for _ in range(7)])  # 8 experts, 4 of them here
    dispatch = LocalDispatch([3, 2, 1, 0, -1, -1, -1, -1])
    assert (ids >= 4).any() and (ids < 4).any()
    out = {}
    for impl in ("loop", "grouped"):
        with undefined_padding():
            ex = _experts(L=4)
            ex.impl = impl
            assert ex.backend.kernel(14, True) == {"loop": "loop", "grouped": "grouped"}[impl]
            x, w = x0.clone().requires_grad_(True), w0.clone().requires_grad_(True)
            y = dispatch.partial(ex, x, w, ids)
            y.pow(2).sum().backward()
            padded = ex(x0, torch.tensor([2, 0, 1, 1]), rows=torch.arange(6) % 7)  # 4 pairs, 2 padding rows
        out[impl] = [y.detach(), x.grad, w.grad, ex.w13.grad, ex.w2.grad]
        assert [t.isfinite().all().item() for t in out[impl]] == [True] * 5, impl
        assert torch.equal(padded[4:], torch.zeros(2, 16)), impl  # padding comes back zero
    for a, b in zip(out["loop"], out["grouped"]):
        torch.testing.assert_close(b, a, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out["loop"][0], _by_hand(_experts(L=4), x0, w0,
                                                        torch.tensor([3, 2, 1, 0, -1, -1, -1, -1])[ids]))
    # the stand-in is what it claims: the groups' rows, then NaN (forward and x's gradient)
    x = torch.randn(5, 4, requires_grad=True)
    wg = torch.randn(2, 4, 3)
    y = grouped_mm(x, wg, torch.tensor([1, 3], dtype=torch.int32))
    torch.testing.assert_close(y[:3], torch.cat([x[:1] @ wg[0], x[1:3] @ wg[1]]))
    y[:3].sum().backward()
    assert y[3:].isnan().all() and x.grad[3:].isnan().all() and x.grad[:3].isfinite().all()


def test_routing_stats():
    stats = RoutingStats(2, 4)
    assert stats.counts().tolist() == [[0] * 4] * 2 and stats.counts().dtype == torch.int64
    live = stats.counts()
    ids = [torch.tensor([[0, 1], [1, 3], [3, 0]]), torch.tensor([[2, 2], [0, 1], [1, 2]])]
    stats.add([Routed(torch.zeros(3, 4), ids[0]), Routed(torch.zeros(3, 4), ids[1], torch.tensor([True, False, True]))])
    assert stats.counts().tolist() == [[2, 2, 0, 2], [0, 1, 3, 0]] and stats.counts() is live  # updated in place
    stats.add([Routed(torch.zeros(1, 4), torch.tensor([[3, 2]])), Routed(torch.zeros(1, 4), torch.tensor([[0, 3]]))])
    assert stats.counts().tolist() == [[2, 2, 1, 3], [1, 1, 3, 1]]
    stats.reset()
    assert stats.counts().tolist() == [[0] * 4] * 2 and stats.counts() is live
    stats.add([Routed(torch.zeros(1, 4), torch.tensor([[1, 0]]))] * 2)
    moved = stats.counts("meta")  # a device change keeps the counts (moved)
    assert moved.device.type == "meta" and stats.counts() is moved


# ---- the layer ---------------------------------------------------------------------------------------

def _layer(jitter=0.0):
    torch.manual_seed(0)
    layer = MoE(16, 24, 4, 2, jitter_noise=jitter)
    with torch.no_grad():
        layer.gate.weight.normal_(0, 1.0)
        layer.experts.w13.normal_(0, 0.3)
        layer.experts.w2.normal_(0, 0.3)
    return layer


def test_moe_forward_returns_what_it_routed_and_uses_its_dispatcher():
    layer = _layer().eval()
    x = torch.randn(2, 3, 16)
    mask = torch.tensor([True, True, False, True, True, True])
    with torch.no_grad():
        want, routed = layer(x, mask)
    w, i = route(layer.gate(x.reshape(6, 16)), 2)
    assert torch.equal(routed.expert_ids, i) and routed.mask is mask and routed.logits.shape == (6, 4)
    with torch.no_grad():  # the padding token (mask False) reaches no expert at inference
        by_hand = _by_hand(layer.experts, x.reshape(6, 16), w, i) * mask[:, None]
        torch.testing.assert_close(want.reshape(6, 16), by_hand, atol=1e-5, rtol=1e-5)
    with torch.no_grad():
        full, _ = layer(x)  # no mask: every token through its experts
    seen = []

    def dispatcher(experts, flat, weights, ids, mask):
        seen.append((experts, flat, weights, ids))
        return LocalDispatch()(experts, flat, weights, ids, mask) * 2.0
    layer.dispatcher = dispatcher
    with torch.no_grad():
        got, routed2 = layer(x)
    (experts, flat, weights, ids), = seen
    assert experts is layer.experts and torch.equal(flat, x.reshape(6, 16)) and got.shape == (2, 3, 16)
    assert torch.equal(ids, i) and torch.equal(weights, w) and routed2.mask is None
    torch.testing.assert_close(got, 2.0 * full)


def test_moe_sync_free_asks_the_dispatcher_and_the_backend():
    layer = _layer()
    layer.experts.requires_grad_(False)
    assert layer.sync_free(3) == layer.experts.backend.sync_free(6)
    layer.experts.impl = "loop"
    assert not layer.sync_free(3)
    layer.experts.impl = "grouped"

    class Syncing:
        sync_free = False
    layer.dispatcher = Syncing()
    assert not layer.sync_free(3)


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


def test_recompute_only_when_asked_and_training(monkeypatch):
    calls = []
    real = moe_lib.checkpoint
    monkeypatch.setattr(moe_lib, "checkpoint", lambda *a, **k: calls.append(1) or real(*a, **k))
    ex = _experts()
    x, counts = torch.randn(4, 16), torch.tensor([1, 1, 1, 1])
    ex.forward_loop(x, counts).sum().backward()
    with torch.no_grad():
        ex.recompute_up = True
        ex.forward_loop(x, counts)
    assert calls == []
    ex.forward_loop(x, counts).sum().backward()
    assert len(calls) == 4  # one per expert


def test_no_jitter_draws_no_random_numbers():
    plain, jittered = _layer(jitter=0.0).train(), _layer(jitter=0.1).train()
    x = torch.randn(2, 3, 16)
    state = torch.get_rng_state()
    plain(x)
    assert torch.equal(torch.get_rng_state(), state)
    jittered(x)
    assert not torch.equal(torch.get_rng_state(), state)


def test_moe_sync_free_counts_pairs(monkeypatch):
    """A layer's forward of T tokens computes T * top_k pairs: that is what the backend is asked about."""
    monkeypatch.setattr(moe_lib, "choose_backend", lambda *a, **k: ComputeBackend(small_m_max=8))
    layer = _layer()
    assert layer.sync_free(4) and not layer.sync_free(5)  # 8 pairs: Triton; 10: the (syncing) loop


SMALL_M = r"""
import torch
import epkit.moe as moe_lib
from epkit import moe_kernels
from epkit.moe import ComputeBackend, Experts, LocalDispatch

real = moe_lib.choose_backend
moe_lib.choose_backend = lambda d, t, h, i, impl="grouped": real(d, t, h, i, impl) if impl == "loop" else ComputeBackend(256)
torch.manual_seed(0)
L, D, I, N = 3, 16, 24, 5
ex = Experts(L, D, I)
torch.nn.init.normal_(ex.w13, std=0.3)
torch.nn.init.normal_(ex.w2, std=0.3)
ref = Experts(L, D, I)
ref.load_state_dict(ex.state_dict())
ref.impl = "loop"
x, w = torch.randn(N, D), torch.rand(N, 2)
ids = torch.tensor([[0, 4], [5, 2], [1, 0], [3, 2], [0, 1]])  # global ids of 6 experts; 3, 4, 5 live elsewhere
slots = [2, 0, 1, -1, -1, -1]
calls = []
for name in ("experts_small_m", "fused_experts_small"):
    real_fn = getattr(moe_kernels, name)
    setattr(moe_kernels, name, lambda *a, f=real_fn, n=name: calls.append(n) or f(*a))
with torch.no_grad():
    assert ex.backend.kernel(N * 2, False) == "small_m"
    torch.testing.assert_close(LocalDispatch(slots).partial(ex, x, w, ids), LocalDispatch(slots).partial(ref, x, w, ids),
                               atol=1e-5, rtol=1e-5)
    every = torch.tensor([[0, 2], [1, 2], [1, 0], [2, 2], [0, 1]])
    torch.testing.assert_close(LocalDispatch()(ex, x, w, every), LocalDispatch()(ref, x, w, every), atol=1e-5, rtol=1e-5)
    counts, rows = torch.tensor([2, 1, 2]), torch.tensor([4, 0, 3, 1, 2])
    torch.testing.assert_close(ex(x, counts, rows=rows), ref(x, counts, rows=rows), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(ex(x[rows], counts), ref(x[rows], counts), atol=1e-5, rtol=1e-5)
assert calls == ["fused_experts_small", "fused_experts_small", "experts_small_m", "experts_small_m"], calls
ex(x, torch.tensor([2, 1, 2]), rows=torch.tensor([4, 0, 3, 1, 2])).sum().backward()  # training: never Triton
LocalDispatch(slots).partial(ex, x, w, ids).sum().backward()
assert len(calls) == 4, calls
print("SMALL_M OK")
"""


def test_small_m_paths_in_the_triton_interpreter():
    """The decode-sized paths (Triton kernels) of Experts.forward and LocalDispatch, run by Triton's CPU
    interpreter in a subprocess, against the loop; training calls never take them."""
    import os
    import subprocess
    import sys
    pytest.importorskip("triton")
    ex = _experts()  # (the same entry points in this process: the CPU backends)
    with torch.no_grad():
        LocalDispatch([0, 1, 2, 3])(ex, torch.randn(2, 16), torch.rand(2, 2), torch.tensor([[0, 1], [2, 3]]))
    env = dict(os.environ, TRITON_INTERPRET="1")
    out = subprocess.run([sys.executable, "-c", SMALL_M], capture_output=True, text=True, env=env, timeout=300)
    assert "SMALL_M OK" in out.stdout, out.stdout + out.stderr


def test_inference_grouped_experts_zero_padding_and_dense_callers_equal_the_loop():
    """At inference the grouped path leaves the padding input rows alone (the GEMM never reads them) and, for a
    `dense` caller (every pair local: EP=1, the all-to-all's arrived rows), has no output padding to zero.
    Through the GPU kernel's stand-in (padding rows NaN): padding still comes back zero, and the dense path, the
    padded path and the EP=1 dispatcher equal the loop and the formula."""
    from gpu_grouped_mm import undefined_padding
    g = torch.Generator().manual_seed(8)
    x = torch.randn(7, 16, generator=g)
    x[5:] = float("nan")  # padding rows: whatever the buffer held
    counts = torch.tensor([2, 0, 1, 2])  # 5 grouped rows, then 2 padding
    weights, ids = torch.rand(6, 2, generator=g), torch.stack([torch.randperm(4, generator=g)[:2] for _ in range(6)])
    with undefined_padding(), torch.no_grad():
        ex = _experts(L=4)
        loop = ex.forward_loop(x[:5], counts)
        ex.impl = "grouped"
        assert ex.backend.kernel(7, False) == "grouped"
        padded = ex(x, counts)
        direct = ex.forward_grouped(x, counts)  # not dense unless said
        dense = ex(x[:5], counts, dense=True)
        ep1 = LocalDispatch().partial(ex, x[:6].nan_to_num(), weights, ids)
    assert torch.equal(padded[5:], torch.zeros(2, 16)) and torch.equal(direct, padded)
    torch.testing.assert_close(padded[:5], loop, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(dense, loop, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(ep1, _by_hand(ex, x[:6].nan_to_num(), weights, ids), atol=1e-5, rtol=1e-5)


def test_forward_asks_the_backend_about_the_pairs_it_computes(monkeypatch):
    """The backend is asked about the rows computed (len(rows) when a gather is given, not the token count),
    and its answer picks the kernels: grouped GEMM when it says so, else the loop."""
    x, counts, rows = torch.randn(5, 16), torch.tensor([3, 3, 2, 2]), torch.arange(10) % 5
    monkeypatch.setattr(moe_lib.moe_kernels, "experts_small_m", lambda *a: pytest.fail("Triton for 10 pairs"))
    monkeypatch.setattr(moe_lib, "choose_backend", lambda *a, **k: ComputeBackend(small_m_max=8))
    grouped = Experts.forward_grouped  # a backend without grouped GEMM (e.g. fp32 on a GPU) must not reach it
    monkeypatch.setattr(Experts, "forward_grouped", lambda *a: pytest.fail("grouped GEMM where the loop was chosen"))
    with torch.no_grad():
        want = _experts()(x, counts, rows=rows)  # 10 pairs > 8: the loop, though x has only 5 rows
    monkeypatch.setattr(moe_lib, "choose_backend", lambda *a, **k: ComputeBackend(0, "infer"))
    monkeypatch.setattr(Experts, "forward_grouped", grouped)
    monkeypatch.setattr(Experts, "forward_loop", lambda *a: pytest.fail("the loop where grouped GEMM was chosen"))
    with torch.no_grad():
        torch.testing.assert_close(_experts()(x, counts, rows=rows), want, atol=1e-5, rtol=1e-5)


def test_expert_rows_parts_are_the_formula_slices_and_sum_to_the_whole_expert():
    """Experts(rows=(r, R)) holds rows r*I..(r+1)*I-1 of w1 and of w3 and those columns of w2 (I = I_full / R):
    by index arithmetic, and the R parts' outputs add up to the whole expert's (SwiGLU acts row by row)."""
    g = torch.Generator().manual_seed(11)
    D, I_full, R = 8, 12, 3
    full13, full2 = torch.randn(2 * I_full, D, generator=g), torch.randn(D, I_full, generator=g)
    whole = Experts(1, D, I_full)
    assert whole.take_rows("w13", full13) is full13 and whole.take_rows("w2", full2) is full2
    x = torch.randn(5, D, generator=g)
    with torch.no_grad():
        whole.w13[0].copy_(full13)
        whole.w2[0].copy_(full2)
        want = whole.forward_loop(x, torch.tensor([5]))
        total = torch.zeros_like(want)
        for r in range(R):
            part = Experts(1, D, I_full, rows=(r, R))
            assert part.rows == (r, R) and part.intermediate_size == 4 and part.w13.shape == (1, 8, D)
            assert part.w2.shape == (1, D, 4)
            w13, w2 = part.take_rows("w13", full13), part.take_rows("w2", full2)
            rows13 = [i for i in range(2 * I_full) if r * 4 <= i % I_full < (r + 1) * 4]
            assert torch.equal(w13, full13[rows13]) and torch.equal(w2, full2[:, r * 4:(r + 1) * 4])
            part.w13[0].copy_(w13)
            part.w2[0].copy_(w2)
            total += part.forward_loop(x, torch.tensor([5]))
    torch.testing.assert_close(total, want, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="intermediate_size=12 does not split into 5 equal parts"):
        Experts(1, D, I_full, rows=(0, 5))


def test_inference_and_training_take_the_fused_kernels_unless_switched_off(monkeypatch):
    """Where Triton runs (here: said so, with stand-ins that compute what the kernels compute and record their
    calls), an inference forward takes moe_kernels.swiglu and moe_kernels.combine with its own arguments (the
    keep mask where other ranks' pairs are dropped), a forward that needs gradients takes their differentiable
    forms (swiglu_autograd, combine_autograd) and gets the same gradients as torch's ops, and with
    moe.FUSED_KERNELS off every call takes torch's ops. The kernels themselves are checked against these ops
    in tests/test_moe_kernels.py and bench/gpu_check.py."""
    import torch.nn.functional as F
    calls = []

    def stand_in(name, fn):
        def call(*args, **kw):
            calls.append((name, args[0].shape[1] if name.startswith("swiglu") else args[3] is not None))
            return fn(*args, **kw)
        return call

    def swiglu(h13):
        I = h13.shape[1] // 2
        return F.silu(h13[:, :I]) * h13[:, I:]

    def combine(out, order, weights, keep=None):
        return unpermute(out, order, weights, keep)
    monkeypatch.setattr(moe_lib.moe_kernels, "available", lambda device: True)
    for name, fn in (("swiglu", swiglu), ("swiglu_autograd", swiglu)):
        monkeypatch.setattr(moe_lib.moe_kernels, name, stand_in(name, fn))
    for name in ("combine", "combine_autograd"):
        monkeypatch.setattr(moe_lib.moe_kernels, name, lambda out, order, w, keep=None, _n=name:
                            stand_in(_n, combine)(out, order, w, keep))
    g = torch.Generator().manual_seed(12)
    x, weights = torch.randn(6, 16, generator=g), torch.rand(6, 2, generator=g)
    ids = torch.stack([torch.randperm(4, generator=g)[:2] for _ in range(6)])
    for slots, keep in ((None, False), ([0, -1, 1, -1], True)):
        ex = _experts(L=4 if slots is None else 2)
        ex.impl = "loop"
        with torch.no_grad():
            fast = LocalDispatch(slots).partial(ex, x, weights, ids)
        used, calls[:] = set(calls), []
        assert used == {("combine", keep), ("swiglu", 48)}, used
        w = weights.clone().requires_grad_()
        trained = LocalDispatch(slots).partial(ex, x, w, ids)
        grads = torch.autograd.grad(trained.square().sum(), [w, ex.w13, ex.w2])
        used, calls[:] = set(calls), []
        assert used == {("combine_autograd", keep), ("swiglu_autograd", 48)}, used
        ex.requires_grad_(False)  # only the router's weights train (e.g. --train-only router, the first layer)
        w = weights.clone().requires_grad_()
        LocalDispatch(slots).partial(ex, x, w, ids).sum().backward()
        assert w.grad is not None and ("combine_autograd", keep) in calls, calls
        calls[:] = []
        ex.requires_grad_(True)
        monkeypatch.setattr(moe_lib, "FUSED_KERNELS", False)
        w = weights.clone().requires_grad_()
        slow = LocalDispatch(slots).partial(ex, x, w, ids)  # torch's ops
        want = torch.autograd.grad(slow.square().sum(), [w, ex.w13, ex.w2])
        with torch.no_grad():
            LocalDispatch(slots).partial(ex, x, weights, ids)
        monkeypatch.setattr(moe_lib, "FUSED_KERNELS", True)
        assert calls == []
        torch.testing.assert_close(fast, slow.detach(), atol=1e-6, rtol=1e-6)
        torch.testing.assert_close(trained, slow, atol=1e-6, rtol=1e-6)
        for got, ref in zip(grads, want):
            torch.testing.assert_close(got, ref, atol=1e-6, rtol=1e-6)
        torch.testing.assert_close(fast, _by_hand(ex, x, weights, torch.tensor(slots or [0, 1, 2, 3])[ids]
                                                  if slots else ids), atol=1e-5, rtol=1e-5)


def test_inference_skips_padding_tokens_in_the_experts(monkeypatch):
    """At inference the MoE hands the dispatcher its token mask: padding tokens (position -1, a batch's rows
    padded to the longest) reach no expert, so the experts compute only the real tokens' pairs, and the real
    tokens' outputs are what they were; in training every token goes to its experts, as before."""
    layer = _layer()
    layer.experts.impl = "loop"
    g = torch.Generator().manual_seed(5)
    x = torch.randn(2, 3, 16, generator=g)
    mask = torch.tensor([True, True, True, True, False, False])
    rows = []
    forward = layer.experts.forward
    monkeypatch.setattr(layer.experts, "forward", lambda x_, counts, *a, **k: rows.append(int(counts.sum())) or
                        forward(x_, counts, *a, **k))
    with torch.no_grad():
        full, _ = layer(x)
        masked, _ = layer(x, mask)
    assert rows == [12, 8]  # top-2 of 6 tokens, then of the 4 real ones
    torch.testing.assert_close(masked.reshape(6, 16)[:4], full.reshape(6, 16)[:4], atol=1e-6, rtol=1e-6)
    assert torch.equal(masked.reshape(6, 16)[4:], torch.zeros(2, 16))
    trained, _ = layer(x, mask)  # autograd on: every token computed
    assert rows[-1] == 12
    torch.testing.assert_close(trained.detach(), full, atol=1e-6, rtol=1e-6)
