"""LoRA (epkit.lora, epkit.lora_io) against PEFT on transformers' own Mixtral: one CPU process, fp32.

  - an adapter epkit saves loads with `peft.PeftModel.from_pretrained` and gives epkit's logits; its gradients
    in training are PEFT's (same loss, same adapter);
  - adapters PEFT makes (all targets, or a few) load into epkit with PEFT's logits; merged checkpoints load
    in transformers with them too;
  - `LLM(base, lora=...)` greedy output equals `PeftModel.generate`, at EP=1 (launch/infer.py --lora) and EP=2;
  - the grouped-GEMM and loop expert paths agree with adapters;
  - bad input: one line naming the value (and file).
Multi-rank training (EP x DP equality, resume, base unchanged) is in test_train_ep.py.
"""
import json
import os
import sys

import pytest
import torch
from safetensors.torch import load_file

from conftest import hf_logits, hf_model, tiny_args
from distributed import run
from epkit import load_pretrained
from epkit.checkpoint import CheckpointError
from epkit.infer import LLM
from epkit.lora import TARGETS, LoRAExperts, LoraSpec, apply_lora
from epkit.lora_io import export_merged, merge_adapter, save_adapter
from test_infer import GREEDY, assert_greedy_matches, make_checkpoint, make_prompts

torch.set_num_threads(1)
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ALL = LoraSpec(4, 8.0, 0.0, TARGETS)


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    return make_checkpoint(str(tmp_path_factory.mktemp("lora") / "base"), seed=0, tokenizer=True)


def _tokens(seed=0, shape=(2, 12)):
    return torch.randint(3, 96, shape, generator=torch.Generator().manual_seed(seed))


def _epkit_adapter(base, spec=ALL, seed=1):
    """epkit's model with `spec`'s adapters, B drawn at random (a trained-looking adapter, not a no-op)."""
    model = load_pretrained(base).eval()
    apply_lora(model, spec, seed=seed)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.2)
    return model


def _peft(base, adapter, trainable=False):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM
    hf = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32, attn_implementation="eager")
    return PeftModel.from_pretrained(hf, adapter, is_trainable=trainable).eval()


@pytest.mark.parametrize("spec, parameters", [
    (ALL, ["mlp.gate.weight", "mlp.experts.gate_up_proj", "mlp.experts.down_proj"]),
    (LoraSpec.from_groups(8, 4.0, 0.0, "experts"), ["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]),
    (LoraSpec.from_groups(2, 16.0, 0.1, "attention"), None),
], ids=["all", "experts", "attention_dropout"])
def test_epkit_adapter_loads_in_peft_with_the_same_logits(base, tmp_path, spec, parameters):
    model = _epkit_adapter(base, spec)
    save_adapter(model, str(tmp_path / "ad"), base)
    with open(tmp_path / "ad" / "adapter_config.json") as f:
        cfg = json.load(f)
    assert cfg["target_parameters"] == parameters and cfg["lora_dropout"] == spec.dropout
    tokens = _tokens()
    with torch.no_grad():
        ours = model(tokens)[0]  # eval: no dropout
    theirs = hf_logits(_peft(base, str(tmp_path / "ad")), tokens)[0]
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=0)
    plain = hf_logits(hf_model(tiny_args()), tokens)[0]  # the adapter matters: far from the base's logits
    assert (plain - theirs).abs().max() > 0.05


def test_adapter_gradients_equal_peft(base, tmp_path):
    """Training math: the same loss through epkit and through PEFT gives the same adapter gradients."""
    model = _epkit_adapter(base, seed=2).train()
    save_adapter(model, str(tmp_path / "ad"), base)
    peft_model = _peft(base, str(tmp_path / "ad"), trainable=True).train()
    tokens = _tokens(1)

    def loss(logits):
        return torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]),
                                                 tokens[:, 1:].reshape(-1))

    loss(model(tokens)[0]).backward()
    loss(peft_model(input_ids=tokens).logits).backward()
    with torch.no_grad():  # epkit's gradients in PEFT's names and layouts: save them as if they were the adapter
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.copy_(p.grad)
    save_adapter(model, str(tmp_path / "grads"), base)
    ours = load_file(str(tmp_path / "grads" / "adapter_model.safetensors"))
    theirs = {n.replace(".default", ""): p.grad for n, p in peft_model.named_parameters() if p.requires_grad}
    assert ours.keys() == theirs.keys()
    assert all(theirs[k].abs().max() > 0 for k in theirs if "lora_A" not in k)
    for k in ours:
        torch.testing.assert_close(ours[k], theirs[k], atol=1e-6, rtol=1e-4, msg=lambda m: f"{k}: {m}")


