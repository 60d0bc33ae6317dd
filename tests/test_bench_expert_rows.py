"""bench/expert_rows.py in its CPU mode: both layouts are timed over the same routings and written as JSON."""
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def test_expert_rows_bench_writes_both_layouts(tmp_path):
    from bench import expert_rows
    out = tmp_path / "rows.json"
    assert expert_rows.main(["--preset", "tiny", "--tokens", "1,3", "--routings", "2", "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    assert result["config"]["ep"] == 2 and [r["tokens"] for r in result["rows"]] == [1, 3]
    for r in result["rows"]:
        assert r["whole_busiest_ms"] > 0 and r["rows_ms"] > 0 and r["routings"] == 2


def test_rows_layout_computes_the_whole_expert_sum():
    """The two layouts the benchmark times compute the same thing: rank 0 + rank 1 of whole experts equals two
    halves of rows (the second half built from the same full weights)."""
    import torch

    from bench.expert_rows import layouts
    from epkit.args import ModelArgs
    from epkit.moe import Experts, LocalDispatch
    args = ModelArgs.from_name("tiny")
    whole, whole_dispatch, rows0, rows_dispatch = layouts(args, torch.device("cpu"), torch.float32)
    full_w13 = torch.cat([w.w13 for w in whole]).detach()
    full_w2 = torch.cat([w.w2 for w in whole]).detach()
    parts = []
    for r in range(2):
        ex = Experts(args.num_experts, args.hidden_size, args.intermediate_size, rows=(r, 2))
        with torch.no_grad():
            for e in range(args.num_experts):
                ex.w13[e].copy_(ex.take_rows("w13", full_w13[e]))
                ex.w2[e].copy_(ex.take_rows("w2", full_w2[e]))
        parts.append(ex)
    g = torch.Generator().manual_seed(0)
    x, weights = torch.randn(5, args.hidden_size, generator=g), torch.rand(5, 2, generator=g)
    ids = torch.stack([torch.randperm(args.num_experts, generator=g)[:2] for _ in range(5)])
    with torch.no_grad():
        by_experts = sum(whole_dispatch[r].partial(whole[r], x, weights, ids) for r in range(2))
        by_rows = sum(rows_dispatch.partial(p, x, weights, ids) for p in parts)
    torch.testing.assert_close(by_rows, by_experts, atol=1e-5, rtol=1e-5)


def test_profile_prefill_cpu_mode(tmp_path):
    """bench/profile_prefill.py profiles the one step that prefills every prompt and writes its kernels."""
    from bench import profile_prefill
    out = tmp_path / "prefill.json"
    assert profile_prefill.main(["--preset", "tiny", "--prompts", "2", "--prompt-len", "32", "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    assert result["config"]["prompts"] == 2 and result["top"] and result["kernels_per_step"] > 0
    assert result["prefill_plus_1_s"] > 0  # the JSON rounds the wall time to 0.1 ms
    assert abs(result["outside_kernels_ms"] - (result["prefill_plus_1_s"] * 1e3 - result["device_ms_per_step"])) <= 0.2
