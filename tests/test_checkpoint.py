"""Hugging Face checkpoint round trips and clear errors on bad checkpoints."""
import json
import os

import pytest
import torch
from safetensors.torch import load_file, save_file

import epkit
from conftest import hf_logits, hf_model, save_fused, tiny_args


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


def _saved(path):
    out = {}
    for f in sorted(os.listdir(path)):
        if f.endswith(".safetensors"):
            out.update(load_file(os.path.join(path, f)))
    return out


def test_save_is_atomic_when_writing_fails(tmp_path, monkeypatch):
    """A crash mid-save leaves the previous checkpoint whole: same files, same tensors, same model."""
    torch.manual_seed(0)
    model = epkit.Mixtral(tiny_args()).init_weights()
    path = str(tmp_path / "ck")
    epkit.save_pretrained(model, path)
    files = sorted(os.listdir(path))
    before = _saved(path)
    weights = {n: p.detach().clone() for n, p in model.named_parameters()}
    import epkit.checkpoint as ck
    calls = {"n": 0}
    real = ck.save_file

    def crash(*a, **k):
        calls["n"] += 1
        if calls["n"] == 2:
            raise OSError("disk full (simulated)")
        return real(*a, **k)
    monkeypatch.setattr(ck, "save_file", crash)
    with torch.no_grad():
        model.embed.weight.add_(1.0)
        for moe in model.moe_layers():
            moe.experts.w2.mul_(2.0)
    with pytest.raises(OSError, match="simulated"):
        epkit.save_pretrained(model, path, max_shard_size=20_000)
    assert calls["n"] == 2, "the crash should come after a first shard was written"
    assert sorted(os.listdir(path)) == files
    after = _saved(path)
    assert after.keys() == before.keys()
    for name, t in before.items():
        assert torch.equal(after[name], t), name
    assert os.listdir(tmp_path) == ["ck"]  # no half-written temporary directory left behind
    again = epkit.load_pretrained(path)  # still whole, and the model as it was before the change
    for name, p in again.named_parameters():
        assert torch.equal(p, weights[name]), name


def test_save_refuses_to_replace_a_directory_that_is_not_a_checkpoint(tmp_path):
    model = epkit.Mixtral(tiny_args()).init_weights()
    (tmp_path / "notes.txt").write_text("precious")
    with pytest.raises(ValueError, match="exists and is not a checkpoint directory; refusing to replace it"):
        epkit.save_pretrained(model, str(tmp_path))
    assert (tmp_path / "notes.txt").read_text() == "precious" and os.listdir(tmp_path) == ["notes.txt"]
    epkit.save_pretrained(model, str(tmp_path / "ck"))
    epkit.save_pretrained(model, str(tmp_path / "ck"))  # replacing a checkpoint is fine
    epkit.save_pretrained(model, str(tmp_path / "empty_dir_is_fine"))
