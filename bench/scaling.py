"""Serving throughput as GPUs are added: EP=1 on one GPU, EP=N on N GPUs with replicated dispatch and
with data-parallel attention. Random bf16 weights built straight on the GPUs (Mixtral-8x7B shape).

    OUT=bench/results/scaling-h200-$(date -u +%Y%m%dT%H%M).json
    torchrun --nproc_per_node 1 bench/scaling.py --out $OUT     # EP=1 rows
    torchrun --nproc_per_node 2 bench/scaling.py --out $OUT     # EP=2 rows (replicated, dp), same file
    torchrun --nproc_per_node 2 bench/scaling.py --small --out /tmp/s.json   # CPU check (gloo, tiny)
    torchrun --nproc_per_node 4 bench/scaling.py --ep 2 --out $OUT     # EP=2 x DP=2: two replicas of EP=2

Each launch serves every workload in every mode (`--modes`; default: ep1 on one rank, replicated and dp
on more; with `--ep` below the launched ranks, data-parallel replicas of that EP size, each in those modes)
and merges its rows into the JSON at --out (rows of the same gpus/ep/mode/workload are
replaced, others kept; written atomically), then prints every row of the file with the speed-up over
the EP=1 row of the same workload.

Workloads (seeded; prompts of random token ids; greedy; ignore_eos; all requests submitted at once):
  mixed   128 requests, prompt lengths uniform in 32..1024, 128 new tokens each
  decode  128 requests, 4-token prompts, 128 new tokens each
Each mode's engine first runs `LLM.warmup()` (`--warmup server`: the decode CUDA graph of every rows
bucket captured, kernels compiled, as a server does at start-up; `full`: each workload once unmeasured
too, so every bucket it meets is captured; `none`), then each workload is measured through
`LLM.stream` on rank 0: generated_tokens_per_s = generated
tokens / wall time from submission to the last token; TTFT = first token - submission; ITL = the gaps
between a request's consecutive tokens (p50/p99 over all gaps of all requests). Replicas (dp > 1) serve
through `LLM.generate` (no streaming): their TTFT is each request's own (`timings`) and their ITL the
per-request mean gap (rows say `itl: per-request mean`). `outputs_sha1` hashes
the greedy tokens so modes can be compared (on GPUs, bf16 rounding may differ with batch composition).
"""
from __future__ import annotations

import argparse
import datetime
import gc
import hashlib
import json
import os
import platform
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run from a checkout

from bench.timing import write_json  # noqa: E402

from epkit.args import ModelArgs  # noqa: E402
from epkit.infer import LLM, SamplingParams  # noqa: E402
from epkit.infer.build import random_model  # noqa: E402
from epkit.parallel import init_distributed, set_dispatch, world_rank, world_size  # noqa: E402

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
WORKLOADS = {  # name: (requests, shortest prompt, longest prompt, new tokens)
    "mixed": (128, 32, 1024, 128),
    "decode": (128, 4, 4, 128),
}
SMALL = {"mixed": (8, 4, 24, 8), "decode": (8, 4, 4, 8)}
KEY = ("gpus", "ep", "dp", "mode", "workload")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--preset", default="mixtral-8x7b")
    p.add_argument("--small", action="store_true", help="tiny preset, small workloads, CPU/gloo, fp32")
    p.add_argument("--workloads", default="mixed,decode")
    p.add_argument("--ep", type=int, default=None, help="expert-parallel size (default: the launched ranks; fewer: "
                   "launched / ep data-parallel replicas)")
    p.add_argument("--modes", default=None, help="ep1 (one rank), replicated, dp (default: what the launch fits)")
    p.add_argument("--warmup", default="server", choices=["server", "full", "none"])
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--max-num-seqs", type=int, default=None, help="engine setting (per rank in dp mode)")
    p.add_argument("--max-num-batched-tokens", type=int, default=None, help="engine setting (per rank in dp mode)")
    p.add_argument("--gpu-memory-utilization", type=float, default=None, help="engine setting (default 0.85)")
    p.add_argument("--out", default=None, help="JSON to merge rows into (default: bench/results/"
                   "scaling-<gpu>-<time>.json); pass the same file to every launch")
    p.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    a.workloads = a.workloads.split(",")
    bad = [w for w in a.workloads if w not in WORKLOADS]
    if bad:
        p.error(f"unknown workload(s) {bad}; choose from {sorted(WORKLOADS)}")
    return a


def log(msg: str) -> None:
    if world_rank() == 0:
        print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def make_requests(name: str, small: bool, vocab: int, seed: int) -> tuple[list[list[int]], SamplingParams]:
    n, lo, hi, new = (SMALL if small else WORKLOADS)[name]
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(lo, hi + 1, (n,), generator=g).tolist()
    prompts = [torch.randint(3, vocab, (k,), generator=g).tolist() for k in lengths]
    return prompts, SamplingParams(temperature=0, max_tokens=new, ignore_eos=True)


