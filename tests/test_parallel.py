"""Expert parallelism on real gloo processes: logits, gradients, both dispatch modes, checkpoints
saved at one EP size and loaded at others, bytes each rank reads from the files (hub and fused names)."""
import os

import pytest
import torch

import epkit
from conftest import count_safetensors_reads, expected_read_bytes, hf_logits, hf_model, save_fused, tiny_args
from distributed import run

ARGS = dict(num_layers=2, num_experts=8)
B, T = 4, 6


def _inputs(args):
    g = torch.Generator().manual_seed(7)
    tokens = torch.randint(0, args.vocab_size, (B, T), generator=g)
    probe = torch.randn(B, T, args.vocab_size, generator=g)  # loss = (logits * probe).sum()
    return tokens, probe


def _reference(ckpt):
    model = epkit.load_pretrained(ckpt)
    tokens, probe = _inputs(model.args)
    logits, router = model(tokens)
    (logits * probe).sum().backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    return logits.detach(), grads


def _load_counting_reads(path, world):
    """Load at EP=world (replicated dispatch); also return what the load read from the files, and the
    experts this rank holds per layer."""
    log, undo = count_safetensors_reads()
    try:
        model, report = epkit.load_pretrained(path, ep_size=world, dispatch="replicated", return_report=True)
    finally:
        undo()
    read = sum(n for _, _, n in log)
    assert report.bytes_read == read, (report.bytes_read, read)  # epkit's own report agrees with the files
    return model, {"read": read, "local": [m.experts.expert_ids for m in model.moe_layers()]}


def _check_rank(rank, world, ckpt, save_to, ref_logits, ref_grads, fused=None):
    """On every rank: replicated logits + grads, then all_to_all with a different chunk per rank. With `fused`
    (the same weights under transformers' fused in-memory names) also load that and compare logits."""
    import torch.distributed as dist

    from epkit.parallel import set_dispatch
    model, out = _load_counting_reads(ckpt, world)
    args = model.args
    tokens, probe = _inputs(args)
    info = model.expert_parallel
    from deepspeed.moe.utils import is_moe_param
    assert all(is_moe_param(p) == ("experts" in n) for n, p in model.named_parameters())  # survive loading
    if fused is not None:
        fused_model, out["fused"] = _load_counting_reads(fused, world)
        with torch.no_grad():
            torch.testing.assert_close(fused_model(tokens)[0], ref_logits, atol=1e-5, rtol=0)
        del fused_model

    def check_grads(reduce_shared):
        for name, p in model.named_parameters():
            g = p.grad.clone()
            if "experts" in name:
                layer = int(name.split(".")[1])
                ids = model.layers[layer].moe.experts.expert_ids
                torch.testing.assert_close(g, ref_grads[name][ids], atol=1e-5, rtol=1e-5, msg=name)
            else:
                if reduce_shared:
                    dist.all_reduce(g)
                torch.testing.assert_close(g, ref_grads[name], atol=1e-5, rtol=1e-5, msg=name)

    # replicated: same tokens everywhere
    from epkit.parallel import gather_routing_counts, rank_loads
    model.routing_stats.reset()
    logits, _ = model(tokens)
    counts = gather_routing_counts(model)  # every EP rank saw the same tokens: counted once
    assert [sum(row) for row in counts] == [B * T * args.experts_per_token] * args.num_layers
    out["rank_loads"] = rank_loads(model, counts)
    torch.testing.assert_close(logits.detach(), ref_logits, atol=1e-5, rtol=0)
    (logits * probe).sum().backward()
    check_grads(reduce_shared=False)

    # the inference-time sum: symmetric memory is CUDA's; on CPUs "auto" keeps gloo/NCCL and asking for it fails
    from epkit.symm_sum import set_ep_all_reduce
    assert set_ep_all_reduce(model, "auto") == "nccl"
    with pytest.raises(ValueError, match="ep_all_reduce='symm_mem' needs CUDA GPUs"):
        set_ep_all_reduce(model, "symm_mem")
    with pytest.raises(ValueError, match="'ring' is not one of"):
        set_ep_all_reduce(model, "ring")

    # all_to_all: each rank its own rows (rank 0 may get several, the last rank possibly none)
    set_dispatch(model, "all_to_all")
    model.zero_grad()
    rows = torch.tensor_split(torch.arange(B), world)[rank]
    logits, _ = model(tokens[rows])
    torch.testing.assert_close(logits.detach(), ref_logits[rows], atol=1e-5, rtol=0)
    (logits * probe[rows]).sum().backward()
    check_grads(reduce_shared=True)
    assert info.dispatch == "all_to_all"

    if save_to:
        epkit.save_pretrained(model, save_to)
        if rank == 0:
            out["files"] = sorted(os.listdir(save_to))
    return out


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("ep")
    args = tiny_args(**ARGS)
    hf = hf_model(args, seed=11)
    src = str(root / "hf")
    hf.save_pretrained(src)  # transformers writes the hub names
    save_fused(hf, str(root / "fused"))  # transformers 5's in-memory names (experts fused per layer)
    ref_logits, ref_grads = _reference(src)
    tokens, _ = _inputs(args)
    torch.testing.assert_close(ref_logits, hf_logits(hf, tokens)[0], atol=1e-5, rtol=0)
    return root, src, hf, ref_logits, ref_grads


