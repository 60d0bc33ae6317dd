"""GPU check: what the CPU tests cannot see, asserted. Prints a PASS/FAIL table and exits 1 on any mismatch.

    torchrun --nproc_per_node 2 bench/gpu_check.py [--out DIR]   # every check
    python bench/gpu_check.py [--out DIR]                          # one GPU: the EP=2 checks are SKIP

Checks (model: 2 layers, hidden 512, 8 experts, random weights, written by transformers):
  bf16_vs_transformers   epkit bf16 logits vs transformers fp32 on the same checkpoint
  triton_kernels         the small-M Triton kernels at their GPU tile sizes (and every few-pairs down-projection
                         configuration set-up may choose), through LocalDispatch (fused, as decoding runs them)
                         and Experts.forward (experts_small_m), vs the loop reference in fp32: the Mixtral-8x7B
                         shape and shapes that are not tile multiples, 1..256 routed pairs, pairs owned by
                         another rank, local slots permuted; bf16 and fp32 weights
  prefill_kernels        the prefill MoE's swiglu and combine kernels at the Mixtral-8x7B shape vs torch's ops
                         (bf16 bits, fp32 sums) and a grouped-GEMM MoE layer with them vs with moe.FUSED_KERNELS
                         off (torch ops); times each kernel beside the ops it replaces
  train_kernels          the same kernels' training forms (moe_kernels.swiglu_autograd, combine_autograd) at the
                         Mixtral-8x7B shape: their gradients vs torch autograd's through the ops they replace, and a
                         grouped-GEMM MoE layer's gradients with the fused kernels vs without; times forward +
                         backward of each beside torch's
  sampling_cuda          the sampler's CUDA copies and draws against its CPU path: the same tokens
  host_transfers         to_device and HostCopy never wait for queued GPU work, HostCopy.get waits for its own copy
                         only, and both carry int64 values exactly (timed against torch.cuda._sleep kernels)
  cuda_graph_decode      every decode step the engine replays from a real torch.cuda.CUDAGraph is also run
                         eagerly on the same inputs just before (same KV cache, same tokens): logits compared
  ep2_nccl               EP=2 over NCCL, replicated and all_to_all dispatch and the expert-rows split, vs EP=1,
                         bf16 logits
  symm_mem_all_reduce    the inference EP sum through symmetric memory vs NCCL: bit-equal, eager, in a CUDA graph
                         and as the model's sum; microseconds per sum of each
  cuda_graph_decode_ep2  cuda_graph_decode at EP=2 (the graphs hold the EP sums: symmetric memory by default)

Logits are compared with `compare`: max |diff| within a tolerance (the report also counts top-1 changes on
rows whose reference top-2 gap is wider than twice the tolerance).
A check that raises is a FAIL with its error. The CPU parts (this module's functions without a GPU,
`summarize`) import without CUDA; tests/test_bench_gpu_check.py runs them.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
import traceback
from dataclasses import dataclass, field

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run from a checkout

# max |logit diff| allowed (measured on H200: 0.12 bf16 vs fp32, 0.03 all_to_all vs one GPU)
TOL_BF16_VS_FP32 = 0.25
TOL_BF16_SAME_MATH = 0.1
# kernel outputs vs the fp32 loop, relative to max |reference| (tl.dot rounds fp32 inputs to tf32)
TOL_KERNEL = {torch.bfloat16: 2e-2, torch.float32: 5e-3}


def progress(msg: str) -> None:
    """A line per check and case, so a slow or stuck run shows where it is."""
    rank = os.environ.get("RANK", "0")
    print(f"[gpu_check rank {rank} {time.strftime('%H:%M:%S')}] {msg}", flush=True)


@dataclass
class Result:
    name: str
    status: str  # PASS, FAIL, SKIP
    detail: str = ""
    data: dict = field(default_factory=dict)


def compare(ours: torch.Tensor, ref: torch.Tensor, tol: float) -> tuple[bool, str, dict]:
    """Logits [..., V]: max |diff| <= tol. (Within tol, top-1 can only change where ref's top-2 gap is at
    most 2 * tol; the report counts changes on rows with a wider gap, which a failure then explains.)"""
    ours, ref = ours.float().reshape(-1, ref.shape[-1]), ref.float().reshape(-1, ref.shape[-1])
    diff = float((ours - ref).abs().max())
    top2 = ref.topk(2, dim=-1).values
    clear = (top2[:, 0] - top2[:, 1]) > 2 * tol
    flips = int((ours.argmax(-1) != ref.argmax(-1))[clear].sum())
    data = {"max_abs": diff, "tol": tol, "rows": ref.shape[0], "clear_rows": int(clear.sum()), "top1_flips": flips}
    return diff <= tol, f"max|diff| {diff:.3g} (tol {tol}), top-1 changed on {flips} clear rows", data


def summarize(results: list[Result], out=sys.stdout) -> int:
    """Print the table; 1 if any check failed, else 0."""
    width = max([len(r.name) for r in results] + [5])
    print(f"{'check':{width}s}  status  detail", file=out)
    for r in results:
        print(f"{r.name:{width}s}  {r.status:6s}  {r.detail}", file=out)
    failed = [r.name for r in results if r.status == "FAIL"]
    print(f"gpu_check: {'FAIL (' + ', '.join(failed) + ')' if failed else 'PASS'}", file=out)
    return 1 if failed else 0


# ---- the checks -------------------------------------------------------------------------------------

def small_args():
    from epkit import ModelArgs
    return ModelArgs(vocab_size=1024, hidden_size=512, intermediate_size=1024, num_layers=2, num_heads=8,
                     num_kv_heads=4, num_experts=8, experts_per_token=2)


def write_checkpoint(path: str) -> None:
    """transformers' Mixtral with random weights (router widened so top-2 choices are clear)."""
    from transformers import MixtralConfig, MixtralForCausalLM
    torch.manual_seed(0)
    cfg = MixtralConfig(**{k: v for k, v in small_args().to_hf_config().items() if k != "architectures"})
    hf = MixtralForCausalLM(cfg)
    with torch.no_grad():
        for layer in hf.model.layers:
            layer.mlp.gate.weight.normal_(0, 0.5)
    hf.save_pretrained(path)