@pytest.mark.parametrize("targets", [
    dict(target_modules=["q_proj", "v_proj"], target_parameters=["mlp.experts.down_proj"], use_rslora=True),
    dict(target_modules=["q_proj", "k_proj", "v_proj", "o_proj"],
         target_parameters=["mlp.gate.weight", "mlp.experts.gate_up_proj", "mlp.experts.down_proj"]),
], ids=["some_targets_rslora", "all_targets"])
def test_peft_adapter_loads_in_epkit_and_merges(base, tmp_path, targets):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM
    hf = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32, attn_implementation="eager")
    peft_model = get_peft_model(hf, LoraConfig(r=4, lora_alpha=6, init_lora_weights=False, **targets)).eval()
    peft_model.save_pretrained(str(tmp_path / "peft"))
    tokens = _tokens(2)
    theirs = hf_logits(peft_model, tokens)[0]
    ours = merge_adapter(load_pretrained(base), str(tmp_path / "peft")).eval()
    with torch.no_grad():
        torch.testing.assert_close(ours(tokens)[0], theirs, atol=1e-5, rtol=0)
    merged = export_merged(base, str(tmp_path / "peft"), str(tmp_path / "merged"))
    hf_merged = AutoModelForCausalLM.from_pretrained(merged, dtype=torch.float32, attn_implementation="eager")
    torch.testing.assert_close(hf_logits(hf_merged.eval(), tokens)[0], theirs, atol=1e-5, rtol=0)


def _peft_greedy(peft_model, prompts) -> list:
    """PEFT's greedy generate, one prompt at a time: (tokens, top-two logit gap per step), as test_infer's
    reference for transformers."""
    refs = []
    for p in prompts:
        ids = torch.tensor([p])
        out = peft_model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=False,
                                  max_new_tokens=GREEDY.max_tokens, output_logits=True, return_dict_in_generate=True,
                                  pad_token_id=0)
        refs.append((out.sequences[0, len(p):].tolist(),
                     [float(torch.topk(l[0].float(), 2).values.diff().abs()) for l in out.logits]))
    return refs


def _serve_at_ep2(rank, world, base, adapter, prompts):
    outs = LLM(base, ep_size=2, lora=adapter).generate(prompts, GREEDY)
    return [o.token_ids for o in outs] if rank == 0 else None


def test_generate_with_lora_at_ep2_equals_peft_generate(base, tmp_path):
    """Every rank merges only its experts' adapters at load; the two ranks serve what PEFT generates."""
    save_adapter(_epkit_adapter(base, seed=5), str(tmp_path / "ad"), base)
    prompts = make_prompts(96, lengths=[2, 7, 11])
    ours = run(_serve_at_ep2, 2, base, str(tmp_path / "ad"), prompts, timeout=300)[0]
    for i, (tokens, ref) in enumerate(zip(ours, _peft_greedy(_peft(base, str(tmp_path / "ad")), prompts))):
        assert_greedy_matches(tokens, ref, f"prompt {i}")


