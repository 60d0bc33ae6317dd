"""The decode path's Triton kernels against the torch code they mirror, run by Triton's CPU interpreter
(fp32: the interpreter's bf16 casts truncate and its bf16 dot is wrong), and compiled for Hopper
(sm_90) so that a kernel which only the GPU compiler rejects fails here too."""
import os
import subprocess
import sys
import textwrap

import pytest

SCRIPT = textwrap.dedent('''
    import os
    os.environ["TRITON_INTERPRET"] = "1"
    import torch
    from epkit import moe_kernels
    from epkit.kernels import attention as A, fused as F
    from epkit.model import apply_rope, rope_cos_sin
    from epkit.moe import Experts, LocalDispatch
    torch.manual_seed(0)

    # paged attention: one and several key splits, GQA and MHA, a sliding window, padding rows
    splits = []
    for N, H, G, Dh, bs, NB, window, programs in [(3, 4, 2, 16, 4, 40, None, 1), (5, 8, 2, 32, 16, 3, None, 64),
                                                  (4, 4, 4, 16, 8, 20, 13, 64), (2, 4, 1, 16, 16, 6, None, 16)]:
        A._programs_wanted = lambda device, n=programs: n
        k, v = torch.randn(200 * bs, G, Dh), torch.randn(200 * bs, G, Dh)
        q = torch.randn(N, H, Dh)
        table = torch.randint(1, 200, (N, NB))
        lens = torch.randint(1, NB * bs + 1, (N,))
        lens[0] = 0  # padding
        out = A.paged_decode_attention(q, k, v, table, lens, bs, window)
        ref = A.paged_decode_attention_torch(q, k, v, table, lens, bs, window)
        torch.testing.assert_close(out[1:], ref[1:], atol=2e-6, rtol=2e-6)
        assert out[0].abs().max() == 0
        splits.append(A.split_plan(N, G, NB * bs, q.device)[0])
    assert splits[0] == 1 and splits[2] > 1 and splits[3] > 1, splits  # both kernels' paths ran

    # residual add + RMSNorm (the delta in fp32, as the EP all-reduce leaves it, and in the stream's dtype)
    h, w = torch.randn(5, 48), torch.randn(48)
    for delta in (None, torch.randn(5, 48, dtype=torch.float64).float()):
        (h1, x1), (h2, x2) = F.add_rms_norm(h, delta, w, 1e-5), F.add_rms_norm_torch(h, delta, w, 1e-5)
        assert torch.equal(h1, h2)
        torch.testing.assert_close(x1, x2, atol=1e-6, rtol=1e-6)

    # rotary + KV write: bit-equal to the model's apply_rope; padding rotates as position 0 and writes scratch
    H, G, Dh, N = 4, 2, 16, 5
    qkv = torch.randn(N, (H + 2 * G) * Dh)
    pos = torch.tensor([0, 5, -1, 17, 30])
    cos, sin = rope_cos_sin(torch.arange(64)[None], Dh, 10000.0, torch.float32)
    slots = torch.tensor([3, 9, 0, 10, 40])
    pools = [torch.zeros(64, G, Dh) for _ in range(4)]
    q1 = F.rope_write_kv(qkv, cos[0, 0], sin[0, 0], pos, slots, pools[0], pools[1], H, G)
    q2 = F.rope_write_kv_torch(qkv, cos[0, 0], sin[0, 0], pos, slots, pools[2], pools[3], H, G)
    assert torch.equal(q1, q2) and torch.equal(pools[0], pools[2]) and torch.equal(pools[1], pools[3])
    c, s = rope_cos_sin(pos.clamp(min=0)[:, None], Dh, 10000.0, torch.float32)
    assert torch.equal(q2, apply_rope(qkv.view(N, H + 2 * G, Dh)[:, :H, None], c, s)[:, :, 0])
    assert torch.equal(pools[0][slots[3]], apply_rope(qkv.view(N, H + 2 * G, Dh)[3:4, H:H + G, None],
                                                      c[3:4], s[3:4])[0, :, 0])

    # routing
    for E, K in ((8, 2), (6, 3), (8, 1)):
        logits = torch.randn(37, E)
        (w1, i1), (w2, i2) = F.route(logits, K), F.route_torch(logits, K)
        assert torch.equal(i1, i2)
        torch.testing.assert_close(w1, w2, atol=1e-6, rtol=1e-6)

    # the four-kernel small-batch MoE against the readable loop, with two experts held by another rank
    for L, N, K, D, I in [(4, 5, 2, 32, 48), (3, 40, 2, 24, 40), (8, 1, 2, 16, 16), (2, 7, 3, 16, 32)]:
        ex = Experts(L, D, I)
        ex.impl = "loop"
        torch.nn.init.normal_(ex.w13, std=0.3)
        torch.nn.init.normal_(ex.w2, std=0.3)
        table = list(range(L)) + [-1, -1]  # global expert -> local slot
        x, weights, ids = torch.randn(N, D), torch.rand(N, K), torch.randint(0, L + 2, (N, K))
        with torch.no_grad():
            y = moe_kernels.fused_experts_small(x, weights, torch.tensor(table)[ids], ex.w13, ex.w2)
            ref = LocalDispatch(table).partial(ex, x, weights, ids)
            torch.testing.assert_close(y, ref, atol=2e-5, rtol=1e-5)
    print("KERNELS OK")
''')


