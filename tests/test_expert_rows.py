"""--expert-split rows (parallel.apply_expert_rows): every EP rank holds 1/ep of every expert's intermediate rows
and the replicated all-reduce sums the parts. On real gloo processes: logits equal transformers' from hub and
fused checkpoint names, each rank reads exactly the shared tensors plus its rows, random weights equal the
whole-expert model's, the engine's greedy tokens equal transformers', and what the layout cannot do fails in
one line."""
import pytest
import torch

import epkit
from conftest import count_safetensors_reads, hf_logits, hf_model, save_fused, tiny_args
from distributed import run

ARGS = dict(num_layers=2, num_experts=8)


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("rows")
    hf = hf_model(tiny_args(**ARGS), seed=5)
    hf.save_pretrained(str(root / "hub"))
    save_fused(hf, str(root / "fused"))
    tokens = torch.randint(0, 96, (3, 7), generator=torch.Generator().manual_seed(2))
    return root, tokens, hf_logits(hf, tokens)[0]


def _rows_rank(rank, world, root, tokens, ref):
    from safetensors import safe_open

    from epkit.infer import LLM, SamplingParams
    from epkit.parallel import set_dispatch
    out = {}
    for kind in ("hub", "fused"):
        log, undo = count_safetensors_reads()
        try:
            model = epkit.load_pretrained(str(root / kind), ep_size=world, split="rows")
        finally:
            undo()
        experts = model.layers[0].moe.experts
        assert experts.rows == (rank, world) and experts.expert_ids == list(range(8))
        assert tuple(experts.w2.shape) == (8, 32, 48 // world)
        with torch.no_grad():
            torch.testing.assert_close(model(tokens)[0], ref, atol=2e-5, rtol=0)
        # bytes: every shared tensor whole, and 1/world of every expert tensor
        want = 0
        with safe_open(str(root / kind / "model.safetensors"), "pt") as f:
            for name in f.keys():
                n = f.get_slice(name).get_shape()
                size = 4 * int(torch.tensor(n).prod())
                want += size // world if ".experts." in name else size
        out[kind] = (sum(b for _, _, b in log), want)
    with pytest.raises(ValueError, match="split by rows"):
        epkit.save_pretrained(model, str(root / f"never-{rank}"))
    with pytest.raises(ValueError, match="keeps its replicated dispatch"):
        set_dispatch(model, "all_to_all")
    # the engine on this layout: greedy tokens equal transformers' (the leader's outputs)
    llm = LLM.from_model(model, ep=world, max_num_seqs=4, kv_cache_memory=1 << 22)
    outs = llm.generate([t.tolist() for t in tokens], SamplingParams(temperature=0, max_tokens=6, ignore_eos=True))
    out["tokens"] = [list(o.token_ids) for o in outs] if llm.is_leader else None
    # random weights: the row parts of the whole-expert model's experts
    from epkit.infer.build import random_model
    a = random_model(tiny_args(**ARGS), world, split="rows", seed=3)
    b = random_model(tiny_args(**ARGS), world, split="experts", seed=3)
    with torch.no_grad():
        torch.testing.assert_close(a(tokens)[0], b(tokens)[0], atol=2e-5, rtol=0)
    return out


def test_rows_split_matches_transformers_and_reads_only_its_rows(checkpoints):
    from transformers import MixtralForCausalLM
    root, tokens, ref = checkpoints
    outs = run(_rows_rank, 2, root, tokens, ref)
    for out in outs:
        for kind in ("hub", "fused"):
            read, want = out[kind]
            assert read == want, (kind, read, want)
    hf = MixtralForCausalLM.from_pretrained(str(root / "hub")).eval()
    with torch.no_grad():
        theirs = hf.generate(tokens, max_new_tokens=6, do_sample=False, min_new_tokens=6)[:, tokens.shape[1]:]
    assert outs[0]["tokens"] == theirs.tolist()


def test_rows_split_refusals():
    from epkit.infer import EngineConfig
    from epkit.moe import Experts
    with pytest.raises(ValueError, match="needs the replicated mode"):
        EngineConfig(expert_split="rows", dp_attention=True).check()
    with pytest.raises(ValueError, match="expert_split='cols' is not one of"):
        EngineConfig(expert_split="cols").check()
    with pytest.raises(ValueError, match="intermediate_size=48 does not split into 5 equal parts"):
        Experts(8, 32, 48, rows=(0, 5))
