"""Data-parallel attention (`LLM(..., dp_attention=True)`) on real gloo processes at EP=2 and EP=3:
greedy tokens identical to EP=1 and to transformers with more requests than ranks, uneven prompt
lengths, bad requests, late arrivals, a rank running out of requests first, preemption on a small KV
cache, the uneven all-to-all for large prefill chunks; a decode forward with no host sync. The step
agreement and the request placement are checked on their own too."""
import pytest
import torch

from conftest import tiny_args
from distributed import run
from epkit.infer import LLM, SamplingParams
from epkit.infer.dp import (CMD, DEC_FULL, DEC_ROWS, DEC_WIDTH, FREE, GRAPHS, HEADER, LOGPROBS, N_PREFILL, PAYLOAD,
                            PREFILL, SAMPLED, UNFINISHED, WORK, agree, assign_ranks)
from epkit.infer.kv_cache import bytes_per_block
from hostsync import NoHostSync
from test_infer import GREEDY, assert_greedy_matches, hf_reference, make_checkpoint, make_prompts

SAMPLED_PARAMS = SamplingParams(temperature=0.8, top_p=0.9, seed=7, max_tokens=10, ignore_eos=True)
LOGPROBS_PARAMS = SamplingParams(temperature=0, max_tokens=4, logprobs=2)
BAD = [([], "empty prompt"), ([1, 4000], "outside the vocabulary")]
ENGINE = dict(max_num_batched_tokens=24, block_size=4)
SMALL_KV = 14 * bytes_per_block(tiny_args(), 4, torch.float32)  # 13 usable blocks of 4 tokens per rank


def _finished_ids(updates, into: dict) -> None:
    for u in updates:
        if u.finished:
            into[u.request_id] = u.token_ids


def _serve(rank, world, path, prompts):
    llm = LLM(path, ep=world, dp_attention=True, **ENGINE)
    assert llm.dp is not None and llm.model.expert_parallel.dispatch == "all_to_all"
    cudnn, forward = [], llm.model.forward  # whether cuDNN attention was on in each forward (never, as the runner)
    llm.model.forward = lambda *a, **k: cudnn.append(torch.backends.cuda.cudnn_sdp_enabled()) or forward(*a, **k)
    reqs = prompts[:2] + [b[0] for b in BAD] + prompts[2:]
    outs = llm.generate(reqs, [GREEDY] * len(reqs))
    sampled = llm.generate([prompts[3], prompts[5]], SAMPLED_PARAMS)
    with_lp = llm.generate([prompts[1], prompts[2], prompts[5]], [LOGPROBS_PARAMS, GREEDY, LOGPROBS_PARAMS])
    streamed = [u.new_token_ids for u in llm.stream([prompts[6]], GREEDY)]
    # Late arrival, an abort and a rank running out of work: rank 0 drives step() by hand. The 2-token
    # request finishes at once; a rank left without requests runs padding forwards for the others' MoE
    # exchanges.
    padding_before, late = llm.dp.padding_forwards, None
    if rank == 0:
        done = {}
        ids = [llm.add_request(prompts[0], SamplingParams(temperature=0, max_tokens=2)),
               llm.add_request(prompts[7], GREEDY)]
        # served by rank 0 at EP=2, by rank 2 at EP=3; far from done when the others finish
        dropped = llm.add_request(prompts[3], SamplingParams(temperature=0, max_tokens=200, ignore_eos=True))
        for _ in range(4):
            _finished_ids(llm.step(), done)
        assert llm.dp.abort(dropped) and not llm.dp.abort(dropped)
        ids.append(llm.add_request(prompts[4], GREEDY))
        while llm.has_unfinished():
            _finished_ids(llm.step(), done)
        llm.release_followers()
        late = [done[i] for i in ids]
        assert dropped not in done
    else:
        llm.follow()
    padding = llm.dp.padding_forwards - padding_before
    assert not llm.scheduler.has_unfinished(), "an aborted request is still served"
    load = llm.expert_load()  # collective: every rank
    # A small KV cache (preemption) and the uneven all-to-all for slots above 8 tokens per rank.
    small = LLM(path, ep=world, dp_attention=True, kv_cache_memory=SMALL_KV, sync_free_max_tokens=8, **ENGINE)
    tight = small.generate(prompts, GREEDY)
    # A padded decode forward, whole (KV bookkeeping, attention, all-to-all experts, routing counts),
    # reads nothing back on the host: a CUDA graph can capture it.
    from epkit.parallel import set_dispatch_capacity
    set_dispatch_capacity(small.model, 4)
    tokens = torch.tensor([[5], [6], [7]])
    with torch.no_grad(), NoHostSync():
        small.runner._forward(tokens, torch.full((3, 1), -1), torch.zeros(3, 2, dtype=torch.long), torch.arange(3))
    set_dispatch_capacity(small.model, None)
    return {"outs": [(o.token_ids, o.finish_reason, o.error, o.timings) for o in outs],
            "sampled": [o.token_ids for o in sampled], "logprobs": [(o.logprobs, o.top_logprobs) for o in with_lp],
            "streamed": sum(streamed, []), "late": late,
            "padding": padding, "load": load["per_rank"], "tight": [o.token_ids for o in tight],
            "preemptions": small.scheduler.num_preemptions, "served": small.stats["steps"],
            "cudnn_in_forwards": (len(cudnn), any(cudnn))}


