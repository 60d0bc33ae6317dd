"""A serving workload through epkit's engine at EP=N and, in the same run, transformers' continuous batching.

    torchrun --nproc_per_node 2 bench/serve.py                     # Mixtral-8x7B shape, random bf16, EP=2
    torchrun --nproc_per_node 2 bench/serve.py --rate 8            # Poisson arrivals, 8 requests/s
    python bench/serve.py --preset tiny                             # CPU check (what the test runs)

Workload (seeded, `--seed`): `--requests` 512 prompts of random token ids, lengths uniform in
[--min-prompt 32, --max-prompt 1024], `max_tokens` uniform in [--min-tokens 16, --max-tokens 256],
greedy, EOS ignored. All arrive at once, or with `--rate R` as a Poisson process of R requests/s (the
same arrival times for both engines). epkit runs with the engine's memory-sized defaults
(`max_num_seqs`, `max_num_batched_tokens`, KV cache: see `epkit.infer.LLM`) unless flags say otherwise,
after `LLM.warmup()` (graph captures, kernel compiles), as a server would start.

The peer is transformers' continuous batching (`init_continuous_batching`, paged attention, its own
warm-up) with the same random-weight model on rank 0's GPU (`--hf-gpus 1`: Mixtral-8x7B in bf16 fits
one 141 GB H200; `--hf-gpus N` splits the layers over N GPUs, which its paged cache may refuse). It
stops after `--hf-timeout` (240) seconds and then reports what finished. If it fails, the error goes in the
JSON and epkit's figures still stand.

Per engine: generated tokens/s (all generated tokens / time from the first arrival to the last token),
time to first token and inter-token latency at p50/p99 (per token, as the host receives it), peak
memory per GPU, preemptions. Writes bench/results/serve-<gpu>-<time>.json and prints a table.
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
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run from a checkout

from bench.generate import RESULTS, build_hf, log, peak_memory_all_ranks  # noqa: E402
from bench.scaling import percentile  # noqa: E402
from bench.profile_decode import step_profiler, summarize_profile  # noqa: E402
from bench.timing import sync  # noqa: E402

from epkit.args import ModelArgs  # noqa: E402
from epkit.infer import LLM, SamplingParams  # noqa: E402
from epkit.infer.build import random_model  # noqa: E402
from epkit.parallel import init_distributed, world_rank, world_size  # noqa: E402
from epkit.plan import EXPERT_SPLITS  # noqa: E402

FULL = dict(requests=512, min_prompt=32, max_prompt=1024, min_tokens=16, max_tokens=256)
TINY = dict(requests=24, min_prompt=4, max_prompt=48, min_tokens=2, max_tokens=16)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--preset", default="mixtral-8x7b")
    for k in FULL:
        p.add_argument("--" + k.replace("_", "-"), type=int, default=None,
                       help=f"default {FULL[k]} ({TINY[k]} for --preset tiny)")
    p.add_argument("--rate", type=float, default=None,
                   help="Poisson arrivals, requests per second (default: all at once)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--max-num-seqs", type=int, default=None, help="engine setting (default: sized from memory)")
    p.add_argument("--max-num-batched-tokens", type=int, default=None, help="engine setting (default: sized)")
    p.add_argument("--gpu-memory-utilization", type=float, default=None, help="engine setting (default: the engine's)")
    p.add_argument("--max-tokens-while-decoding", type=int, default=None,
                   help="engine setting: most tokens in a step that also decodes (default: the whole budget)")
    p.add_argument("--decode-kernels", default=None, help="engine setting (default: auto)")
    p.add_argument("--no-overlap", action="store_true", help="engine setting: no host overlap")
    p.add_argument("--skip-hf", action="store_true", help="do not run transformers' continuous batching")
    p.add_argument("--expert-split", default="experts", choices=EXPERT_SPLITS,
                   help="engine setting: whole experts per EP rank, or a part of every expert's rows")
    p.add_argument("--hf-gpus", type=int, default=1)
    p.add_argument("--hf-timeout", type=float, default=240.0, help="seconds the peer serves before it is cut off")
    p.add_argument("--no-hf-warmup", action="store_true", help="skip the peer's own warm-up (its CUDA graph "
                   "captures then fall inside the measured run)")
    p.add_argument("--profile-steps", type=int, default=0,
                   help="profile this many engine steps of epkit's run, from step --profile-from (top kernels)")
    p.add_argument("--profile-from", type=int, default=100, help="the first step --profile-steps profiles")
    p.add_argument("--out", default=None, help="JSON path (default: bench/results/serve-<gpu>-<time>.json)")
    p.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    for k, v in (TINY if a.preset == "tiny" else FULL).items():
        if getattr(a, k) is None:
            setattr(a, k, v)
    if (a.requests < 1 or not 1 <= a.min_prompt <= a.max_prompt or not 1 <= a.min_tokens <= a.max_tokens
            or (a.rate is not None and a.rate <= 0)):
        p.error(f"bad workload: {a.requests} requests, prompts {a.min_prompt}..{a.max_prompt}, "
                f"max_tokens {a.min_tokens}..{a.max_tokens}, rate {a.rate}")
    return a


def workload(a, vocab: int) -> list[dict]:
    """The seeded requests: prompt ids, max_tokens, arrival time (s after the start)."""
    g = torch.Generator().manual_seed(a.seed)
    lens = torch.randint(a.min_prompt, a.max_prompt + 1, (a.requests,), generator=g).tolist()
    outs = torch.randint(a.min_tokens, a.max_tokens + 1, (a.requests,), generator=g).tolist()
    gaps = (torch.empty(a.requests, dtype=torch.float64).exponential_(a.rate, generator=g).tolist()
            if a.rate else [0.0] * a.requests)
    t, reqs = 0.0, []
    for i, (n, m) in enumerate(zip(lens, outs)):
        t += gaps[i] if a.rate else 0.0
        reqs.append({"prompt": torch.randint(3, vocab, (n,), generator=g).tolist(), "max_tokens": m, "arrival": t})
    return reqs


def summarise(reqs: list[dict], first_tokens: dict, token_times: dict, wall_s: float) -> dict:
    """tokens/s, TTFT and ITL percentiles from per-request token arrival times (s after the start)."""
    generated = sum(len(v) for v in token_times.values())
    ttft = [first_tokens[i] - reqs[i]["arrival"] for i in first_tokens]
    itl = [b - a for v in token_times.values() for a, b in zip(v, v[1:])]
    return {"requests_finished": sum(1 for i, v in token_times.items() if len(v) >= reqs[i]["max_tokens"]),
            "generated_tokens": generated, "wall_s": round(wall_s, 3),
            "generated_tokens_per_s": round(generated / max(wall_s, 1e-9), 1),
            "ttft_p50_s": _round(percentile(ttft, 50), 6), "ttft_p99_s": _round(percentile(ttft, 99), 6),
            "itl_p50_ms": _round(1000 * percentile(itl, 50), 3), "itl_p99_ms": _round(1000 * percentile(itl, 99), 3)}


def _round(x: float, digits: int) -> float | None:
    return None if x != x else round(x, digits)  # NaN (no samples): null in the JSON


# ---- epkit ----------------------------------------------------------------------------------------

def run_epkit(model, reqs: list[dict], a, device) -> dict | None:
    engine = {k: v for k, v in dict(max_num_seqs=a.max_num_seqs, max_num_batched_tokens=a.max_num_batched_tokens,
                                    gpu_memory_utilization=a.gpu_memory_utilization,
                                    max_tokens_while_decoding=a.max_tokens_while_decoding,
                                    decode_kernels=a.decode_kernels).items() if v is not None}
    t0 = time.perf_counter()
    llm = LLM.from_model(model, overlap=not a.no_overlap, **engine)
    llm.warmup()  # every rank
    warm = [r["prompt"][: a.max_prompt] for r in reqs[:4]]
    llm.generate(warm, SamplingParams(temperature=0, max_tokens=4, ignore_eos=True))  # prefill kernels
    setup_s = time.perf_counter() - t0
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    if not llm.is_leader:
        llm.follow()
        peak_memory_all_ranks(device)  # NOTE: collective, with the leader's below
        return None
    log(f"epkit: engine ready in {setup_s:.0f}s ({llm.runner.decode_kernels} decode kernels, max_num_seqs "
        f"{llm.scheduler.max_num_seqs}, max_num_batched_tokens {llm.scheduler.max_num_batched_tokens}, "
        f"{llm.cache.num_blocks} KV blocks); running {len(reqs)} requests")
    preempt0, steps0 = llm.scheduler.num_preemptions, llm.stats["steps"]
    timeline = StepTimeline(llm)
    profiler, profiled = None, None
    index, first, times = {}, {}, {i: [] for i in range(len(reqs))}
    nxt, start = 0, time.perf_counter()
    last = start
    try:
        while nxt < len(reqs) or llm.has_unfinished():
            now = time.perf_counter() - start
            while nxt < len(reqs) and reqs[nxt]["arrival"] <= now:
                r = reqs[nxt]
                rid = llm.add_request(r["prompt"], SamplingParams(temperature=0, max_tokens=r["max_tokens"],
                                                                  ignore_eos=True))
                index[rid] = nxt
                nxt += 1
            if not llm.has_unfinished():
                time.sleep(max(0.0, min(0.01, reqs[nxt]["arrival"] - now)))
                continue
            if a.profile_steps and profiled is None and profiler is None and timeline.calls == a.profile_from:
                profiler, profile_t0 = step_profiler(device).__enter__(), time.perf_counter()
            with timeline:
                updates = llm.step()
            if profiler is not None and timeline.calls == a.profile_from + a.profile_steps:
                sync(device)
                profiler.__exit__(None, None, None)
                profiled, profiler = summarize_profile(profiler, a.profile_steps, device), None
                profiled["wall_ms_per_step"] = round(1000 * (time.perf_counter() - profile_t0) / a.profile_steps, 2)
            for out in updates:
                t = time.perf_counter()
                if out.error:
                    raise RuntimeError(f"request {out.request_id} failed: {out.error}")
                i = index[out.request_id]
                first.setdefault(i, t - start)
                times[i] += [t - start] * len(out.new_token_ids)
                last = t
    finally:
        timeline.close()
        if profiler is not None:
            profiler.__exit__(None, None, None)
        llm.release_followers()
        peaks = peak_memory_all_ranks(device)
    res = summarise(reqs, first, times, last - start)
    res["step_kinds"] = timeline.summary()
    if device.type == "cuda":  # the caching allocator's retries free cached blocks and wait for the device
        stats = torch.cuda.memory_stats(device)
        res["allocator"] = {k: stats.get(k) for k in ("num_alloc_retries", "num_ooms", "num_device_alloc",
                                                     "num_device_free")}
    if profiled is not None:
        res["profile"] = {"from_step": a.profile_from, **profiled}
    res.update(steps=llm.stats["steps"] - steps0, preemptions=llm.scheduler.num_preemptions - preempt0,
               setup_s=round(setup_s, 1), peak_memory_gib=peaks,
               engine={"decode_kernels": llm.runner.decode_kernels, "overlap": llm.overlap,
                       "expert_tiles": llm.runner.expert_tiles,
                       "max_num_seqs": llm.scheduler.max_num_seqs,
                       "max_num_batched_tokens": llm.scheduler.max_num_batched_tokens,
                       "max_tokens_while_decoding": llm.scheduler.max_tokens_while_decoding,
                       "gpu_memory_utilization": llm.config.gpu_memory_utilization,
                       "kv_cache_blocks": llm.cache.num_blocks, "block_size": llm.cache.block_size,
                       "kv_cache_tokens": llm.cache.capacity_tokens})
    log(f"epkit: {res['generated_tokens_per_s']:.0f} generated tok/s, TTFT p50 {res['ttft_p50_s']}s, "
        f"ITL p50 {res['itl_p50_ms']} ms, {res['preemptions']} preemptions; steps: "
        + "; ".join(f"{k} {res['step_kinds'][k]['steps']} x {res['step_kinds'][k]['ms_per_step']} ms"
                    for k in ("decode_only", "with_prompt_tokens")))
    return res


class StepTimeline:
    """What each engine step held and where its time went. The scheduler's plans are read as they are made (a
    wrapped `schedule`), and the host's time making and queueing each one (a wrapped `_launch`). With host
    overlap a step() call queues plan i, then waits for plan i-1's tokens; so plan i is charged its own launch
    (host) and the rest of the next call (the wait for its tokens; without overlap, of its own call). A wait near
    zero beside a long launch means the host, not the device, set the pace. `summary()` groups the steps by kind:
    decode-only, or with prompt tokens (prefill chunks, alone or beside decode rows)."""

    def __init__(self, llm):
        self.llm, self.calls, self.plans, self.times = llm, 0, [], []
        self.host = {}  # plan index -> seconds in the `_launch` that made it
        self._schedule, self._launch = llm.scheduler.schedule, getattr(llm, "_launch", None)

        def schedule(*args, **kw):
            plan = self._schedule(*args, **kw)
            prompt = sum(n for seq, begin, n in plan.rows if begin < seq.prompt_len)
            decode = sum(1 for seq, begin, n in plan.rows if begin >= seq.prompt_len)
            self.plans.append((prompt, decode, bool(plan.rows)))  # an empty plan runs no step
            return plan
        llm.scheduler.schedule = schedule
        if self._launch is not None:  # (the dp-attention engine launches elsewhere: waits only)
            def launch(*args, **kw):
                t, made = time.perf_counter(), len(self.plans)
                out = self._launch(*args, **kw)
                if len(self.plans) > made:
                    self.host[made] = time.perf_counter() - t
                return out
            llm._launch = launch

    def __enter__(self):
        self._t0, self._made = time.perf_counter(), len(self.plans)
        return self

    def __exit__(self, *exc):
        self.times.append((time.perf_counter() - self._t0, self._made, len(self.plans)))
        self.calls += 1

    def close(self) -> None:
        self.llm.scheduler.schedule = self._schedule
        if self._launch is not None:
            self.llm._launch = self._launch

    def summary(self) -> dict:
        host = [self.host.get(i, 0.0) for i in range(len(self.plans))]
        wait = [0.0] * len(self.plans)
        for dt, before, after in self.times:
            own = sum(host[before:after])  # this call's launches
            i = before - 1 if self.llm.overlap else after - 1  # the plan whose tokens this call waited for
            if 0 <= i < len(wait):
                wait[i] += dt - own
        charged = [h + w for h, w in zip(host, wait)]
        out = {}
        for kind, pick in (("decode_only", lambda p: p[2] and p[0] == 0), ("with_prompt_tokens", lambda p: p[0] > 0)):
            idx = [i for i, p in enumerate(self.plans) if pick(p)]
            mean = (lambda v: round(sum(v[i] for i in idx) / len(idx), 1)) if idx else (lambda v: None)
            out[kind] = {"steps": len(idx), "seconds": round(sum(charged[i] for i in idx), 3),
                         "ms_per_step": mean([1000 * c for c in charged]) if idx else None,
                         "host_ms_per_step": mean([1000 * h for h in host]) if idx else None,
                         "prompt_tokens_per_step": mean([p[0] for p in self.plans]),
                         "decode_rows_per_step": mean([p[1] for p in self.plans])}
        out["per_step"] = [[round(1000 * charged[i], 2), p[0], p[1], round(1000 * host[i], 2)]
                           for i, p in enumerate(self.plans) if p[2]]
        out["per_step_columns"] = ["ms", "prompt_tokens", "decode_rows", "host_ms"]
        return out


# ---- transformers ---------------------------------------------------------------------------------

def run_hf(margs: ModelArgs, reqs: list[dict], a, devices: list) -> dict:
    from transformers import GenerationConfig
    from transformers.generation.continuous_batching.utils import WorkloadHints
    t0 = time.perf_counter()
    for d in devices:
        if torch.device(d).type == "cuda":
            torch.cuda.reset_peak_memory_stats(d)
    hf, _ = build_hf(margs, devices, torch.bfloat16 if torch.device(devices[0]).type == "cuda" else torch.float32)
    gen = GenerationConfig(do_sample=False, max_new_tokens=a.max_tokens, eos_token_id=-1, pad_token_id=0)
    hints = WorkloadHints(max_prompt_length=max(len(r["prompt"]) for r in reqs), max_generated_length=a.max_tokens,
                          num_requests=len(reqs))
    cb = None
    if torch.device(devices[0]).type != "cuda":  # it sizes its cache from free memory: on a CPU, all of RAM
        from transformers import ContinuousBatchingConfig
        cb = ContinuousBatchingConfig(num_blocks=64, max_batch_tokens=512)
    manager = hf.init_continuous_batching(generation_config=gen, continuous_batching_config=cb, workload_hints=hints)
    if hasattr(manager, "warmup") and torch.device(devices[0]).type == "cuda" and not a.no_hf_warmup:
        manager.warmup()  # its CUDA graphs
    manager.start()
    setup_s = time.perf_counter() - t0
    log(f"transformers: continuous batching ready on {devices} in {setup_s:.0f}s; running {len(reqs)} requests")
    first, times, done = {}, {i: [] for i in range(len(reqs))}, set()
    nxt, start, timed_out = 0, time.perf_counter(), False
    submitted = {}
    try:
        while len(done) < len(reqs):
            now = time.perf_counter() - start
            if now > a.hf_timeout:
                timed_out = True
                break
            while nxt < len(reqs) and reqs[nxt]["arrival"] <= now:
                r = reqs[nxt]
                manager.add_request(r["prompt"], request_id=str(nxt), max_new_tokens=r["max_tokens"],
                                    record_timestamps=True)
                submitted[nxt] = time.perf_counter()
                nxt += 1
            result = manager.get_result(timeout=0.01)
            if result is None:
                if not manager.is_running():
                    raise RuntimeError("transformers' generation thread stopped")
                continue
            if not result.is_finished():
                continue
            if result.error:
                raise RuntimeError(f"request {result.request_id}: {result.error}")
            i = int(result.request_id)
            stamps = [t - start for t in (result.timestamps or [])]
            if len(stamps) != len(result.generated_tokens):  # no per-token stamps: the finish time for all
                stamps = [result.lifespan[1] - start] * len(result.generated_tokens)
            times[i], first[i] = stamps, stamps[0]
            done.add(i)
    finally:
        manager.stop(block=True, timeout=30)
        if hasattr(manager, "destroy"):
            manager.destroy()
    wall = max((v[-1] for v in times.values() if v), default=0.0)
    res = summarise(reqs, first, {i: times[i] for i in done}, wall if not timed_out else a.hf_timeout)
    peaks = [round(torch.cuda.max_memory_allocated(d) / 2 ** 30, 2) if torch.device(d).type == "cuda" else 0.0
             for d in devices]
    res.update(completed=not timed_out, warmed_up=not a.no_hf_warmup, setup_s=round(setup_s, 1), peak_memory_gib=peaks,
               devices=[str(d) for d in devices], preemptions=None,
               attn_implementation=getattr(hf.config, "_attn_implementation", None))
    del manager, hf
    gc.collect()
    log(f"transformers: {res['generated_tokens_per_s']:.0f} generated tok/s ({len(done)}/{len(reqs)} finished)")
    return res


# ---- main -----------------------------------------------------------------------------------------

def main(argv=None) -> int:
    a = parse_args(argv)
    init_distributed()
    ep = world_size()
    cuda = torch.cuda.is_available()
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if cuda else torch.device("cpu")
    dtype = torch.bfloat16 if cuda else torch.float32
    margs = ModelArgs.from_name(a.preset)
    reqs = workload(a, margs.vocab_size)
    # transformers runs on rank 0 alone, for minutes: the others wait on a gloo group with a long timeout.
    waiters = dist.new_group(backend="gloo", timeout=datetime.timedelta(hours=2)) if ep > 1 else None
    t_start = time.perf_counter()
    model = random_model(margs, ep, device, dtype, seed=0, router_std=None, split=a.expert_split)
    sync(device)
    log(f"built {margs.num_parameters() / 1e9:.1f}B-parameter {a.preset} at EP={ep} in "
        f"{time.perf_counter() - t_start:.0f}s; {len(reqs)} requests, "
        f"{sum(len(r['prompt']) for r in reqs)} prompt tokens, up to {sum(r['max_tokens'] for r in reqs)} new")
    result = {"benchmark": "serving workload, epkit LLM vs transformers continuous batching (same run)",
              "gpu": torch.cuda.get_device_name(device) if cuda else "cpu", "num_gpus": ep if cuda else 0,
              "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
              "config": {"preset": a.preset, "ep": ep, "expert_split": a.expert_split,
                         "dtype": str(dtype).replace("torch.", ""),
                         "requests": a.requests, "prompt_len": [a.min_prompt, a.max_prompt],
                         "max_tokens": [a.min_tokens, a.max_tokens], "arrivals": f"poisson {a.rate}/s" if a.rate
                         else "all at once", "seed": a.seed, "greedy": True, "ignore_eos": True,
                         "prompt_tokens": sum(len(r["prompt"]) for r in reqs),
                         "max_new_tokens_total": sum(r["max_tokens"] for r in reqs)},
              "errors": {}}
    import transformers
    result["versions"] = {"torch": torch.__version__, "transformers": transformers.__version__}
    tag = result["gpu"].replace(" ", "-").replace("/", "-")
    out = a.out or os.path.join(RESULTS, f"serve-{tag}x{max(ep, 1)}-{time.strftime('%Y%m%d-%H%M%S')}.json")
    try:
        result["epkit"] = run_epkit(model, reqs, a, device)
    except Exception as e:  # noqa: BLE001 - recorded below; the JSON is still written
        result["epkit"], result["errors"]["epkit"] = None, f"{type(e).__name__}: {e}"
        log(traceback.format_exc())
    if world_rank() == 0:  # now, so that a time limit hit during the peer keeps epkit's figures
        write(result, out, t_start)
    del model
    gc.collect()
    if cuda:
        torch.cuda.empty_cache()
    if waiters is not None:
        dist.barrier(group=waiters)
    if world_rank() == 0 and not a.skip_hf:
        devices = [f"cuda:{i}" for i in range(min(a.hf_gpus, torch.cuda.device_count()))] if cuda else ["cpu"]
        try:
            result["transformers"] = run_hf(margs, reqs, a, devices)
        except Exception as e:  # noqa: BLE001 - the peer failing on this shape is a result, not a crash
            result["transformers"], result["errors"]["transformers"] = None, f"{type(e).__name__}: {e}"
            log(traceback.format_exc())
    if waiters is not None:
        dist.barrier(group=waiters)
    if world_rank() != 0:
        return 0
    write(result, out, t_start)
    print_table(result)
    print(f"wrote {out}", flush=True)
    return 0 if "epkit" not in result["errors"] else 1


def write(result: dict, path: str, t_start: float) -> None:
    """Write the JSON atomically (a reader never sees half a file)."""
    result["wall_s"] = round(time.perf_counter() - t_start, 1)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path + ".tmp", "w") as f:
        json.dump(result, f, indent=2)
    os.replace(path + ".tmp", path)


def print_table(r: dict) -> None:
    c = r["config"]
    print(f"\n{c['preset']} {c['dtype']} on {r['num_gpus'] or 'no'} x {r['gpu']}: {c['requests']} requests, "
          f"prompts {c['prompt_len']}, max_tokens {c['max_tokens']}, {c['arrivals']}, seed {c['seed']}")
    print(f"{'engine':>26} | {'tok/s':>8} | {'TTFT p50':>8} | {'TTFT p99':>8} | {'ITL p50':>8} | {'ITL p99':>8} | "
          f"{'preempt':>7} | peak GiB")
    rows = [(f"epkit EP={c['ep']}", r.get("epkit"))]
    if "transformers" in r:
        hf = r["transformers"]
        rows.append((f"transformers CB ({len(hf['devices']) if hf else '?'} GPU)", hf))
    for name, x in rows:
        if not x:
            print(f"{name:>26} | failed: {r['errors'].get(name.split()[0], '')[:80]}")
            continue
        f = lambda v, s=1: "-" if v is None else f"{v * s:.2f}"  # noqa: E731
        print(f"{name:>26} | {x['generated_tokens_per_s']:>8.0f} | {f(x['ttft_p50_s']):>8} | {f(x['ttft_p99_s']):>8} | "
              f"{f(x['itl_p50_ms']):>8} | {f(x['itl_p99_ms']):>8} | {str(x['preemptions']):>7} | "
              f"{x['peak_memory_gib']}")
    print("(TTFT in s, ITL in ms)")


if __name__ == "__main__":
    sys.exit(main())
