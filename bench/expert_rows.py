"""Small-batch MoE cost per EP rank, whole experts vs rows (`--expert-split`), measured on one GPU.

    python bench/expert_rows.py [--tokens 1,4,16] [--out bench/results/expert_rows-<gpu>.json]

At EP=2 with 8 Mixtral-8x7B experts, each layer of a decode step waits for the rank with the most expert work.
With whole experts a rank holds 4 experts and gets 0, 1 or 2 of a token's top-2 choices; with rows it holds
half of every expert's rows and always computes every pair on its half. This times, on one GPU, the fused
decode MoE path (`LocalDispatch.partial`, the Triton small-M kernels, tiles tuned per shape as the runner does,
replayed from CUDA graphs as decode steps are) a rank runs in each case, over the same random routings, and
reports per layer:
  whole_busiest_ms  mean over routings of the slower rank's time (each rank's own pairs on its 4 experts)
  rows_ms           mean time of one rank's pass over every pair on half-width experts (both ranks do the same)
The decode step waits for the slower rank in every layer, so (whole_busiest_ms - rows_ms) x layers is what rows
save per step (before the all-reduce, which both layouts pay). Weights are random bf16; no communication.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run from a checkout

from bench.timing import time_calls  # noqa: E402
from epkit.args import ModelArgs  # noqa: E402
from epkit.infer.decode import tune_tiles_for  # noqa: E402
from epkit.infer.graphs import record  # noqa: E402
from epkit.moe import Experts, LocalDispatch  # noqa: E402


def layouts(args: ModelArgs, device, dtype):
    """(rank 0's whole experts 0..3, rank 1's whole experts 4..7, one rank's half rows of all 8), with their
    dispatchers (global expert -> local slot, -1 elsewhere)."""
    E, D, I = args.num_experts, args.hidden_size, args.intermediate_size
    half = E // 2
    whole = [Experts(E, D, I, expert_ids=list(range(r * half, (r + 1) * half)), device=device, dtype=dtype)
             for r in range(2)]
    rows = Experts(E, D, I, device=device, dtype=dtype, rows=(0, 2))
    for ex in whole + [rows]:
        ex.w13.data.normal_(0, D ** -0.5)
        ex.w2.data.normal_(0, I ** -0.5)
    whole_dispatch = [LocalDispatch([s - r * half if r * half <= s < (r + 1) * half else -1 for s in range(E)])
                      for r in range(2)]
    return whole, whole_dispatch, rows, LocalDispatch(list(range(E)))


def _time(fn, device, iters: int = 10, graph: bool = True) -> float:
    """ms per call: on a GPU replayed from a CUDA graph of `iters` calls (as decode steps run: no launch gaps),
    on a CPU, or for prefill-sized batches (`graph` False: the grouped GEMM path, run eagerly as prefill
    chunks are), the median of eager calls."""
    if device.type != "cuda" or not graph:
        return time_calls(fn, device, 2, iters)["ms_median"]
    replayed, _ = record(lambda: [fn() for _ in range(iters)], device)
    replayed.replay()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    replayed.replay()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) / iters


@torch.no_grad()
def measure(args: ModelArgs, tokens: int, routings: int, device, dtype) -> dict:
    whole, whole_dispatch, rows, rows_dispatch = layouts(args, device, dtype)
    g = torch.Generator().manual_seed(tokens)
    x = torch.randn(tokens, args.hidden_size, generator=g).to(device, dtype)
    weights = torch.rand(tokens, 2, generator=g).to(device)
    for ex in whole + [rows]:  # the small-batch down projection's launch, chosen per shape as the runner does
        tune_tiles_for(ex)
    busiest, per_rows, both_on_one = [], [], 0
    routings = routings if tokens <= 64 else min(routings, 3)  # large batches: routing loads barely vary
    for _ in range(routings):
        ids = torch.rand(tokens, args.num_experts, generator=g).topk(2, dim=-1).indices.to(device)
        small = tokens <= 64  # decode-sized: graph-replayed small-M kernels; larger: prefill's grouped GEMM
        t_whole = [_time(lambda r=r: whole_dispatch[r].partial(whole[r], x, weights, ids), device, graph=small)
                   for r in range(2)]
        busiest.append(max(t_whole))
        per_rows.append(_time(lambda: rows_dispatch.partial(rows, x, weights, ids), device, graph=small))
        both_on_one += int(((ids < args.num_experts // 2).sum(1) != 1).all())
    return {"tokens": tokens, "routings": routings, "whole_busiest_ms": round(sum(busiest) / routings, 4),
            "rows_ms": round(sum(per_rows) / routings, 4), "routings_with_every_token_on_one_rank": both_on_one}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", default="mixtral-8x7b")
    p.add_argument("--tokens", default="1,2,4,16,4096")
    p.add_argument("--routings", type=int, default=40, help="random routings averaged per token count")
    p.add_argument("--out", default=None)
    a = p.parse_args(argv)
    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    dtype = torch.bfloat16 if cuda else torch.float32
    args = ModelArgs.from_name(a.preset)
    rows = []
    for n in (int(t) for t in a.tokens.split(",")):
        rows.append(measure(args, n, a.routings, device, dtype))
        r = rows[-1]
        print(f"tokens {n:4d}: whole experts, slower rank {r['whole_busiest_ms']:.4f} ms | rows {r['rows_ms']:.4f} ms "
              f"per layer -> {args.num_layers * (r['whole_busiest_ms'] - r['rows_ms']):+.2f} ms per step saved",
              flush=True)
    gpu = torch.cuda.get_device_name(device) if cuda else "cpu"
    result = {"benchmark": "small-batch MoE per EP=2 rank: whole experts (slower rank) vs rows, one GPU",
              "gpu": gpu, "config": {"preset": a.preset, "dtype": str(dtype), "ep": 2, "layers": args.num_layers,
                                     "routings": a.routings}, "rows": rows}
    out = a.out or os.path.join("bench", "results", f"expert_rows-{gpu.replace(' ', '-')}-"
                                                     f"{time.strftime('%Y%m%dT%H%M')}.json")
    os.makedirs(os.path.dirname(out), exist_ok=True)
    with open(out, "w") as f:
        json.dump(result, f, indent=1)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