def test_ep2_logits_grads_and_save(checkpoints):
    root, src, hf, ref_logits, ref_grads = checkpoints
    saved = str(root / "ep2")
    outs = run(_check_rank, 2, src, saved, ref_logits, ref_grads, str(root / "fused"))
    assert outs[0]["local"][0] == [0, 1, 2, 3] and outs[1]["local"][0] == [4, 5, 6, 7]
    for o in outs:  # each rank read the shared tensors and its own experts, nothing else (both namings)
        assert o["read"] == expected_read_bytes(src, o["local"]) < expected_read_bytes(src, [range(8)] * 2)
        assert o["fused"]["local"] == o["local"]
        assert o["fused"]["read"] == expected_read_bytes(str(root / "fused"), o["local"])
    files = outs[0]["files"]
    assert "model.safetensors.index.json" in files and "epkit_plan.json" in files and "config.json" in files
    assert any(f.startswith("model-ep000") for f in files) and any(f.startswith("model-ep001") for f in files)
    # the EP=2 directory is a Hugging Face checkpoint: transformers and single-device epkit agree
    from transformers import AutoModelForCausalLM
    theirs = AutoModelForCausalLM.from_pretrained(saved).eval()
    tokens, _ = _inputs(hf.config)
    torch.testing.assert_close(hf_logits(theirs, tokens)[0], ref_logits, atol=1e-5, rtol=0)
    with torch.no_grad():
        ours, _ = epkit.load_pretrained(saved)(tokens)
    torch.testing.assert_close(ours, ref_logits, atol=1e-5, rtol=0)


@pytest.mark.parametrize("world", [3, 4])
def test_ep2_checkpoint_loads_at_other_sizes(checkpoints, world):
    """EP=3 is uneven (3/3/2 experts); each rank reads about shared + its own experts."""
    root, src, hf, ref_logits, ref_grads = checkpoints
    saved = str(root / "ep2")
    if not os.path.isdir(saved):
        run(_check_rank, 2, src, saved, ref_logits, ref_grads)
    outs = run(_check_rank, world, saved, None, ref_logits, ref_grads, str(root / "fused"))
    sizes = [len(o["local"][0]) for o in outs]
    assert all(sum(load) == B * T * 2 and len(load) == world for load in outs[0]["rank_loads"])
    assert sizes == ([3, 3, 2] if world == 3 else [2, 2, 2, 2])
    everything = expected_read_bytes(saved, [range(8)] * 2)
    for o in outs:  # shared + this rank's experts exactly, for epkit's hub-named files and for fused names
        assert o["read"] == expected_read_bytes(saved, o["local"]) < everything
        assert o["fused"]["read"] == expected_read_bytes(str(root / "fused"), o["fused"]["local"])
        assert o["fused"]["local"] == o["local"]
    assert sorted(e for o in outs for e in o["local"][1]) == list(range(8))