def percentile(xs: list[float], q: float) -> float:
    if not xs:
        return float("nan")
    xs = sorted(xs)
    return xs[min(len(xs) - 1, max(0, round(q / 100 * (len(xs) - 1))))]


def serve(llm: LLM, prompts, params) -> dict | None:
    """Submit every prompt at once, stream; rank 0 returns the figures, the others None."""
    t0 = time.perf_counter()
    times: dict[str, list[float]] = {}
    tokens: dict[str, list[int]] = {}
    for out in llm.stream(prompts, params):  # other ranks run the steps inside and yield nothing
        now = time.perf_counter()
        if out.new_token_ids:
            times.setdefault(out.request_id, []).append(now)
        tokens[out.request_id] = out.token_ids
    elapsed = time.perf_counter() - t0
    if not llm.is_leader:
        return None
    generated = sum(len(t) for t in tokens.values())
    ttft = [ts[0] - t0 for ts in times.values()]
    itl = [(b - a) * 1000 for ts in times.values() for a, b in zip(ts, ts[1:])]
    digest = hashlib.sha1(json.dumps([tokens[k] for k in sorted(tokens, key=int)]).encode()).hexdigest()
    return {"requests": len(prompts), "prompt_tokens": sum(map(len, prompts)), "generated_tokens": generated,
            "elapsed_s": round(elapsed, 3), "generated_tokens_per_s": round(generated / elapsed, 1),
            "ttft_p50_s": round(percentile(ttft, 50), 4), "ttft_p99_s": round(percentile(ttft, 99), 4),
            "itl_p50_ms": round(percentile(itl, 50), 2), "itl_p99_ms": round(percentile(itl, 99), 2),
            "outputs_sha1": digest}


def serve_replicas(llm: LLM, prompts, params) -> dict | None:
    """`serve` for data-parallel replicas: one `generate` (every rank); figures from each request's timings."""
    t0 = time.perf_counter()
    outs = llm.generate(prompts, params)
    elapsed = time.perf_counter() - t0
    if world_rank() != 0:
        return None
    generated = sum(len(o.token_ids) for o in outs)
    ttft = [o.timings["ttft_s"] for o in outs]
    itl = [1000 / o.timings["decode_tokens_per_s"] for o in outs if o.timings.get("decode_tokens_per_s")]
    digest = hashlib.sha1(json.dumps([o.token_ids for o in outs]).encode()).hexdigest()
    return {"requests": len(prompts), "prompt_tokens": sum(map(len, prompts)), "generated_tokens": generated,
            "elapsed_s": round(elapsed, 3), "generated_tokens_per_s": round(generated / elapsed, 1),
            "ttft_p50_s": round(percentile(ttft, 50), 4), "ttft_p99_s": round(percentile(ttft, 99), 4),
            "itl_p50_ms": round(percentile(itl, 50), 2), "itl_p99_ms": round(percentile(itl, 99), 2),
            "itl": "per-request mean", "outputs_sha1": digest}


def run_mode(model, mode: str, a, device, margs) -> list[dict]:
    set_dispatch(model, "all_to_all" if mode == "dp" else "replicated") if a.ep > 1 else None
    engine = {k: getattr(a, k) for k in ("max_num_seqs", "max_num_batched_tokens", "gpu_memory_utilization")
              if getattr(a, k) is not None}
    if a.small:
        engine["kv_cache_memory"] = 64 << 20
    llm = LLM.from_model(model, dp_attention=mode == "dp", dp_size=a.dp, **engine)
    if a.warmup != "none":
        llm.warmup()  # every rank
    rows = []
    for w in a.workloads:
        prompts, params = make_requests(w, a.small, margs.vocab_size, a.seed)
        run = serve if a.dp == 1 else serve_replicas
        if a.warmup == "full":
            run(llm, prompts, params)
        steps, preempted = llm.stats["steps"], llm.scheduler.num_preemptions
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        r = run(llm, prompts, params)
        peak = torch.cuda.max_memory_allocated(device) / 2 ** 30 if device.type == "cuda" else 0.0
        peaks = all_gather_float(peak)
        if r is not None:
            r.update(gpus=world_size() if device.type == "cuda" else 0, ep=a.ep, dp=a.dp, mode=mode, workload=w,
                     steps=llm.stats["steps"] - steps, preemptions_rank0=llm.scheduler.num_preemptions - preempted,
                     peak_memory_gib=[round(p, 2) for p in peaks], kv_cache_blocks_per_rank=llm.cache.num_blocks)
            rows.append(r)
            log(f"{mode} {w}: {r['generated_tokens_per_s']} tok/s, TTFT p50 {r['ttft_p50_s']} s, "
                f"ITL p50 {r['itl_p50_ms']} ms, {r['steps']} steps")
    del llm
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return rows


def all_gather_float(x: float) -> list[float]:
    if world_size() == 1:
        return [x]
    import torch.distributed as dist
    out = [None] * world_size()
    dist.all_gather_object(out, x)  # NOTE: collective
    return out


