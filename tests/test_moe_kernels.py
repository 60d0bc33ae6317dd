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
