"""One MoE layer of the Mixtral-8x7B shape on 2 GPUs: epkit at EP=2 (both dispatch modes) against
transformers' `MixtralSparseMoeBlock` on one GPU and DeepSpeed's `deepspeed.moe.layer.MoE` at ep_size=2,
measured in the same run with identical weights. Forward only, inference mode.

    torchrun --nproc_per_node 2 bench/moe_layer.py [--out DIR]     # GPU: NCCL, bf16, 8x7B shape
    torchrun --nproc_per_node 2 bench/moe_layer.py --small         # CPU: gloo, fp32, tiny dims

Every EP rank gets N tokens: `replicated` gives both ranks the same N tokens (the layer sees N),
`all_to_all` and DeepSpeed give each rank its own N (the layer sees N x ranks). transformers runs on
rank 0's GPU alone with rank 0's N tokens. Results: a table on stdout and a JSON file in --out.

Legend: N tokens per rank, D hidden, I intermediate, E experts, K experts per token, L local experts.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import re
import sys
import time
import traceback
from dataclasses import asdict, dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run from a checkout

import epkit  # noqa: E402
from bench.peers import build_deepspeed, build_transformers, versions  # noqa: E402
from bench.timing import copy_bandwidth, matmul_tflops, sync, time_calls  # noqa: E402
from epkit.infer.graphs import record  # noqa: E402
from epkit.moe import route  # noqa: E402
from epkit.parallel import init_distributed, set_dispatch, setup_expert_parallel, world_rank  # noqa: E402

IMPLS = ("epkit_replicated", "epkit_replicated_graph", "epkit_all_to_all", "transformers_eager",
         "transformers_grouped_mm", "deepspeed")
GPU_ONLY = {"epkit_replicated_graph": "CUDA graphs need a GPU"}


@dataclass
class Shape:
    hidden: int
    intermediate: int
    experts: int
    top_k: int

    @property
    def expert_elems(self) -> int:
        """Weights of one expert (w1, w3, w2), in elements."""
        return 3 * self.hidden * self.intermediate


FULL = Shape(hidden=4096, intermediate=14336, experts=8, top_k=2)  # Mixtral-8x7B
SMALL = Shape(hidden=32, intermediate=64, experts=8, top_k=2)


# ---- small helpers --------------------------------------------------------------------------------

def gather(obj) -> list:
    """Every rank's `obj`, in rank order (NOTE: collective)."""
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")


def error_text(e: BaseException) -> str:
    last = traceback.extract_tb(e.__traceback__)[-1:] if e.__traceback__ else []
    where = f" (at {os.path.basename(last[0].filename)}:{last[0].lineno})" if last else ""
    return f"{type(e).__name__}: {e}{where}"[:2000]


# ---- weights and inputs: identical on every rank and for every implementation -------------------

@torch.no_grad()
def make_weights(shape: Shape, device, dtype, seed: int) -> dict[str, torch.Tensor]:
    """Router [E, D], w13 [E, 2I, D] (w1 rows then w3 rows), w2 [E, D, I]. Drawn on rank 0, then
    broadcast so every rank holds the same bytes. Scales keep activations O(1) and routing decisive."""
    D, I, E = shape.hidden, shape.intermediate, shape.experts
    w = {"gate": torch.empty(E, D, device=device, dtype=dtype),
         "w13": torch.empty(E, 2 * I, D, device=device, dtype=dtype),
         "w2": torch.empty(E, D, I, device=device, dtype=dtype)}
    if world_rank() == 0:
        g = torch.Generator(device=device).manual_seed(seed)
        w["gate"].copy_(torch.randn(E, D, generator=g, device=device) * (2.0 / D ** 0.5))
        for e in range(E):  # one expert at a time keeps the fp32 scratch small
            w["w13"][e].copy_(torch.randn(2 * I, D, generator=g, device=device) * D ** -0.5)
            w["w2"][e].copy_(torch.randn(D, I, generator=g, device=device) * I ** -0.5)
    if dist.is_initialized():
        for t in w.values():
            dist.broadcast(t, src=0)  # NOTE: collective
    return w


