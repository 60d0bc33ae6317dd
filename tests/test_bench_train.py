"""bench/train.py on 2 CPU ranks (gloo, fp32, --cpu): every variant trains and the JSON holds every figure;
epkit's EP=2, EP=1 and reference-loss runs give the same loss curve; a failing variant is recorded and
the others still run, and one whose gradients are NaN shows its skipped optimizer steps."""
from __future__ import annotations

import glob
import importlib.util
import json
import math
import os
import subprocess
import sys

import torch

from distributed import free_port, run

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "bench", "train.py")
ALL = ["epkit_ep2", "epkit_ep2_fixed_capacity", "epkit_ep1", "transformers_zero2", "deepspeed_moe_ep2",
       "epkit_ep2_reference"]


def load_bench():
    spec = importlib.util.spec_from_file_location("bench_train", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod
    spec.loader.exec_module(mod)
    return mod


def read_result(out_dir: str) -> dict:
    files = glob.glob(os.path.join(out_dir, "train-cpu-*.json"))
    assert len(files) == 1, files
    with open(files[0]) as f:
        return json.load(f)


def test_cpu_run_writes_every_figure(tmp_path):
    out = str(tmp_path / "results")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(free_port()),
           SCRIPT, "--cpu", "--variants", ",".join(ALL), "--steps", "3", "--peak-tflops", "0.5", "--out", out]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    r = read_result(out)
    assert (r["gpu"], r["backend"], r["world_size"], r["partial"]) == ("cpu", "gloo", 2, False)
    c = r["config"]
    assert (c["layers"], c["seq_len"], c["micro_batch"], c["grad_accum"], c["steps"], c["timed_steps"]) == \
        (2, 32, 1, 1, 3, 2)
    # the tiny preset: D 64, I 128, E 8, K 2, H 4, G 2, Dh 16, V 512; 2 layers, T 32
    active = 2 * (64 * 16 * 2 * (4 + 2) + 64 * 8 + 2 * 3 * 64 * 128) + 512 * 64
    assert r["active_params"] == active
    assert r["flops_per_token"] == 6 * active + 6 * 2 * 32 * 4 * 16
    assert "6 x active_params" in r["flops_formula"]
    assert r["peak_tflops_per_gpu"] == 0.5 and len(r["matmul_tflops_per_rank"]) == 2
    rows = {v["variant"]: v for v in r["variants"]}
    assert list(rows) == ALL
    for name, v in rows.items():
        assert v["ok"], (name, v.get("error"))
        assert v["tokens_per_s"] > 0 and v["tokens_per_s_per_gpu"] == v["tokens_per_s"] / 2
        assert math.isclose(v["tflops_per_gpu"], v["tokens_per_s_per_gpu"] * r["flops_per_token"] / 1e12)
        assert math.isclose(v["mfu"], v["tflops_per_gpu"] / 0.5)
        assert math.isclose(v["fraction_of_matmul_rate"], v["tflops_per_gpu"] / max(r["matmul_tflops_per_rank"]))
        assert math.isclose(v["step_time_s"], max(v["elapsed_s_per_rank"]) / 2)
        assert len(v["lm_losses"]) == 3 and v["final_lm_loss"] == v["lm_losses"][-1]
        assert all(5.5 < x < 7.0 for x in v["lm_losses"]), v["lm_losses"]  # near ln(512) = 6.24 at the start
        assert v["notes"]["zero_stage"] == 2
        assert v["skipped_steps"] == 0, name  # every update applied (a NaN gradient would skip it)
    for name in rows:  # the peers too: their step splits stand beside epkit's
        prof = rows[name]["profile"]
        assert set(prof["phases_ms_per_step"]) == {"forward", "backward", "optimizer"}
        assert all(ms > 0 for ms in prof["phases_ms_per_step"].values())
        assert prof["communication_ms_per_step"] > 0  # gloo collectives: ZeRO-2 reductions, all-to-alls
    assert rows["epkit_ep2"]["notes"]["dispatch"] == "all_to_all (exact)" and rows["epkit_ep2"]["notes"]["overlap_comm"]
    assert rows["epkit_ep2_fixed_capacity"]["notes"]["dispatch"] == "all_to_all (fixed_capacity)"
    assert rows["deepspeed_moe_ep2"]["notes"]["drop_tokens"] is False
    assert rows["deepspeed_moe_ep2"]["notes"]["top2_2nd_expert_sampling"] is False
    check = r["loss_check"]
    assert check["epkit_ep2_vs_epkit_ep1_max_abs_diff"] < 1e-5
    assert check["epkit_ep2_vs_epkit_ep2_fixed_capacity_max_abs_diff"] < 1e-5
    assert check["epkit_ep2_vs_epkit_ep2_reference_max_abs_diff"] < 1e-5
    assert rows["epkit_ep2"]["lm_losses"] != rows["transformers_zero2"]["lm_losses"]  # other initial weights
    assert "epkit_ep2" in proc.stdout and "split per step" in proc.stdout


