"""The Triton small-M expert kernels against the readable loop, run by Triton's CPU interpreter."""
import os
import subprocess
import sys
import textwrap


SCRIPT = textwrap.dedent('''
    import os
    os.environ["TRITON_INTERPRET"] = "1"
    import torch
    from epkit import moe_kernels
    from epkit.moe import Experts, LocalDispatch, permute, unpermute
    torch.manual_seed(0)
    for L, N, K, D, I in [(4, 5, 2, 32, 48), (3, 40, 2, 24, 40), (8, 1, 2, 16, 16)]:
        ex = Experts(L, D, I)
        torch.nn.init.normal_(ex.w13, std=0.3)
        torch.nn.init.normal_(ex.w2, std=0.3)
        x = torch.randn(N, D)
        weights = torch.rand(N, K)
        slots = torch.randint(-1, L, (N, K))  # -1: an expert that lives on another rank
        if N > 1:
            slots[:, 0] = torch.where(slots[:, 0] == 1, 0, slots[:, 0])  # leave expert 1 nearly empty
        key = torch.where(slots < 0, L, slots)
        order, counts = permute(key, L + 1)
        with torch.no_grad():
            out = moe_kernels.experts_small_m(x, order // K, counts[:L], ex.w13, ex.w2)
            local = key.reshape(-1)[order] < L
            ref = torch.cat([ex._expert(int(s), x[t][None]) for s, t in zip(key.reshape(-1)[order][local],
                                                                              (order // K)[local])])
            assert torch.allclose(out[local], ref, atol=1e-4, rtol=1e-4), (out[local] - ref).abs().max()
            loop = ex.forward_loop(x[order // K], counts[:L])  # the readable reference
            assert torch.allclose(out[local], loop[local], atol=1e-4, rtol=1e-4)
            y = unpermute(out, order, weights, keep=local)
            ex.impl = "loop"  # global expert L lives on another rank
            torch.testing.assert_close(y, LocalDispatch(list(range(L)) + [-1])(ex, x, weights, key),
                                       atol=1e-4, rtol=1e-4)
    print("KERNELS OK")
''')


def test_small_m_kernels_match_loop_reference():
    import triton  # noqa: F401  (the test extra installs it; CUDA falls back to grouped_mm without it)
    env = dict(os.environ, TRITON_INTERPRET="1")
    out = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, env=env, timeout=300)
    assert "KERNELS OK" in out.stdout, out.stdout + out.stderr