@pytest.mark.parametrize("world", [2, 3])
def test_dp_attention_matches_one_device_and_transformers(tmp_path, world):
    path = make_checkpoint(str(tmp_path / "ck"), seed=2)
    prompts = make_prompts(96, seed=2)
    refs = hf_reference(path, prompts)
    one = LLM(path, **ENGINE)
    ep1 = [o.token_ids for o in one.generate(prompts, GREEDY)]
    for tokens, ref, i in zip(ep1, refs, range(len(prompts))):
        assert_greedy_matches(tokens, ref, f"EP=1 prompt {i}")

    results = run(_serve, world, path, prompts)
    r = results[0]
    good = r["outs"][:2] + r["outs"][2 + len(BAD):]
    assert [g[0] for g in good] == ep1, "DP attention differs from one device"
    for (tokens, reason, err, timings), i in zip(good, range(len(prompts))):
        assert err is None and reason in ("stop", "length") and timings["ttft_s"] >= timings["queue_s"] >= 0, i
    for (tokens, reason, err, _), (_, msg) in zip(r["outs"][2: 2 + len(BAD)], BAD):
        assert reason == "error" and msg in err and tokens == []
    assert r["sampled"] == [o.token_ids for o in one.generate([prompts[3], prompts[5]], SAMPLED_PARAMS)]
    assert r["streamed"] == ep1[6]
    ref_lp = one.generate([prompts[1], prompts[2], prompts[5]], [LOGPROBS_PARAMS, GREEDY, LOGPROBS_PARAMS])
    for (lps, tops), o in zip(r["logprobs"], ref_lp):  # rows of every rank, through the gather to rank 0
        assert (lps is None) == (o.logprobs is None) and [[i for i, _ in t] for t in tops or []] == \
            [[i for i, _ in t] for t in o.top_logprobs or []]
        if lps is not None:
            torch.testing.assert_close(torch.tensor(lps), torch.tensor(o.logprobs), atol=1e-5, rtol=0)
    assert r["late"] == [ep1[0][:2], ep1[7], ep1[4]]
    assert any(x["padding"] for x in results), "a rank out of requests should have run padding forwards"
    assert len(r["load"]) == world and all(x > 0 for x in r["load"]), r["load"]  # every rank's experts served
    assert all(x["tight"] == [] for x in results[1:]) and r["tight"] == ep1
    assert sum(x["preemptions"] for x in results) > 0, "the small KV cache should have preempted"
    assert len({x["served"] for x in results}) == 1  # lock-step: every rank ran every step
    assert all(x["cudnn_in_forwards"][0] > 0 and not x["cudnn_in_forwards"][1] for x in results), results


def _header(**fields) -> list[int]:
    h = [0] * HEADER
    names = dict(CMD=CMD, PAYLOAD=PAYLOAD, DEC_ROWS=DEC_ROWS, DEC_WIDTH=DEC_WIDTH, DEC_FULL=DEC_FULL, GRAPHS=GRAPHS,
                 SAMPLED=SAMPLED, LOGPROBS=LOGPROBS, UNFINISHED=UNFINISHED, WORK=WORK, FREE=FREE, N_PREFILL=N_PREFILL)
    for k, v in fields.items():
        if k == "prefill":
            h[N_PREFILL] = len(v)
            h[PREFILL: PREFILL + len(v)] = v
        else:
            h[names[k]] = v
    return h