def _failing_variants(rank, world, out_dir):
    bench = load_bench()
    from bench import train_variants

    def build_fails_on_rank_1(s):
        if rank == 1:
            raise RuntimeError("injected build failure")
        return train_variants.build_deepspeed_moe(s)

    def oom_in_first_step(s):
        built = train_variants.build_transformers(s)

        def loss_fn(engine, batch):
            raise torch.OutOfMemoryError("injected: CUDA out of memory")
        built.loss_fn = loss_fn
        return built

    class NaNGradient(torch.autograd.Function):  # finite loss, NaN gradients: what the first GPU fixed_capacity had
        forward = staticmethod(lambda ctx, x: x.view_as(x))
        backward = staticmethod(lambda ctx, g: g * float("nan"))

    def nan_gradients(s):
        built = train_variants.build_epkit(s, 1)
        inner = built.loss_fn

        def loss_fn(engine, batch):
            loss, lm = inner(engine, batch)
            return NaNGradient.apply(loss), lm
        built.loss_fn = loss_fn
        return built

    train_variants.BUILDERS["deepspeed_moe_ep2"] = build_fails_on_rank_1
    train_variants.BUILDERS["transformers_zero2"] = oom_in_first_step
    train_variants.BUILDERS["epkit_ep1"] = nan_gradients
    rc = bench.main(["--cpu", "--variants", "deepspeed_moe_ep2,transformers_zero2,epkit_ep1", "--steps", "2",
                     "--profile-steps", "0", "--out", out_dir])
    return rc, "datasets" in sys.modules  # the GPU machine has no `datasets`: nothing here may import it


def test_a_failing_variant_is_recorded_and_the_rest_still_run(tmp_path):
    out = str(tmp_path / "results")
    assert run(_failing_variants, 2, out, timeout=180) == [(0, False), (0, False)]
    r = read_result(out)
    rows = {v["variant"]: v for v in r["variants"]}
    assert list(rows) == ["deepspeed_moe_ep2", "transformers_zero2", "epkit_ep1"]
    assert not rows["deepspeed_moe_ep2"]["ok"]
    assert rows["deepspeed_moe_ep2"]["error"] == ["rank 1: build: RuntimeError: injected build failure"
                                                  + rows["deepspeed_moe_ep2"]["error"][0].split("failure", 1)[1]]
    assert not rows["transformers_zero2"]["ok"] and len(rows["transformers_zero2"]["error"]) == 2
    assert all(e.startswith(f"rank {i}: step 1: OutOfMemoryError: injected")
               for i, e in enumerate(rows["transformers_zero2"]["error"]))
    assert rows["epkit_ep1"]["ok"] and rows["epkit_ep1"]["tokens_per_s"] > 0 and "profile" not in rows["epkit_ep1"]
    assert rows["epkit_ep1"]["skipped_steps"] == 2  # NaN gradients: no update applied, and the JSON says so


def test_variant_names_may_carry_their_own_zero_stage():
    """"epkit_ep1@z1" trains epkit_ep1 at ZeRO 1 whatever --zero-stage says; a stage DeepSpeed's ZeRO optimizer
    here does not run, or a name that is no variant, is refused by name."""
    import pytest

    from bench.train_variants import split_variant
    bench = load_bench()
    assert split_variant("epkit_ep1@z1", 2) == ("epkit_ep1", 1)
    assert split_variant("epkit_ep1", 2) == ("epkit_ep1", 2)
    assert split_variant("epkit_ep1@z0", 2) == ("epkit_ep1", 0)
    a = bench.parse_args(["--cpu", "--variants", "epkit_ep1@z1,transformers_zero2@z0"])
    assert a.variants == ["epkit_ep1@z1", "transformers_zero2@z0"]
    for bad in ("epkit_ep1@z3", "epkit_ep1@zx", "epkit_ep9@z1"):
        with pytest.raises(SystemExit):
            bench.parse_args(["--cpu", "--variants", bad])
