"""EP x DP equivalence of the DeepSpeed training path, on 4 real gloo ranks (one spawn, several runs).

Same seed, same global batch (4 ranks x micro 2 x accumulation 2), active gradient clipping, and a learning
rate high enough that by step 3 some EP ranks receive no token in some micro-batches (idle experts):
EP=1 x DP=4, EP=2 x DP=2 and EP=4 x DP=1 must give the same losses and the same saved weights, and
ZeRO 1/2 must agree with ZeRO 0 (also ZeRO 2 taken from a --deepspeed-config file), and placing the
experts round-robin or by measured load (balanced) must not change the math either. EP=1 is plain data
parallelism (every gradient averaged over the world by DeepSpeed); EP>1 reduces expert gradients over the expert-data-parallel group, so a wrong
scale or group there shows up in the gradient norm (compared every step) and, through clipping, in the
losses. (Adam alone is blind to a constant gradient scale, hence the norm check.) Saved weights agree to
5e-5: Adam normalises every element's step, so float rounding in near-zero gradients reaches lr * 1e-3.
"""
from __future__ import annotations

import json
import os

import pytest
import torch
from safetensors.torch import load_file

from tests.distributed import run

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# (name, ep, zero stage, extra settings); ep4_z1 also recomputes layers (activation checkpointing); the
# first two also evaluate at the end (a world of 4, all-to-all under EP=2)
RUNS = [("ep1_z0", 1, 0, {"eval": True}), ("ep2_z0", 2, 0, {"eval": True}), ("ep4_z0", 4, 0, {}),
        ("ep2_z2", 2, 2, {}), ("ep4_z1", 4, 1, {"activation_checkpointing": True}),
        # ZeRO 2 from a --deepspeed-config file (no --zero-stage), logging every second step
        ("ep2_dsfile_log2", 2, None, {"deepspeed_config": "DS_FILE", "log_every": 2})]
# the router z-loss on, at EP=1 and at EP=4 with experts placed round-robin
ZLOSS = [("ep1_zloss", 1, 0, {"z_loss_coef": 0.1}),
         ("ep4_rr_zloss", 4, 0, {"z_loss_coef": 0.1, "plan_strategy": "round_robin"})]
FROZEN = [("ep2_z2_experts", 2, 2, {"train_only": "experts"}), ("ep4_z1_router", 4, 1, {"train_only": "router"}),
          ("ep2_z0_attention", 2, 0, {"train_only": "attention"})]
# LoRA on a frozen base checkpoint (the tiny preset's seeded weights): adapters on attention, router and experts;
# lora_ep2_z0 saves at step 2 and is resumed from there; lora_ep2_z2 also recomputes layers and merges at the end
LORA_RUNS = [("lora_ep1_z0", 1, 0, {}), ("lora_ep2_z0", 2, 0, {"save_every": 2}),
             ("lora_ep2_z2", 2, 2, {"activation_checkpointing": True, "merge": True}), ("lora_ep4_z1", 4, 1, {})]
LORA = {"lora_rank": 4, "lora_alpha": 8.0, "lora_targets": "attention,experts,router"}
SEED = 3
DS_FILE = {"zero_optimization": {"stage": 2, "reduce_bucket_size": 500000}, "train_micro_batch_size_per_gpu": 64}


def _settings(root, extra):
    extra = dict(extra)
    if extra.pop("eval", False):
        extra["eval_data"] = os.path.join(root, "eval.jsonl")
    if extra.get("deepspeed_config") == "DS_FILE":
        extra["deepspeed_config"] = os.path.join(root, "ds.json")
    return extra


