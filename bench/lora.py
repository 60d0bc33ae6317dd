"""LoRA fine-tuning of the full Mixtral-8x7B shape on two GPUs: epkit at EP=2, a frozen bf16 base (random
weights), rank-16 adapters on attention and experts, sequence 4096, on the shipped corpus.

    torchrun --nproc_per_node 2 bench/lora.py                 # 32 layers, T=4096, 50 steps (NCCL_NVLS_ENABLE=0
                                                              # on shared hosts)
    torchrun --nproc_per_node 2 bench/lora.py --activation-checkpointing
    torchrun --nproc_per_node 2 bench/lora.py --cpu           # tiny preset, gloo, fp32: a check, not a benchmark

The run is `launch/train.py --model mixtral-8x7b --ep 2 --lora-rank 16 --lora-targets attention,experts`
step for step (the same build, trainable set, DeepSpeed engine, loss and clipping from epkit.train), with
the data read without `datasets`: epkit/assets/corpus.txt split into paragraphs, tokenised with the
shipped tokenizer, packed. Base weights: Normal(0, 0.02) in bf16 drawn on each GPU (Mixtral.init_weights,
seeded per tensor and expert), each rank only its 4 experts: 48 GB per GPU, nothing read from disk.

FLOPs counted are those the step does (per token, `flops_per_token`):
    forward   2 x (attention q/k/v/o + router + K of E experts + LM head) weights
              + 2 x L x T x H x Dh for causal attention scores and values (half of the square)
              + LoRA: 2 x r x (in + out) per adapted projection (experts: per routed pair)
    backward  the frozen base: input gradients only (= its forward matmuls); attention 2 x its forward;
              LoRA: input and weight gradients (2 x its forward)
    recompute with --activation-checkpointing, the forward again (counted in `hfu`, not in `mfu`)
MFU = counted FLOP/s per GPU / dense bf16 peak (989 TFLOP/s on H100/H200). Results go to
bench/results/lora-<gpu>-<time>.json.

Legend: L layers, T sequence length, H heads, Dh head dim, D hidden, I intermediate, E experts, K active experts.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import sys
import tempfile
import time

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run from a checkout
from bench.moe_layer import gather, slug  # noqa: E402
from bench.peers import versions  # noqa: E402
from bench.timing import sync  # noqa: E402

from epkit import data as data_lib  # noqa: E402
from epkit.args import ModelArgs  # noqa: E402
from epkit.parallel import init_distributed  # noqa: E402
from epkit.train.config import TrainConfig  # noqa: E402
from epkit.train.optim import clip_exact, initialize, make_trainable, model_for, uses_exact_clip  # noqa: E402
from epkit.train.loop import lm_and_router_losses  # noqa: E402

PEAK_TFLOPS = {"H100": 989.0, "H200": 989.0}  # dense bf16, no sparsity


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--cpu", action="store_true", help="tiny preset, CPU, gloo, fp32: what the test runs")
    p.add_argument("--model", default=None, help="preset or checkpoint dir (default mixtral-8x7b; tiny with --cpu)")
    p.add_argument("--seq-len", type=int, default=None, help="tokens per row (default 4096; 64 with --cpu)")
    p.add_argument("--micro-batch", type=int, default=1, help="rows per rank per step")
    p.add_argument("--steps", type=int, default=None, help="optimizer steps (default 50; 4 with --cpu)")
    p.add_argument("--warmup", type=int, default=None, help="untimed first steps (default 3; 1 with --cpu)")
    p.add_argument("--lora-rank", type=int, default=16)
    p.add_argument("--lora-alpha", type=float, default=32.0)
    p.add_argument("--lora-targets", default="attention,experts")
    p.add_argument("--lr", type=float, default=5e-3, help="AdamW peak learning rate of the adapters")
    p.add_argument("--zero-stage", type=int, default=0, choices=(0, 1, 2))
    p.add_argument("--activation-checkpointing", action="store_true", help="recompute decoder layers in backward")
    p.add_argument("--peak-tflops", type=float, default=None, help="dense bf16 peak per GPU (default: by GPU name)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    p.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results"))
    a = p.parse_args(argv)
    a.model = a.model or ("tiny" if a.cpu else "mixtral-8x7b")
    a.seq_len = a.seq_len or (64 if a.cpu else 4096)
    a.steps = a.steps or (4 if a.cpu else 50)
    a.warmup = a.warmup if a.warmup is not None else (1 if a.cpu else 3)
    if not 0 <= a.warmup < a.steps:
        p.error(f"--warmup={a.warmup} must be at least 0 and below --steps={a.steps}")
    return a


class _Paragraphs:
    """The column slices `epkit.data.tokenize` reads (what a `datasets` text file gives), from a list."""

    def __init__(self, texts: list[str]):
        self.texts = texts

    def __len__(self) -> int:
        return len(self.texts)

    def __getitem__(self, sl: slice) -> dict:
        return {"text": self.texts[sl]}


def corpus(args: ModelArgs, seq_len: int, seed: int) -> data_lib.PackedData:
    """The shipped corpus, tokenised with the shipped tokenizer and packed, without `datasets`."""
    with open(data_lib.DEFAULT_DATA) as f:
        texts = [p.strip() for p in f.read().split("\n\n") if p.strip()]
    tok = data_lib.Tokenizer(data_lib.DEFAULT_TOKENIZER)
    ids, labels = data_lib.tokenize(_Paragraphs(texts), tok, args.bos_token_id or 1, args.eos_token_id or 2,
                                    data_lib.DEFAULT_DATA)
    if max(ids) >= args.vocab_size:
        raise ValueError(f"the shipped tokenizer's id {max(ids)} does not fit vocab_size={args.vocab_size}")
    pad = args.pad_token_id if args.pad_token_id is not None else (args.eos_token_id or 0)
    return data_lib.pack(ids, labels, seq_len, pad, seed, data_lib.DEFAULT_DATA)


def flops_per_token(args: ModelArgs, seq_len: int, rank: int, targets: str, recompute: bool) -> dict:
    """Forward, backward and recompute FLOPs per token of one LoRA training step (module doc)."""
    D, I, L, K, V = args.hidden_size, args.intermediate_size, args.num_layers, args.experts_per_token, args.vocab_size
    q, kv = args.num_heads * args.head_dim, args.num_kv_heads * args.head_dim
    attn_shapes = [(D, q), (D, kv), (D, kv), (q, D)]  # (in, out) of q/k/v/o
    base = 2 * (L * (sum(i * o for i, o in attn_shapes) + D * args.num_experts + K * 3 * D * I) + V * D)
    scores = 2 * L * seq_len * args.num_heads * args.head_dim  # causal: QK^T and PV over half the square
    groups = targets.split(",")
    lora = 0
    if "attention" in groups:
        lora += 2 * L * sum(rank * (i + o) for i, o in attn_shapes)
    if "experts" in groups:
        lora += 2 * L * K * rank * ((D + 2 * I) + (I + D))
    if "router" in groups:
        lora += 2 * L * rank * (D + args.num_experts)
    forward = base + scores + lora
    backward = base + 2 * scores + 2 * lora
    return {"forward": forward, "backward": backward, "done": forward + backward,
            "recompute": forward if recompute else 0, "lora_forward": lora}


def main(argv=None) -> int:
    a = parse_args(argv)
    use_cuda = torch.cuda.is_available() and not a.cpu
    if a.cpu:
        torch.set_num_threads(1)
    owns_group = not dist.is_initialized()
    init_distributed(backend="nccl" if use_cuda else "gloo", timeout_s=1800)
    rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
    device = torch.device("cuda", torch.cuda.current_device()) if use_cuda else torch.device("cpu")
    dtype = torch.bfloat16 if use_cuda else torch.float32
    say = print if rank == 0 else (lambda *x, **k: None)
    out_dir = tempfile.mkdtemp(prefix="epkit-bench-lora-")  # TrainConfig needs one; nothing is saved
    cfg = TrainConfig(model=a.model, ep_size=world, lora_rank=a.lora_rank, lora_alpha=a.lora_alpha,
                      lora_targets=a.lora_targets, seq_len=a.seq_len, micro_batch=a.micro_batch, max_steps=a.steps,
                      lr=a.lr, warmup_steps=min(5, a.steps - 1), zero_stage=a.zero_stage, seed=a.seed,
                      activation_checkpointing=a.activation_checkpointing, progress=False, output_dir=out_dir)
    cfg.check()
    args = ModelArgs.load(a.model) if os.path.isdir(a.model) else ModelArgs.from_name(a.model)
    data = corpus(args, a.seq_len, a.seed)
    t0 = time.perf_counter()
    model = model_for(cfg, args, device, dtype)
    trainable = make_trainable(model, cfg)
    engine, optimizer, _ = initialize(cfg, model, dtype)
    exact_clip = uses_exact_clip(engine)
    sync(device)
    build_s = time.perf_counter() - t0
    say(f"built {a.model} at EP={world} in {build_s:.1f}s; trainable {trainable}", flush=True)
    if use_cuda:
        torch.cuda.reset_peak_memory_stats(device)
    losses, step_s = [], []
    aux_coef = args.router_aux_loss_coef
    for step in range(a.steps):
        t = time.perf_counter()
        batch = {k: v.to(device) for k, v in data.batch(step, a.micro_batch, rank, world).items()}
        loss, parts = lm_and_router_losses(engine, batch, aux_coef, 0.0)
        engine.backward(loss)
        if exact_clip:
            clip_exact(model, cfg.grad_clip)
        engine.step()
        lm = (parts[0] / parts[1].clamp(min=1)).double().reshape(1)
        dist.all_reduce(lm)  # NOTE: collective; also a sync that ends the step on every rank
        losses.append(lm.item() / world)
        step_s.append(time.perf_counter() - t)
        if rank == 0 and (step + 1) % 10 == 0:
            say(f"step {step + 1}: loss {losses[-1]:.4f}, {step_s[-1]:.3f}s", flush=True)
    timed = step_s[a.warmup:]
    tokens_per_step = a.micro_batch * a.seq_len * world
    gpu = torch.cuda.get_device_name(device) if use_cuda else "cpu"
    peak = a.peak_tflops or next((v for k, v in PEAK_TFLOPS.items() if k in gpu), None)
    flops = flops_per_token(args, a.seq_len, a.lora_rank, a.lora_targets, a.activation_checkpointing)
    tokens_per_s = tokens_per_step * len(timed) / sum(timed)
    tflops = tokens_per_s / world * flops["done"] / 1e12
    mem = gather(torch.cuda.max_memory_allocated(device) / 2 ** 30 if use_cuda else None)
    reserved = gather(torch.cuda.max_memory_reserved(device) / 2 ** 30 if use_cuda else None)
    now = datetime.datetime.now(datetime.timezone.utc)
    report = {
        "benchmark": "lora", "created_utc": now.isoformat(timespec="seconds"), "gpu": gpu, "world_size": world,
        "versions": versions(),
        "config": {"model": a.model, "layers": args.num_layers, "ep": world, "dtype": str(dtype), "seq_len": a.seq_len,
                   "micro_batch": a.micro_batch, "lora_rank": a.lora_rank, "lora_alpha": a.lora_alpha,
                   "lora_targets": a.lora_targets, "lr": a.lr, "zero_stage": engine.zero_optimization_stage(),
                   "activation_checkpointing": a.activation_checkpointing, "steps": a.steps, "timed_steps": len(timed),
                   "data": f"{data_lib.DEFAULT_DATA} ({len(data)} rows of {a.seq_len} tokens)",
                   "base_weights": "random Normal(0, 0.02), bf16 on GPU (Mixtral.init_weights)"},
        "trainable_params_rank0": trainable, "build_s": build_s,
        "flops_per_token": flops, "peak_tflops_per_gpu": peak,
        "tokens_per_s": tokens_per_s, "tokens_per_s_per_gpu": tokens_per_s / world,
        "step_time_s": sum(timed) / len(timed), "tflops_per_gpu": tflops,
        "mfu": None if peak is None else tflops / peak,
        "hfu": None if peak is None else tflops * (flops["done"] + flops["recompute"]) / flops["done"] / peak,
        "peak_allocated_gib_per_rank": mem, "peak_reserved_gib_per_rank": reserved,
        "lm_losses": losses, "step_s": step_s,
    }
    if rank == 0:
        os.makedirs(a.out, exist_ok=True)
        path = os.path.join(a.out, f"lora-{slug(gpu)}-{now.strftime('%Y%m%dT%H%M%SZ')}.json")
        with open(path, "w") as f:
            json.dump(report, f, indent=2)
        mfu = "-" if report["mfu"] is None else f"{100 * report['mfu']:.1f}%"
        mem_s = "-" if mem[0] is None else ", ".join(f"{m:.1f}" for m in mem)
        print(f"\nLoRA r={a.lora_rank} on {a.lora_targets}, {a.model} ({args.num_layers} layers), EP={world}, "
              f"T={a.seq_len}, {gpu}: {tokens_per_s:.0f} tokens/s ({tokens_per_s / world:.0f} per GPU), "
              f"{tflops:.1f} TFLOP/s per GPU, MFU {mfu}, peak GiB per GPU [{mem_s}], loss {losses[0]:.3f} -> "
              f"{losses[-1]:.3f} over {a.steps} steps\nwrote {path}", flush=True)
    import shutil
    shutil.rmtree(out_dir, ignore_errors=True)
    if owns_group and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
