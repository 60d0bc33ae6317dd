"""Where a decode step's time goes: epkit's engine at EP=N, every decode-kernel set, one run.

    torchrun --nproc_per_node 2 bench/profile_decode.py            # Mixtral-8x7B shape, random bf16, EP=2
    python bench/profile_decode.py --preset tiny                    # CPU check (what the test runs)

Per kernel set (`--variants`, default reference,triton,triton-serial,compile,torch: see
epkit/infer/decode.py; `triton-serial` is the triton set with the engine's host overlap off) and per
batch size B (`--batch-sizes`, default 1,16,64,256): B random prompts of `--prompt-len` tokens are
prefilled, then the engine decodes in steady state (CUDA graphs on). It reports
  ms_per_step     wall time of `--steps` decode steps / steps (host overlap included, as served)
  kernels         a torch.profiler window of `--profile-steps` steps on rank 0: device kernels per step,
                  device ms per step, and the top 15 kernels by device time (on CPU: top ops by CPU time)
  first_decode_top1_agree, first_decode_logprob_max_diff, greedy_16_tokens_match: 16 requests' first
                  decode step (same input in every variant) and greedy tokens against the reference set
  floor_ms        weight + KV bytes this rank must read per step (experts by uniform routing, busiest
                  rank) over the measured copy bandwidth
After the variants, on a GPU, rank 0 also checks each Triton kernel against its torch reference at the
full shape in bf16 (`kernel_checks`), times one rank's MoE share fused against the plain
permute/experts/unpermute (`moe_fused_vs_plain`) and the small-batch expert kernels per
down-projection tile (`moe_tiles`). The JSON is rewritten after each variant and each check.
A variant that fails is recorded under `errors` and the others still run.
Writes bench/results/profile_decode-<gpu>-<time>.json and prints tables.
"""
from __future__ import annotations

import argparse
import datetime
import gc
import json
import os
import sys
import time
import traceback

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run from a checkout

from bench.generate import RESULTS, log, make_prompts  # noqa: E402
from bench.timing import copy_bandwidth, sync, write_json  # noqa: E402
from epkit.args import ModelArgs  # noqa: E402
from epkit.infer import LLM, SamplingParams  # noqa: E402
from epkit.infer.build import random_model  # noqa: E402
from epkit.infer.kv_cache import bytes_per_block  # noqa: E402
from epkit.parallel import init_distributed, world_rank, world_size  # noqa: E402

VARIANTS = {"reference": dict(decode_kernels="reference"), "torch": dict(decode_kernels="torch"),
            "triton": dict(decode_kernels="triton"), "compile": dict(decode_kernels="compile"),
            "triton-serial": dict(decode_kernels="triton", overlap=False),
            "triton-nccl": dict(decode_kernels="triton", ep_all_reduce="nccl")}
GPU_DEFAULT = ["reference", "triton", "triton-serial", "compile", "torch"]  # most wanted first (JSON after each)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--preset", default="mixtral-8x7b")
    p.add_argument("--variants", default=None, help="comma list of " + ",".join(VARIANTS)
                   + f" (default: {','.join(GPU_DEFAULT)} on GPU, reference,torch on CPU)")
    p.add_argument("--batch-sizes", default="1,16,64,256")
    p.add_argument("--prompt-len", type=int, default=128)
    p.add_argument("--steps", type=int, default=32, help="timed decode steps per batch size")
    p.add_argument("--profile-steps", type=int, default=8)
    p.add_argument("--warmup-steps", type=int, default=4)
    p.add_argument("--block-size", type=int, default=16)
    p.add_argument("--no-cuda-graphs", action="store_true")
    p.add_argument("--out", default=None, help="JSON path (default: bench/results/profile_decode-<gpu>-<time>.json)")
    p.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    a.batch_sizes = [int(b) for b in a.batch_sizes.split(",")]
    cuda = torch.cuda.is_available()
    a.variants = a.variants.split(",") if a.variants else (GPU_DEFAULT if cuda else ["reference", "torch"])
    bad = [v for v in a.variants if v not in VARIANTS]
    if bad or min(a.batch_sizes) < 1 or a.steps < 1 or a.profile_steps < 1:
        p.error(f"variants {bad} unknown (known: {', '.join(VARIANTS)}), or a batch size / step count below 1")
    return a


# ---- one variant ----------------------------------------------------------------------------------

