"""Hugging Face checkpoint round trips and clear errors on bad checkpoints."""
import errno
import json
import os
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

import epkit
from conftest import hf_logits, hf_model, save_fused, saved_tensors, tiny_args


@pytest.fixture
def hf_dir(tmp_path):
    hf = hf_model(tiny_args(), seed=5)
    path = str(tmp_path / "hf")
    hf.save_pretrained(path)
    return hf, path


def _tokens(args):
    return torch.randint(0, args.vocab_size, (2, 9), generator=torch.Generator().manual_seed(0))


def test_transformers_save_then_epkit_load(hf_dir):
    hf, path = hf_dir
    model = epkit.load_pretrained(path)
    tokens = _tokens(model.args)
    with torch.no_grad():
        torch.testing.assert_close(model(tokens)[0], hf_logits(hf, tokens)[0], atol=1e-5, rtol=0)


@pytest.mark.parametrize("tied", [False, True])
def test_epkit_save_then_transformers_load(tmp_path, tied):
    from transformers import AutoModelForCausalLM
    args = tiny_args(tie_word_embeddings=tied)
    torch.manual_seed(0)
    model = epkit.Mixtral(args).init_weights()
    path = str(tmp_path / "ours")
    epkit.save_pretrained(model, path, max_shard_size=20_000)  # forces several files
    files = [f for f in os.listdir(path) if f.endswith(".safetensors")]
    assert len(files) > 2
    theirs = AutoModelForCausalLM.from_pretrained(path).eval()
    tokens = _tokens(args)
    with torch.no_grad():
        torch.testing.assert_close(hf_logits(theirs, tokens)[0], model(tokens)[0], atol=1e-5, rtol=0)
    again = epkit.load_pretrained(path)
    for (n, a), (_, b) in zip(model.state_dict().items(), again.state_dict().items()):
        torch.testing.assert_close(a, b, rtol=0, atol=0, msg=n)
    if tied:
        assert again.lm_head.weight is again.embed.weight
    with open(os.path.join(path, "epkit_plan.json")) as f:
        assert json.load(f)["plan"]["ep_size"] == 1


def test_sharded_transformers_checkpoint_loads(tmp_path):
    hf = hf_model(tiny_args(), seed=6)
    path = str(tmp_path / "sharded")
    hf.save_pretrained(path, max_shard_size="50KB")
    assert os.path.isfile(os.path.join(path, "model.safetensors.index.json"))
    model = epkit.load_pretrained(path)
    tokens = _tokens(model.args)
    with torch.no_grad():
        torch.testing.assert_close(model(tokens)[0], hf_logits(hf, tokens)[0], atol=1e-5, rtol=0)


def test_fused_names_load_in_bf16(tmp_path):
    """transformers' fused in-memory names, read in bf16: every value is transformers' fp32 value rounded to
    bf16, and the bf16 checkpoint epkit writes holds those same values (hub names, bf16 in config.json)."""
    from transformers import AutoConfig
    hf = hf_model(tiny_args(), seed=7)
    model = epkit.load_pretrained(save_fused(hf, str(tmp_path / "f")), dtype=torch.bfloat16)
    assert all(p.dtype == torch.bfloat16 for p in model.parameters())
    theirs = hf.state_dict()
    for layer, block in enumerate(model.layers):
        fused = f"model.layers.{layer}.mlp.experts."
        assert torch.equal(block.moe.experts.w13, theirs[fused + "gate_up_proj"].to(torch.bfloat16))
        assert torch.equal(block.moe.experts.w2, theirs[fused + "down_proj"].to(torch.bfloat16))
        assert torch.equal(block.moe.gate.weight, theirs[f"model.layers.{layer}.mlp.gate.weight"].to(torch.bfloat16))
        assert torch.equal(block.attn.q_proj.weight,
                           theirs[f"model.layers.{layer}.self_attn.q_proj.weight"].to(torch.bfloat16))
    assert torch.equal(model.embed.weight, theirs["model.embed_tokens.weight"].to(torch.bfloat16))
    assert torch.equal(model.lm_head.weight, theirs["lm_head.weight"].to(torch.bfloat16))
    epkit.save_pretrained(model, str(tmp_path / "bf16"))
    assert AutoConfig.from_pretrained(str(tmp_path / "bf16")).dtype == torch.bfloat16
    again = epkit.load_pretrained(str(tmp_path / "bf16"))
    mine = dict(model.named_parameters())
    for name, p in again.named_parameters():
        assert p.dtype == torch.bfloat16 and torch.equal(p, mine[name]), name
    # and the values mean the same model: bf16 logits close to transformers' fp32 ones
    tokens = _tokens(model.args)
    with torch.no_grad():
        torch.testing.assert_close(model(tokens)[0].float(), hf_logits(hf, tokens)[0], atol=0.1, rtol=0)


