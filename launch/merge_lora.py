"""Fold a LoRA adapter into its base and write a merged Hugging Face Mixtral checkpoint.

    python launch/merge_lora.py --lora RUN/final --output merged/                 # base from the adapter's config
    python launch/merge_lora.py --base BASE --lora ADAPTER --output merged/ --dtype bf16
    deepspeed --num_gpus 2 launch/merge_lora.py --base BASE --lora ADAPTER --output merged/ --ep 2

With --ep N (inside an N-rank launch) each rank reads, merges and writes only its experts. The adapter is a
PEFT directory (adapter_config.json + adapter_model.safetensors), as `launch/train.py --lora-rank` writes.
"""
import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run from a checkout

from epkit.checkpoint import CheckpointError  # noqa: E402


def run(argv=None) -> int:
    p = argparse.ArgumentParser(description="Merge a LoRA adapter into its base checkpoint.")
    p.add_argument("--lora", required=True, help="adapter directory, or a --lora-rank run directory (final/ inside)")
    p.add_argument("--base", default=None, help="base checkpoint (default: the adapter's base_model_name_or_path)")
    p.add_argument("--output", required=True, help="where to write the merged checkpoint")
    p.add_argument("--ep", type=int, default=1, help="expert-parallel size (= the number of launched ranks)")
    p.add_argument("--dtype", default=None, choices=["fp32", "bf16", "fp16"], help="default: the base's dtype")
    p.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)  # deepspeed's
    args = p.parse_args(argv)
    try:
        import torch

        from epkit.infer.cli import lora_base
        from epkit.lora_io import export_merged
        from epkit.parallel import init_distributed, world_rank
        base = lora_base(args.base, args.lora)
        if args.ep > 1:
            init_distributed()
        dtype = {None: None, "fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[args.dtype]
        out = export_merged(base, args.lora, args.output, ep_size=args.ep, dtype=dtype)
    except (ValueError, CheckpointError, FileNotFoundError) as e:
        if os.environ.get("EPKIT_DEBUG"):
            raise
        print(f"error (rank {os.environ.get('RANK', '0')}): {e}", file=sys.stderr, flush=True)
        return 2
    if world_rank() == 0:
        print(f"merged: {os.path.abspath(out)}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(run())
