"""bench/moe_layer.py on 2 CPU ranks (gloo, fp32, --small): the JSON holds every figure, epkit matches
transformers, the correctness check catches a wrong expert, and a failing peer is recorded, not fatal."""
from __future__ import annotations

import glob
import importlib.util
import json
import os
import subprocess
import sys

import pytest
import torch

from distributed import free_port, run

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "bench", "moe_layer.py")
IMPLS = ["epkit_replicated", "epkit_all_to_all", "transformers_eager", "transformers_grouped_mm", "deepspeed"]


def load_bench():
    spec = importlib.util.spec_from_file_location("bench_moe_layer", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # dataclasses look their module up here
    spec.loader.exec_module(mod)
    return mod


def read_result(out_dir: str) -> dict:
    files = glob.glob(os.path.join(out_dir, "moe_layer-cpu-*.json"))
    assert len(files) == 1, files
    with open(files[0]) as f:
        return json.load(f)


def test_small_run_writes_every_figure(tmp_path):
    out = str(tmp_path / "results")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(free_port()),
           SCRIPT, "--small", "--tokens", "1,16", "--out", out]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "epkit matches transformers: True" in proc.stdout
    r = read_result(out)

    assert r["gpu"] == "cpu" and r["backend"] == "gloo" and r["world_size"] == 2
    assert r["config"]["ep_size"] == 2 and r["config"]["tokens_per_rank"] == [1, 16]
    assert r["versions"]["torch"] == torch.__version__ and r["versions"]["deepspeed"]
    assert r["errors"] == {}
    assert list(r["skipped"]) == ["epkit_replicated_graph"]  # CUDA graphs: GPU only
    assert r["epkit_matches_transformers"] is True
    assert len(r["copy_bandwidth_GBps_per_rank"]) == 2 and all(b > 0 for b in r["copy_bandwidth_GBps_per_rank"])
    assert len(r["matmul_TFLOPs_per_rank"]) == 2 and all(t > 0 for t in r["matmul_TFLOPs_per_rank"])

    rows = {(x["tokens_per_rank"], x["impl"]): x for x in r["results"]}
    assert set(rows) == {(n, i) for n in (1, 16) for i in IMPLS}
    for (n, impl), row in rows.items():
        assert row["ms_median"] > 0 and row["wall_ms_mean"] > 0
        assert row["floor_memory_ms"] > 0 and row["floor_compute_ms"] > 0
        assert row["floor_ms"] == max(row["floor_memory_ms"], row["floor_compute_ms"])
        assert row["devices"] == (1 if impl.startswith("transformers") else 2)
        assert len(row["ms_median_per_rank"]) == row["devices"]
        layer_tokens = n * (2 if impl in ("epkit_all_to_all", "deepspeed") else 1)
        assert row["tokens_in_layer"] == layer_tokens
        # weights of 1..8 experts (3 x D x I fp32 each) on the busiest rank; at most 2 per token of one rank
        expert_bytes = 3 * 32 * 64 * 4
        assert expert_bytes <= row["expert_bytes_max_rank"] <= min(8, 2 * layer_tokens) * expert_bytes
        # FLOPs: 6 D I per (token, expert) pair; the busiest rank holds between half and all of the pairs
        pair_flops = 6 * 32 * 64
        pairs = 2 * layer_tokens
        low = pairs if row["devices"] == 1 else -(-pairs // 2)
        assert low * pair_flops <= row["flops_max_rank"] <= pairs * pair_flops
    one = rows[(1, "transformers_eager")]  # one token, one GPU: exactly its 2 experts and 2 pairs
    assert one["expert_bytes_max_rank"] == 2 * 3 * 32 * 64 * 4 and one["flops_max_rank"] == 2 * 6 * 32 * 64

    for n in ("1", "16"):
        checks = r["correctness_vs_transformers"][n]
        assert set(checks) == set(IMPLS) - {"transformers_eager"}
        for impl, c in checks.items():
            assert c["ok"], (n, impl, c)
            assert c["max_abs_diff"] < 1e-4 * c["ref_max_abs"], (n, impl, c)
            assert c["ref_max_abs"] > 0.1  # the layer really produced something


@torch.no_grad()
def test_correctness_check_catches_a_wrong_expert():
    bench = load_bench()
    shape = bench.SMALL
    w = bench.make_weights(shape, "cpu", torch.float32, seed=3)
    _, moe = bench.build_epkit(shape, w, 1, "cpu", torch.float32)
    hf = bench.build_transformers(shape, w, "cpu", torch.float32)
    x = bench.make_tokens(64, shape, 7, "cpu", torch.float32)
    good = bench.compare(moe(x)[0], hf(x), 1e-4)
    assert good["ok"] and good["max_abs_diff"] < 1e-5, good
    moe.experts.w2[[0, 1]] = moe.experts.w2[[1, 0]].clone()  # experts 0 and 1 swap down projections
    bad = bench.compare(moe(x)[0], hf(x), 1e-4)
    assert not bad["ok"] and bad["rows_over_tol"] > 0, bad


def _deepspeed_fails_on_rank_1(rank, world, out_dir):
    bench = load_bench()
    real = bench.build_deepspeed

    def build_deepspeed(*args):
        if rank == 1:
            raise RuntimeError("injected failure")
        return real(*args)

    bench.build_deepspeed = build_deepspeed
    return bench.main(["--small", "--tokens", "4", "--impls", "epkit_replicated,transformers_eager,deepspeed",
                       "--out", out_dir])


def test_a_failing_peer_is_recorded_and_the_rest_still_runs(tmp_path):
    out = str(tmp_path / "results")
    assert run(_deepspeed_fails_on_rank_1, 2, out, timeout=120) == [0, 0]
    r = read_result(out)
    assert list(r["errors"]) == ["deepspeed"]
    assert len(r["errors"]["deepspeed"]) == 1
    assert r["errors"]["deepspeed"][0].startswith("rank 1: RuntimeError: injected failure")
    assert {x["impl"] for x in r["results"]} == {"epkit_replicated", "transformers_eager"}
    assert r["epkit_matches_transformers"] is True
