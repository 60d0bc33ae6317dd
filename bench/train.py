"""Training throughput, one run, same GPUs, same data: epkit at EP=2 and EP=1 against transformers'
MixtralForCausalLM under DeepSpeed ZeRO-2 (plain data parallel) and a Mixtral-shaped model built on
DeepSpeed's own `deepspeed.moe.layer.MoE` at ep_size=2.

    torchrun --nproc_per_node 2 bench/train.py [--layers 4 --seq-len 4096 --micro-batch 1 --grad-accum 1]
    deepspeed --num_gpus 2 bench/train.py ...
    torchrun --nproc_per_node 2 bench/train.py --cpu       # tiny shapes, gloo, fp32: a check, not a benchmark
    torchrun --nproc_per_node 4 bench/train.py --variants epkit_ep4,epkit_ep2   # EP=4, and EP=2 x DP=2

Every variant trains the Mixtral-8x7B shape with `--layers` decoder layers on the same seeded token ids
(Zipf-distributed, so the loss has something to learn), with the same optimizer (torch AdamW, fused on
CUDA; warm-up-free cosine schedule), clipping (1.0), ZeRO stage (`--zero-stage`, 2) and DeepSpeed settings (epkit's
`deepspeed_config`). Variants run one after another in one process group; each is freed (del, gc,
empty_cache) before the next, and one that fails (an OOM, a peer's bug) records its error and the rest
still run. The JSON (bench/results/train-<gpu>-<time>.json) is rewritten after every variant.

FLOPs per token = 6 x active parameters (every matmul weight a token passes: attention, router, its K
experts, the LM head; not the embedding lookup) + 6 x layers x T x H x Dh for causal attention (half of
PaLM's 12 L T H Dh: the masked half of the scores is skipped). MFU = achieved FLOP/s per GPU / the peak.

Legend: L layers, T sequence length, B micro batch, A gradient accumulation, R ranks, V vocab.
"""
from __future__ import annotations

import argparse
import dataclasses
import datetime
import gc
import json
import os
import re
import sys
import time

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run from a checkout
from bench.moe_layer import error_text, gather, slug  # noqa: E402
from bench.peers import versions  # noqa: E402
from bench.timing import matmul_tflops, sync, write_json  # noqa: E402
from bench.train_variants import BUILDERS, DEFAULT_VARIANTS, VARIANTS, Setup, make_batches, split_variant  # noqa: E402

import epkit.moe  # noqa: E402
from epkit.parallel import init_distributed, setup_expert_parallel  # noqa: E402
from epkit.train.optim import initialize  # noqa: E402

PEAK_TFLOPS = {"H100": 989.0, "H200": 989.0}  # dense bf16, no sparsity


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--cpu", action="store_true", help="tiny shapes, CPU, gloo, fp32: what the test runs")
    p.add_argument("--layers", type=int, default=None, help="decoder layers (default 4; 2 with --cpu)")
    p.add_argument("--seq-len", type=int, default=None, help="tokens per row (default 4096; 32 with --cpu)")
    p.add_argument("--micro-batch", type=int, default=1, help="rows per rank per micro-step")
    p.add_argument("--grad-accum", type=int, default=1, help="micro-steps per optimizer step")
    p.add_argument("--steps", type=int, default=None, help="optimizer steps per variant (default 10; 3 with --cpu)")
    p.add_argument("--warmup", type=int, default=None, help="of those, untimed first steps (default 2; 1 with --cpu)")
    p.add_argument("--profile-steps", type=int, default=None,
                   help="extra steps under torch.profiler for epkit's step-time split (default 2; 1 with --cpu)")
    p.add_argument("--lr", type=float, default=None, help="AdamW peak learning rate (default 3e-4; 3e-3 with --cpu)")
    p.add_argument("--zero-stage", type=int, default=2, choices=(1, 2), help="DeepSpeed ZeRO stage, every variant")
    p.add_argument("--activation-checkpointing", default="none", choices=("none", "layers", "selective"),
                   help="for the epkit variants")
    p.add_argument("--variants", default=",".join(DEFAULT_VARIANTS),
                   help=f"comma separated, from {', '.join(VARIANTS)} (default: all but the last)")
    p.add_argument("--peak-tflops", type=float, default=None,
                   help="dense bf16 peak per GPU for MFU (default: 989 on H100/H200, else none)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)  # deepspeed adds it
    p.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results"),
                   help="folder for the JSON result (default bench/results)")
    a = p.parse_args(argv)
    a.variants = a.variants.split(",")
    unknown = [v for v in a.variants if split_variant(v, 2)[0] not in VARIANTS
               or split_variant(v, 2)[1] not in (0, 1, 2)]
    if unknown:
        p.error(f"unknown variant {unknown[0]!r}; choose from {', '.join(VARIANTS)}, each optionally with "
                f"@z0, @z1 or @z2 (its own ZeRO stage)")
    small = a.cpu
    a.layers = a.layers or (2 if small else 4)
    a.seq_len = a.seq_len or (32 if small else 4096)
    a.steps = a.steps or (3 if small else 10)
    a.warmup = a.warmup if a.warmup is not None else (1 if small else 2)
    a.profile_steps = a.profile_steps if a.profile_steps is not None else (1 if small else 2)
    a.lr = a.lr or (3e-3 if small else 3e-4)
    for name in ("layers", "seq_len", "micro_batch", "grad_accum", "steps"):
        if getattr(a, name) < 1:
            p.error(f"--{name.replace('_', '-')}={getattr(a, name)} must be at least 1")
    if not 0 <= a.warmup < a.steps:
        p.error(f"--warmup={a.warmup} must be at least 0 and below --steps={a.steps}")
    return a


