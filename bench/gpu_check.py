"""GPU smoke check: environment, bf16 parity with transformers, EP=2 over NCCL, single-GPU MoE timing.

    torchrun --nproc_per_node 2 bench/gpu_check.py [--out DIR]

Prints a short report and writes gpu_check.json. Takes about a minute on two H100s.
"""
from __future__ import annotations

import argparse
import json
import os
import time

import sys

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run from a checkout

import epkit  # noqa: E402
from bench.timing import copy_bandwidth, time_calls  # noqa: E402
from epkit.parallel import init_distributed, set_dispatch, world_rank  # noqa: E402


def cuda_ms(fn, iters=20, warmup=5) -> float:
    return time_calls(fn, torch.device("cuda", torch.cuda.current_device()), warmup, iters)["ms_median"]


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--out", default="bench/results")
    a = p.parse_args()
    init_distributed()
    rank = world_rank()
    dev = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    torch.cuda.set_device(dev)
    import torch.nn.functional as F
    from transformers import MixtralConfig, MixtralForCausalLM
    report = {"gpu": torch.cuda.get_device_name(dev), "torch": torch.__version__,
              "grouped_mm": hasattr(F, "grouped_mm") or hasattr(torch, "_grouped_mm")}

    # 1) bf16 parity with transformers on a small model (same weights through a checkpoint)
    args = epkit.ModelArgs(vocab_size=1024, hidden_size=512, intermediate_size=1024, num_layers=2, num_heads=8,
                           num_kv_heads=4, num_experts=8, experts_per_token=2)
    path = "/tmp/epkit_gpu_check"
    if rank == 0:
        torch.manual_seed(0)
        cfg = MixtralConfig(**{k: v for k, v in args.to_hf_config().items() if k not in ("architectures",)})
        hf = MixtralForCausalLM(cfg)
        with torch.no_grad():
            for layer in hf.model.layers:
                layer.mlp.gate.weight.normal_(0, 0.5)
        hf.save_pretrained(path)
    dist.barrier()
    tokens = torch.randint(0, args.vocab_size, (4, 64), device=dev, generator=torch.Generator(dev).manual_seed(1))
    hf = MixtralForCausalLM.from_pretrained(path, dtype=torch.float32).to(dev).eval()
    with torch.no_grad():
        ref = hf(tokens).logits
    del hf
    single = epkit.load_pretrained(path, device=dev, dtype=torch.bfloat16).eval()
    with torch.no_grad():
        ours = single(tokens)[0].float()
    report["bf16_vs_hf_fp32_max_abs"] = (ours - ref).abs().max().item()
    report["bf16_vs_hf_fp32_argmax_agree"] = (ours.argmax(-1) == ref.argmax(-1)).float().mean().item()

    # 2) EP=2 over NCCL equals the single-device bf16 model (replicated and all_to_all)
    ep = epkit.load_pretrained(path, device=dev, dtype=torch.bfloat16, ep_size=2, dispatch="replicated").eval()
    with torch.no_grad():
        rep = ep(tokens)[0].float()
        set_dispatch(ep, "all_to_all")
        mine = torch.tensor_split(torch.arange(4), 2)[rank]
        a2a = ep(tokens[mine])[0].float()
    report["ep2_replicated_vs_single_max_abs"] = (rep - ours).abs().max().item()
    report["ep2_all_to_all_vs_single_max_abs"] = (a2a - ours[mine]).abs().max().item()

    # 3) one MoE layer of the Mixtral-8x7B shape on one GPU: epkit grouped vs loop vs transformers' block
    if rank == 0:
        from transformers.models.mixtral.modeling_mixtral import MixtralSparseMoeBlock
        big = epkit.ModelArgs.from_name("mixtral-8x7b")
        moe = epkit.MoE(big.hidden_size, big.intermediate_size, 8, 2, device=dev, dtype=torch.bfloat16)
        with torch.no_grad():
            for prm in moe.parameters():
                prm.normal_(0, 0.02)
        cfg = MixtralConfig(hidden_size=big.hidden_size, intermediate_size=big.intermediate_size)
        block = MixtralSparseMoeBlock(cfg).to(dev, torch.bfloat16)
        with torch.no_grad():
            block.gate.weight.copy_(moe.gate.weight)
            block.experts.gate_up_proj.copy_(moe.experts.w13)
            block.experts.down_proj.copy_(moe.experts.w2)
        timings = {}
        for n in (1, 64, 4096):
            x = torch.randn(1, n, big.hidden_size, device=dev, dtype=torch.bfloat16)
            with torch.no_grad():
                diff = (moe(x)[0] - block(x)).abs().max().item()
                row = {"max_abs_diff_vs_hf": diff, "hf_ms": cuda_ms(lambda: block(x))}
                moe.experts.impl = "grouped"
                row["epkit_grouped_ms"] = cuda_ms(lambda: moe(x))
                moe.experts.impl = "loop"
                row["epkit_loop_ms"] = cuda_ms(lambda: moe(x))
                moe.experts.impl = "grouped"
            timings[n] = row
        report["moe_layer_1gpu"] = timings
        gb = 8 * 3 * big.hidden_size * big.intermediate_size * 2 / 1e9
        report["copy_bandwidth_GBps"] = copy_bandwidth(dev, torch.bfloat16, int(4e9))
        report["expert_weights_GB"] = gb
        print(json.dumps(report, indent=1))
        os.makedirs(a.out, exist_ok=True)
        with open(os.path.join(a.out, "gpu_check.json"), "w") as f:
            json.dump(report, f, indent=1)
    dist.barrier()


if __name__ == "__main__":
    t0 = time.time()
    main()
    print(f"gpu_check done in {time.time() - t0:.0f}s")