PREFILL_SCRIPT = textwrap.dedent('''
    import os
    os.environ["TRITON_INTERPRET"] = "1"
    import torch
    import torch.nn.functional as F
    from epkit import moe_kernels
    from epkit import moe as moe_lib
    from epkit.moe import Experts, LocalDispatch, permute, unpermute
    torch.manual_seed(0)
    # swiglu: silu(gate) * up as torch computes it, for I not a multiple of the block (and one row, and none)
    for M, I, dtype in [(7, 40, torch.float32), (5, 1100, torch.float32), (9, 24, torch.bfloat16),
                        (1, 3, torch.float32), (0, 8, torch.float32)]:
        h13 = (torch.randn(M, 2 * I) * 3).to(dtype)
        ref = F.silu(h13[:, :I]) * h13[:, I:]
        got = moe_kernels.swiglu(h13)
        assert got.dtype == dtype and got.shape == (M, I)
        if dtype == torch.float32:
            torch.testing.assert_close(got, ref, atol=1e-6, rtol=1e-5)
        else:  # the interpreter truncates fp32 -> bf16 (GPUs round to nearest): within its two roundings
            torch.testing.assert_close(got.float(), ref.float(), atol=1e-2, rtol=2 ** -6)
    # combine: unpermute's weighted sum per token, with and without dropped rows (which may hold NaN)
    for N, K, D, L in [(6, 2, 40, 3), (5, 3, 1030, 4), (1, 2, 8, 2)]:
        out = torch.randn(N * K, D).to(torch.bfloat16)
        weights = torch.rand(N, K)
        key = torch.randint(0, L + 1, (N, K))  # L: another rank's expert
        order, counts = permute(key, L + 1)
        keep = key.reshape(-1)[order] < L
        ref = unpermute(out, order, weights, keep=keep)
        out[~keep] = float("nan")  # never read
        got = moe_kernels.combine(out, order, weights, keep)
        assert got.dtype == torch.float32 and got.shape == (N, D)
        torch.testing.assert_close(got, ref, atol=1e-6, rtol=1e-6)
        torch.testing.assert_close(moe_kernels.combine(out.nan_to_num(), order, weights),
                                   unpermute(out.nan_to_num(), order, weights), atol=1e-6, rtol=1e-6)
    # their differentiable forms (training): the gradients torch's autograd gives through silu * up and
    # through unpermute (out and weights), dropped rows (NaN, never read) getting zero
    for M, I, dtype in [(7, 40, torch.float32), (5, 1100, torch.float32), (9, 24, torch.bfloat16),
                        (0, 8, torch.float32)]:
        h13 = (torch.randn(M, 2 * I) * 3).to(dtype)
        g = torch.randn(M, I).to(dtype)
        ref_in, got_in = h13.clone().requires_grad_(), h13.clone().requires_grad_()
        ref = F.silu(ref_in[:, :I]) * ref_in[:, I:]
        got = moe_kernels.swiglu_autograd(got_in)
        (ref + 0).backward(g)
        got.backward(g)
        tol = dict(atol=1e-5, rtol=1e-5) if dtype == torch.float32 else dict(atol=1e-2, rtol=2 ** -6)
        torch.testing.assert_close(got_in.grad.float(), ref_in.grad.float(), **tol)
    for N, K, D, L, dtype in [(6, 2, 40, 3, torch.float32), (5, 3, 1030, 4, torch.float32),
                              (7, 2, 24, 3, torch.bfloat16)]:
        out = torch.randn(N * K, D).to(dtype)
        weights = torch.rand(N, K)
        key = torch.randint(0, L + 1, (N, K))
        order, counts = permute(key, L + 1)
        for keep in (key.reshape(-1)[order] < L, None):
            o1, w1 = out.clone().requires_grad_(), weights.clone().requires_grad_()
            ref = unpermute(o1, order, w1, keep=keep)
            gy = torch.randn_like(ref)
            ref.backward(gy)
            o2 = out.clone()
            if keep is not None:
                o2[~keep] = float("nan")  # never read, forward or backward
            o2.requires_grad_()
            w2 = weights.clone().requires_grad_()
            got = moe_kernels.combine_autograd(o2, order, w2, keep)
            torch.testing.assert_close(got, ref.detach(), atol=1e-6, rtol=1e-6)
            got.backward(gy)
            tol = dict(atol=1e-6, rtol=1e-6) if dtype == torch.float32 else dict(atol=1e-2, rtol=2 ** -6)
            torch.testing.assert_close(o2.grad, o1.grad, **tol)
            torch.testing.assert_close(w2.grad, w1.grad, atol=1e-4, rtol=1e-5)
    # the whole local MoE under no_grad (kernels) equals it with autograd on (torch ops), EP=1 and a rank's share
    ex = Experts(4, 24, 40)
    torch.nn.init.normal_(ex.w13, std=0.3)
    torch.nn.init.normal_(ex.w2, std=0.3)
    ex.impl = "loop"
    x, weights, ids = torch.randn(9, 24), torch.rand(9, 2), torch.randint(0, 4, (9, 2))
    for slots in (None, [0, -1, 1, -1]):
        dispatch = LocalDispatch(slots)
        with torch.no_grad():
            fast = dispatch.partial(ex, x, weights, ids)
        moe_lib.FUSED_KERNELS = False
        slow = dispatch.partial(ex, x, weights, ids).detach()
        moe_lib.FUSED_KERNELS = True
        torch.testing.assert_close(fast, slow, atol=1e-5, rtol=1e-5)
    print("PREFILL KERNELS OK")
''')


def test_prefill_kernels_match_torch():
    """swiglu and combine (the memory-bound steps around the grouped GEMM at prefill and in training), forward
    and backward, against the torch ops they replace, in Triton's CPU interpreter: odd sizes, bf16 rounding,
    dropped rows holding NaN."""
    import triton  # noqa: F401
    env = dict(os.environ, TRITON_INTERPRET="1")
    out = subprocess.run([sys.executable, "-c", PREFILL_SCRIPT], capture_output=True, text=True, env=env,
                         timeout=300)
    assert "PREFILL KERNELS OK" in out.stdout, out.stdout + out.stderr
