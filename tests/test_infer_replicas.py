"""Data-parallel replicas (epkit.infer.replicas) on real gloo processes: 4 ranks = EP=2 x DP=2 serve the same
greedy tokens as one engine and as transformers, in input order, also with data-parallel attention inside each
replica; a world that is not ep x dp is one line on every rank; the split is balanced and deterministic."""
import pytest

from distributed import run
from epkit.infer import LLM
from epkit.infer.replicas import split_by_cost
from test_infer import GREEDY, assert_greedy_matches, hf_reference, make_checkpoint, make_prompts


def test_split_is_balanced_and_deterministic():
    costs = [40, 10, 10, 30, 5, 5]
    shares = split_by_cost(costs, 2)
    assert shares == split_by_cost(costs, 2) and sorted(sum(shares, [])) == list(range(6))
    assert [sum(costs[i] for i in s) for s in shares] == [50, 50] and all(s == sorted(s) for s in shares)
    assert split_by_cost([7], 3) == [[0], [], []]


def _serve(rank, world, path, prompts):
    finished = {}
    out = {}
    for mode in (False, True):  # replicated dispatch, then data-parallel attention inside each replica
        llm = LLM(path, ep=2, dp=2, dp_attention=mode, max_num_batched_tokens=24, block_size=4)
        # rank 2 (replica 1's leader) passes no prompts: global rank 0's are served
        outs = llm.generate(prompts if rank == 0 else [], GREEDY,
                            on_finish=lambda i, o: finished.setdefault(mode, []).append(i))
        out[mode] = [o.token_ids for o in outs]
        out[f"generated {mode}"] = llm.stats["generated_tokens"]  # this replica's share
        if mode:
            with pytest.raises(ValueError, match="stream\\(\\) serves one engine; with dp_size=2"):
                next(iter(llm.stream(prompts[:1], GREEDY)))
    load = llm.expert_load()  # collective over every rank: both replicas' tokens
    try:
        LLM(path, ep=3)
    except ValueError as e:
        bad = str(e)
    return {"outs": out, "finished": finished, "load": load["per_rank"], "bad": bad}


def test_ep2_dp2_matches_one_engine_and_transformers(tmp_path):
    path = make_checkpoint(str(tmp_path / "ck"), seed=4)
    prompts = make_prompts(96, seed=4)
    refs = hf_reference(path, prompts)
    one = [o.token_ids for o in LLM(path, max_num_batched_tokens=24, block_size=4).generate(prompts, GREEDY)]
    results = run(_serve, 4, path, prompts)
    r0 = results[0]
    for mode in (False, True):
        assert r0["outs"][mode] == one, f"dp_attention={mode}: EP=2 x DP=2 differs from one engine"
        assert sorted(r0["finished"][mode]) == list(range(len(prompts)))
        served = [results[r]["outs"][f"generated {mode}"] for r in (0, 2)]  # each replica's leader
        assert min(served) > 0 and sum(served) == sum(map(len, one)), served
    for i, (tokens, ref) in enumerate(zip(one, refs)):
        assert_greedy_matches(tokens, ref, f"prompt {i}")
    for r in results[1:]:
        assert r["outs"][False] == r["outs"][True] == [] and not r["finished"]
    assert all(r["load"] == r0["load"] for r in results) and len(r0["load"]) == 2 and min(r0["load"]) > 0
    for r in results:
        assert r["bad"].startswith("--ep 3 x --dp 1 = 3 rank(s), but 4 rank(s) were launched"), r["bad"]