COMM = re.compile(r"nccl|gloo|c10d|all_?to_?all|all_?reduce|all_?gather|reduce_?scatter|broadcast", re.I)
GEMM = re.compile(r"gemm|cutlass|nvjet|xmma|matmul|wgmma|grouped_mm", re.I)
ATTENTION = re.compile(r"flash|fmha|attention|sdpa|cudnn_.*mha", re.I)


def profile_split(step, device, steps: int) -> dict:
    """Step time split from `steps` profiled steps (torch.profiler): wall time of forward, backward and
    optimizer (each phase ends with a device sync, so these steps run a little slower than the timed
    ones), communication (NCCL kernels on GPU, gloo ops on CPU; union of their intervals) and the part of it
    no compute kernel overlaps, plus device time by kernel class and the top kernels. (epkit's forward
    includes the LM head's gradient: `linear_cross_entropy` computes it there, so backward is lighter.)"""
    import contextlib
    import tempfile

    from torch.profiler import ProfilerActivity, profile
    phases: dict[str, float] = {}

    @contextlib.contextmanager
    def phase(name):
        sync(device)
        t = time.perf_counter()
        yield
        sync(device)
        phases[name] = phases.get(name, 0.0) + (time.perf_counter() - t) * 1e3

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        t0 = time.perf_counter()
        for i in range(steps):
            step(i, phase)
        sync(device)
        wall = (time.perf_counter() - t0) * 1e3
    with tempfile.TemporaryDirectory() as tmp:
        trace = os.path.join(tmp, "trace.json")
        prof.export_chrome_trace(trace)
        with open(trace) as f:
            events = [e for e in json.load(f).get("traceEvents", []) if e.get("ph") == "X" and "dur" in e]
    kind = "kernel" if device.type == "cuda" else "cpu_op"
    spans = [(e["ts"], e["ts"] + e["dur"], e["name"]) for e in events if e.get("cat") == kind]
    comm = _union([(a, b) for a, b, n in spans if COMM.search(n)])
    out = {"steps": steps, "step_ms": wall / steps, "phases_ms_per_step": {k: v / steps for k, v in phases.items()},
           "communication_ms_per_step": _length(comm) / 1e3 / steps, "communication_exposed_ms_per_step": None}
    if device.type == "cuda":
        compute = _union([(a, b) for a, b, n in spans if not COMM.search(n)])
        out["communication_exposed_ms_per_step"] = (_length(comm) - _overlap(comm, compute)) / 1e3 / steps
        classes: dict[str, float] = {}
        by_name: dict[str, list] = {}
        for a, b, n in spans:
            c = ("communication" if COMM.search(n) else "gemm" if GEMM.search(n) else
                 "attention" if ATTENTION.search(n) else "other")
            classes[c] = classes.get(c, 0.0) + (b - a) / 1e3 / steps
            by_name.setdefault(n, [0.0, 0])
            by_name[n][0] += (b - a) / 1e3 / steps
            by_name[n][1] += 1
        out["kernel_ms_per_step"] = classes
        out["attention_kernels"] = sorted({n[:120] for _, _, n in spans if ATTENTION.search(n)})[:8]
        top = sorted(by_name.items(), key=lambda kv: -kv[1][0])[:40]
        out["top_kernels"] = [{"name": n[:160], "ms_per_step": round(ms, 3), "calls_per_step": cnt / steps}
                              for n, (ms, cnt) in top]
    return out


