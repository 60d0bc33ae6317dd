"""Decode throughput of epkit's engine at EP=N next to transformers' `generate` with the layers split
over the same GPUs, measured in one run. Random bf16 weights built straight on the GPUs.

    torchrun --nproc_per_node 2 bench/generate.py                      # Mixtral-8x7B shape, EP=2
    deepspeed --num_gpus 2 bench/generate.py
    torchrun --nproc_per_node 2 bench/generate.py --preset tiny        # CPU check (gloo)

Per batch size B (prompt P random tokens, N new, greedy, EOS ignored) each side runs `generate`
twice: with 1 new token (prefill + first token) and with N. Decode tokens/s = B * (N - 1) / (t_N - t_1),
the same formula for both sides. Writes bench/results/generate-<gpu>-<time>.json and prints a table.
"""
from __future__ import annotations

import argparse
import datetime
import gc
import json
import os
import platform
import sys
import time

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run from a checkout

from bench.peers import versions  # noqa: E402
from bench.timing import sync  # noqa: E402
from epkit.args import ModelArgs  # noqa: E402
from epkit.infer import LLM, SamplingParams  # noqa: E402
from epkit.infer.build import random_model  # noqa: E402
from epkit.infer.kv_cache import bytes_per_block  # noqa: E402
from epkit.parallel import init_distributed, world_rank, world_size  # noqa: E402

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--preset", default="mixtral-8x7b")
    p.add_argument("--ep", dest="ep_size", type=int, default=None, help="expert-parallel size (default: the number of "
                   "ranks)")
    p.add_argument("--batch-sizes", default="1,16,64")
    p.add_argument("--prompt-len", type=int, default=128)
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--block-size", type=int, default=16)
    p.add_argument("--dtype", default="auto", choices=["auto", "bf16", "fp32"], help="auto: bf16 on GPU, fp32 on CPU")
    p.add_argument("--skip-hf", action="store_true", help="do not measure transformers")
    p.add_argument("--expert-splits", default="experts", help="comma list of experts,rows: each runs epkit once "
                   "(the first is the headline; the JSON's epkit_splits holds all, with greedy agreement)")
    p.add_argument("--out", default=None, help="JSON path (default: bench/results/generate-<gpu>-<time>.json)")
    p.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    args.batch_sizes = [int(b) for b in args.batch_sizes.split(",")]
    if min(args.batch_sizes) < 1 or args.prompt_len < 1 or args.new_tokens < 2:
        p.error(f"batch sizes {args.batch_sizes} must be >= 1, prompt-len >= 1, new-tokens >= 2")
    return args


def log(msg: str) -> None:
    if world_rank() == 0:
        print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def make_prompts(batch: int, length: int, vocab: int, seed: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, vocab, (batch, length), generator=g).tolist()


def peak_memory_all_ranks(device) -> list[float]:
    """GiB peak allocated on this rank's GPU, gathered from every rank (0 on CPU)."""
    mine = torch.cuda.max_memory_allocated(device) / 2 ** 30 if device.type == "cuda" else 0.0
    if world_size() == 1:
        return [round(mine, 2)]
    out = [None] * world_size()
    dist.all_gather_object(out, round(mine, 2))  # NOTE: collective
    return out


# ---- epkit ----------------------------------------------------------------------------------------

