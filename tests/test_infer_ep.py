"""Inference under expert parallelism, on real gloo processes: greedy parity with transformers at EP=2
and EP=3, bad requests failing alone without desynchronising the ranks, and a checkpoint saved at EP=2
served at EP=1 and EP=4 with identical outputs."""
import torch

from distributed import run
from conftest import tiny_args
from epkit.infer import LLM, SamplingParams
from epkit.infer.build import random_model
from test_infer import GREEDY, assert_greedy_matches, hf_reference, make_checkpoint, make_prompts

SAMPLED = SamplingParams(temperature=0.8, top_p=0.9, seed=7, max_tokens=10, ignore_eos=True)
BAD = [([], "empty prompt"), ([1, 4000], "outside the vocabulary")]


def _serve(rank, world, path, prompts, save_to=None, strategy="contiguous"):
    """Every rank builds the engine and calls generate; rank 0 returns the outputs."""
    llm = LLM(path, ep=world, max_num_batched_tokens=24, block_size=4, strategy=strategy)
    assert llm.load_report.bytes_read < _checkpoint_bytes(path), "a rank read experts it does not own"
    # Bad requests sit between good ones; every rank keeps stepping in lock-step.
    reqs = prompts[:2] + [b[0] for b in BAD] + prompts[2:]
    outs = llm.generate(reqs, [GREEDY] * len(reqs))
    sampled = llm.generate([prompts[3], prompts[5]], SAMPLED)
    streamed = [u.new_token_ids for u in llm.stream([prompts[6]], GREEDY)]
    load = llm.expert_load()  # collective: every rank
    # A model built straight on its devices (as bench/generate.py does) serves through from_model.
    built = LLM.from_model(random_model(tiny_args(), world, "cpu", torch.float32, seed=3, router_std=0.5))
    random_outs = built.generate(prompts[:4], GREEDY)
    if save_to is not None:  # the trainer's way: an EP model, all_to_all dispatch, saved on every rank
        import epkit
        model = epkit.load_pretrained(path, ep_size=world, dispatch="all_to_all")
        with torch.no_grad():  # a "fine-tuned" change, so the saved checkpoint differs from the input
            for moe in model.moe_layers():
                moe.experts.w2.mul_(1.5)
            # Different tokens per rank (all_to_all), so the checkpoint carries routing counts.
            model(torch.randint(3, 96, (2, 16), generator=torch.Generator().manual_seed(rank)))
        epkit.save_pretrained(model, save_to)
    if rank != 0:
        assert outs == [] and sampled == []
        return None
    return {"owners": [llm.model.expert_parallel.plan.owners(layer) for layer in range(llm.model.args.num_layers)],
            "outs": [(o.token_ids, o.finish_reason, o.error) for o in outs],
            "sampled": [o.token_ids for o in sampled], "random": [o.token_ids for o in random_outs], "streamed": sum(streamed, []), "load": load}


def _checkpoint_bytes(path):
    import os
    return sum(os.path.getsize(os.path.join(path, f)) for f in os.listdir(path) if f.endswith(".safetensors"))


def _check(result, prompts, refs, label):
    outs = result["outs"]
    good = outs[:2] + outs[2 + len(BAD):]
    for i, ((tokens, reason, err), ref) in enumerate(zip(good, refs)):
        assert err is None and reason in ("stop", "length"), (label, i, err)
        assert_greedy_matches(tokens, ref, f"{label} prompt {i}")
    for (tokens, reason, err), (_, msg) in zip(outs[2: 2 + len(BAD)], BAD):
        assert reason == "error" and msg in err and tokens == [], (label, err)
    assert result["streamed"] == good[6][0]
    load = result["load"]
    assert len(load["per_rank"]) == int(label.split("=")[1]) and all(x > 0 for x in load["per_rank"])


def test_ep_parity_and_cross_ep_checkpoint(tmp_path):
    path = make_checkpoint(str(tmp_path / "ck"), seed=2)
    prompts = make_prompts(96, seed=2)
    refs = hf_reference(path, prompts)
    local = LLM(path)
    one = local.generate([prompts[3], prompts[5]], SAMPLED)
    saved = str(tmp_path / "saved_ep2")

    r2 = run(_serve, 2, path, prompts, saved)[0]
    _check(r2, prompts, refs, "EP=2")
    assert r2["sampled"] == [o.token_ids for o in one], "seeded sampling differs between EP=1 and EP=2"
    r3 = run(_serve, 3, path, prompts)[0]
    _check(r3, prompts, refs, "EP=3")
    assert r3["sampled"] == r2["sampled"]
    # Random weights depend on the expert, not on the EP size: EP=1, 2 and 3 agree.
    built = LLM.from_model(random_model(tiny_args(), 1, "cpu", torch.float32, seed=3, router_std=0.5))
    assert r2["random"] == r3["random"] == [o.token_ids for o in built.generate(prompts[:4], GREEDY)]

    # The EP=2 checkpoint (transformers-readable) served at EP=1 and at EP=4, experts placed by the
    # routing counts saved with it.
    refs_saved = hf_reference(saved, prompts)
    r4 = run(_serve, 4, saved, prompts, None, "balanced")[0]
    _check(r4, prompts, refs_saved, "EP=4")
    assert r4["owners"][0] != [0, 0, 1, 1, 2, 2, 3, 3], "balanced placement should differ from contiguous"
    ep1 = LLM(saved, max_num_batched_tokens=24, block_size=4)
    outs1 = ep1.generate(prompts[:2] + [b[0] for b in BAD] + prompts[2:], GREEDY)
    assert [(o.token_ids, o.finish_reason, o.error) for o in outs1] == r4["outs"]
    assert [o.token_ids for o in ep1.generate([prompts[3], prompts[5]], SAMPLED)] == r4["sampled"]
    assert r4["outs"] != r2["outs"], "the saved checkpoint should differ from the original (experts were scaled)"
