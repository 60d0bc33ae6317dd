"""Where a prefill step's time goes: top device kernels of one chunked-prefill step (torch.profiler).

    python bench/profile_prefill.py [--prompts 2 --prompt-len 4096] [--out bench/results/profile_prefill-<gpu>.json]
    torchrun --nproc_per_node 2 bench/profile_prefill.py      # at EP=2 (rank 0 profiles)

Builds the random-weight preset at the launched EP size, queues `--prompts` prompts of `--prompt-len` tokens
(max_tokens 1) in an engine whose step budget holds them all, runs one warm-up step of the same shape, times
generate() of the same shape without the profiler (prefill + first token: wall time, whose excess over the device
kernels is host work and gaps), then profiles the step that prefills them all, and prints the step time, its
compute floor (2 x active parameters x tokens at the measured bf16 matmul rate; attention's own FLOPs, about 4% at
4096 tokens, are left out) and the top kernels.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run from a checkout

from bench.generate import make_prompts  # noqa: E402
from bench.profile_decode import profile_steps  # noqa: E402
from bench.timing import matmul_tflops, sync  # noqa: E402
from epkit.args import ModelArgs  # noqa: E402
from epkit.infer import LLM, SamplingParams  # noqa: E402
from epkit.infer.build import random_model  # noqa: E402
from epkit.parallel import init_distributed, world_size  # noqa: E402
from epkit.plan import EXPERT_SPLITS  # noqa: E402


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", default="mixtral-8x7b")
    p.add_argument("--prompts", type=int, default=2)
    p.add_argument("--prompt-len", type=int, default=4096)
    p.add_argument("--expert-split", default="experts", choices=EXPERT_SPLITS)
    p.add_argument("--out", default=None)
    a = p.parse_args(argv)
    init_distributed()
    cuda = torch.cuda.is_available()
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if cuda else torch.device("cpu")
    dtype = torch.bfloat16 if cuda else torch.float32
    margs = ModelArgs.from_name(a.preset)
    ep = world_size()
    model = random_model(margs, ep, device, dtype, seed=0, split=a.expert_split)
    tokens = a.prompts * a.prompt_len
    llm = LLM.from_model(model, ep=ep, max_num_seqs=a.prompts, max_num_batched_tokens=tokens,
                         long_prefill_tokens=a.prompt_len, kv_cache_memory=None if cuda else 64 << 20)
    once = SamplingParams(temperature=0, max_tokens=1, ignore_eos=True)
    result = None
    if llm.is_leader:
        llm.generate(make_prompts(a.prompts, a.prompt_len, margs.vocab_size, 1), once)  # warm-up, same shape
        sync(device)
        t0 = time.perf_counter()
        llm.generate(make_prompts(a.prompts, a.prompt_len, margs.vocab_size, 3), once)  # timed, no profiler
        sync(device)
        wall_s = time.perf_counter() - t0
        for prompt in make_prompts(a.prompts, a.prompt_len, margs.vocab_size, 2):
            llm.add_request(prompt, once)
        sync(device)
        t0 = time.perf_counter()
        prof = profile_steps(llm, 1, device)  # the step that prefills every prompt
        step_s = time.perf_counter() - t0
        while llm.has_unfinished():
            llm.step()
        llm.release_followers()
        m = margs  # matmul parameters a token passes through: all but the unchosen experts and the embedding
        active = (m.num_parameters() - m.num_layers * (m.num_experts - m.experts_per_token) * 3 * m.hidden_size
                  * m.intermediate_size - m.vocab_size * m.hidden_size)
        tflops = matmul_tflops(device, dtype, 8192) if cuda else None
        floor_s = 2 * active * tokens / (tflops * 1e12) / ep if tflops else None
        result = {"benchmark": "one prefill step's kernels", "gpu": torch.cuda.get_device_name(device) if cuda
                  else "cpu", "config": {"preset": a.preset, "ep": ep, "prompts": a.prompts,
                                         "prompt_len": a.prompt_len, "expert_split": a.expert_split,
                                         "dtype": str(dtype)},
                  "step_s_with_profiler": round(step_s, 4), "matmul_tflops": tflops,
                  "prefill_plus_1_s": round(wall_s, 4),  # generate(), the same shape, no profiler: wall time
                  "outside_kernels_ms": round(wall_s * 1e3 - prof["device_ms_per_step"], 1),
                  "compute_floor_s": round(floor_s, 4) if floor_s else None, **prof}
        print(f"prefill of {a.prompts} x {a.prompt_len} tokens at EP={ep}: {wall_s:.3f} s from generate() to the first "
              f"token ({step_s:.3f} s with the profiler on), device kernels {prof['device_ms_per_step']:.1f} ms; "
              f"compute floor {floor_s if floor_s is None else round(floor_s, 3)} s")
        for r in prof["top"]:
            print(f"  {r['ms_per_step']:9.3f} ms  x{r['calls_per_step']:<6g} {r['name'][:90]}")
        out = a.out or os.path.join("bench", "results", f"profile_prefill-{time.strftime('%Y%m%dT%H%M')}.json")
        os.makedirs(os.path.dirname(out) or ".", exist_ok=True)
        with open(out, "w") as f:
            json.dump(result, f, indent=1)
        print(f"wrote {out}")
    else:
        for _ in range(3):  # the leader's warm-up, timed and profiled runs
            llm.follow()
    return 0


if __name__ == "__main__":
    sys.exit(main())