def _single_file(path):
    files = [f for f in os.listdir(path) if f.endswith(".safetensors")]
    assert len(files) == 1
    return os.path.join(path, files[0])


def test_missing_tensor_names_file_and_tensor(hf_dir):
    _, path = hf_dir
    file = _single_file(path)
    sd = load_file(file)
    del sd["model.layers.1.block_sparse_moe.experts.3.w2.weight"]
    save_file(sd, file)
    with pytest.raises(epkit.CheckpointError, match=r"hf: tensor model\.layers\.1\.block_sparse_moe\.experts\.3\.w2"
                                                    r"\.weight is missing"):
        epkit.load_pretrained(path)


def test_wrong_shape_names_file_and_tensor(hf_dir):
    _, path = hf_dir
    file = _single_file(path)
    sd = load_file(file)
    sd["model.layers.0.self_attn.q_proj.weight"] = torch.zeros(3, 3)
    save_file(sd, file)
    with pytest.raises(epkit.CheckpointError, match=r"model\.safetensors: tensor model\.layers\.0\.self_attn\.q_proj"
                                                    r"\.weight has shape \[3, 3\], but config\.json implies \[32, 32\]"):
        epkit.load_pretrained(path)


def test_config_disagreeing_with_weights(hf_dir):
    _, path = hf_dir
    cfg_file = os.path.join(path, "config.json")
    with open(cfg_file) as f:
        cfg = json.load(f)
    cfg["num_hidden_layers"] = 1  # weights have 2 layers
    with open(cfg_file, "w") as f:
        json.dump(cfg, f)
    with pytest.raises(epkit.CheckpointError, match=r"tensor model\.layers\.1\..* is not described by config\.json"):
        epkit.load_pretrained(path)
    cfg["num_hidden_layers"], cfg["intermediate_size"] = 2, 64
    with open(cfg_file, "w") as f:
        json.dump(cfg, f)
    with pytest.raises(epkit.CheckpointError, match=r"has shape \[48, 32\], but config\.json implies \[64, 32\]"):
        epkit.load_pretrained(path)


def test_not_a_checkpoint(tmp_path):
    with pytest.raises(FileNotFoundError, match="no config.json, so this is not a checkpoint directory"):
        epkit.load_pretrained(str(tmp_path))
    tiny_args().save(str(tmp_path))
    with pytest.raises(epkit.CheckpointError, match=r"no \*\.safetensors files"):
        epkit.load_pretrained(str(tmp_path))
    with pytest.raises(FileNotFoundError, match="does-not-exist"):
        epkit.load_pretrained(str(tmp_path / "does-not-exist"))


def test_plan_naming_more_experts_than_config(hf_dir):
    _, path = hf_dir
    with open(os.path.join(path, "epkit_plan.json"), "w") as f:
        json.dump({"plan": epkit.ShardingPlan(10, 2).to_dict()}, f)
    with pytest.raises(ValueError, match="the plan names 10 experts but config.json has 8"):
        epkit.load_pretrained(path, ep_size=2)