def _bad_ep(rank, world, ckpt, ep):
    try:
        epkit.load_pretrained(ckpt, ep_size=ep, dispatch="replicated")
    except (ValueError, epkit.CheckpointError) as e:
        return str(e)
    return None


def test_bad_ep_sizes_fail_clearly_on_every_rank(checkpoints):
    root, src, *_ = checkpoints
    assert run(_bad_ep, 2, src, 4) == ["ep_size=4 is larger than the world size 2; launch at least 4 ranks "
                                       "(e.g. deepspeed --num_gpus 4)"] * 2
    msgs = run(_bad_ep, 3, src, 2)
    assert msgs == ["the world size 3 is not divisible by ep_size=2"] * 3


def test_manifest_with_too_many_experts_fails_on_every_rank(checkpoints, tmp_path):
    import json
    import shutil
    root, src, *_ = checkpoints
    bad = str(tmp_path / "bad")
    shutil.copytree(src, bad)
    with open(os.path.join(bad, "epkit_plan.json"), "w") as f:
        json.dump({"plan": epkit.ShardingPlan(12, 2).to_dict()}, f)
    assert run(_bad_ep, 2, bad, 2) == [f"{bad}/epkit_plan.json: the plan names 12 experts but config.json has 8"] * 2


def _save_fails_on_one_rank(rank, world, src, dst):
    import epkit.checkpoint as ck
    model = epkit.load_pretrained(src, ep_size=world, dispatch="replicated")
    epkit.save_pretrained(model, dst)
    before = sorted(os.listdir(dst))
    if rank == 1:
        def broken(*a, **k):
            raise OSError("disk full (simulated on rank 1)")
        ck.save_file = broken
    try:
        epkit.save_pretrained(model, dst)
    except Exception as e:  # every rank must get here instead of waiting forever
        msg = str(e)
    else:
        msg = None
    return msg, before == sorted(os.listdir(dst)), sorted(os.listdir(os.path.dirname(dst)))


def test_a_save_failing_on_one_rank_fails_everywhere_and_keeps_the_old_checkpoint(checkpoints, tmp_path):
    root, src, *_ = checkpoints
    dst = str(tmp_path / "ck")
    outs = run(_save_fails_on_one_rank, 2, src, dst, timeout=120)
    assert outs[0][0] == f"saving {dst} failed on another rank; nothing was replaced"
    # one line naming the file as it would have been called (not the temporary directory)
    assert outs[1][0] == (f"could not write {dst}/model-ep001-of-002-experts-00000.safetensors: "
                          f"disk full (simulated on rank 1)")
    assert all(o[1] for o in outs) and outs[0][2] == ["ck"]  # old checkpoint whole, no temp dir left


def test_an_expert_missing_on_one_rank_fails_on_every_rank(checkpoints, tmp_path):
    import shutil

    from safetensors.torch import load_file, save_file
    root, src, *_ = checkpoints
    bad = str(tmp_path / "bad")
    shutil.copytree(src, bad)
    file = [os.path.join(bad, f) for f in os.listdir(bad) if f.endswith(".safetensors")][0]
    sd = load_file(file)
    del sd["model.layers.1.block_sparse_moe.experts.6.w1.weight"]  # owned by EP rank 1
    save_file(sd, file)
    msgs = run(_bad_ep, 2, bad, 2)
    assert msgs[1].startswith(f"{bad}: tensor model.layers.1.block_sparse_moe.experts.6.w1.weight is missing")
    assert msgs[0] == f"{bad}: another rank could not load its experts (see its error)"