def test_agree_takes_the_largest_slot_of_any_rank():
    s = agree([_header(CMD=1, PAYLOAD=9, DEC_ROWS=3, DEC_WIDTH=2, DEC_FULL=1, GRAPHS=1, SAMPLED=4, LOGPROBS=3,
                       UNFINISHED=5,
                       WORK=50, FREE=7, prefill=[12]),
               _header(DEC_FULL=0, GRAPHS=1, DEC_ROWS=6, DEC_WIDTH=1, SAMPLED=6, UNFINISHED=6, WORK=60, FREE=3,
                       prefill=[20, 5]),
               _header(DEC_FULL=1, GRAPHS=1)])  # a rank with no work
    assert (s.command, s.payload, s.decode_rows, s.decode_width) == (1, 9, 6, 2)
    assert not s.decode_all_sampled and s.graphs and s.prefill == [20, 5] and s.forwards == 3
    assert (s.sampled, s.logprobs, s.unfinished, s.loads) == (6, 2, 11, [(50, 7), (60, 3), (0, 0)])
    idle = agree([_header(DEC_FULL=1), _header(DEC_FULL=1, GRAPHS=1)])
    assert idle.forwards == 0 and not idle.graphs


def test_requests_go_to_the_least_loaded_rank():
    # equal loads: lowest rank first; then the rank with less work; a tie in work goes to more free blocks
    assert assign_ranks([(10, 1), (10, 1), (5, 1)], [(0, 9), (0, 9)]) == [0, 1, 0]
    assert assign_ranks([(10, 1)], [(30, 9), (20, 9), (25, 9)]) == [1]
    assert assign_ranks([(10, 1)], [(20, 2), (20, 8)]) == [1]
    ranks = assign_ranks([(n, 1) for n in (100, 90, 80, 70, 60, 50, 40, 30)], [(0, 9)] * 3)
    work = [sum(n for n, r in zip((100, 90, 80, 70, 60, 50, 40, 30), ranks) if r == k) for k in range(3)]
    assert sorted(ranks[:3]) == [0, 1, 2] and max(work) - min(work) <= 100, work  # within the largest request


def _cli(rank, world, argv):
    from epkit.infer.cli import main
    return main(argv)


def test_cli_dp_attention_matches_one_device(tmp_path):
    """`launch/infer.py --dp-attention` at EP=2: text prompts, a stop string found on the owning rank, bad
    lines; every line equals the EP=1 run's (text and finish reason too)."""
    import json

    from epkit.infer.cli import main
    ck = make_checkpoint(str(tmp_path / "ck"), seed=3, tokenizer=True)
    text = LLM(ck).generate(["a stitch in time"], SamplingParams(temperature=0, max_tokens=12,
                                                                 ignore_eos=True))[0].text
    stop = text.strip()[3:6]
    assert len(stop) == 3
    # the second good request goes to rank 1 (rank 0 holds the first): its stop string is found there
    lines = [{"prompt": "the quick brown fox", "max_tokens": 5}, {"prompt": ""},
             {"prompt": "a stitch in time", "max_tokens": 12, "ignore_eos": True, "stop": [stop]},
             {"prompt_token_ids": [5, 6, 7], "max_tokens": 4, "temperature": 0.7, "seed": 1},
             {"prompt": "to be or", "max_tokens": 6}, {"prompt_token_ids": [5, 999]},
             {"prompt": "all that glitters", "max_tokens": 9}]
    src = tmp_path / "in.jsonl"
    src.write_text("\n".join(json.dumps(l) for l in lines) + "\n")
    one, dp = tmp_path / "one.jsonl", tmp_path / "dp.jsonl"
    assert main(["--checkpoint", ck, "--prompts", str(src), "--output", str(one), "--no-progress"]) == 3  # 2 bad lines
    argv = ["--checkpoint", ck, "--prompts", str(src), "--output", str(dp), "--no-progress", "--dp-attention",
            "--compare", str(one)]
    codes = run(_cli, 2, argv)
    assert codes[0] == 3, codes  # exit 3: some requests failed (the two bad lines), the rest match
    drop = lambda r: {k: v for k, v in r.items() if k != "timings"}  # noqa: E731
    ours, theirs = ([drop(json.loads(l)) for l in f.read_text().splitlines()] for f in (dp, one))
    assert ours == theirs
    assert ours[2]["finish_reason"] == "stop" and stop not in ours[2]["text"]