def test_expert_paths_agree_with_adapters(base):
    model = _epkit_adapter(base)
    moe = model.layers[0].moe
    assert isinstance(moe.experts, LoRAExperts)
    assert moe.experts.backend.kernel(14, grad=False) == "grouped"  # CPU grouped GEMM in inference
    x = torch.randn(1, 7, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        grouped, _ = moe(x)
        moe.experts.impl = "loop"
        loop, _ = moe(x)
    torch.testing.assert_close(grouped, loop, atol=1e-6, rtol=0)


# ---- bad input --------------------------------------------------------------------------------------

@pytest.mark.parametrize("argv, message", [
    (["--lora-rank", "0"], "--lora-rank=0 must be a positive integer"),
    (["--lora-rank", "-4"], "--lora-rank=-4 must be a positive integer"),
    (["--lora-rank", "8", "--lora-targets", "attention,mlp"], "--lora-targets 'attention,mlp': unknown target 'mlp'"),
    (["--lora-rank", "8", "--lora-dropout", "0.1"], "--lora-dropout=0.1 needs attention-only targets"),
    (["--lora-alpha", "16"], "--lora-alpha needs --lora-rank"),
    (["--lora-rank", "8", "--train-only", "experts"], "--train-only experts and --lora-rank exclude each other"),
])
def test_bad_lora_flags_one_line(tmp_path, capsys, argv, message):
    sys.path.insert(0, os.path.join(ROOT, "launch"))
    import train as launcher
    out = str(tmp_path / "out")
    assert launcher.run([*argv, "--output-dir", out, "--no-progress"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0], err
    assert not os.path.exists(out)


def test_adapter_for_another_base_is_one_clear_error(base, tmp_path):
    save_adapter(_epkit_adapter(base), str(tmp_path / "ad"), base)
    other = make_checkpoint(str(tmp_path / "other"), seed=0, intermediate_size=64)
    with pytest.raises(CheckpointError) as e:
        LLM(other, lora=str(tmp_path / "ad"))
    msg = str(e.value)
    assert "\n" not in msg and "adapter_model.safetensors" in msg and "another model" in msg and "[96, 32]" in msg
    deeper = make_checkpoint(str(tmp_path / "deeper"), seed=0, num_layers=1)
    with pytest.raises(CheckpointError, match="model.layers.1.* does not belong to this base model"):
        merge_adapter(load_pretrained(deeper), str(tmp_path / "ad"))
    (tmp_path / "ad" / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 4, "lora_alpha": 8,
                                                                      "target_modules": ["q_proj", "mlp"]}))
    with pytest.raises(CheckpointError, match=r"adapter_config.json: targets: unknown target 'mlp'"):
        merge_adapter(load_pretrained(base), str(tmp_path / "ad"))
    with pytest.raises(FileNotFoundError, match="not a LoRA adapter directory"):
        LLM(base, lora=str(tmp_path))


def test_infer_cli_serves_an_adapter_over_the_base_it_records(base, tmp_path):
    from epkit.infer.cli import main
    save_adapter(_epkit_adapter(base, seed=4), str(tmp_path / "run" / "final"), os.path.abspath(base))
    prompts = make_prompts(96, lengths=[3, 6])
    (tmp_path / "p.jsonl").write_text("".join(json.dumps({"prompt_token_ids": p}) + "\n" for p in prompts))
    out = tmp_path / "out.jsonl"
    assert main(["--lora", str(tmp_path / "run"), "--prompts", str(tmp_path / "p.jsonl"), "--output", str(out),
                 "--max-tokens", str(GREEDY.max_tokens),
                 "--no-progress"]) == 0  # run dir -> final/; base from adapter_config.json
    got = [json.loads(line)["token_ids"] for line in out.read_text().splitlines()]
    for i, (tokens, ref) in enumerate(zip(got, _peft_greedy(_peft(base, str(tmp_path / "run" / "final")), prompts))):
        assert_greedy_matches(tokens, ref, f"prompt {i}")  # EP=1: LLM(base, lora=...) equals PEFT
    assert got != [o.token_ids for o in LLM(base).generate(prompts, GREEDY)]  # and the adapter matters