def bench_epkit(margs: ModelArgs, a, device, dtype, split: str = "experts") -> tuple[list[dict], dict]:
    t0 = time.perf_counter()
    model = random_model(margs, a.ep_size, device, dtype, seed=0, split=split)
    sync(device)
    build_s = time.perf_counter() - t0
    log(f"epkit: built {margs.num_parameters() / 1e9:.1f}B-parameter model at EP={a.ep_size} in {build_s:.1f}s")
    B, L = max(a.batch_sizes), a.prompt_len + a.new_tokens
    blocks = B * -(-L // a.block_size) + 2
    llm = LLM.from_model(model, block_size=a.block_size, max_num_seqs=B, max_num_batched_tokens=B * a.prompt_len,
                         kv_cache_memory=blocks * bytes_per_block(margs, a.block_size, dtype))
    params = lambda n: SamplingParams(temperature=0, max_tokens=n, ignore_eos=True)  # noqa: E731
    llm.generate(make_prompts(2, a.prompt_len, margs.vocab_size, 99), params(4))  # warm-up
    rows = []
    for b in a.batch_sizes:
        prompts = make_prompts(b, a.prompt_len, margs.vocab_size, b)
        # Warm-up at this batch size: captures the decode CUDA graphs of its buckets (as a server
        # does once at start-up) so the timed runs measure steady-state decoding.
        llm.generate(prompts, params(4))
        t = {}
        for n in (1, a.new_tokens):
            steps = llm.stats["steps"]
            sync(device)
            start = time.perf_counter()
            outs = llm.generate(prompts, params(n))  # ends with a host sync on rank 0
            sync(device)
            t[n] = time.perf_counter() - start
            if world_rank() == 0:
                assert all(len(o.token_ids) == n and o.error is None for o in outs), outs[0]
            t[f"steps{n}"] = llm.stats["steps"] - steps
        rows.append(_row(b, a, t))
        rows[-1]["tokens"] = [list(o.token_ids) for o in outs] if world_rank() == 0 else None
        log(f"epkit B={b}: prefill+1 {t[1]:.3f}s, +{a.new_tokens} {t[a.new_tokens]:.3f}s, "
            f"decode {_tps(rows[-1])}")
    load = llm.expert_load()
    extra = {"build_s": round(build_s, 1), "peak_memory_gib": peak_memory_all_ranks(device),
             "kv_cache_blocks": llm.cache.num_blocks, "per_rank_expert_share": load["per_rank_share"]}
    del llm, model
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return rows, extra


def _row(b: int, a, t: dict) -> dict:
    """One batch size's figures from the timed runs t[1] (prefill and one token) and t[n] (n tokens). When
    the n-token run took no longer than the one-token run (a prefill-sized run: n = 2 is within noise), the
    decode figures are None, not a division by a difference of zero or below."""
    n = a.new_tokens
    decode_s = t[n] - t[1] if t[n] > t[1] else None
    return {"batch": b, "prefill_plus_1_s": round(t[1], 4), "total_s": round(t[n], 4),
            "decode_tokens_per_s": round(b * (n - 1) / decode_s, 2) if decode_s else None,
            "end_to_end_tokens_per_s": round(b * n / t[n], 2),
            "ms_per_decode_step": round(1000 * decode_s / (n - 1), 2) if decode_s else None,
            "steps": t.get(f"steps{n}")}


def _tps(row: dict) -> str:
    return f"{row['decode_tokens_per_s']:.1f} tok/s" if row["decode_tokens_per_s"] is not None else "- tok/s"


def _cells(row: dict | None) -> str:
    """prefill+1 s, decode tok/s and ms/step of one side, '-' where there is none."""
    def f(v, w, spec):
        return f"{v:>{w}{spec}}" if v is not None else f"{'-':>{w}}"
    row = row or {}
    return " | ".join([f(row.get("prefill_plus_1_s"), 9, ".3f"), f(row.get("decode_tokens_per_s"), 10, ".1f"),
                       f(row.get("ms_per_decode_step"), 8, ".1f")])


def print_table(r: dict) -> None:
    print(f"\n{r['config']['preset']} ({r['config']['parameters_b']}B params, {r['config']['dtype']}) on "
          f"{r['num_gpus'] or 'no'} x {r['gpu']}; prompt {r['config']['prompt_len']}, "
          f"{r['config']['new_tokens']} new tokens, greedy")
    side = f"{'prefill+1':>9} | {'tok/s':>10} | {'ms/step':>8}"
    print(f"{'':>5} | {'epkit EP=' + str(r['config']['ep']):^33} | {'transformers':^33} |")
    print(f"{'batch':>5} | {side} | {side} | {'decode speed-up':>15}")
    theirs = {row["batch"]: row for row in (r["transformers"] or {}).get("rows") or []}
    for row in r["epkit"]["rows"]:
        t = theirs.get(row["batch"])
        ours_tps, their_tps = row["decode_tokens_per_s"], (t or {}).get("decode_tokens_per_s")
        sp = f"{ours_tps / their_tps:>14.2f}x" if ours_tps and their_tps else f"{'-':>15}"
        print(f"{row['batch']:>5} | {_cells(row)} | {_cells(t)} | {sp}")
    print(f"peak GiB per GPU: epkit {r['epkit']['peak_memory_gib']}"
          + (f", transformers {r['transformers']['peak_memory_gib']}" if r["transformers"] else ""))


# ---- transformers ---------------------------------------------------------------------------------

def build_hf(margs: ModelArgs, devices: list, dtype):
    """transformers' Mixtral with random weights, decoder layers split evenly over `devices`."""
    from accelerate import dispatch_model
    from accelerate.utils import set_module_tensor_to_device
    from transformers import MixtralConfig, MixtralForCausalLM
    from transformers.models.mixtral.modeling_mixtral import MixtralRotaryEmbedding
    cfg = MixtralConfig(**{k: v for k, v in margs.to_hf_config().items() if k not in ("architectures", "model_type")})
    cfg.dtype = dtype
    default = torch.get_default_dtype()
    torch.set_default_dtype(dtype)  # parameters are made in `dtype` (set_module_tensor_to_device casts to it)
    try:
        with torch.device("meta"):
            hf = MixtralForCausalLM(cfg)
    finally:
        torch.set_default_dtype(default)
    L = margs.num_layers
    dmap = {"model.embed_tokens": devices[0], "model.rotary_emb": devices[0], "model.norm": devices[-1],
            "lm_head": devices[-1]}
    dmap.update({f"model.layers.{i}": devices[i * len(devices) // L] for i in range(L)})

    def device_of(name: str):
        return next(d for prefix, d in sorted(dmap.items(), key=lambda kv: -len(kv[0]))
                    if name == prefix or name.startswith(prefix + "."))

    g = {}
    for name, p in list(hf.named_parameters()):
        dev = torch.device(device_of(name))
        if dev not in g:
            g[dev] = torch.Generator(device=dev).manual_seed(1)
        value = torch.empty(p.shape, dtype=dtype, device=dev)
        value.fill_(1.0) if name.endswith("norm.weight") else value.normal_(0.0, 0.02, generator=g[dev])
        set_module_tensor_to_device(hf, name, dev, value=value, dtype=dtype)
    hf.model.rotary_emb = MixtralRotaryEmbedding(cfg)  # its buffers were made on meta
    wrong = [n for n, p in hf.named_parameters() if p.dtype != dtype or p.device.type == "meta"]
    if wrong:
        raise RuntimeError(f"transformers model: {len(wrong)} parameter(s) not materialised in {dtype}: {wrong[:3]}")
    hf = dispatch_model(hf.eval(), device_map=dmap, main_device=devices[0])
    return hf, dmap


def bench_hf(margs: ModelArgs, a, devices: list, dtype) -> tuple[list[dict], dict]:
    t0 = time.perf_counter()
    for d in devices:
        if torch.device(d).type == "cuda":
            torch.cuda.reset_peak_memory_stats(d)
    hf, _ = build_hf(margs, devices, dtype)
    for d in devices:
        sync(torch.device(d))
    build_s = time.perf_counter() - t0
    impl = {"attn": hf.config._attn_implementation, "experts": getattr(hf.config, "_experts_implementation", None)}
    log(f"transformers: built over {devices} in {build_s:.1f}s ({impl})")
    dev0 = torch.device(devices[0])

    def gen(prompts, n):
        ids = torch.tensor(prompts, device=dev0)
        with torch.no_grad():
            out = hf.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=n,
                              min_new_tokens=n, pad_token_id=0)
        assert out.shape[1] == ids.shape[1] + n
        return out

    gen(make_prompts(2, a.prompt_len, margs.vocab_size, 99), 4)  # warm-up
    rows = []
    for b in a.batch_sizes:
        prompts = make_prompts(b, a.prompt_len, margs.vocab_size, b)
        gen(prompts, 4)  # warm-up at this batch size, as the epkit side gets
        t = {}
        for n in (1, a.new_tokens):
            for d in devices:
                sync(torch.device(d))
            start = time.perf_counter()
            gen(prompts, n)
            for d in devices:
                sync(torch.device(d))
            t[n] = time.perf_counter() - start
        rows.append(_row(b, a, t))
        log(f"transformers B={b}: prefill+1 {t[1]:.3f}s, +{a.new_tokens} {t[a.new_tokens]:.3f}s, "
            f"decode {_tps(rows[-1])}")
    peaks = [round(torch.cuda.max_memory_allocated(d) / 2 ** 30, 2) if torch.device(d).type == "cuda" else 0.0
             for d in devices]
    del hf
    gc.collect()
    return rows, {"build_s": round(build_s, 1), "peak_memory_gib": peaks, "implementation": impl,
                  "devices": [str(d) for d in devices]}


# ---- main -----------------------------------------------------------------------------------------

def main(argv=None) -> int:
    a = parse_args(argv)
    init_distributed()
    a.ep_size = a.ep_size or world_size()
    if a.ep_size != world_size():
        raise SystemExit(f"--ep {a.ep_size} needs exactly {a.ep_size} ranks, this run has {world_size()}")
    cuda = torch.cuda.is_available()
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if cuda else torch.device("cpu")
    dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}.get(a.dtype) or (torch.bfloat16 if cuda else torch.float32)
    margs = ModelArgs.from_name(a.preset)
    # The transformers phase runs on rank 0 only, for minutes: the others wait on a gloo group with a long
    # timeout instead of an NCCL barrier that its watchdog would kill.
    waiters = dist.new_group(backend="gloo", timeout=datetime.timedelta(hours=2)) if world_size() > 1 else None
    t_start = time.perf_counter()
    splits = {}
    for split in a.expert_splits.split(","):
        splits[split] = bench_epkit(margs, a, device, dtype, split)
        if split != a.expert_splits.split(",")[0] and world_rank() == 0:
            first = next(iter(splits.values()))[0]
            for mine, ref in zip(splits[split][0], first):
                same = sum(x == y for x, y in zip(mine["tokens"], ref["tokens"]))
                mine["same_greedy_tokens_as_first_split"] = f"{same} of {len(ref['tokens'])} sequences"
                log(f"epkit {split} B={mine['batch']}: {_tps(mine)} vs {_tps(ref)}; {same} of {len(ref['tokens'])} "
                    f"sequences identical")
    for rows, _ in splits.values():
        for r in rows:
            r.pop("tokens", None)
    ours, ours_extra = next(iter(splits.values()))
    if waiters is not None:
        dist.barrier(group=waiters)
    theirs, theirs_extra = None, None
    if world_rank() == 0 and not a.skip_hf:
        devices = [f"cuda:{i}" for i in range(max(a.ep_size, 1))] if cuda else ["cpu"]
        theirs, theirs_extra = bench_hf(margs, a, devices, dtype)
    if waiters is not None:
        dist.barrier(group=waiters)
    if world_rank() != 0:
        return 0
    result = {
        "benchmark": "decode throughput, epkit LLM vs transformers generate (same run)",
        "gpu": torch.cuda.get_device_name(device) if cuda else f"cpu ({platform.processor() or platform.machine()})",
        "num_gpus": torch.cuda.device_count() if cuda else 0,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "versions": versions(),
        "config": {"preset": a.preset, "parameters_b": round(margs.num_parameters() / 1e9, 2), "ep": a.ep_size,
                   "dtype": str(dtype).replace("torch.", ""), "prompt_len": a.prompt_len, "new_tokens": a.new_tokens,
                   "batch_sizes": a.batch_sizes, "greedy": True, "ignore_eos": True, "block_size": a.block_size,
                   "model": margs.to_hf_config()},
        "epkit": {"rows": ours, **ours_extra, "expert_split": next(iter(splits))},
        "epkit_splits": {k: {"rows": r, **x} for k, (r, x) in splits.items()},
        "transformers": {"rows": theirs, **theirs_extra} if theirs else None,
        "wall_s": round(time.perf_counter() - t_start, 1),
    }
    os.makedirs(RESULTS, exist_ok=True)
    tag = result["gpu"].replace(" ", "-").replace("/", "-").split("(")[0].strip("-")
    out = a.out or os.path.join(RESULTS, f"generate-{tag}-{time.strftime('%Y%m%d-%H%M%S')}.json")
    with open(out, "w") as f:
        json.dump(result, f, indent=2)
    print_table(result)
    print(f"wrote {out}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
