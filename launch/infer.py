"""Serve a Mixtral checkpoint: JSONL prompts in, JSONL results out, experts split over ranks.

    deepspeed --num_gpus 2 launch/infer.py --ep 2 --checkpoint DIR --prompts FILE.jsonl
    python launch/infer.py --checkpoint DIR < prompts.jsonl > results.jsonl     # EP=1
    deepspeed --num_gpus 2 launch/infer.py --checkpoint BASE --lora RUN/final  # LoRA adapter merged at load
    python launch/infer.py          # outputs/default (the default fine-tune) if there, else the tiny preset

Settings: `--help` and configs/infer/default.yaml. Tokens/s and per-rank expert load go to stderr.
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run from a checkout

from epkit.infer.cli import main  # noqa: E402
from epkit.runtime import run_entry  # noqa: E402


def run(argv=None) -> int:
    return run_entry(lambda: main(argv))


if __name__ == "__main__":
    sys.exit(run())