def _union(spans):
    merged = []
    for a, b in sorted(spans):
        if merged and a <= merged[-1][1]:
            merged[-1][1] = max(merged[-1][1], b)
        else:
            merged.append([a, b])
    return merged


def _length(spans) -> float:
    return sum(b - a for a, b in spans)


def _overlap(x, y) -> float:
    """Total length where two unions of intervals overlap."""
    i = j = 0
    total = 0.0
    while i < len(x) and j < len(y):
        total += max(0.0, min(x[i][1], y[j][1]) - max(x[i][0], y[j][0]))
        if x[i][1] < y[j][1]:
            i += 1
        else:
            j += 1
    return total


def free_memory(device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def run_variant(name: str, s: Setup, batches, profile: bool) -> dict:
    """Build, train s.steps steps (the last s.steps - s.warmup timed), then optionally profile. Every phase
    ends with an exchange of errors, so all ranks stop together when one fails."""
    rank, device = dist.get_rank(), s.device
    row: dict = {"variant": name, "ok": False}

    def attempt(phase: str, fn):
        try:
            out, err = fn(), None
        except Exception as e:  # an OOM or a peer's bug: record it, let the other variants run
            out, err = None, f"rank {rank}: {phase}: {error_text(e)}"
            del e
        errs = [x for x in gather(err) if x]  # NOTE: collective, every rank
        if errs:
            row["error"] = errs
            raise _VariantFailed
        return out

    state = {}
    try:
        free_memory(device)
        torch.manual_seed(s.seed)  # peers draw their initial weights from torch's global generator
        before = torch.cuda.memory_allocated(device) if device.type == "cuda" else None
        row["memory_before_gib"] = None if before is None else round(before / 2 ** 30, 3)
        # two phases, so a failure while building (which has no collective) stops every rank cleanly
        base, stage = split_variant(name, s.zero_stage)
        built = attempt("build", lambda: BUILDERS[base](dataclasses.replace(s, zero_stage=stage)))
        state["loss_fn"], row["notes"] = built.loss_fn, built.notes
        epkit.moe.FUSED_KERNELS = built.fused_kernels
        state["engine"] = attempt("engine", lambda: initialize(built.cfg, built.model, s.dtype)[0])
        del built
        row["notes"].update(zero_stage=state["engine"].zero_optimization_stage(),
                            overlap_comm=state["engine"].zero_overlap_comm())

        def step(i: int, phase=None) -> torch.Tensor:
            return _train_step(state["engine"], state["loss_fn"], batches[i], phase)

        losses = []
        for i in range(s.warmup):
            losses.append(attempt(f"step {i + 1}", lambda: step(i).item()))
        sync(device)
        dist.barrier()

        def timed():
            events = []
            t0 = time.perf_counter()
            for i in range(s.warmup, s.steps):
                events.append(step(i))
            sync(device)
            return time.perf_counter() - t0, [e.item() for e in events]

        elapsed, timed_losses = attempt("timed steps", timed)
        losses += timed_losses
        row["elapsed_s_per_rank"] = gather(elapsed)
        row["lm_losses"] = _mean_over_ranks(losses, device)
        if device.type == "cuda":
            for key, fn in (("allocated", torch.cuda.max_memory_allocated),
                            ("reserved", torch.cuda.max_memory_reserved)):
                row[f"peak_{key}_gib_per_rank"] = [round(m / 2 ** 30, 3) for m in gather(fn(device))]
        if profile and s.profile_steps:
            row["profile"] = attempt("profile", lambda: profile_split(
                lambda i, phase: step(s.steps + i, phase), device, s.profile_steps))
        # optimizer steps DeepSpeed skipped for a non-finite gradient (the same on every rank): a variant that
        # skips trains nothing, and its speed (no optimizer work) is not a training speed
        row["skipped_steps"] = state["engine"].skipped_steps
        row["ok"] = True
    except _VariantFailed:
        pass
    finally:
        if "engine" in state:
            state["engine"].destroy()  # else DeepSpeed's hooks keep its model and optimizer for the next variant
        state.clear()
        epkit.moe.FUSED_KERNELS = True
        free_memory(device)
    return row


class _VariantFailed(Exception):
    pass


def _train_step(engine, loss_fn, micro_batches, phase=None) -> torch.Tensor:
    """One optimizer step over the micro-batches; returns the mean LM loss (on device, not read)."""
    phase = phase or _no_phase
    lm = 0.0
    for batch in micro_batches:
        with phase("forward"):
            loss, lm_part = loss_fn(engine, batch)
        with phase("backward"):
            engine.backward(loss)
        with phase("optimizer"):
            engine.step()
        lm = lm + lm_part.detach().float()
    return lm / len(micro_batches)


class _no_phase:
    def __init__(self, name):
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def _mean_over_ranks(values: list[float], device) -> list[float]:
    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t)  # NOTE: collective
    return (t / dist.get_world_size()).tolist()