def make_tokens(n: int, shape: Shape, seed: int, device, dtype) -> torch.Tensor:
    """[1, N, D] drawn on the CPU from `seed`, so any rank can rebuild any rank's tokens."""
    g = torch.Generator().manual_seed(seed)
    return torch.randn(1, n, shape.hidden, generator=g).to(device=device, dtype=dtype)


# ---- the implementations ----------------------------------------------------------------------------

@torch.no_grad()
def build_epkit(shape: Shape, w, ep_size: int, device, dtype):
    """A 1-layer epkit.Mixtral built as the product builds every model (`epkit.build.build_model`: meta,
    expert parallelism, materialise), its MoE layer loaded with `w`. Returns (model, MoE layer)."""
    from epkit.build import build_model
    args = epkit.ModelArgs(vocab_size=8, hidden_size=shape.hidden, intermediate_size=shape.intermediate,
                           num_layers=1, num_heads=1, num_kv_heads=1, num_experts=shape.experts,
                           experts_per_token=shape.top_k)
    model = build_model(args, epkit.ShardingPlan(shape.experts, ep_size), "replicated", device, dtype)
    moe = model.layers[0].moe
    moe.gate.weight.copy_(w["gate"])
    local = moe.experts.expert_ids
    moe.experts.w13.copy_(w["w13"][local])
    moe.experts.w2.copy_(w["w2"][local])
    return model.eval(), moe.eval()


# ---- floors ---------------------------------------------------------------------------------------

def floors(work, expert_bytes: int, pair_flops: int, bandwidth_gbps: float, tflops: float) -> dict:
    """Lower bounds for one layer call from `work` = per rank (experts read, (token, expert) pairs computed):
    reading those experts' weights once at the copy bandwidth, and their FLOPs at the matmul throughput.
    The slowest rank sets the pace."""
    if work is None:
        return {"expert_bytes_max_rank": None, "flops_max_rank": None, "floor_memory_ms": None,
                "floor_compute_ms": None, "floor_ms": None}
    mem = [len(experts) * expert_bytes / (bandwidth_gbps * 1e9) * 1e3 for experts, _ in work]
    comp = [pairs * pair_flops / (tflops * 1e12) * 1e3 for _, pairs in work]
    return {"expert_bytes_max_rank": max(len(experts) for experts, _ in work) * expert_bytes,
            "flops_max_rank": max(pairs for _, pairs in work) * pair_flops,
            "floor_memory_ms": max(mem), "floor_compute_ms": max(comp),
            "floor_ms": max(max(m, c) for m, c in zip(mem, comp))}


# ---- correctness ----------------------------------------------------------------------------------

def compare(out: torch.Tensor, ref: torch.Tensor, tol: float) -> dict:
    """Max |out - ref| and how many token rows exceed `tol` x max|ref|."""
    out, ref = out.float().reshape(-1, out.shape[-1]), ref.float().reshape(-1, ref.shape[-1])
    diff = (out - ref).abs()
    ref_max = ref.abs().max().item()
    bound = tol * max(ref_max, 1e-6)
    rows_over = int((diff.amax(dim=1) > bound).sum())
    return {"max_abs_diff": diff.max().item(), "ref_max_abs": ref_max, "rows_checked": ref.shape[0],
            "rows_over_tol": rows_over,
            "tol": bound, "ok": rows_over == 0}


def merge_checks(per_rank: list[dict | None]) -> dict | None:
    per_rank = [c for c in per_rank if c is not None]
    if not per_rank:
        return None
    return {"max_abs_diff": max(c["max_abs_diff"] for c in per_rank),
            "ref_max_abs": max(c["ref_max_abs"] for c in per_rank),
            "rows_checked": sum(c["rows_checked"] for c in per_rank),
            "rows_over_tol": sum(c["rows_over_tol"] for c in per_rank),
            "tol": min(c["tol"] for c in per_rank), "ok": all(c["ok"] for c in per_rank)}


