"""bench/lora.py: its FLOP count matches a hand count of the Mixtral-8x7B shape; its CPU mode (gloo, fp32: LoRA
at EP=4 on the shipped corpus without `datasets`) runs inside tests/test_train_ep.py's spawn and writes every
figure (`check_cpu_result`)."""
from __future__ import annotations

import glob
import importlib.util
import json
import os

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "bench", "lora.py")


def load_bench():
    spec = importlib.util.spec_from_file_location("bench_lora", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def check_cpu_result(out: str, ep: int) -> None:
    """The JSON of `bench/lora.py --cpu --steps 3` run on `ep` ranks (tests/test_train_ep.py runs it in its
    spawn, which saves starting another set of processes)."""
    files = glob.glob(os.path.join(out, "lora-cpu-*.json"))
    assert len(files) == 1, files
    with open(files[0]) as f:
        r = json.load(f)
    assert r["config"]["ep"] == ep and r["config"]["lora_targets"] == "attention,experts"
    # 2 layers, rank 16; rank 0 holds 8 / ep of the experts' adapters
    assert r["trainable_params_rank0"] == {"lora_attention": 2 * 16 * (2 * (64 + 64) + 2 * (64 + 32)),
                                           "lora_experts": 2 * (8 // ep) * 16 * ((64 + 256) + (128 + 64))}
    assert len(r["lm_losses"]) == 3 and all(5.0 < x < 7.0 for x in r["lm_losses"])  # about ln(512) at the start
    assert r["tokens_per_s"] > 0 and r["flops_per_token"]["done"] > 0 and r["config"]["timed_steps"] == 2


def test_flops_per_token_of_mixtral_8x7b():
    from epkit.args import ModelArgs
    flops = load_bench().flops_per_token(ModelArgs.from_name("mixtral-8x7b"), 4096, 16, "attention,experts", False)
    active = 32 * (2 * 4096 * 4096 + 2 * 4096 * 1024 + 4096 * 8 + 2 * 3 * 4096 * 14336) + 32000 * 4096  # 12.75e9
    scores = 2 * 32 * 4096 * 4096 * 1  # 2 x L x T x H x Dh, H x Dh = 4096
    lora = 2 * 32 * (16 * (2 * 8192 + 2 * 5120) + 2 * 16 * (4096 + 28672 + 14336 + 4096))
    assert flops["forward"] == 2 * active + scores + lora
    assert flops["done"] == 4 * active + 3 * scores + 3 * lora and flops["recompute"] == 0