def test_save_is_atomic_when_writing_fails(tmp_path, monkeypatch):
    """A crash mid-save leaves the previous checkpoint whole: same files, same tensors, same model."""
    torch.manual_seed(0)
    model = epkit.Mixtral(tiny_args()).init_weights()
    path = str(tmp_path / "ck")
    epkit.save_pretrained(model, path)
    files = sorted(os.listdir(path))
    before = saved_tensors(path)
    weights = {n: p.detach().clone() for n, p in model.named_parameters()}
    import epkit.checkpoint as ck
    calls = {"n": 0}
    real = ck.save_file

    def crash(*a, **k):
        calls["n"] += 1
        if calls["n"] == 2:
            raise OSError(errno.ENOSPC, "No space left on device (simulated)")
        return real(*a, **k)
    monkeypatch.setattr(ck, "save_file", crash)
    with torch.no_grad():
        model.embed.weight.add_(1.0)
        for moe in model.moe_layers():
            moe.experts.w2.mul_(2.0)
    # one line naming the file as it would have been called (not the temporary directory)
    with pytest.raises(epkit.CheckpointError, match=f"^no space left while writing {path}/model-00001.safetensors$"):
        epkit.save_pretrained(model, path, max_shard_size=20_000)
    assert calls["n"] == 2, "the crash should come after a first shard was written"
    assert sorted(os.listdir(path)) == files
    after = saved_tensors(path)
    assert after.keys() == before.keys()
    for name, t in before.items():
        assert torch.equal(after[name], t), name
    assert os.listdir(tmp_path) == ["ck"]  # no half-written temporary directory left behind
    again = epkit.load_pretrained(path)  # still whole, and the model as it was before the change
    for name, p in again.named_parameters():
        assert torch.equal(p, weights[name]), name