# ---- the run ----------------------------------------------------------------------------------------

def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--small", action="store_true", help="tiny dims, CPU (gloo) and fp32: a check, not a benchmark")
    p.add_argument("--tokens", type=str, default=None, help="tokens per rank, comma separated "
                   "(default 1,64,4096; 1,16,64 with --small)")
    p.add_argument("--warmup", type=int, default=None, help="untimed iterations (default 5; 1 with --small)")
    p.add_argument("--iters", type=int, default=None, help="timed iterations (default 30; 3 with --small)")
    p.add_argument("--impls", type=str, default=",".join(IMPLS),
                   help=f"implementations to time, comma separated (default all: {','.join(IMPLS)}); "
                        "transformers_eager always serves as the reference")
    p.add_argument("--dtype", choices=("bf16", "fp32"), default=None,
                   help="weights and activations (default bf16 on GPU, fp32 with --small)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)  # deepspeed adds it
    p.add_argument("--out", type=str, default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results"),
                   help="folder for the JSON result (default bench/results)")
    a = p.parse_args(argv)
    a.impls = a.impls.split(",")
    unknown = [i for i in a.impls if i not in IMPLS]
    if unknown:
        p.error(f"unknown implementation {unknown[0]!r}; choose from {', '.join(IMPLS)}")
    a.tokens = [int(t) for t in (a.tokens or ("1,16,64" if a.small else "1,64,4096")).split(",")]
    a.warmup = a.warmup if a.warmup is not None else (1 if a.small else 5)
    a.iters = a.iters if a.iters is not None else (3 if a.small else 30)
    return a


def main(argv=None) -> int:
    a = parse_args(argv)
    use_cuda = torch.cuda.is_available() and not a.small
    if a.small:
        torch.set_num_threads(1)
    owns_process_group = not dist.is_initialized()  # False when a test harness joined the ranks already
    init_distributed(backend="nccl" if use_cuda else "gloo", timeout_s=300)
    if not dist.is_initialized():
        raise SystemExit("launch with 2 ranks: torchrun --nproc_per_node 2 bench/moe_layer.py")
    rank, world = dist.get_rank(), dist.get_world_size()
    device = torch.device("cuda", torch.cuda.current_device()) if use_cuda else torch.device("cpu")
    dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}[a.dtype or ("bf16" if use_cuda else "fp32")]
    shape = SMALL if a.small else FULL
    ep = world
    tol = 2e-2 if dtype == torch.bfloat16 else 1e-4  # of max|ref|; bf16 carries 8 significant bits
    say = print if rank == 0 else (lambda *args, **kw: None)
    t_start = time.perf_counter()

    errors: dict[str, list[str]] = {}

    def attempt(name: str, fn, *args):
        """Run fn on every rank; on failure keep the error string. All ranks learn whether any failed."""
        try:
            out, err = fn(*args), None
        except Exception as e:  # a peer may fail on this shape; record it and carry on
            out, err = None, f"rank {rank}: {error_text(e)}"
        errs = [x for x in gather(err) if x]
        if errs:
            errors.setdefault(name, []).extend(errs)
            say(f"[{name}] failed: {errs[0]}")
            return None
        return out

    with torch.inference_mode():
        weights = make_weights(shape, device, dtype, a.seed)
        bw = gather(copy_bandwidth(device, dtype, (1 << 30) if use_cuda else (8 << 20)))
        tflops = gather(matmul_tflops(device, dtype, 8192 if use_cuda else 256))
        groups = setup_expert_parallel(ep)

        built = {}
        built["epkit"] = attempt("epkit", build_epkit, shape, weights, ep, device, dtype)
        built["transformers"] = attempt("transformers", build_transformers, shape, weights, device, dtype)
        built["deepspeed"] = (attempt("deepspeed", build_deepspeed, shape, weights, ep, groups.ep_rank, device, dtype)
                              if "deepspeed" in a.impls else None)
        local_sets = gather(built["epkit"][1].experts.expert_ids if built["epkit"] else None)
        del weights
        if use_cuda:
            torch.cuda.empty_cache()

        def run_epkit(mode, x):
            model, moe = built["epkit"]
            if model.expert_parallel.dispatch != mode:
                set_dispatch(model, mode)
            return moe(x)[0]

        graphs = {}  # x's shape -> (graph, static input, static output, the dispatcher the graph reads)

        def run_epkit_graph(x):
            """The layer captured once per shape (epkit's CUDA-graph helper) and replayed with x copied in."""
            if x.shape not in graphs:
                run_epkit("replicated", x)  # sets the dispatcher (and moves its table) outside the capture
                moe, static = built["epkit"][1], x.clone()
                graph, out = record(lambda: moe(static)[0], device, warmup=3)
                # keep the dispatcher: set_dispatch replaces it, and the graph reads its slot table
                graphs[x.shape] = (graph, static, out, moe.dispatcher)
            graph, static, out, _ = graphs[x.shape]
            static.copy_(x)
            graph.replay()
            return out

        def run_transformers(impl, x):
            block = built["transformers"]
            cfg = getattr(block.experts, "config", None)  # transformers >= 5 switches expert kernels here
            if cfg is not None:
                cfg._experts_implementation = impl
            elif impl != "eager":
                raise RuntimeError(f"transformers {versions()['transformers']} has no experts implementation switch")
            return block(x)

        def run_deepspeed(x):
            return built["deepspeed"](x)[0]

        runners = {
            "epkit_replicated": (lambda x_rep, x_own: run_epkit("replicated", x_rep), "epkit", True),
            "epkit_replicated_graph": (lambda x_rep, x_own: run_epkit_graph(x_rep), "epkit", True),
            "epkit_all_to_all": (lambda x_rep, x_own: run_epkit("all_to_all", x_own), "epkit", True),
            "transformers_eager": (lambda x_rep, x_own: run_transformers("eager", x_rep), "transformers", False),
            "transformers_grouped_mm": (lambda x_rep, x_own: run_transformers("grouped_mm", x_rep), "transformers",
                                        False),
            "deepspeed": (lambda x_rep, x_own: run_deepspeed(x_own), "deepspeed", True),
        }
        skipped = {k: why for k, why in GPU_ONLY.items() if k in a.impls and not use_cuda}
        runners = {k: v for k, v in runners.items() if k in a.impls and k not in skipped}
        # inputs each implementation sees: the replicated ones or this rank's own
        feeds_own = {"epkit_all_to_all", "deepspeed"}

        results, checks = [], {}
        for n in a.tokens:
            x_rep = make_tokens(n, shape, a.seed + 1000, device, dtype)  # same on every rank
            x_own = make_tokens(n, shape, a.seed + 2000 + rank, device, dtype)  # this rank's own
            # tokens per expert, for the floors: which weights each rank must read, how many FLOPs it computes
            # and how many tokens an fp32 router (DeepSpeed's) sends to other experts than a bf16 one
            counts, fp32_moves = {}, {}
            router = built["transformers"].gate.weight if built["transformers"] else None
            if router is not None:
                for key, x in (("rep", x_rep), ("own", x_own)):
                    ids = route(F.linear(x.reshape(n, -1), router), shape.top_k)[1]
                    counts[key] = torch.bincount(ids.reshape(-1), minlength=shape.experts).tolist()
                    ids32 = route(F.linear(x.reshape(n, -1).float(), router.float()), shape.top_k)[1]
                    fp32_moves[key] = int((ids.sort(-1).values != ids32.sort(-1).values).any(-1).sum())
            counts_all = gather(counts)
            fp32_moves_all = gather(fp32_moves)

            # correctness first: every implementation against transformers on the same tokens
            refs = {}
            if built["transformers"]:
                refs = {"rep": run_transformers("eager", x_rep), "own": run_transformers("eager", x_own)}
            checks[str(n)] = {}
            for impl, (fn, needs, _) in runners.items():
                if not built[needs] or impl in errors or impl == "transformers_eager":
                    continue
                check = None
                if refs:
                    out = attempt(impl, fn, x_rep, x_own)
                    if out is None:
                        continue
                    check = compare(out, refs["own" if impl in feeds_own else "rep"], tol)
                checks[str(n)][impl] = merge_checks(gather(check))
                if impl == "deepspeed" and checks[str(n)][impl] is not None:
                    checks[str(n)][impl]["tokens_routed_differently_in_fp32"] = sum(m["own"] for m in fp32_moves_all)

            # timing
            for impl, (fn, needs, collective) in runners.items():
                if not built[needs] or impl in errors:
                    continue
                active = collective or rank == 0
                sync(device)
                dist.barrier()
                t = attempt(impl, lambda: time_calls(lambda: fn(x_rep, x_own), device, a.warmup, a.iters) if active
                            else None)
                sync(device)
                dist.barrier()
                if t is None and impl in errors:
                    continue
                per_rank = [r for r in gather(t) if r is not None]
                work = _work(counts_all, local_sets, "own" if impl in feeds_own else "rep", collective, ep)
                elem = torch.tensor([], dtype=dtype).element_size()
                floor = floors(work, shape.expert_elems * elem, 2 * shape.expert_elems,
                               max(bw) if collective else bw[0], max(tflops) if collective else tflops[0])
                results.append({
                    "tokens_per_rank": n, "impl": impl, "devices": ep if collective else 1,
                    "tokens_in_layer": n * (ep if impl in feeds_own else 1),
                    "ms_median": max(r["ms_median"] for r in per_rank),  # the slowest rank sets the pace
                    "ms_median_per_rank": [r["ms_median"] for r in per_rank],
                    "ms_min": max(r["ms_min"] for r in per_rank),
                    "wall_ms_mean": max(r["wall_ms_mean"] for r in per_rank),
                    **floor,
                })

    epkit_checks = [c for per_n in checks.values() for impl, c in per_n.items() if impl.startswith("epkit")]
    epkit_ok = (bool(epkit_checks) and all(c is not None and c["ok"] for c in epkit_checks)
                and not any(name.startswith("epkit") for name in errors))
    epkit_asked = any(i.startswith("epkit") for i in a.impls)
    if rank == 0:
        now = datetime.datetime.now(datetime.timezone.utc)
        gpu = torch.cuda.get_device_name() if use_cuda else "cpu"
        report = {
            "benchmark": "moe_layer",
            "created_utc": now.isoformat(timespec="seconds"),
            "gpu": gpu,
            "device": str(device.type),
            "backend": dist.get_backend(),
            "world_size": world,
            "versions": versions(),
            "config": {**asdict(shape), "ep_size": ep, "dtype": str(dtype).replace("torch.", ""), "small": a.small,
                       "tokens_per_rank": a.tokens, "warmup": a.warmup, "iters": a.iters, "seed": a.seed,
                       "correctness_tol_of_ref_max": tol},
            "copy_bandwidth_GBps_per_rank": bw,
            "matmul_TFLOPs_per_rank": tflops,
            "floor_note": "bandwidth from a device-to-device copy (bytes read + written), TFLOP/s from a dense "
                          "matmul, both measured in this run; floor_memory_ms = bytes of the expert weights a rank "
                          "must read for these tokens / bandwidth, floor_compute_ms = its expert FLOPs "
                          "(6 D I per routed pair) / TFLOP/s, floor_ms = the larger, on the busiest rank",
            "correctness_vs_transformers": checks,
            "epkit_matches_transformers": epkit_ok if epkit_asked else None,
            "results": results,
            "errors": errors,
            "skipped": skipped,
            "wall_s": round(time.perf_counter() - t_start, 1),
        }
        os.makedirs(a.out, exist_ok=True)
        path = os.path.join(a.out, f"moe_layer-{slug(gpu)}-{now.strftime('%Y%m%dT%H%M%SZ')}.json")
        with open(path, "w") as f:
            json.dump(report, f, indent=2)
        _print_table(report)
        print(f"wrote {path}")
    dist.barrier()
    if owns_process_group and device.type != "cuda":
        # NOTE: on GPUs, tearing down NCCL after CUDA-graph captures hung for minutes (2x H200);
        # process exit releases the communicators instead.
        dist.destroy_process_group()
    return 1 if epkit_asked and not epkit_ok else 0