def _train_all(rank, world, root):
    from epkit import load_pretrained
    from epkit.parallel import set_dispatch
    from epkit.train import TrainConfig, main
    for name, ep, zero, extra in RUNS + ZLOSS + FROZEN:
        cfg = TrainConfig(model="tiny", ep_size=ep, zero_stage=zero, max_steps=3 if not extra.get("train_only") else 2,
                          seq_len=32, micro_batch=2, grad_accum=2, lr=1e-2, warmup_steps=0, grad_clip=0.5,
                          progress=False, output_dir=os.path.join(root, name), seed=SEED, **_settings(root, extra))
        main(cfg)
    # fine-tune further from a checkpoint written at EP=2: at EP=4 with experts placed by the routing it
    # recorded (each rank reads its own experts), and at EP=1
    for name, ep, strategy in [("from_ep2", 4, "balanced"), ("from_ep2_ep1", 1, "contiguous")]:
        main(TrainConfig(model=os.path.join(root, "ep2_z0", "final"), ep_size=ep, plan_strategy=strategy, zero_stage=2,
                         max_steps=2, seq_len=32, micro_batch=2, lr=1e-3, warmup_steps=0, progress=False,
                         output_dir=os.path.join(root, name), seed=SEED))
    # A checkpoint written at EP=4 loads at EP=2 (replicated dispatch: same tokens on every rank) and gives
    # the logits the EP=1 checkpoint gives on one device.
    tokens = torch.randint(0, 512, (2, 16), generator=torch.Generator().manual_seed(0))  # same on all ranks
    ep2 = load_pretrained(os.path.join(root, "ep4_z0", "final"), ep_size=2, dispatch="replicated").eval()
    set_dispatch(ep2, "replicated")
    ref = load_pretrained(os.path.join(root, "ep1_z0", "final")).eval()
    with torch.no_grad():
        diffs = {"ep4_at_ep2": (ep2(tokens)[0] - ref(tokens)[0]).abs().max().item()}
    diffs["lora_ep2_at_ep4"] = _train_lora(rank, root, tokens)
    return diffs


def _train_lora(rank, root, tokens):
    import shutil

    from epkit import Mixtral, ModelArgs, load_pretrained, save_pretrained
    from epkit.data import DEFAULT_TOKENIZER
    from epkit.lora_io import merge_adapter
    from epkit.parallel import barrier
    from epkit.train import TrainConfig, main
    base = os.path.join(root, "lora_base")
    save_pretrained(Mixtral(ModelArgs.from_name("tiny")).init_weights(seed=SEED), base, tokenizer_dir=DEFAULT_TOKENIZER)
    for name, ep, zero, extra in LORA_RUNS:
        main(TrainConfig(model=base, ep_size=ep, zero_stage=zero, max_steps=3, seq_len=32, micro_batch=2, grad_accum=2,
                         lr=1e-2, warmup_steps=0, grad_clip=0.15, progress=False, output_dir=os.path.join(root, name),
                         seed=SEED, **LORA, **extra))
    # resume lora_ep2_z0 from its step-2 checkpoint: the final adapters must come out the same
    run = os.path.join(root, "lora_ep2_z0")
    if rank == 0:
        shutil.move(os.path.join(run, "final"), os.path.join(run, "final_uninterrupted"))
    barrier()
    main(TrainConfig(model=base, ep_size=2, zero_stage=0, max_steps=3, seq_len=32, micro_batch=2, grad_accum=2, lr=1e-2,
                     warmup_steps=0, grad_clip=0.15, progress=False, output_dir=run, seed=SEED, save_every=2,
                     resume=True, **LORA))
    # the adapter saved at EP=2 loads at EP=4 (each rank reads its own experts' adapters) as at EP=1
    adapter = os.path.join(root, "lora_ep2_z2", "final")
    ep4 = merge_adapter(load_pretrained(base, ep_size=4, dispatch="replicated"), adapter).eval()
    ref = merge_adapter(load_pretrained(base), adapter).eval()
    with torch.no_grad():
        diff = (ep4(tokens)[0] - ref(tokens)[0]).abs().max().item()
    # bench/lora.py's CPU mode in this spawn (here EP=4), checked by tests/test_bench_lora.py
    from tests.test_bench_lora import load_bench
    load_bench().main(["--cpu", "--steps", "3", "--out", os.path.join(root, "bench_lora")])
    return diff