@pytest.mark.parametrize("damage", ["truncated", "garbage_header", "tiny"])
def test_damaged_safetensors_is_one_line_naming_the_file(tmp_path, hf_dir, damage):
    """A truncated or corrupt file, with an index (epkit's save) or without (one transformers file)."""
    ours = str(tmp_path / "ours")
    epkit.save_pretrained(epkit.Mixtral(tiny_args()).init_weights(), ours)
    theirs = str(tmp_path / "theirs")
    shutil.copytree(hf_dir[1], theirs)
    for file in (os.path.join(ours, "model-experts-00000.safetensors"), os.path.join(theirs, "model.safetensors")):
        data = open(file, "rb").read()
        bad = {"truncated": data[: len(data) // 2], "garbage_header": data[:8] + b"{not json" + data[17:],
               "tiny": data[:5]}[damage]
        open(file, "wb").write(bad)
        with pytest.raises(epkit.CheckpointError) as e:
            epkit.load_pretrained(os.path.dirname(file))
        assert str(e.value).startswith(f"{file}: not a readable safetensors file") and "\n" not in str(e.value)


def test_save_refuses_to_replace_a_directory_that_is_not_a_checkpoint(tmp_path):
    model = epkit.Mixtral(tiny_args()).init_weights()
    (tmp_path / "notes.txt").write_text("precious")
    with pytest.raises(ValueError, match="exists and is not a checkpoint directory; refusing to replace it"):
        epkit.save_pretrained(model, str(tmp_path))
    assert (tmp_path / "notes.txt").read_text() == "precious" and os.listdir(tmp_path) == ["notes.txt"]
    epkit.save_pretrained(model, str(tmp_path / "ck"))
    epkit.save_pretrained(model, str(tmp_path / "ck"))  # replacing a checkpoint is fine
    epkit.save_pretrained(model, str(tmp_path / "empty_dir_is_fine"))


def test_manifest_round_trip(tmp_path):
    from epkit.checkpoint import PLAN_FILE, Manifest
    plan = epkit.ShardingPlan(8, 2, num_layers=2)
    routed = [[5, 1, 1, 1, 1, 1, 1, 9], [1, 2, 3, 4, 5, 6, 7, 8]]
    written = Manifest(plan.to_dict(), routed, {"step": 3, "tokens_seen": 96})
    written.write(str(tmp_path))
    read = Manifest.read(str(tmp_path))
    assert read == written and read.file == os.path.join(str(tmp_path), PLAN_FILE)
    assert epkit.ShardingPlan.from_dict(read.plan) == plan
    assert Manifest.read(str(tmp_path / "elsewhere")) is None  # no manifest (e.g. a transformers checkpoint)
    # plans for other EP sizes come from it; balanced places by the recorded routing
    assert epkit.ShardingPlan.from_manifest(read, 4) == epkit.ShardingPlan(8, 4, num_layers=2)
    balanced = epkit.ShardingPlan.from_manifest(read, 2, "balanced")
    assert balanced == epkit.ShardingPlan(8, 2, "balanced", loads=routed, num_layers=2)
    with pytest.raises(ValueError, match=f"strategy='balanced' needs routing counts and {PLAN_FILE} has none"):
        epkit.ShardingPlan.from_manifest(Manifest(plan.to_dict(), file=PLAN_FILE), 2, "balanced")


@pytest.mark.parametrize("text", ["{not json", "[1, 2]", '{"plan": 3}', '{"routed_tokens": [[1, "x"]]}'])
def test_corrupt_manifest_is_one_line_naming_the_file(tmp_path, text):
    from epkit.checkpoint import PLAN_FILE, Manifest, checkpoint_plan
    file = tmp_path / PLAN_FILE
    file.write_text(text)
    for read in (lambda: Manifest.read(str(tmp_path)), lambda: checkpoint_plan(str(tmp_path), tiny_args(), 2)):
        with pytest.raises(epkit.CheckpointError) as e:
            read()
        assert str(e.value).startswith(f"{file}: ") and "\n" not in str(e.value), str(e.value)


_README_EP2 = """
import sys, torch, epkit
model = epkit.load_pretrained(sys.argv[1], ep_size=2, dispatch="replicated")   # as the README shows it
tokens = torch.tensor([[1, 15, 27, 3, 8, 60]])
with torch.no_grad():
    logits = model(tokens)[0]
experts = model.layers[0].moe.experts.expert_ids
torch.save({"logits": logits, "experts": experts}, f"{sys.argv[2]}.{torch.distributed.get_rank()}")
"""


def test_load_pretrained_joins_a_torchrun_launch(tmp_path):
    """epkit.load_pretrained(path, ep_size=2) inside `torchrun --nproc_per_node 2` joins the launch itself
    (it failed with "ep_size=2 is larger than the world size 1"); each rank holds half the experts and the
    logits equal one device's (issue 9 item 13)."""
    import subprocess
    import sys

    from tests.distributed import free_port
    path = str(tmp_path / "ck")
    model = epkit.Mixtral(tiny_args()).init_weights()
    epkit.save_pretrained(model, path)
    script = tmp_path / "readme_ep2.py"
    script.write_text(_README_EP2)
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore",
               PYTHONPATH=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    p = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
                        str(free_port()), str(script), path, str(tmp_path / "out")],
                       env=env, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, (p.stdout + p.stderr)[-3000:]
    outs = [torch.load(f"{tmp_path / 'out'}.{r}") for r in (0, 1)]
    assert [o["experts"] for o in outs] == [[0, 1, 2, 3], [4, 5, 6, 7]]
    with torch.no_grad():
        ref = epkit.load_pretrained(path)(torch.tensor([[1, 15, 27, 3, 8, 60]]))[0]
    for o in outs:
        torch.testing.assert_close(o["logits"], ref, atol=1e-5, rtol=1e-5)
    assert "init_distributed" in epkit.__all__