def _work(counts_all, local_sets, key: str, collective: bool, ep: int):
    """Per rank (experts whose weights it reads, (token, expert) pairs it computes). One GPU computes
    every choice of its tokens; under EP a rank computes its local experts' share of the tokens it
    serves: rank 0's tokens for replicated ("rep", the same everywhere), every rank's own for all-to-all."""
    if any(key not in c for c in counts_all):
        return None
    if not collective:
        counts = counts_all[0][key]
        return [({e for e, c in enumerate(counts) if c}, sum(counts))]
    if any(s is None for s in local_sets):
        return None
    counts = counts_all[0][key] if key == "rep" else [sum(c) for c in zip(*(x[key] for x in counts_all))]
    return [({e for e in local_sets[r] if counts[e]}, sum(counts[e] for e in local_sets[r])) for r in range(ep)]


def _ms(v) -> str:
    return "-" if v is None else f"{v:.3f}"


def _print_table(r: dict) -> None:
    c = r["config"]
    print(f"\nMoE layer D={c['hidden']} I={c['intermediate']} E={c['experts']} K={c['top_k']} {c['dtype']} "
          f"EP={c['ep_size']} on {r['gpu']} ({r['backend']}); per rank: copy bandwidth "
          f"{', '.join(f'{b:.0f}' for b in r['copy_bandwidth_GBps_per_rank'])} GB/s, matmul "
          f"{', '.join(f'{t:.1f}' for t in r['matmul_TFLOPs_per_rank'])} TFLOP/s")
    unit = "gpus" if r["device"] == "cuda" else "ranks"
    head = (f"{'tokens/rank':>11}  {'implementation':<24} {unit:>5} {'layer tok':>9} {'median ms':>10} "
            f"{'wall ms':>9} {'mem floor':>9} {'flop floor':>10} {'x floor':>8} {'max|diff|':>10}")
    print(head)
    print("-" * len(head))
    for row in r["results"]:
        check = r["correctness_vs_transformers"].get(str(row["tokens_per_rank"]), {}).get(row["impl"])
        diff = "ref" if row["impl"] == "transformers_eager" else (
            "-" if check is None else f"{check['max_abs_diff']:.2e}" + ("" if check["ok"] else f" !{check['rows_over_tol']}"))
        ratio = "-" if not row["floor_ms"] else f"{row['ms_median'] / row['floor_ms']:.1f}"
        print(f"{row['tokens_per_rank']:>11}  {row['impl']:<24} {row['devices']:>5} {row['tokens_in_layer']:>9} "
              f"{row['ms_median']:>10.3f} {row['wall_ms_mean']:>9.3f} {_ms(row['floor_memory_ms']):>9} "
              f"{_ms(row['floor_compute_ms']):>10} {ratio:>8} {diff:>10}")
    for impl, errs in r["errors"].items():
        print(f"error [{impl}]: {errs[0]}")
    print(f"epkit matches transformers: {r['epkit_matches_transformers']}  "
          f"('!n': n token rows over {c['correctness_tol_of_ref_max']} x max|ref|; DeepSpeed routes in fp32, "
          f"so near-tied tokens may pick another expert)")


if __name__ == "__main__":
    from epkit.runtime import exit_now
    exit_now(main())  # results are written; gloo's teardown at interpreter exit could still abort the rank