def _rows(root, name):
    with open(os.path.join(root, name, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def _losses(root, name):
    return [(r["loss"], r["grad_norm"]) for r in _rows(root, name) if "loss" in r]


def _routed(root, name):
    with open(os.path.join(root, name, "final", "epkit_plan.json")) as f:
        return json.load(f)["routed_tokens"]


def _weights(root, name, final="final"):
    d = os.path.join(root, name, final)
    out = {}
    for f in os.listdir(d):
        if f.endswith(".safetensors"):
            out.update(load_file(os.path.join(d, f)))
    return out


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("ep_runs"))
    with open(os.path.join(ROOT, "epkit", "assets", "instructions.jsonl")) as f, \
            open(os.path.join(root, "eval.jsonl"), "w") as out:
        out.writelines(f.readlines()[:40])  # a small held-out set: 40 records
    with open(os.path.join(root, "ds.json"), "w") as f:
        json.dump(DS_FILE, f)
    diffs = run(_train_all, 4, root, timeout=900)
    return root, diffs


def test_ep_sizes_give_the_same_losses_and_weights(trained):
    root, _ = trained
    base_losses, base_weights = _losses(root, "ep1_z0"), _weights(root, "ep1_z0")
    assert len(base_losses) == 3
    assert sum(_routed(root, "ep1_z0")[0]) == 3 * 4 * 2 * 2 * 32 * 2  # steps x ranks x accum x rows x T x top-2
    assert base_losses[0][1] > 0.5, "clipping should be active for this test to cover it"
    start = _initial_weights()  # sanity: training moved the weights (else equal weights would prove nothing)
    assert start.keys() == base_weights.keys()
    unchanged = sorted(k for k in start if torch.equal(start[k], base_weights[k]))
    assert not unchanged, f"training left these weights at their initial values: {unchanged[:5]}"
    for name, _, _, extra in RUNS[1:]:
        losses = _losses(root, name)
        if extra.get("log_every") == 2:
            assert [r["step"] for r in _rows(root, name)] == [2, 3]
            losses = [None] + losses  # steps 2 and 3 logged: compare those
        for step, ((l0, g0), pair) in enumerate(zip(base_losses, losses), 1):
            if pair is None:
                continue
            l1, g1 = pair
            assert abs(l0 - l1) < 1e-5, f"{name} step {step}: loss {l1} vs EP=1 {l0}"
            assert abs(g0 - g1) < 1e-4 * max(1.0, g0), f"{name} step {step}: grad norm {g1} vs EP=1 {g0}"
        assert _routed(root, name) == _routed(root, "ep1_z0")
        weights = _weights(root, name)
        assert weights.keys() == base_weights.keys()
        for k, v in base_weights.items():
            torch.testing.assert_close(weights[k], v, atol=5e-5, rtol=0, msg=lambda m: f"{name} {k}: {m}")


def _initial_weights():
    from epkit import Mixtral, ModelArgs
    from epkit.checkpoint import hub_tensors
    model = Mixtral(ModelArgs.from_name("tiny")).init_weights(seed=SEED)
    return {name: get().clone() for name, get in hub_tensors(model)}


@pytest.mark.parametrize("name, part", [("ep2_z2_experts", ".experts."), ("ep4_z1_router", ".gate."),
                                        ("ep2_z0_attention", ".self_attn.")])
def test_train_only_changes_only_that_part(trained, name, part):
    root, _ = trained
    init, final = _initial_weights(), _weights(root, name)
    assert init.keys() == final.keys()
    changed = {k for k in init if not torch.equal(init[k], final[k])}
    assert changed == {k for k in init if part in k}, sorted(changed)[:5]


def test_losses_fall_and_checkpoint_loads_at_another_ep_size(trained):
    root, diffs = trained
    losses = [l for l, _ in _losses(root, "ep1_z0")]
    assert losses[-1] < losses[0]
    continued = _losses(root, "from_ep2")[0][0]
    assert continued < losses[0] - 0.05, "training from the EP=2 checkpoint should start below a fresh model"
    with open(os.path.join(root, "from_ep2", "final", "epkit_plan.json")) as f:
        assert json.load(f)["plan"]["ep_size"] == 4
    worst = max(d["ep4_at_ep2"] for d in diffs)
    assert worst < 1e-4, f"EP=4 checkpoint at EP=2 differs from EP=1 by {worst}"


def _no_tokens_for_one_rank(rank, world):
    """Every token of both ranks picks experts 0 and 1, which EP rank 0 owns: rank 1 receives nothing.
    Backward must still run the same all-to-alls on both ranks and give the single-device gradients."""
    from epkit.moe import Experts, LocalDispatch
    from epkit.parallel import AllToAllDispatch, setup_expert_parallel
    from epkit.plan import ShardingPlan
    E, D, I, N = 4, 8, 12, 6
    full = Experts(E, D, I)
    with torch.no_grad():
        g = torch.Generator().manual_seed(0)
        full.w13.normal_(0, 0.3, generator=g)
        full.w2.normal_(0, 0.3, generator=g)
    plan, groups = ShardingPlan(E, 2), setup_expert_parallel(2)
    local = Experts(E, D, I, expert_ids=plan.local_experts(groups.ep_rank))
    with torch.no_grad():
        local.w13.copy_(full.w13[local.expert_ids])
        local.w2.copy_(full.w2[local.expert_ids])
    dispatch = AllToAllDispatch(plan.slots(), plan.owners(), 2, groups.ep_group)
    x = torch.randn(N, D, generator=torch.Generator().manual_seed(10 + rank), requires_grad=True)
    ids = torch.tensor([[0, 1]] * N)
    weights = torch.full((N, 2), 0.5)
    dispatch(local, x, weights, ids).pow(2).sum().backward()
    x_ref = x.detach().clone().requires_grad_(True)
    LocalDispatch()(full, x_ref, weights, ids).pow(2).sum().backward()
    return (x.grad - x_ref.grad).abs().max().item()


def test_backward_when_a_rank_receives_no_tokens():
    """Routing can leave every expert of a rank idle for a micro-batch (seen here at lr 1e-2 after one
    step). Regression test for a collective mismatch (gloo abort / NCCL hang) in that case."""
    diffs = run(_no_tokens_for_one_rank, 2, timeout=120)
    assert max(diffs) < 1e-5


# ---- settings that must not change the math, and what the run reports ----------------------------------

def test_deepspeed_config_file_and_log_every(trained):
    """ZeRO 2 came from the --deepspeed-config file (its batch size was overridden by epkit's flags: the run
    equals EP=1 above); with --log-every 2 steps 2 and 3 are logged, and expert_tokens covers every step
    since the previous line, so the heatmap still sums to the run's routing."""
    import sys
    root, _ = trained
    name = "ep2_dsfile_log2"
    state = torch.load(os.path.join(root, name, "final", "engine", "rank00000.pt"), weights_only=False)
    assert state["zero_stage"] == 2
    base = [r for r in _rows(root, "ep1_z0") if "loss" in r]
    rows = _rows(root, name)
    assert [r["step"] for r in rows] == [2, 3]
    for r in rows:
        b = base[r["step"] - 1]
        assert r["lr"] == b["lr"] and r["tokens"] == b["tokens"] and abs(r["loss"] - b["loss"]) < 1e-5
    add = [[x + y for x, y in zip(r0, r1)] for r0, r1 in zip(base[0]["expert_tokens"], base[1]["expert_tokens"])]
    assert rows[0]["expert_tokens"] == add and rows[1]["expert_tokens"] == base[2]["expert_tokens"]
    sys.path.insert(0, os.path.join(ROOT, "launch"))
    import heatmap
    assert heatmap.load_counts(os.path.join(root, name), None)[0] == _routed(root, name) == _routed(root, "ep1_z0")


def _step1_oracle():
    """lm, aux and z losses of step 1 (initial weights, the 4 ranks' 2 micro-batches of step 1, averaged as the
    loop averages them), computed by transformers' Mixtral from a checkpoint of the initial weights."""
    import tempfile

    from transformers import AutoModelForCausalLM
    from transformers.models.mixtral.modeling_mixtral import load_balancing_loss_func

    from epkit import Mixtral, ModelArgs, save_pretrained
    from epkit.train import TrainConfig
    from epkit.train.loop import check_inputs
    args = ModelArgs.from_name("tiny")
    with tempfile.TemporaryDirectory() as d:
        train = check_inputs(TrainConfig(model="tiny", seq_len=32, micro_batch=2, seed=SEED,
                                         output_dir=os.path.join(d, "run")))[2]
        save_pretrained(Mixtral(args).init_weights(seed=SEED), os.path.join(d, "init"))
        hf = AutoModelForCausalLM.from_pretrained(os.path.join(d, "init"), dtype=torch.float32).eval()
    lm, aux, z = [], [], []
    with torch.no_grad():
        for rank in range(4):
            for micro in range(2):
                b = train.batch(micro, 2, rank, 4)
                assert (b["positions"] >= 0).all(), "step 1 should hold no padding row"
                out = hf(input_ids=b["tokens"], output_router_logits=True)  # (with labels, out.loss would add aux)
                lm.append(float(torch.nn.functional.cross_entropy(out.logits[:, :-1].reshape(-1, 512),
                                                                  b["labels"][:, 1:].reshape(-1), ignore_index=-100)))
                aux.append(float(load_balancing_loss_func(out.router_logits, 8, 2)))
                z.append(float(torch.stack([torch.logsumexp(r, -1).pow(2).mean() for r in out.router_logits]).mean()))
    mean = lambda xs: sum(xs) / len(xs)  # noqa: E731
    return mean(lm), mean(aux), mean(z), args.router_aux_loss_coef


def _router_z(path, tokens):
    """Router z-loss of a checkpoint on fixed tokens (transformers' router logits)."""
    from transformers import AutoModelForCausalLM
    hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    with torch.no_grad():
        logits = hf(input_ids=tokens, output_router_logits=True).router_logits
    return float(torch.stack([torch.logsumexp(r, -1).pow(2).mean() for r in logits]).mean())


def test_router_z_loss_and_round_robin_placement(trained):
    root, _ = trained
    z1, z4 = _rows(root, "ep1_zloss"), _rows(root, "ep4_rr_zloss")
    lm, aux, z, aux_coef = _step1_oracle()
    first = z1[0]
    assert first["lm_loss"] == pytest.approx(lm, rel=1e-5) and first["aux_loss"] == pytest.approx(aux, rel=1e-5)
    assert first["z_loss"] == pytest.approx(z, rel=1e-5) and z > 0.1
    for r in z1 + z4:  # the logged loss is the one trained: lm + aux_coef * aux + z_coef * z
        assert r["loss"] == pytest.approx(r["lm_loss"] + aux_coef * r["aux_loss"] + 0.1 * r["z_loss"], rel=1e-9)
    # EP=4 with round-robin placement equals EP=1
    with open(os.path.join(root, "ep4_rr_zloss", "final", "epkit_plan.json")) as f:
        assert json.load(f)["plan"]["owners"] == [0, 1, 2, 3, 0, 1, 2, 3]
    for a, b in zip(z1, z4):
        assert abs(a["loss"] - b["loss"]) < 1e-5 and abs(a["z_loss"] - b["z_loss"]) < 1e-5
        assert a["grad_norm"] == pytest.approx(b["grad_norm"], rel=1e-4) and a["expert_tokens"] == b["expert_tokens"]
    w1, w4 = _weights(root, "ep1_zloss"), _weights(root, "ep4_rr_zloss")
    for k, v in w1.items():
        torch.testing.assert_close(w4[k], v, atol=5e-5, rtol=0, msg=lambda m: f"{k}: {m}")
    # the z-loss reaches the gradients: the routers end with smaller logits than without it
    tokens = torch.randint(0, 512, (4, 32), generator=torch.Generator().manual_seed(1))
    with_z = _router_z(os.path.join(root, "ep1_zloss", "final"), tokens)
    without = _router_z(os.path.join(root, "ep1_z0", "final"), tokens)
    assert with_z < without, (with_z, without)


def test_balanced_training_plan_follows_the_checkpoints_routing(trained):
    from epkit.plan import ShardingPlan
    root, _ = trained
    with open(os.path.join(root, "from_ep2", "final", "epkit_plan.json")) as f:
        saved = json.load(f)["plan"]
    want = ShardingPlan(8, 4, "balanced", loads=_routed(root, "ep2_z0"), num_layers=2)
    assert saved["owners"] == [want.owners(layer) for layer in range(2)]
    assert any(want.owners(layer) != ShardingPlan(8, 4).owners() for layer in range(2)), "not a contiguous plan"
    for (l4, g4), (l1, g1) in zip(_losses(root, "from_ep2"), _losses(root, "from_ep2_ep1")):
        assert abs(l4 - l1) < 1e-5 and abs(g4 - g1) < 1e-4 * max(1.0, g1)
    w4, w1 = _weights(root, "from_ep2"), _weights(root, "from_ep2_ep1")
    assert w4.keys() == w1.keys()
    for k, v in w1.items():
        torch.testing.assert_close(w4[k], v, atol=5e-5, rtol=0, msg=lambda m: f"{k}: {m}")


def test_evaluation_at_world_4(trained):
    """Eval rows are sharded over the 4 ranks (EP=2: all-to-all inside): the loss and token count are the
    whole set's, as transformers computes them from final/ on one process."""
    from conftest import eval_loss_with_transformers
    root, _ = trained
    e1 = [r for r in _rows(root, "ep1_z0") if "eval_loss" in r]
    e2 = [r for r in _rows(root, "ep2_z0") if "eval_loss" in r]
    assert [r["step"] for r in e1] == [r["step"] for r in e2] == [3]
    want, tokens = eval_loss_with_transformers(os.path.join(root, "ep2_z0", "final"), os.path.join(root, "eval.jsonl"),
                                               32)
    assert e2[0]["eval_tokens"] == e1[0]["eval_tokens"] == tokens
    assert e2[0]["eval_loss"] == pytest.approx(want, rel=1e-5) and abs(e1[0]["eval_loss"] - want) < 1e-4


# ---- LoRA -------------------------------------------------------------------------------------------

def _adapter(root, name, final="final"):
    return load_file(os.path.join(root, name, final, "adapter_model.safetensors"))


def test_lora_ep_sizes_give_the_same_losses_and_adapters(trained):
    root, _ = trained
    base_losses, base_adapter = _losses(root, "lora_ep1_z0"), _adapter(root, "lora_ep1_z0")
    assert len(base_losses) == 3 and base_losses[-1][0] < base_losses[0][0]
    assert max(g for _, g in base_losses) > 0.15, "clipping should be active for this test to cover it"
    experts = [k for k in base_adapter if ".mlp.experts." in k]
    assert len(experts) == 2 * 2 * 2 and any(".mlp.gate." in k for k in base_adapter)  # layers x (w13, w2) x (A, B)
    start = _initial_adapter(root)  # sanity: every adapter tensor moved from its initial value (B starts at 0)
    assert start.keys() == base_adapter.keys()
    assert not [k for k in start if torch.equal(start[k], base_adapter[k])]
    for name, _, _, _ in LORA_RUNS[1:]:
        losses = _losses(root, name)
        for step, ((l0, g0), (l1, g1)) in enumerate(zip(base_losses, losses), 1):
            assert abs(l0 - l1) < 1e-5, f"{name} step {step}: loss {l1} vs EP=1 {l0}"
            assert abs(g0 - g1) < 1e-4 * max(1.0, g0), f"{name} step {step}: grad norm {g1} vs EP=1 {g0}"
        adapter = _adapter(root, name)
        assert adapter.keys() == base_adapter.keys()
        for k, v in base_adapter.items():
            torch.testing.assert_close(adapter[k], v, atol=5e-5, rtol=0, msg=lambda m: f"{name} {k}: {m}")


def _initial_adapter(root):
    from epkit import Mixtral, ModelArgs
    from epkit.lora import LoraSpec, apply_lora
    from epkit.lora_io import save_adapter
    model = Mixtral(ModelArgs.from_name("tiny")).init_weights(seed=SEED)
    apply_lora(model, LoraSpec.from_groups(LORA["lora_rank"], LORA["lora_alpha"], 0.0, LORA["lora_targets"]), seed=SEED)
    save_adapter(model, os.path.join(root, "lora_init"), base=None)
    return _adapter(root, "lora_init", "")


def test_lora_resume_and_load_at_another_ep_size(trained):
    root, diffs = trained
    resumed, first = _adapter(root, "lora_ep2_z0"), _adapter(root, "lora_ep2_z0", "final_uninterrupted")
    assert resumed.keys() == first.keys()
    for k in first:
        assert torch.equal(resumed[k], first[k]), f"{k} differs after --resume"
    with open(os.path.join(root, "lora_ep2_z0", "metrics.jsonl")) as f:
        assert [json.loads(line)["step"] for line in f if '"loss"' in line] == [1, 2, 3]
    worst = max(d["lora_ep2_at_ep4"] for d in diffs)
    assert worst < 1e-5, f"the EP=2 adapter at EP=4 differs from EP=1 by {worst}"


def test_lora_trains_only_the_adapters(trained):
    """The base is bit-identical after training: merging the saved adapter into the base checkpoint offline (EP=1)
    gives, bit for bit, the checkpoint the run merged in memory at its end (EP=2, ZeRO 2), whose base weights had
    been through 3 optimizer steps; tensors no adapter touches equal the base's."""
    from epkit.lora_io import export_merged
    root, _ = trained
    offline = export_merged(os.path.join(root, "lora_base"), os.path.join(root, "lora_ep2_z2", "final"),
                            os.path.join(root, "merged_offline"))
    base, in_run, off = (_weights(root, *d) for d in (("lora_base", ""), ("lora_ep2_z2", "merged"),
                                                       ("merged_offline", "")))
    assert offline and base.keys() == in_run.keys() == off.keys()
    for k in base:
        assert torch.equal(in_run[k], off[k]), f"{k}: the run's base moved during training"
        adapted = any(p in k for p in ("_proj.", ".gate.", ".experts."))
        assert torch.equal(in_run[k], base[k]) != adapted, f"{k}: adapted={adapted} but merged == base is the opposite"


def test_bench_lora_cpu_run_writes_every_figure(trained):
    from tests.test_bench_lora import check_cpu_result
    root, _ = trained
    check_cpu_result(os.path.join(root, "bench_lora"), ep=4)