def figures(row: dict, s: Setup, tflops_matmul: float, peak: float | None) -> None:
    """tokens/s, FLOP/s and MFU from a finished variant's timing."""
    if not row.get("ok"):
        return
    world = dist.get_world_size()
    timed = s.steps - s.warmup
    tokens = s.tokens_per_step(world) * timed
    elapsed = max(row["elapsed_s_per_rank"])  # the slowest rank sets the pace
    row["tokens_per_s"] = tokens / elapsed
    row["tokens_per_s_per_gpu"] = row["tokens_per_s"] / world
    row["step_time_s"] = elapsed / timed
    row["tflops_per_gpu"] = row["tokens_per_s_per_gpu"] * s.flops_per_token / 1e12
    row["mfu"] = None if peak is None else row["tflops_per_gpu"] / peak
    row["fraction_of_matmul_rate"] = row["tflops_per_gpu"] / tflops_matmul
    row["final_lm_loss"] = row["lm_losses"][-1]


def main(argv=None) -> int:
    a = parse_args(argv)
    use_cuda = torch.cuda.is_available() and not a.cpu
    if a.cpu:
        torch.set_num_threads(1)
    owns_process_group = not dist.is_initialized()  # False when a test harness joined the ranks already
    init_distributed(backend="nccl" if use_cuda else "gloo", timeout_s=900)
    if not dist.is_initialized():
        raise SystemExit("launch with 2 ranks: torchrun --nproc_per_node 2 bench/train.py")
    rank, world = dist.get_rank(), dist.get_world_size()
    device = torch.device("cuda", torch.cuda.current_device()) if use_cuda else torch.device("cpu")
    dtype = torch.bfloat16 if use_cuda else torch.float32
    s = Setup.create(a, device, dtype)
    setup_expert_parallel(world)  # DeepSpeed's expert groups, once, before any variant builds (NOTE: collective)
    say = print if rank == 0 else (lambda *args, **kw: None)
    t_start = time.perf_counter()
    gpu = torch.cuda.get_device_name(device) if use_cuda else "cpu"
    peak = a.peak_tflops or next((v for k, v in PEAK_TFLOPS.items() if k in gpu), None)
    tflops = gather(matmul_tflops(device, dtype, 8192 if use_cuda else 256))
    batches = make_batches(s, rank, world, s.steps + s.profile_steps)
    now = datetime.datetime.now(datetime.timezone.utc)
    path = os.path.join(a.out, f"train-{slug(gpu)}-{now.strftime('%Y%m%dT%H%M%SZ')}.json")
    report = {
        "benchmark": "train", "created_utc": now.isoformat(timespec="seconds"), "gpu": gpu,
        "device": device.type, "backend": dist.get_backend(), "world_size": world, "versions": versions(),
        "config": s.describe(), "flops_per_token": s.flops_per_token, "active_params": s.active_params,
        "flops_formula": "6 x active_params + 6 x layers x seq_len x heads x head_dim (causal attention, fwd+bwd); "
                         "active_params: attention q/k/v/o, router, experts_per_token experts (3 x hidden x "
                         "intermediate each), LM head; not the embedding lookup",
        "peak_tflops_per_gpu": peak, "matmul_tflops_per_rank": tflops,
        "matmul_note": "one 8192^3 bf16 product (256^3 fp32 on CPU), measured in this run",
        "variants": [], "partial": True,
    }
    for name in a.variants:
        say(f"[{name}] ...", flush=True)
        t = time.perf_counter()
        row = run_variant(name, s, batches, profile=True)
        row["wall_s"] = round(time.perf_counter() - t, 1)
        figures(row, s, max(tflops), peak)
        report["variants"].append(row)
        if row.get("error"):
            say(f"[{name}] failed: {row['error'][0]}", flush=True)
        if rank == 0:
            _write(report, path)
    report["partial"] = False
    report["loss_check"] = _loss_check(report["variants"])
    report["wall_s"] = round(time.perf_counter() - t_start, 1)
    if rank == 0:
        _write(report, path)
        _print_table(report)
        print(f"wrote {path}")
    dist.barrier()
    if owns_process_group:
        dist.destroy_process_group()
    return 0