def merge(path: str, rows: list[dict], meta: dict) -> dict:
    """Rows of `path` (if any) with ours replacing those of the same key; written atomically."""
    doc = {"benchmark": "serving throughput vs GPUs: EP=1 on 1 GPU, EP=N replicated and dp-attention", "rows": [],
           "runs": []}
    if os.path.isfile(path):
        with open(path) as f:
            doc = json.load(f)
    ours = {tuple(r[k] for k in KEY) for r in rows}
    doc["rows"] = [r for r in doc.get("rows", []) if tuple(r.get(k) for k in KEY) not in ours] + rows
    doc.setdefault("runs", []).append(meta)
    write_json(path, doc)
    return doc


def print_table(doc: dict) -> None:
    base = {r["workload"]: r for r in doc["rows"] if r["ep"] == 1 and r.get("dp", 1) == 1}
    print(f"\n{'workload':>8} | {'gpus':>4} | {'ep':>2} | {'dp':>2} | {'mode':>10} | {'tok/s':>8} | {'x EP=1':>6} | "
          f"{'TTFT p50/p99 s':>15} | {'ITL p50/p99 ms':>15} | {'same tokens':>11}")
    for r in sorted(doc["rows"], key=lambda r: (r["workload"], r["gpus"], r["ep"], r["mode"])):
        b = base.get(r["workload"])
        speed = f"{r['generated_tokens_per_s'] / b['generated_tokens_per_s']:>6.2f}" if b else f"{'-':>6}"
        same = ("yes" if r["outputs_sha1"] == b["outputs_sha1"] else "no") if b else "-"
        print(f"{r['workload']:>8} | {r['gpus']:>4} | {r['ep']:>2} | {r.get('dp', 1):>2} | {r['mode']:>10} | "
              f"{r['generated_tokens_per_s']:>8.1f} | {speed} | {r['ttft_p50_s']:>7.3f}/{r['ttft_p99_s']:<7.3f} | "
              f"{r['itl_p50_ms']:>7.1f}/{r['itl_p99_ms']:<7.1f} | {same:>11}")


def main(argv=None) -> int:
    a = parse_args(argv)
    init_distributed()
    cuda = torch.cuda.is_available() and not a.small
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if cuda else torch.device("cpu")
    dtype = torch.bfloat16 if cuda else torch.float32
    a.ep = a.ep or world_size()
    if a.ep < 1 or world_size() % a.ep:
        raise SystemExit(f"--ep {a.ep} must divide the launched ranks ({world_size()})")
    a.dp = world_size() // a.ep
    modes = a.modes.split(",") if a.modes else (["ep1"] if a.ep == 1 else ["replicated", "dp"])
    if any(m not in ("ep1", "replicated", "dp") for m in modes) or (("ep1" in modes) != (a.ep == 1)):
        raise SystemExit(f"--modes {a.modes}: ep1 runs at --ep 1, replicated and dp at more (this launch has "
                         f"--ep {a.ep})")
    margs = ModelArgs.from_name("tiny" if a.small else a.preset)
    t0 = time.perf_counter()
    model = random_model(margs, a.ep, device, dtype, seed=a.seed, router_std=0.5 if a.small else None)
    log(f"built {margs.num_parameters() / 1e9:.2f}B-parameter model at EP={a.ep} x DP={a.dp} in "
        f"{time.perf_counter() - t0:.1f}s")
    rows = []
    for mode in modes:
        rows += run_mode(model, mode, a, device, margs)
    if world_rank() != 0:
        return 0
    import transformers
    gpu = torch.cuda.get_device_name(device) if cuda else "cpu"
    meta = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"), "gpu": gpu,
            "host": platform.node(), "world_size": world_size(), "ep": a.ep, "dp": a.dp, "modes": modes,
            "preset": "tiny" if a.small else a.preset,
            "dtype": str(dtype).replace("torch.", ""),
            "workloads": {w: dict(zip(("requests", "prompt_min", "prompt_max", "new_tokens"),
                                      (SMALL if a.small else WORKLOADS)[w])) for w in a.workloads},
            "engine": {"max_num_seqs": a.max_num_seqs, "max_num_batched_tokens": a.max_num_batched_tokens,
                       "gpu_memory_utilization": a.gpu_memory_utilization, "warmup": a.warmup, "seed": a.seed},
            "versions": {"torch": torch.__version__, "transformers": transformers.__version__,
                         "cuda": torch.version.cuda, "nccl": ".".join(map(str, torch.cuda.nccl.version()))
                         if cuda else None}}
    tag = gpu.replace(" ", "-").replace("/", "-").lower()
    out = a.out or os.path.join(RESULTS, f"scaling-{tag}-{time.strftime('%Y%m%dT%H%M%S')}.json")
    doc = merge(out, rows, meta)
    print_table(doc)
    print(f"wrote {out}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