def tokens_for(device, rows=4, length=64):
    return torch.randint(0, 1024, (rows, length), generator=torch.Generator().manual_seed(1)).to(device)


@torch.no_grad()
def check_bf16_vs_transformers(path: str, device, dtype=torch.bfloat16, tol: float = TOL_BF16_VS_FP32) -> Result:
    import epkit
    from transformers import MixtralForCausalLM
    tokens = tokens_for(device)
    hf = MixtralForCausalLM.from_pretrained(path, dtype=torch.float32).to(device).eval()
    ref = hf(tokens).logits
    del hf
    ours = epkit.load_pretrained(path, device=device, dtype=dtype).eval()(tokens)[0]
    ok, detail, data = compare(ours, ref, tol)
    return Result("bf16_vs_transformers", "PASS" if ok else "FAIL", detail, data)


KERNEL_CASES = [  # (local experts, D, I, tokens, top-k): Mixtral-8x7B; not tile multiples; many pairs
    (8, 4096, 14336, 1, 2), (8, 4096, 14336, 16, 2), (4, 4096, 14336, 128, 2),
    (3, 96, 200, 5, 2), (3, 96, 200, 40, 2), (5, 520, 1000, 128, 2), (8, 64, 128, 1, 2)]


@torch.no_grad()
def check_triton_kernels(device, cases=KERNEL_CASES, dtypes=(torch.bfloat16, torch.float32)) -> Result:
    """Both small-M entry points - `LocalDispatch` (the fused permute/experts/combine decoding runs) and
    `Experts.forward` with rows (`experts_small_m`) - against the fp32 loop, with every down-projection launch
    configuration `decode.tune_expert_tiles` may pick for few pairs. Half of the global experts live
    "elsewhere" (slot -1) and the local slots are a permutation, as under expert parallelism."""
    from epkit import moe_kernels
    from epkit.moe import Experts, LocalDispatch, permute, unpermute
    worst, data = 0.0, []
    for dtype in dtypes:
        for L, D, I, N, K in cases:
            if dtype == torch.float32 and D * I > 1 << 22:
                continue  # fp32 at the 8x7B shape adds nothing but memory
            progress(f"triton_kernels {dtype} L={L} D={D} I={I} pairs={N * K}")
            g = torch.Generator(device=device).manual_seed(L * 1000 + N)
            ex = Experts(L, D, I, device=device, dtype=dtype)
            ex.w13.normal_(0, D ** -0.5, generator=g)
            ex.w2.normal_(0, I ** -0.5, generator=g)
            x = torch.randn(N, D, device=device, generator=g).to(dtype)
            weights = torch.rand(N, K, device=device, generator=g)
            slots = [L - 1 - e for e in range(L)] + [-1] * L  # global expert e -> local slot (-1: another rank)
            ids = torch.randint(0, 2 * L, (N, K), device=device, generator=g)
            if ex.backend.kernel(N * K, False) != "small_m":
                return Result("triton_kernels", "FAIL", f"the small-M Triton path is not taken for {N * K} pairs "
                                                        f"({ex.backend}, {dtype}; triton installed?)")
            ref32 = Experts(L, D, I, device=device, dtype=torch.float32)
            ref32.w13.copy_(ex.w13.float())
            ref32.w2.copy_(ex.w2.float())
            ref32.impl = "loop"
            dispatch = LocalDispatch(slots)
            ref = dispatch.partial(ref32, x.float(), weights, ids)
            slot = torch.tensor(slots, device=device)[ids]
            key = torch.where(slot < 0, L, slot)
            order, counts = permute(key, L + 1)
            tiles_key = (ex.w2.device, tuple(ex.w2.shape))
            configs = moe_kernels.FEW_PAIRS_DOWN if N * K <= moe_kernels.FEW_PAIRS else [None]
            for cfg in configs:
                if cfg is not None:
                    moe_kernels.few_pairs_down[tiles_key] = cfg
                fused = dispatch.partial(ex, x, weights, ids)
                sorted_out = ex(x, counts[:L], rows=order // K)
                unfused = unpermute(sorted_out.float(), order, weights, keep=key.reshape(-1)[order] < L)
                scale = max(float(ref.abs().max()), 1e-6)
                for path, got in (("fused", fused), ("experts_small_m", unfused)):
                    rel = float((got.float() - ref).abs().max()) / scale
                    worst = max(worst, rel / TOL_KERNEL[dtype])
                    data.append({"path": path, "dtype": str(dtype), "L": L, "D": D, "I": I, "pairs": N * K,
                                 "down_config": cfg, "rel_max_abs": rel})
            moe_kernels.few_pairs_down.pop(tiles_key, None)
            del ex, ref32
    ok = worst <= 1.0
    return Result("triton_kernels", "PASS" if ok else "FAIL",
                  f"{len(data)} cases, worst {worst:.2f} x tolerance", {"cases": data})


def check_cuda_graph_decode(path: str, device, ep: int = 1, name: str = "cuda_graph_decode") -> Result:
    """Teacher-forced: each graph replay is preceded by the eager forward of the same step, which writes the
    same keys into the same cache slots, so both see identical inputs and cache."""
    from epkit.infer import LLM, SamplingParams
    llm = LLM(path, ep=ep, device=device, dtype=torch.bfloat16, cuda_graphs=True, block_size=16,
              kv_cache_memory=256 << 20)
    graphs = llm.runner.graphs
    if graphs is None:
        return Result(name, "FAIL", "the engine built no CUDA graphs")
    pairs, replay = [], graphs.run

    def run(tokens, positions, table, with_logits, **buckets):
        rows = torch.arange(tokens.shape[0], device=tokens.device) if with_logits else tokens.new_zeros(0)
        eager = llm.runner._forward(tokens, positions, table, rows)
        out = replay(tokens, positions, table, with_logits, **buckets)
        if with_logits:
            pairs.append((out.float().cpu(), eager.float().cpu()))
        return out
    graphs.run = run
    g = torch.Generator().manual_seed(5)
    prompts = [torch.randint(3, 1024, (n,), generator=g).tolist() for n in (5, 17, 33, 9, 64, 3, 21)]
    # requests end at different steps, so the batch shrinks through several row buckets
    outs = llm.generate(prompts, [SamplingParams(temperature=0, max_tokens=n, ignore_eos=True)
                                  for n in (24, 6, 16, 24, 3, 12, 20)])
    if not llm.is_leader:
        return Result(name, "PASS", "follower")
    if not pairs or len(graphs.graphs) < 2:
        return Result(name, "FAIL", f"{len(pairs)} graph replays over {len(graphs.graphs)} buckets: the check "
                                    f"did not exercise the graph path")
    ok, detail, data = compare(torch.cat([p for p, _ in pairs]), torch.cat([e for _, e in pairs]), TOL_BF16_SAME_MATH)
    data.update(replays=len(pairs), buckets=sorted(str(k) for k in graphs.graphs),
                tokens=[len(o.token_ids) for o in outs], ep_all_reduce=llm.ep_all_reduce)
    return Result(name, "PASS" if ok else "FAIL", f"{len(pairs)} replays, {len(graphs.graphs)} graphs "
                                                  f"(EP sum: {llm.ep_all_reduce}): {detail}", data)


def _gpu_ms(fn, iters: int = 10) -> float:
    """Milliseconds per call of fn, by CUDA events (by the host clock without CUDA: the CPU smoke test)."""
    fn()
    if not torch.cuda.is_available():
        t0 = time.perf_counter()
        fn()
        return (time.perf_counter() - t0) * 1e3
    a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    a.record()
    for _ in range(iters):
        fn()
    b.record()
    b.synchronize()
    return a.elapsed_time(b) / iters


def _quarter_layer(device, g: torch.Generator, tokens: int, hidden: int, intermediate: int):
    """8 bf16 experts of a quarter of the given shape (normal(0, 0.02) weights), `tokens` inputs, their top-2
    weights and ids: (experts, x, weights, ids)."""
    from epkit.moe import Experts
    bf16 = dict(device=device, dtype=torch.bfloat16)
    ex = Experts(8, hidden // 4, intermediate // 4, **bf16)
    torch.nn.init.normal_(ex.w13, std=0.02)
    torch.nn.init.normal_(ex.w2, std=0.02)
    x = torch.randn(tokens, hidden // 4, generator=g, **bf16)
    w = torch.rand(tokens, 2, generator=g, device=device)
    return ex, x, w, torch.randint(0, 8, (tokens, 2), generator=g, device=device)


@torch.no_grad()
def check_prefill_kernels(device, tokens: int = 4096, hidden: int = 4096, intermediate: int = 14336) -> Result:
    """`moe_kernels.swiglu` and `moe_kernels.combine` at a prefill of `tokens` tokens (top-2) against the torch
    ops they replace: swiglu's bf16 output equal to torch's but where the exponential's last fp32 bit tips a
    rounding (at most 1 in 1000 elements, each within about one bf16 step); combine within fp32 rounding of unpermute,
    with dropped rows holding NaN. Then a whole LocalDispatch layer through the grouped GEMM under no_grad
    (these kernels) against the same layer with moe.FUSED_KERNELS off (torch's ops)."""
    import torch.nn.functional as F

    from epkit import moe as moe_lib
    from epkit import moe_kernels
    from epkit.moe import LocalDispatch, permute, unpermute
    g = torch.Generator(device=device).manual_seed(0)
    bf16 = dict(device=device, dtype=torch.bfloat16)
    M, I, D = 2 * tokens, intermediate, hidden
    h13 = torch.randn(M, 2 * I, generator=g, **bf16) * 3
    want = F.silu(h13[:, :I]) * h13[:, I:]
    got = moe_kernels.swiglu(h13)
    differ = (got != want).float().mean().item()
    step = ((got.float() - want.float()).abs() / want.float().abs().clamp(min=1e-30)).max().item()
    swiglu_ok = differ <= 1e-3 and step <= 2 ** -6  # a tipped silu moves the product by about one bf16 step
    t_swiglu = (_gpu_ms(lambda: moe_kernels.swiglu(h13)), _gpu_ms(lambda: F.silu(h13[:, :I]) * h13[:, I:]))
    del h13, want, got
    out = torch.randn(M, D, generator=g, **bf16)
    weights = torch.rand(tokens, 2, generator=g, device=device)
    key = torch.randint(0, 9, (tokens, 2), generator=g, device=device)  # 8: another rank's expert
    order, _ = permute(key, 9)
    keep = key.reshape(-1)[order] < 8
    want = unpermute(out, order, weights, keep)
    dropped = torch.where(keep[:, None], out, float("nan"))
    got = moe_kernels.combine(dropped, order, weights, keep)
    comb_err = ((got - want).abs().max() / want.abs().max()).item()
    t_combine = (_gpu_ms(lambda: moe_kernels.combine(out, order, weights)),
                 _gpu_ms(lambda: unpermute(out, order, weights)))
    del out, dropped, got, want
    ex, x, w, ids = _quarter_layer(device, g, tokens, D, I)
    assert ex.backend.kernel(2 * tokens, False) == "grouped", ex.backend
    fast = LocalDispatch().partial(ex, x, w, ids)
    moe_lib.FUSED_KERNELS = False
    try:
        slow = LocalDispatch().partial(ex, x, w, ids)
    finally:
        moe_lib.FUSED_KERNELS = True
    layer_err = ((fast - slow).abs().max() / slow.abs().max()).item()
    ok = swiglu_ok and comb_err <= 1e-6 and layer_err <= 1e-2
    data = {"swiglu_differ": differ, "swiglu_max_rel": step, "combine_rel_err": comb_err, "layer_rel_err": layer_err,
            "swiglu_ms": round(t_swiglu[0], 3), "silu_mul_ms": round(t_swiglu[1], 3),
            "combine_ms": round(t_combine[0], 3), "unpermute_ms": round(t_combine[1], 3), "tokens": tokens}
    return Result("prefill_kernels", "PASS" if ok else "FAIL",
                  f"swiglu: {differ:.1e} of elements differ (max {step:.4f} rel), {t_swiglu[0]:.2f} vs "
                  f"{t_swiglu[1]:.2f} ms; combine: {comb_err:.1e} rel, {t_combine[0]:.2f} vs {t_combine[1]:.2f} ms; "
                  f"layer {layer_err:.1e} rel ({tokens} tokens)", data)


def check_train_kernels(device, tokens: int = 4096, hidden: int = 4096, intermediate: int = 14336) -> Result:
    """Training's fused SwiGLU and combine against torch autograd through the ops they replace, at `tokens`
    tokens (top-2): the SwiGLU gradient's bf16 bits equal but where the exponential's last fp32 bit tips a
    rounding (at most 1 in 1000 elements, each within about one bf16 step); combine's gradient for the expert
    rows bit-equal (the same fp32 product, rounded once) and for the weights within fp32 summation order
    (rows another rank computes hold NaN and get zero); then a grouped-GEMM LocalDispatch layer's input, weight
    and router-weight gradients with moe.FUSED_KERNELS on vs off."""
    import torch.nn.functional as F

    from epkit import moe as moe_lib
    from epkit import moe_kernels
    from epkit.moe import LocalDispatch, permute, unpermute
    g = torch.Generator(device=device).manual_seed(1)
    bf16 = dict(device=device, dtype=torch.bfloat16)
    M, I, D = 2 * tokens, intermediate, hidden
    h13 = (torch.randn(M, 2 * I, generator=g, **bf16) * 3).requires_grad_()
    gout = torch.randn(M, I, generator=g, **bf16)

    def torch_swiglu():
        return torch.autograd.grad(F.silu(h13[:, :I]) * h13[:, I:], h13, gout)[0]

    def fused_swiglu():
        return torch.autograd.grad(moe_kernels.swiglu_autograd(h13), h13, gout)[0]
    want, got = torch_swiglu(), fused_swiglu()
    differ = (got != want).float().mean().item()
    step = ((got.float() - want.float()).abs() / want.float().abs().clamp(min=1e-30)).max().item()
    swiglu_ok = differ <= 1e-3 and step <= 2 ** -6
    t_swiglu = (_gpu_ms(fused_swiglu), _gpu_ms(torch_swiglu))
    del h13, gout, want, got
    out = torch.randn(M, D, generator=g, **bf16)
    weights = torch.rand(tokens, 2, generator=g, device=device)
    key = torch.randint(0, 9, (tokens, 2), generator=g, device=device)  # 8: another rank's expert
    order, _ = permute(key, 9)
    keep = key.reshape(-1)[order] < 8
    gy = torch.randn(tokens, D, generator=g, device=device)

    def grads(fn, rows):
        o, w = rows.clone().requires_grad_(), weights.clone().requires_grad_()
        return torch.autograd.grad(fn(o, order, w, keep), (o, w), gy)
    want = grads(unpermute, out)
    got = grads(moe_kernels.combine_autograd, torch.where(keep[:, None], out, float("nan")))
    dout_equal = torch.equal(got[0], want[0])
    dw_err = ((got[1] - want[1]).abs().max() / want[1].abs().max()).item()
    t_combine = (_gpu_ms(lambda: grads(moe_kernels.combine_autograd, out)), _gpu_ms(lambda: grads(unpermute, out)))
    del out, gy, got, want
    ex, x, w, ids = _quarter_layer(device, g, tokens, D, I)
    assert ex.backend.kernel(2 * tokens, True) == "grouped", ex.backend

    def layer_grads():
        xi, wi = x.clone().requires_grad_(), w.clone().requires_grad_()
        y = LocalDispatch().partial(ex, xi, wi, ids)
        return torch.autograd.grad(y, (xi, wi, ex.w13, ex.w2), torch.ones_like(y))
    fused = layer_grads()
    moe_lib.FUSED_KERNELS = False
    try:
        plain = layer_grads()
    finally:
        moe_lib.FUSED_KERNELS = True
    layer_err = max(((a.float() - b.float()).abs().max() / b.float().abs().max()).item() for a, b in zip(fused, plain))
    ok = swiglu_ok and dout_equal and dw_err <= 1e-5 and layer_err <= 1e-2
    data = {"swiglu_grad_differ": differ, "swiglu_grad_max_rel": step, "combine_dout_bit_equal": dout_equal,
            "combine_dweights_rel_err": dw_err, "layer_grad_rel_err": layer_err,
            "swiglu_fwd_bwd_ms": round(t_swiglu[0], 3), "silu_mul_fwd_bwd_ms": round(t_swiglu[1], 3),
            "combine_fwd_bwd_ms": round(t_combine[0], 3), "unpermute_fwd_bwd_ms": round(t_combine[1], 3),
            "tokens": tokens}
    return Result("train_kernels", "PASS" if ok else "FAIL",
                  f"swiglu grad: {differ:.1e} of elements differ (max {step:.4f} rel), {t_swiglu[0]:.2f} vs "
                  f"{t_swiglu[1]:.2f} ms; combine grads: rows {'bit-equal' if dout_equal else 'DIFFER'}, weights "
                  f"{dw_err:.1e} rel, {t_combine[0]:.2f} vs {t_combine[1]:.2f} ms; layer grads {layer_err:.1e} rel "
                  f"({tokens} tokens)", data)


@torch.no_grad()
def check_sampling_cuda(device) -> Result:
    """The sampler's CUDA branches (pinned, asynchronous copies; `HostCopy`'s event) against its CPU path: the
    noise is a counter hash, so the same logits, seeds and counters draw the same tokens on either device."""
    from epkit.infer.sampling import HostCopy, SamplingBatch, sample, to_device
    g = torch.Generator().manual_seed(3)
    R, V = 64, 1024
    logits = torch.randn(R, V, generator=g) * 3
    temps = [0.0, 0.5, 1.0, 2.0] * (R // 4)
    batch = SamplingBatch(temps, [V if i % 3 else 20 for i in range(R)], [1.0 if i % 5 else 0.8 for i in range(R)],
                          list(range(1000, 1000 + R)), [i % 7 for i in range(R)])
    cpu = sample(logits, batch)
    gpu = sample(logits.to(device), batch)
    copied = HostCopy(gpu).get()
    moved = to_device(list(range(R)), torch.int64, device)
    ok = (gpu.device.type == "cuda" and copied == cpu.tolist() and moved.device.type == "cuda"
          and moved.cpu().tolist() == list(range(R)))
    differ = sum(a != b for a, b in zip(copied, cpu.tolist()))
    return Result("sampling_cuda", "PASS" if ok else "FAIL", f"{differ} of {R} rows drew differently on the GPU "
                                                             f"(temperatures 0/0.5/1/2, top-k 20, top-p 0.8)",
                  {"rows": R, "differ": differ})


def _sleep_ms(ms: float, device) -> None:
    """Queue a kernel that keeps `device` busy for about `ms` milliseconds (calibrated once)."""
    global _CYCLES_PER_MS
    if _CYCLES_PER_MS is None:
        torch.cuda._sleep(1000)  # load the kernel
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        torch.cuda._sleep(10_000_000)
        b.record()
        b.synchronize()
        _CYCLES_PER_MS = 10_000_000 / a.elapsed_time(b)
    torch.cuda._sleep(int(ms * _CYCLES_PER_MS))


_CYCLES_PER_MS = None


@torch.no_grad()
def check_host_transfers(device, busy_ms: float = 100, later_ms: float = 300) -> Result:
    """The engine's two host<->device helpers keep the host ahead of the GPU: `to_device` (pinned memory, an
    asynchronous copy) returns while the GPU is busy, `HostCopy(t)` queues its copy without waiting, and
    `HostCopy.get()` waits for that copy only, not for work queued after it. Times are host-side, against
    `torch.cuda._sleep` kernels of `busy_ms` (before) and `later_ms` (after); values are int64 beyond float32's
    range of exact integers, so a copy through another dtype shows."""
    from epkit.infer.sampling import HostCopy, to_device
    torch.cuda.set_device(device)
    values = [2**40 + 7 * i for i in range(64)]
    for _ in range(2):  # warm: the pinned-memory pool, the copy kernels, the sleep calibration
        HostCopy(to_device(values, torch.int64, device)).get()
        _sleep_ms(1, device)
    torch.cuda.synchronize(device)
    problems = []
    _sleep_ms(busy_ms, device)
    t0 = time.perf_counter()
    moved = to_device(values, torch.int64, device)
    to_device_ms = (time.perf_counter() - t0) * 1e3
    if to_device_ms > busy_ms / 4:
        problems.append(f"to_device waited {to_device_ms:.0f} ms for a {busy_ms:.0f} ms kernel")
    torch.cuda.synchronize(device)
    if moved.device != torch.device(device) or moved.dtype != torch.int64 or moved.cpu().tolist() != values:
        problems.append(f"to_device gave {moved.dtype} on {moved.device}, values equal: "
                        f"{moved.cpu().tolist() == values}")
    src = torch.tensor(values, dtype=torch.int64, device=device)
    torch.cuda.synchronize(device)
    t0 = time.perf_counter()
    _sleep_ms(busy_ms, device)
    copy = HostCopy(src)
    ctor_ms = (time.perf_counter() - t0) * 1e3
    _sleep_ms(later_ms, device)
    got = copy.get()
    get_ms = (time.perf_counter() - t0) * 1e3
    torch.cuda.synchronize(device)
    if ctor_ms > busy_ms / 4:
        problems.append(f"HostCopy() waited {ctor_ms:.0f} ms for a {busy_ms:.0f} ms kernel")
    if get_ms > busy_ms + later_ms / 2:
        problems.append(f"HostCopy.get() took {get_ms:.0f} ms: it waited for the {later_ms:.0f} ms kernel queued "
                        f"after its copy")
    if got != values or not all(type(v) is int for v in got):
        problems.append("HostCopy.get() returned other values")
    data = {"to_device_ms": round(to_device_ms, 2), "host_copy_ms": round(ctor_ms, 2), "get_ms": round(get_ms, 1),
            "busy_ms": busy_ms, "later_ms": later_ms}
    detail = "; ".join(problems) or (f"to_device {to_device_ms:.2f} ms and HostCopy() {ctor_ms:.2f} ms behind a "
                                     f"{busy_ms:.0f} ms kernel; get() after {get_ms:.0f} ms (its copy, not the "
                                     f"{later_ms:.0f} ms kernel after it)")
    return Result("host_transfers", "FAIL" if problems else "PASS", detail, data)


@torch.no_grad()
def check_ep2_nccl(path: str, device, rank: int) -> Result:
    import epkit
    from epkit.parallel import set_dispatch
    tokens = tokens_for(device)
    single = epkit.load_pretrained(path, device=device, dtype=torch.bfloat16).eval()(tokens)[0]
    ep = epkit.load_pretrained(path, device=device, dtype=torch.bfloat16, ep_size=2, dispatch="replicated").eval()
    rep = ep(tokens)[0]
    set_dispatch(ep, "all_to_all")
    mine = torch.tensor_split(torch.arange(tokens.shape[0]), 2)[rank]
    a2a = ep(tokens[mine])[0]
    del ep
    rows = epkit.load_pretrained(path, device=device, dtype=torch.bfloat16, ep_size=2, split="rows").eval()(tokens)[0]
    ok_r, det_r, data_r = compare(rep, single, TOL_BF16_SAME_MATH)
    ok_a, det_a, data_a = compare(a2a, single[mine], TOL_BF16_SAME_MATH)
    ok_w, det_w, data_w = compare(rows, single, TOL_BF16_SAME_MATH)
    return Result("ep2_nccl", "PASS" if ok_r and ok_a and ok_w else "FAIL",
                  f"replicated {det_r}; all_to_all {det_a}; expert rows {det_w}",
                  {"replicated": data_r, "all_to_all": data_a, "rows": data_w})


@torch.no_grad()
def check_symm_mem(path: str, device, rank: int) -> Result:
    """The inference-time EP sum through symmetric memory (symm_sum.SymmMemAllReduce) against NCCL's: bit-equal
    (two fp32 addends sum the same in any order), eagerly, inside a CUDA graph, and as the replicated model's
    sum; timed against NCCL at decode sizes."""
    import epkit
    import torch.distributed as dist
    from epkit.parallel import set_dispatch, setup_expert_parallel
    from epkit.symm_sum import SymmMemAllReduce, set_ep_all_reduce
    group = setup_expert_parallel(2).ep_group
    fast = SymmMemAllReduce(group, device, 8 << 20)
    worst, timings = 0.0, {}
    for n in (4096, 16 * 4096, 64 * 4096, 2 * 1024 * 1024):
        g = torch.Generator(device=device).manual_seed(n + rank)
        x = torch.randn(n, device=device, generator=g)
        ref = x.clone()
        dist.all_reduce(ref, group=group)
        worst = max(worst, float((fast(x) - ref).abs().max()))
        # in a CUDA graph: capture on a side stream, replay with new inputs
        static = x.clone()
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            fast(static)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            out = fast(static)
        static.copy_(x * 3)
        graph.replay()
        ref3 = x * 3
        dist.all_reduce(ref3, group=group)
        worst = max(worst, float((out - ref3).abs().max()))
        times = {}
        for name, fn in (("symm_mem", lambda: fast(x)), ("nccl", lambda: dist.all_reduce(x.clone(), group=group))):
            for _ in range(5):
                fn()
            torch.cuda.synchronize()
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            for _ in range(50):
                fn()
            end.record()
            torch.cuda.synchronize()
            times[name] = round(start.elapsed_time(end) / 50 * 1000, 1)
        timings[f"{n * 4 // 1024} KiB"] = times
    tokens = tokens_for(device)
    ep = epkit.load_pretrained(path, device=device, dtype=torch.bfloat16, ep_size=2, dispatch="replicated").eval()
    set_dispatch(ep, "replicated")
    nccl_logits = ep(tokens)[0]
    assert set_ep_all_reduce(ep, "symm_mem") == "symm_mem"
    symm_logits = ep(tokens)[0]
    model_diff = float((symm_logits.float() - nccl_logits.float()).abs().max())
    ok = worst == 0.0 and model_diff == 0.0
    return Result("symm_mem_all_reduce", "PASS" if ok else "FAIL",
                  f"max|symm - nccl| {worst:.3g} (sums, eager and graph), {model_diff:.3g} (model logits); "
                  f"us per sum {timings}", {"max_abs": worst, "model_max_abs": model_diff, "us": timings})


def _guarded(name: str, fn, *args, stall_s: float = 90, **kw) -> Result:
    import faulthandler
    progress(f"{name} ...")
    faulthandler.dump_traceback_later(stall_s, repeat=True)  # a stuck check prints where it is, every stall_s
    try:
        return fn(*args, **kw)
    except Exception as e:  # a crash is a failed check, reported with the others
        traceback.print_exc()
        return Result(name, "FAIL", f"{type(e).__name__}: {e}")
    finally:
        faulthandler.cancel_dump_traceback_later()
        import gc
        gc.collect()  # engines hold graphs and KV caches in reference cycles: free them before the next check
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="bench/results", help="directory for gpu_check.json")
    a = p.parse_args(argv)
    if not torch.cuda.is_available():
        print("gpu_check needs a CUDA GPU (the CPU tests cover the rest)", file=sys.stderr)
        return 2
    import torch.distributed as dist

    from epkit.parallel import broadcast_object, init_distributed, world_rank
    t0 = time.time()
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    dev = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    torch.cuda.set_device(dev)
    # Every rank writes the same checkpoint (same seed) to its own directory and runs the one-GPU checks on its
    # own GPU before joining the world: nothing there can wait on a collective only one rank entered.
    path = f"/tmp/epkit_gpu_check_{os.environ.get('TORCHELASTIC_RUN_ID', 'solo')}_{os.getpid()}_rank{rank}"
    write_checkpoint(path)
    results = [_guarded("bf16_vs_transformers", check_bf16_vs_transformers, path, dev),
               _guarded("triton_kernels", check_triton_kernels, dev),
               _guarded("prefill_kernels", check_prefill_kernels, dev),
               _guarded("train_kernels", check_train_kernels, dev),
               _guarded("sampling_cuda", check_sampling_cuda, dev),
               _guarded("host_transfers", check_host_transfers, dev),
               _guarded("cuda_graph_decode", check_cuda_graph_decode, path, dev)]
    if world > 1:
        init_distributed()
        assert world_rank() == rank
        dist.barrier()
    if world == 2:
        ep2 = _guarded("ep2_nccl", check_ep2_nccl, path, dev, rank)
        symm = _guarded("symm_mem_all_reduce", check_symm_mem, path, dev, rank)
        graphs2 = _guarded("cuda_graph_decode_ep2", check_cuda_graph_decode, path, dev, 2, "cuda_graph_decode_ep2")
        results += [ep2, symm, graphs2]
    else:
        results += [Result(n, "SKIP", f"needs exactly 2 ranks (torchrun --nproc_per_node 2), have {world}")
                    for n in ("ep2_nccl", "symm_mem_all_reduce", "cuda_graph_decode_ep2")]
    if world > 1:  # a follower's failure must reach the table
        theirs = [None] * world
        dist.all_gather_object(theirs, results)  # NOTE: collective
        results = theirs[0] + [Result(f"{r.name}[rank{i}]", r.status, r.detail, r.data)
                               for i, rs in enumerate(theirs[1:], 1) for r in rs if r.status == "FAIL"]
    code = 0
    if rank == 0:
        code = summarize(results)
        os.makedirs(a.out, exist_ok=True)
        report = {"gpu": torch.cuda.get_device_name(dev), "torch": torch.__version__, "world": world,
                  "seconds": round(time.time() - t0, 1),
                  "results": [{"name": r.name, "status": r.status, "detail": r.detail, **r.data} for r in results]}
        with open(os.path.join(a.out, "gpu_check.json"), "w") as f:
            json.dump(report, f, indent=1)
    if world > 1:
        code = broadcast_object(code)
        dist.barrier()
        dist.destroy_process_group()
    return code


if __name__ == "__main__":
    sys.exit(main())