def _loss_check(rows: list[dict]) -> dict:
    """epkit at EP=2 (both exchanges), at EP=1 and on the reference loss path start from the same weights
    and see the same tokens: their losses must agree (to bf16 noise on GPU). The peers start from other
    random weights of the same scale, so theirs only follow a similar curve."""
    by = {r["variant"]: r for r in rows if r.get("ok")}
    out = {"final_lm_loss": {k: r["final_lm_loss"] for k, r in by.items()}}
    for other in ("epkit_ep2_fixed_capacity", "epkit_ep1", "epkit_ep2_reference", "epkit_ep4"):
        if "epkit_ep2" in by and other in by:
            out[f"epkit_ep2_vs_{other}_max_abs_diff"] = max(
                abs(x - y) for x, y in zip(by["epkit_ep2"]["lm_losses"], by[other]["lm_losses"]))
    return out


def _write(report: dict, path: str) -> None:
    write_json(path, report)


def _print_table(r: dict) -> None:
    c = r["config"]
    print(f"\ntraining L={c['layers']} T={c['seq_len']} B={c['micro_batch']} A={c['grad_accum']} x {r['world_size']} "
          f"ranks, {c['dtype']}, {r['flops_per_token'] / 1e9:.2f} GFLOP/token, on {r['gpu']}; matmul "
          f"{', '.join(f'{t:.0f}' for t in r['matmul_tflops_per_rank'])} TFLOP/s per rank")
    head = (f"{'variant':<24} {'tok/s':>10} {'tok/s/gpu':>10} {'TFLOP/s':>8} {'MFU':>6} {'%matmul':>8} "
            f"{'step s':>7} {'peak GiB':>9} {'loss':>8}")
    print(head)
    print("-" * len(head))
    for row in r["variants"]:
        if not row.get("ok"):
            print(f"{row['variant']:<24} failed: {row.get('error', ['?'])[0][:100]}")
            continue
        mem = _ms(max(row["peak_allocated_gib_per_rank"]) if row.get("peak_allocated_gib_per_rank") else None)
        mfu = "-" if row["mfu"] is None else f"{100 * row['mfu']:.1f}%"
        print(f"{row['variant']:<24} {row['tokens_per_s']:>10.0f} {row['tokens_per_s_per_gpu']:>10.0f} "
              f"{row['tflops_per_gpu']:>8.1f} {mfu:>6} {100 * row['fraction_of_matmul_rate']:>7.1f}% "
              f"{row['step_time_s']:>7.3f} {mem:>9} {row['final_lm_loss']:>8.4f}")
        if row.get("skipped_steps"):
            print(f"{'':<24} NOT TRAINING: the optimizer skipped {row['skipped_steps']} step(s) for non-finite gradients")
        prof = row.get("profile")
        if prof:
            ph = {k: f"{v:.1f}" for k, v in prof["phases_ms_per_step"].items()}
            print(f"{'':<24} split per step: forward {ph.get('forward')} ms, backward {ph.get('backward')} ms, "
                  f"optimizer {ph.get('optimizer')} ms; communication {prof['communication_ms_per_step']:.1f} ms "
                  f"({_ms(prof.get('communication_exposed_ms_per_step'))} ms not hidden behind compute)")
    for key, diff in r.get("loss_check", {}).items():
        if key.endswith("_max_abs_diff"):
            print(f"loss curves {key[:-len('_max_abs_diff')].replace('_vs_', ' vs ')}: max |diff| {diff:.2e}")


def _ms(v) -> str:
    return "-" if v is None else f"{v:.1f}"


if __name__ == "__main__":
    raise SystemExit(main())