def test_kernels_match_torch_in_interpreter():
    pytest.importorskip("triton")  # the test extra installs it; without it the torch paths run
    env = dict(os.environ, TRITON_INTERPRET="1")
    out = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, env=env, timeout=600)
    assert "KERNELS OK" in out.stdout, out.stdout + out.stderr


def _compile(fn, signature: dict, constants: dict, **options):
    import triton
    from triton.backends.compiler import GPUTarget
    src = triton.compiler.ASTSource(fn=fn, signature={**signature, **{k: "constexpr" for k in constants}},
                                    constexprs=constants)
    compiled = triton.compile(src, target=GPUTarget("cuda", 90, 32), options=options)
    assert compiled.metadata.shared <= 227 * 1024, (fn.__name__, constants, options, compiled.metadata.shared)
    return compiled


def test_kernels_compile_for_hopper():
    """Mixtral-8x7B shapes in bf16, as the engine launches them on an H200."""
    pytest.importorskip("triton")
    from epkit import moe_kernels as M
    from epkit.kernels import attention as A, fused as F
    bf, i64, i32, f32 = "*bf16", "*i64", "*i32", "*fp32"
    for split in (False, True):
        _compile(A._decode_kernel, dict(q_ptr=bf, k_ptr=bf, v_ptr=bf, table_ptr=i64, lens_ptr=i64, out_ptr=bf,
                                        acc_ptr=f32, ml_ptr=f32, scale="fp32", window="i32", NB="i32", splits="i32",
                                        per_split="i32"),
                 dict(H=32, G=8, DH=128, QPG=4, QP=16, BS=16, BLOCK_S=A.BLOCK_S, SPLIT=split))
    _compile(A._merge_kernel, dict(acc_ptr=f32, ml_ptr=f32, out_ptr=bf, splits="i32"), dict(DH=128, SP=4))
    for has_delta, d in ((False, bf), (True, f32)):
        _compile(F._add_rms_norm_kernel, dict(h_ptr=bf, d_ptr=d, w_ptr=bf, h_out_ptr=bf, x_ptr=bf, eps="fp32",
                                              D="i32"), dict(BLOCK=4096, HAS_DELTA=has_delta))
    _compile(F._rope_write_kv_kernel, dict(qkv_ptr=bf, cos_ptr=bf, sin_ptr=bf, pos_ptr=i64, slot_ptr=i64, k_ptr=bf,
                                           v_ptr=bf, q_ptr=bf), dict(H=32, G=8, HALF=64))
    _compile(F._route_kernel, dict(logits_ptr=bf, w_ptr=f32, id_ptr=i64, N="i32"), dict(E=8, EP=8, K=2, KP=2,
                                                                                           BLOCK_N=16))
    _compile(M._permute_kernel, dict(slots=i64, weights=f32, token=i32, pair_w=f32, counts=i32, row_end=i32,
                                     block_end=i32, PK="i32"), dict(K=2, L=4, LB=8, BLOCK_P=2, BM=M.BLOCK_M))
    (bn1, bk1, bn2, bk2), _ = M.TILES
    common = dict(block_end=i32, row_end=i32, counts=i32)
    shape = dict(D=4096, I=14336, L=4, LP=4, BM=M.BLOCK_M)
    _compile(M._gate_up_kernel, dict(x=bf, token=i32, w13=bf, h=bf, **common), dict(**shape, BN=bn1, BK=bk1))
    _compile(M._down_combine_kernel, dict(h=bf, w2=bf, y=f32, token=i32, pair_w=f32, **common),
             dict(**shape, BN=bn2, BK=bk2))
    for bn, bk, stages, warps in M.FEW_PAIRS_DOWN:  # each fits an H200's shared memory
        _compile(M._down_combine_kernel, dict(h=bf, w2=bf, y=f32, token=i32, pair_w=f32, **common),
                 dict(**shape, BN=bn, BK=bk), num_stages=stages, num_warps=warps)