def run_variant(model, margs, a, device, dtype, engine: dict) -> dict:
    """Every batch size through one engine; rank 0 returns the figures, the others follow."""
    B_max = max(a.batch_sizes)
    chunk = max(2048, min(8192, B_max * a.prompt_len))
    # Prompts are admitted over several steps, so the first requests run ahead of the last by that many
    # tokens: with this margin none finishes before the profiled window ends.
    max_tokens = 4 + a.warmup_steps + a.steps + a.profile_steps + -(-B_max * a.prompt_len // chunk)
    blocks = B_max * -(-(a.prompt_len + max_tokens + 1) // a.block_size) + 2
    llm = LLM.from_model(model, block_size=a.block_size, max_num_seqs=B_max, max_num_batched_tokens=chunk,
                         kv_cache_memory=blocks * bytes_per_block(margs, a.block_size, dtype),
                         cuda_graphs=not a.no_cuda_graphs, **engine)
    out = {"decode_kernels": llm.runner.decode_kernels, "overlap": llm.overlap, "ep_all_reduce": llm.ep_all_reduce,
           "rows": [],
           "expert_tiles": llm.runner.expert_tiles}
    try:
        if not llm.is_leader:
            # NOTE: one follow() per phase of the leader; a failure is assumed to hit every rank at the same
            # point (a kernel that does not compile); one that hits a single rank hangs until the timeout.
            for _ in a.batch_sizes:
                llm.follow()
            llm.follow()  # the correctness pass
            return out
        for B in a.batch_sizes:
            out["rows"].append(measure(llm, margs, a, B, max_tokens, device))
            llm.release_followers()
            r = out["rows"][-1]
            log(f"  B={B}: {r['ms_per_step']:.2f} ms/step, {r['tokens_per_s']:.0f} tok/s, "
                f"{r['kernels_per_step']:.0f} kernels/step, device {r['device_ms_per_step']:.2f} ms/step")
        n = min(16, B_max)
        outs = llm.generate(make_prompts(n, a.prompt_len, margs.vocab_size, 7),
                            SamplingParams(temperature=0, max_tokens=16, ignore_eos=True, logprobs=5))
        out["greedy_tokens"] = [o.token_ids for o in outs]
        # token 0 comes from the prefill (the same path in every variant), so the first decode step sees the
        # same input everywhere: its top-5 log-probabilities compare the decode paths directly
        out["first_decode_top5"] = [o.top_logprobs[1] for o in outs]
        cuda = device.type == "cuda"
        out["peak_memory_gib"] = round(torch.cuda.max_memory_allocated(device) / 2 ** 30, 2) if cuda else 0
        return out
    finally:
        del llm
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()


def measure(llm, margs, a, B: int, max_tokens: int, device) -> dict:
    """Prefill B prompts, then time and profile steady decoding (leader)."""
    params = SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True)
    ids = {llm.add_request(p, params) for p in make_prompts(B, a.prompt_len, margs.vocab_size, B)}
    started: set[str] = set()
    while started != ids:  # prefill (chunked) until every request has its first token
        started |= {o.request_id for o in llm.step() if o.token_ids}
    for _ in range(a.warmup_steps):  # captures this batch's CUDA graphs
        llm.step()
    sync(device)
    t0 = time.perf_counter()
    for _ in range(a.steps):
        llm.step()
    sync(device)
    ms = 1000 * (time.perf_counter() - t0) / a.steps
    prof = profile_steps(llm, a.profile_steps, device)
    while llm.has_unfinished():
        llm.step()
    return {"batch": B, "ms_per_step": round(ms, 3), "tokens_per_s": round(B * 1000 / ms, 1), **prof}


def profile_steps(llm, steps: int, device) -> dict:
    with step_profiler(device) as prof:
        for _ in range(steps):
            llm.step()
        sync(device)
    return summarize_profile(prof, steps, device)


def step_profiler(device):
    """A torch.profiler context recording host ops and, on CUDA, device kernels."""
    from torch.profiler import ProfilerActivity, profile
    return profile(activities=[ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else []))


def summarize_profile(prof, steps: int, device) -> dict:
    """Device kernels (CPU aten ops without CUDA) per step from a finished `step_profiler`: count, total time,
    CUDA graph replays and the 15 most expensive."""
    cuda = device.type == "cuda"
    rows, graph_launches = [], 0
    for e in prof.key_averages():
        if e.key == "cudaGraphLaunch":  # a replay; its kernels appear as device events of their own
            graph_launches += e.count
        dev_us = getattr(e, "self_device_time_total", None)
        if dev_us is None:
            dev_us = getattr(e, "self_cuda_time_total", 0)
        on_device = cuda and dev_us > 0 and str(getattr(e, "device_type", "")).endswith("CUDA")
        if cuda and not on_device:
            continue
        if not cuda and not e.key.startswith("aten::"):
            continue
        us = dev_us if cuda else e.self_cpu_time_total
        rows.append({"name": e.key[:120], "ms_per_step": round(us / 1000 / steps, 4),
                     "calls_per_step": round(e.count / steps, 2)})
    rows.sort(key=lambda r: -r["ms_per_step"])
    return {"kernels_per_step": round(sum(r["calls_per_step"] for r in rows), 1),
            "device_ms_per_step": round(sum(r["ms_per_step"] for r in rows), 3),
            "graph_launches_per_step": round(graph_launches / steps, 2),
            "profiled": "device kernels" if cuda else "CPU aten ops", "top": rows[:15]}


# ---- floors, kernel checks, expert tiles (rank 0, GPU) ----------------------------------------------

def floor_ms(margs: ModelArgs, ep: int, B: int, context: int, bandwidth: float, elt: int) -> float:
    """Bytes one rank reads per decode step at batch B: shared weights, its experts (busiest rank, uniform
    top-k routing, averaged over draws), the rows' KV."""
    D, I, L, E, K = (margs.hidden_size, margs.intermediate_size, margs.num_layers, margs.num_experts,
                     margs.experts_per_token)
    attn = D * margs.head_dim * (2 * margs.num_heads + 2 * margs.num_kv_heads)
    shared = L * (attn + E * D + 2 * D) + margs.vocab_size * D + D
    g = torch.Generator().manual_seed(0)
    draws = 64
    picks = torch.rand(draws, L, B, E, generator=g).topk(K, dim=-1).indices  # [draws, L, B, K]
    hit = torch.zeros(draws, L, E, dtype=torch.bool).scatter_(2, picks.reshape(draws, L, -1), True)
    per_rank = hit.view(draws, L, ep, -1).sum(-1).amax(-1) if E % ep == 0 else hit.sum(-1)  # [draws, L]
    experts = per_rank.float().mean(0).sum().item() * 3 * D * I
    kv = B * context * 2 * L * margs.num_kv_heads * margs.head_dim
    return 1000 * (shared + experts + kv) * elt / bandwidth


def kernel_checks(device) -> dict:
    """Each Triton kernel against its torch reference at the Mixtral-8x7B shape, bf16."""
    from epkit import moe_kernels
    from epkit.kernels import attention as A, fused as F
    from epkit.model import rope_cos_sin
    from epkit.moe import Experts, LocalDispatch
    g = torch.Generator(device=device).manual_seed(0)
    bf = torch.bfloat16
    rnd = lambda *s: torch.randn(*s, generator=g, device=device).to(bf)  # noqa: E731
    out = {}
    H, G, Dh, bs = 32, 8, 128, 16
    k, v, q = rnd(4096 * bs, G, Dh), rnd(4096 * bs, G, Dh), rnd(16, H, Dh)
    table = torch.randint(1, 4096, (16, 64), generator=g, device=device)
    lens = torch.randint(1, 64 * bs, (16,), generator=g, device=device)
    for n in (1, 16):
        d = (A.paged_decode_attention(q[:n], k, v, table[:n], lens[:n], bs).float()
             - A.paged_decode_attention_torch(q[:n], k, v, table[:n], lens[:n], bs).float()).abs().max()
        out[f"attention_rows{n}_max_abs_diff"] = d.item()
    h, delta, w = rnd(64, 4096), torch.randn(64, 4096, generator=g, device=device), rnd(4096)
    (h1, x1), (h2, x2) = F.add_rms_norm(h, delta, w, 1e-5), F.add_rms_norm_torch(h, delta, w, 1e-5)
    out["add_rms_norm_sum_bit_equal"] = torch.equal(h1, h2)
    out["add_rms_norm_max_abs_diff"] = (x1.float() - x2.float()).abs().max().item()
    cos, sin = rope_cos_sin(torch.arange(4096, device=device)[None], Dh, 1e6, bf)
    qkv, pos = rnd(64, (H + 2 * G) * Dh), torch.randint(-1, 4096, (64,), generator=g, device=device)
    slots = torch.randperm(4096 * bs, generator=g, device=device)[:64]
    pools = [torch.zeros(4096 * bs, G, Dh, dtype=bf, device=device) for _ in range(4)]
    q1 = F.rope_write_kv(qkv, cos[0, 0], sin[0, 0], pos, slots, pools[0], pools[1], H, G)
    q2 = F.rope_write_kv_torch(qkv, cos[0, 0], sin[0, 0], pos, slots, pools[2], pools[3], H, G)
    # Triton may round x*cos + rot(x)*sin's sum once where torch rounds it to fp32, then bf16: rare 1-ulp gaps
    out["rope_elements_differing"] = int((q1 != q2).sum() + (pools[0] != pools[2]).sum() + (pools[1] != pools[3]).sum())
    out["rope_max_abs_diff"] = max((q1.float() - q2.float()).abs().max().item(),
                                   (pools[0].float() - pools[2].float()).abs().max().item())
    logits = rnd(256, 8)
    (w1, i1), (w2, i2) = F.route(logits, 2), F.route_torch(logits, 2)
    out["route_rows_choosing_differently"] = int((i1 != i2).any(-1).sum())  # only ties in bf16 logits may
    out["route_weights_max_abs_diff"] = (w1 - w2).abs().max().item()
    ex = Experts(4, 4096, 14336, device=device, dtype=bf)
    ex.impl = "loop"
    table = [0, 1, 2, 3, -1, -1, -1, -1]  # EP=2: experts 4..7 live on the other rank
    with torch.no_grad():
        ex.w13.normal_(0, 0.02, generator=g)
        ex.w2.normal_(0, 0.02, generator=g)
        for n in (1, 8, 100):
            x = rnd(n, 4096)
            wts = torch.rand(n, 2, generator=g, device=device)
            ids = torch.randint(0, 8, (n, 2), generator=g, device=device)
            y = moe_kernels.fused_experts_small(x, wts, torch.tensor(table, device=device)[ids], ex.w13, ex.w2)
            ref = LocalDispatch(table).partial(ex, x, wts, ids)
            out[f"fused_moe_n{n}_max_rel_diff"] = ((y - ref).abs().max() / ref.abs().max().clamp(min=1e-9)).item()
    return out


def moe_tiles(device) -> list[dict]:
    """The small-batch expert kernels (4 local experts, Mixtral shape) per few-pairs down-projection launch
    configuration (`FEW_PAIRS_DOWN` in epkit/moe_kernels.py), in a CUDA graph, with bit-equality to the first."""
    from epkit import moe_kernels as M
    from epkit.moe import Experts
    ex = Experts(4, 4096, 14336, device=device, dtype=torch.bfloat16)
    with torch.no_grad():
        ex.w13.normal_(0, 0.02)
        ex.w2.normal_(0, 0.02)
    key = (ex.w2.device, tuple(ex.w2.shape))
    saved, rows = (M.FEW_PAIRS, M.few_pairs_down.get(key)), []
    try:
        M.FEW_PAIRS = 1 << 30  # every size takes the few-pairs configuration under test
        for n in (1, 4, 16, 64):
            x = torch.randn(n, 4096, device=device, dtype=torch.bfloat16)
            wts = torch.rand(n, 2, device=device)
            sl = torch.randint(0, 4, (n, 2), device=device)
            busy, ref = len(set(sl.flatten().tolist())), None
            for cfg in M.FEW_PAIRS_DOWN:
                M.few_pairs_down[key] = cfg
                try:
                    with torch.no_grad():
                        y = M.fused_experts_small(x, wts, sl, ex.w13, ex.w2)
                        ms = graphed_ms(lambda: M.fused_experts_small(x, wts, sl, ex.w13, ex.w2), device)
                except Exception as e:  # noqa: BLE001 - a configuration this GPU cannot run
                    rows.append({"tokens": n, "down_config": list(cfg), "error": f"{type(e).__name__}: {e}"[:200]})
                    continue
                ref = y if ref is None else ref
                rows.append({"tokens": n, "experts_hit": busy, "down_config": list(cfg), "ms": round(ms, 4),
                             "GBps": round(busy * 3 * 4096 * 14336 * 2 / ms / 1e6, 1),
                             "bit_equal_to_first": bool(torch.equal(y, ref))})
    finally:
        M.FEW_PAIRS = saved[0]
        if saved[1] is None:
            M.few_pairs_down.pop(key, None)
        else:
            M.few_pairs_down[key] = saved[1]
    return rows


def moe_fused_vs_plain(device) -> list[dict]:
    """One EP=2 rank's MoE share (4 local experts of 8, Mixtral shape) in a CUDA graph: the four-kernel
    fused path against the plain permute -> Triton experts -> unpermute it replaces."""
    from epkit.moe import Experts, LocalDispatch, permute, unpermute
    ex = Experts(4, 4096, 14336, device=device, dtype=torch.bfloat16)
    with torch.no_grad():
        ex.w13.normal_(0, 0.02)
        ex.w2.normal_(0, 0.02)
    dispatch = LocalDispatch([0, 1, 2, 3, -1, -1, -1, -1])
    dispatch.slot = dispatch.slot.to(device)

    def plain(x, w, ids):
        slot = dispatch.slot[ids]
        key = torch.where(slot < 0, 4, slot)
        order, counts = permute(key, 5)
        out = ex(x, counts[:4], rows=order // 2)
        return unpermute(out, order, w, keep=key.reshape(-1)[order] < 4)

    rows = []
    for n in (1, 16, 64):
        x = torch.randn(n, 4096, device=device, dtype=torch.bfloat16)
        w = torch.rand(n, 2, device=device)
        ids = torch.randint(0, 8, (n, 2), device=device)
        with torch.no_grad():
            fused = graphed_ms(lambda: dispatch.partial(ex, x, w, ids), device)
            ref = graphed_ms(lambda: plain(x, w, ids), device)
            same = torch.equal(dispatch.partial(ex, x, w, ids), plain(x, w, ids))
        rows.append({"tokens": n, "fused_ms": round(fused, 4), "plain_ms": round(ref, 4), "bit_equal": bool(same)})
    return rows


def graphed_ms(fn, device, iters: int = 20) -> float:
    """ms per call of `fn` (free of host syncs), `iters` calls captured in one CUDA graph and replayed."""
    from epkit.infer.graphs import record
    graph, _ = record(lambda: [fn() for _ in range(iters)], device)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    graph.replay()
    start.record()
    graph.replay()
    end.record()
    torch.cuda.synchronize(device)
    return start.elapsed_time(end) / iters


# ---- main -------------------------------------------------------------------------------------------

def main(argv=None) -> int:
    a = parse_args(argv)
    init_distributed()
    ep = world_size()
    cuda = torch.cuda.is_available()
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if cuda else torch.device("cpu")
    dtype = torch.bfloat16 if cuda else torch.float32
    margs = ModelArgs.from_name(a.preset)
    t_start = time.perf_counter()
    model = random_model(margs, ep, device, dtype, seed=0, router_std=None)
    sync(device)
    log(f"built {margs.num_parameters() / 1e9:.1f}B-parameter {a.preset} at EP={ep} in "
        f"{time.perf_counter() - t_start:.0f}s; variants {a.variants}, batch sizes {a.batch_sizes}")
    result = {"benchmark": "decode step profile, epkit engine, per decode-kernel set",
              "gpu": torch.cuda.get_device_name(device) if cuda else "cpu", "num_gpus": ep if cuda else 0,
              "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
              "versions": {"torch": torch.__version__},
              "config": {"preset": a.preset, "ep": ep, "dtype": str(dtype).replace("torch.", ""),
                         "prompt_len": a.prompt_len, "steps": a.steps, "profile_steps": a.profile_steps,
                         "batch_sizes": a.batch_sizes, "block_size": a.block_size,
                         "cuda_graphs": cuda and not a.no_cuda_graphs},
              "variants": {}, "errors": {}}
    out = a.out or os.path.join(RESULTS, f"profile_decode-{_tag(result['gpu'])}x{max(ep, 1)}-"
                                         f"{time.strftime('%Y%m%d-%H%M%S')}.json")
    if world_rank() == 0:
        bw = copy_bandwidth(device, torch.uint8, (1 << 30) if cuda else (1 << 24)) * 1e9  # bytes/s
        context = a.prompt_len + a.warmup_steps + a.steps
        result["copy_bandwidth_GBps"] = round(bw / 1e9, 1)
        result["floor_ms"] = {B: round(floor_ms(margs, ep, B, context, bw, dtype.itemsize), 3) for B in a.batch_sizes}
    # The variants first (what a time-limited run most needs), the JSON rewritten after each: a later
    # hang, crash or time limit keeps what was measured. A failing variant is recorded, the next runs.
    for v in a.variants:
        log(f"variant {v}")
        try:
            result["variants"][v] = run_variant(model, margs, a, device, dtype, VARIANTS[v])
        except Exception as e:  # noqa: BLE001 - recorded; the other variants still run
            result["errors"][v] = f"{type(e).__name__}: {e}"
            log(traceback.format_exc())
        if world_rank() == 0:
            result["wall_s"] = round(time.perf_counter() - t_start, 1)
            write(result, out)
    if world_rank() != 0:
        return 0
    print_tables(result)
    if cuda:  # rank 0 alone, after the others are done: kernel checks and expert-kernel timings
        del model
        gc.collect()
        torch.cuda.empty_cache()
        for name, fn in (("kernel_checks", kernel_checks), ("moe_fused_vs_plain", moe_fused_vs_plain),
                         ("moe_tiles", moe_tiles)):
            log(name)
            try:
                result[name] = fn(device)
                print(f"\n{name}: {json.dumps(result[name])}", flush=True)
            except Exception as e:  # noqa: BLE001 - a broken check is reported, the others still run
                result["errors"][name] = f"{type(e).__name__}: {e}"
                log(traceback.format_exc())
            result["wall_s"] = round(time.perf_counter() - t_start, 1)
            write(result, out)
    if result["errors"]:
        print(f"\nerrors: {json.dumps(result['errors'], indent=1)}")
    print(f"wrote {out}", flush=True)
    return 1 if any(k in result["errors"] for k in a.variants) else 0


def compare_to_reference(r: dict, ref: dict) -> None:
    """first_decode_top1_agree: the share of requests whose first decode step picks the reference's token;
    first_decode_logprob_max_diff: the largest gap between a variant's log-probability of a top-5 token and
    the reference's of the same token (same input, so this is the decode paths' numerical difference);
    greedy_16_tokens_match: the share of requests whose 16 greedy tokens all equal the reference's (with
    random bf16 weights the logits are nearly flat, so a rounding difference can flip a later token)."""
    mine, theirs = r["first_decode_top5"], ref["first_decode_top5"]
    r["first_decode_top1_agree"] = round(sum(a[0][0] == b[0][0] for a, b in zip(mine, theirs)) / len(theirs), 3)
    gaps = [abs(lp - dict(b)[t]) for a, b in zip(mine, theirs) for t, lp in a if t in dict(b)]
    r["first_decode_logprob_max_diff"] = round(max(gaps), 5) if gaps else None
    r["greedy_16_tokens_match"] = round(sum(x == y for x, y in zip(r["greedy_tokens"], ref["greedy_tokens"]))
                                        / len(ref["greedy_tokens"]), 3)


def _tag(gpu: str) -> str:
    return gpu.replace(" ", "-").replace("/", "-")


def write(result: dict, path: str) -> None:
    ref = result["variants"].get("reference", {})
    for r in result["variants"].values():
        if ref.get("greedy_tokens") is not None and r.get("greedy_tokens") is not None:
            compare_to_reference(r, ref)
    write_json(path, {**result, "variants": {v: {k: x for k, x in r.items()
                                                 if k not in ("greedy_tokens", "first_decode_top5")}
                                             for v, r in result["variants"].items()}})


def print_tables(r: dict) -> None:
    c = r["config"]
    print(f"\n{c['preset']} {c['dtype']} EP={c['ep']} on {r['num_gpus'] or 'no'} x {r['gpu']}; "
          f"prompt {c['prompt_len']}; floor (ms/step) {r['floor_ms']}")
    print(f"{'variant':>14} | {'batch':>5} | {'ms/step':>8} | {'tok/s':>8} | {'x floor':>7} | {'kernels':>7} | "
          f"{'dev ms':>7} | top-1 agrees")
    for v, res in r["variants"].items():
        for row in res["rows"]:
            fl = r["floor_ms"].get(row["batch"]) or r["floor_ms"].get(str(row["batch"]))
            print(f"{v:>14} | {row['batch']:>5} | {row['ms_per_step']:>8.2f} | {row['tokens_per_s']:>8.0f} | "
                  f"{row['ms_per_step'] / fl:>7.2f} | {row['kernels_per_step']:>7.0f} | "
                  f"{row['device_ms_per_step']:>7.2f} | {res.get('first_decode_top1_agree', '-')}")
    for v, res in r["variants"].items():
        for row in res["rows"]:
            if row["batch"] in (min(c["batch_sizes"]), 64):
                print(f"\ntop kernels, {v}, batch {row['batch']} ({row['profiled']}):")
                for k in row["top"]:
                    print(f"  {k['ms_per_step']:>8.3f} ms  x{k['calls_per_step']:<6g} {k['name'][:90]}")


if __name__ == "__main__":
    sys.exit(main())
