"""bench/scaling.py in its small CPU mode: an EP=1 launch and an EP=2 launch merge their rows into one
JSON (every figure present, replicated and dp-attention rows, the same greedy tokens in every mode),
and the table prints the speed-up over EP=1."""
from __future__ import annotations

import json
import os
import subprocess
import sys

from distributed import free_port

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "bench", "scaling.py")
FIGURES = ("gpus", "ep", "mode", "workload", "generated_tokens_per_s", "ttft_p50_s", "ttft_p99_s", "itl_p50_ms",
           "itl_p99_ms")


def _launch(ranks: int, out: str, warmup: str) -> str:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(ranks), "--master_port",
           str(free_port()), SCRIPT, "--small", "--warmup", warmup, "--out", out]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc.stdout


def test_ep1_and_ep2_launches_merge_into_one_file(tmp_path):
    out = str(tmp_path / "scaling.json")
    _launch(1, out, "none")
    table = _launch(2, out, "server")  # LLM.warmup in both modes
    with open(out) as f:
        doc = json.load(f)
    rows = {(r["ep"], r["mode"], r["workload"]): r for r in doc["rows"]}
    assert set(rows) == {(e, m, w) for e, m in ((1, "ep1"), (2, "replicated"), (2, "dp")) for w in ("mixed", "decode")}
    for key, r in rows.items():
        assert all(f in r for f in FIGURES), key
        assert r["generated_tokens_per_s"] > 0 and r["ttft_p99_s"] >= r["ttft_p50_s"] > 0, key
        assert r["itl_p99_ms"] >= r["itl_p50_ms"] > 0 and r["generated_tokens"] == 8 * 8, key
        assert r["outputs_sha1"] == rows[(1, "ep1", r["workload"])]["outputs_sha1"], f"{key}: tokens differ"
    assert [run["world_size"] for run in doc["runs"]] == [1, 2]
    assert "x EP=1" in table and table.count("\n  decode |") == 3 and table.count("\n   mixed |") == 3
