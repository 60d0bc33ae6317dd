"""EP=8, one expert per rank (the layout the seed describes at full scale), on 8 real gloo processes.

Without an 8-GPU machine this is where the EP=8 code paths run: fine-tuning the tiny preset (8 experts)
at EP=8 x DP=1 gives the losses and the saved weights of EP=1 x DP=8 (the same global batch), and the
checkpoint written by 8 ranks (each its own expert) loads at EP=2 with the logits of the EP=1 one and
serves at EP=2 with the greedy tokens of EP=1. Kept small: 2 steps, sequence 16.
"""
from __future__ import annotations

import json
import os

import pytest
import torch

from tests.distributed import run
from tests.test_train_ep import _losses as _rows, _weights

SEED = 5


def _train(rank, world, root):
    from epkit import load_pretrained
    from epkit.train import TrainConfig, main
    for name, ep in (("ep1", 1), ("ep8", 8)):
        main(TrainConfig(model="tiny", ep_size=ep, zero_stage=0, max_steps=2, seq_len=16, micro_batch=1, lr=1e-2,
                         warmup_steps=0, grad_clip=0.5, progress=False, output_dir=os.path.join(root, name),
                         seed=SEED))
    # The EP=8 checkpoint at EP=2 (4 replicas of 2 ranks, replicated dispatch) vs the EP=1 one on one device.
    tokens = torch.randint(0, 512, (2, 12), generator=torch.Generator().manual_seed(0))
    ep2 = load_pretrained(os.path.join(root, "ep8", "final"), ep_size=2, dispatch="replicated").eval()
    ref = load_pretrained(os.path.join(root, "ep1", "final")).eval()
    with torch.no_grad():
        return (ep2(tokens)[0] - ref(tokens)[0]).abs().max().item()


def _serve(rank, world, path, prompts):
    from epkit.infer import LLM, SamplingParams
    llm = LLM(path, ep=world, max_num_batched_tokens=32, block_size=4)
    outs = llm.generate(prompts, SamplingParams(temperature=0, max_tokens=6, ignore_eos=True))
    return [o.token_ids for o in outs] if rank == 0 else None


@pytest.fixture(scope="module")
def ep8_runs(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("ep8"))
    diffs = run(_train, 8, root, timeout=600)
    return root, diffs


def test_ep8_training_equals_ep1(ep8_runs):
    root, _ = ep8_runs
    base, ep8 = _rows(root, "ep1"), _rows(root, "ep8")
    assert len(base) == len(ep8) == 2
    for step, ((l0, g0), (l1, g1)) in enumerate(zip(base, ep8), 1):
        assert abs(l0 - l1) < 1e-5, f"step {step}: EP=8 loss {l1} vs EP=1 {l0}"
        assert abs(g0 - g1) < 1e-4 * max(1.0, g0), f"step {step}: EP=8 grad norm {g1} vs EP=1 {g0}"
    with open(os.path.join(root, "ep8", "final", "epkit_plan.json")) as f:
        plan = json.load(f)["plan"]
    assert plan["ep_size"] == 8
    files = [f for f in os.listdir(os.path.join(root, "ep8", "final")) if f.endswith(".safetensors")]
    assert len(files) >= 8, f"each of the 8 ranks should write its own expert file, found {files}"
    w1, w8 = _weights(root, "ep1"), _weights(root, "ep8")
    assert w1.keys() == w8.keys()
    moved = [k for k in w1 if ".experts." in k]
    assert moved, "no expert tensors saved"
    for k, v in w1.items():
        torch.testing.assert_close(w8[k], v, atol=5e-5, rtol=0, msg=lambda m: f"{k}: {m}")


def test_ep8_checkpoint_loads_and_serves_at_ep2(ep8_runs):
    root, diffs = ep8_runs
    assert max(diffs) < 1e-4, f"EP=8 checkpoint at EP=2 differs from EP=1 by {max(diffs)}"
    from epkit.infer import LLM, SamplingParams
    path = os.path.join(root, "ep8", "final")
    g = torch.Generator().manual_seed(1)
    prompts = [torch.randint(3, 512, (n,), generator=g).tolist() for n in (3, 9, 5, 14)]
    ref = LLM(path, ep=1, max_num_batched_tokens=32, block_size=4).generate(
        prompts, SamplingParams(temperature=0, max_tokens=6, ignore_eos=True))
    got = run(_serve, 2, path, prompts, timeout=300)[0]
    assert got == [o.token_ids for o in ref]
