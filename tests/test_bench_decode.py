"""bench/serve.py and bench/profile_decode.py in their CPU modes (--preset tiny): every figure lands in
the JSON, EP=2 runs in lock-step with Poisson arrivals, and transformers' continuous batching runs as
the peer on the same workload."""
from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys

import pytest

from distributed import free_port

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENV = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))


def _load(name: str):
    sys.path.insert(0, ROOT)  # the scripts import bench.timing and friends
    spec = importlib.util.spec_from_file_location(f"bench_{name}", os.path.join(ROOT, "bench", f"{name}.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _run(args: list[str], nproc: int = 1, timeout: int = 300) -> subprocess.CompletedProcess:
    launch = ([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "--master_port",
               str(free_port())] if nproc > 1 else [sys.executable])
    proc = subprocess.run(launch + args, cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


def test_workload_is_seeded_and_shaped():
    serve = _load("serve")
    a = serve.parse_args(["--rate", "4", "--seed", "3"])
    assert (a.requests, a.min_prompt, a.max_prompt, a.min_tokens, a.max_tokens) == (512, 32, 1024, 16, 256)
    reqs = serve.workload(a, 32000)
    assert reqs == serve.workload(a, 32000) and reqs != serve.workload(serve.parse_args(["--seed", "4"]), 32000)
    lens = [len(r["prompt"]) for r in reqs]
    assert min(lens) >= 32 and max(lens) <= 1024 and max(lens) - min(lens) > 900
    assert all(16 <= r["max_tokens"] <= 256 for r in reqs)
    arrivals = [r["arrival"] for r in reqs]
    assert arrivals == sorted(arrivals) and 0.7 < len(reqs) / 4 / arrivals[-1] < 1.3  # about 4 per second
    assert all(r["arrival"] == 0 for r in serve.workload(serve.parse_args([]), 32000))
    assert serve.summarise(reqs[:2], {}, {0: [], 1: []}, 1.0)["ttft_p50_s"] is None  # no tokens: null, not NaN


def test_serve_ep2_poisson(tmp_path):
    out = str(tmp_path / "serve.json")
    proc = _run([os.path.join("bench", "serve.py"), "--preset", "tiny", "--requests", "12", "--rate", "50",
                 "--skip-hf", "--profile-steps", "3", "--profile-from", "2", "--out", out], nproc=2)
    assert "epkit EP=2" in proc.stdout
    with open(out) as f:
        r = json.load(f)
    assert r["config"]["ep"] == 2 and r["config"]["arrivals"] == "poisson 50.0/s" and r["errors"] == {}
    e = r["epkit"]
    assert e["requests_finished"] == 12 and e["generated_tokens"] == r["config"]["max_new_tokens_total"]
    assert e["generated_tokens_per_s"] > 0 and e["ttft_p50_s"] > 0 and e["itl_p99_ms"] >= e["itl_p50_ms"] > 0
    assert len(e["peak_memory_gib"]) == 2 and e["preemptions"] == 0
    assert e["engine"]["max_num_seqs"] >= 16 and e["engine"]["decode_kernels"] == "torch" and e["engine"]["overlap"]
    assert "transformers" not in r
    # every step is counted once, by kind: the prompt tokens of all requests went through steps that held some
    kinds = e["step_kinds"]
    assert kinds["decode_only"]["steps"] + kinds["with_prompt_tokens"]["steps"] == e["steps"] == len(kinds["per_step"])
    assert sum(row[1] for row in kinds["per_step"]) == r["config"]["prompt_tokens"]
    prompt_tokens = r["config"]["prompt_tokens"]
    with_prompt = kinds["with_prompt_tokens"]
    assert with_prompt["prompt_tokens_per_step"] * with_prompt["steps"] == pytest.approx(prompt_tokens, abs=0.1 *
                                                                                          with_prompt["steps"])
    assert kinds["decode_only"]["prompt_tokens_per_step"] in (0, None)
    assert 0 < kinds["decode_only"]["seconds"] + with_prompt["seconds"] <= e["wall_s"] + 0.5
    assert e["profile"]["from_step"] == 2 and e["profile"]["top"] and e["profile"]["kernels_per_step"] > 0
    assert e["profile"]["wall_ms_per_step"] > 0


def test_serve_with_transformers_peer(tmp_path):
    out = str(tmp_path / "serve.json")
    proc = _run([os.path.join("bench", "serve.py"), "--preset", "tiny", "--requests", "6", "--max-tokens", "6",
                 "--out", out])
    assert "transformers CB" in proc.stdout
    with open(out) as f:
        r = json.load(f)
    assert r["errors"] == {}, r["errors"]
    hf, e = r["transformers"], r["epkit"]
    assert hf["completed"] and hf["requests_finished"] == e["requests_finished"] == 6
    assert hf["generated_tokens"] == e["generated_tokens"] == r["config"]["max_new_tokens_total"]
    assert hf["ttft_p50_s"] > 0 and hf["devices"] == ["cpu"]


def test_profile_decode_tiny(tmp_path):
    out = str(tmp_path / "profile.json")
    proc = _run([os.path.join("bench", "profile_decode.py"), "--preset", "tiny", "--batch-sizes", "1,4", "--steps",
                 "2", "--profile-steps", "1", "--warmup-steps", "1", "--out", out])
    assert "top kernels, torch, batch 1" in proc.stdout
    with open(out) as f:
        r = json.load(f)
    assert r["errors"] == {} and set(r["variants"]) == {"reference", "torch"}
    assert r["copy_bandwidth_GBps"] > 0 and all(v > 0 for v in r["floor_ms"].values())
    for name, v in r["variants"].items():
        assert v["decode_kernels"] == name and v["first_decode_top1_agree"] == 1.0 == v["greedy_16_tokens_match"]
        assert v["first_decode_logprob_max_diff"] < 1e-4
        assert [row["batch"] for row in v["rows"]] == [1, 4]
        for row in v["rows"]:
            assert row["ms_per_step"] > 0 and row["kernels_per_step"] > 0 and 0 < len(row["top"]) <= 15


def test_generate_rows_and_table_with_and_without_a_measurable_decode(capsys):
    """bench/generate.py: a 2-token run within noise of the 1-token run (a prefill benchmark) gives no decode
    figures (the 2026-11-29 prefill run printed 2,000,000,000 tok/s from a clamped negative difference), and the
    table prints prefill+1 beside them for both sides."""
    gen = _load("generate")

    class A:
        new_tokens = 2
    prefill = gen._row(2, A, {1: 0.554, 2: 0.550, "steps2": 3})
    assert prefill["decode_tokens_per_s"] is None and prefill["ms_per_decode_step"] is None
    assert prefill["prefill_plus_1_s"] == 0.554 and prefill["end_to_end_tokens_per_s"] == round(4 / 0.550, 2)
    A.new_tokens = 5
    decode = gen._row(4, A, {1: 0.5, 5: 0.9})
    assert decode["decode_tokens_per_s"] == 40.0 and decode["ms_per_decode_step"] == 100.0
    result = {"config": {"preset": "p", "parameters_b": 1, "dtype": "bf16", "prompt_len": 8, "new_tokens": 2,
                         "ep": 1}, "num_gpus": 1, "gpu": "G",
              "epkit": {"rows": [prefill, decode], "peak_memory_gib": [1.0]},
              "transformers": {"rows": [dict(prefill, batch=2, prefill_plus_1_s=0.508), dict(decode, batch=4,
                                                                                           decode_tokens_per_s=20.0)],
                               "peak_memory_gib": [2.0]}}
    gen.print_table(result)
    lines = capsys.readouterr().out.splitlines()
    two = next(line for line in lines if line.strip().startswith("2 |"))
    four = next(line for line in lines if line.strip().startswith("4 |"))
    assert "0.554" in two and "0.508" in two and two.rstrip().endswith("-")
    assert four.rstrip().endswith("2.00x")
