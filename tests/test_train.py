"""The training entry point as a user runs it: real `deepspeed` / `accelerate` / `python` launches.

  - SIGKILL mid-run (EP=2 x DP=2, ZeRO 2, 4 ranks), then --resume: losses and final tensors equal the
    uninterrupted run's; the final checkpoint loads in transformers and at EP=1 in epkit with the same logits;
  - the Accelerate path gives the deepspeed path's learning rate (the schedule's) and loss at every step;
  - a short fine-tune on the embedded corpus lowers the loss, follows the lr schedule, and reports an eval
    loss that transformers recomputes from final/; the heatmap shows the logged routing;
  - bad input: one error line per rank, non-zero exit, nothing written.
"""
from __future__ import annotations

import dataclasses
import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from epkit.train.config import TrainConfig
from conftest import eval_loss_with_transformers, saved_tensors
from test_train_optim import schedule_lr

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TRAIN = os.path.join(ROOT, "launch", "train.py")
SMALL = ["--seq-len", "64", "--micro-batch", "4", "--no-progress"]


def _env():
    env = dict(os.environ, OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false", PYTHONWARNINGS="ignore")
    env.pop("WORLD_SIZE", None)
    return env


def _deepspeed(args, port, gpus: int = 2, **kw):
    cmd = ["deepspeed", "--num_gpus", str(gpus), "--master_port", str(port), TRAIN, *args]
    return subprocess.Popen(cmd, cwd=ROOT, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True, **kw)


def _metrics(out):
    with open(os.path.join(out, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f if line.strip()]


def _free_port():
    from tests.distributed import free_port
    return free_port()


def test_sigkill_then_resume_matches_uninterrupted(tmp_path):
    """4 ranks, EP=2 x DP=2, ZeRO 2: each expert's optimizer state is partitioned over its expert-data-parallel
    group of two, so resume must restore every rank's partition."""
    args = ["--ep", "2", "--zero-stage", "2", "--max-steps", "8", "--save-every", "2", "--keep-last", "2",
            "--warmup-steps", "2", *SMALL]
    full, broken = str(tmp_path / "full"), str(tmp_path / "broken")
    ref = _deepspeed([*args, "--output-dir", full], _free_port(), gpus=4)
    victim = _deepspeed([*args, "--output-dir", broken], _free_port(), gpus=4)
    # kill the second run (launcher and all ranks) once it is past its second checkpoint
    deadline = time.time() + 300
    while time.time() < deadline and victim.poll() is None:
        try:
            if len(_metrics(broken)) >= 5:
                break
        except (FileNotFoundError, json.JSONDecodeError):
            pass
        time.sleep(0.05)
    assert victim.poll() is None, "the run ended before it could be killed:\n" + victim.communicate()[0][-3000:]
    os.killpg(victim.pid, signal.SIGKILL)
    victim.wait()
    out, _ = ref.communicate(timeout=400)
    assert ref.returncode == 0, out[-3000:]
    assert "epkit train (deepspeed): 4 rank(s), ep=2, zero=2" in out
    assert not os.path.exists(os.path.join(broken, "final"))
    resumed = _deepspeed([*args, "--output-dir", broken, "--resume"], _free_port(), gpus=4)
    out2, _ = resumed.communicate(timeout=400)
    assert resumed.returncode == 0, out2[-3000:]
    assert "resuming from" in out2 and "checkpoint-000002 at step 2" not in out2  # from step 4 or later
    a, b = _metrics(full), _metrics(broken)
    assert [r["step"] for r in a] == [r["step"] for r in b] == list(range(1, 9))
    cfg = TrainConfig(max_steps=8, warmup_steps=2)
    assert [r["lr"] for r in a] == pytest.approx([schedule_lr(cfg, s) for s in range(8)], rel=1e-9)
    for x, y in zip(a, b):
        assert abs(x["loss"] - y["loss"]) < 1e-6, f"step {x['step']}: {y['loss']} after resume vs {x['loss']}"
        assert x["lr"] == pytest.approx(y["lr"], rel=1e-12)
        assert x["grad_norm"] == pytest.approx(y["grad_norm"], rel=1e-6)
        assert x["expert_tokens"] == y["expert_tokens"]
    # the final weights of the resumed run are the uninterrupted run's
    want, got = saved_tensors(os.path.join(full, "final")), saved_tensors(os.path.join(broken, "final"))
    assert want.keys() == got.keys() and len(want) > 0
    for name, t in want.items():
        torch.testing.assert_close(got[name], t, atol=1e-6, rtol=0, msg=lambda m: f"{name}: {m}")
    # the checkpoint records the whole run's routing (what the inference engine's balanced placement reads)
    with open(os.path.join(broken, "final", "epkit_plan.json")) as f:
        saved = json.load(f)["routed_tokens"]
    assert saved == [[sum(r["expert_tokens"][layer][e] for r in b) for e in range(8)] for layer in range(2)]
    # keep-last: two step checkpoints plus final
    kept = sorted(d for d in os.listdir(broken) if d.startswith("checkpoint-"))
    assert kept == ["checkpoint-000004", "checkpoint-000006"], kept
    _check_loads_in_transformers_and_epkit(os.path.join(broken, "final"))


def _check_loads_in_transformers_and_epkit(path):
    """A checkpoint saved at EP=2 loads in transformers and in epkit at EP=1, with the same logits."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from epkit import load_pretrained
    hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    ours = load_pretrained(path).eval()
    tok = AutoTokenizer.from_pretrained(path)
    ids = torch.tensor([tok("The red fox lives in the forest and eats")["input_ids"]])
    with torch.no_grad():
        torch.testing.assert_close(ours(ids)[0], hf(input_ids=ids).logits, atol=1e-4, rtol=1e-4)
    with open(os.path.join(path, "epkit_plan.json")) as f:
        assert json.load(f)["plan"]["ep_size"] == 2


def test_accelerate_path_matches_the_deepspeed_path(tmp_path):
    """Same settings through `accelerate launch` and `deepspeed`: the same learning rate and loss at every step
    (Accelerate's wrapped scheduler was never stepped: the lr stayed at warm-up step 1), and a resumable state."""
    acc, ds = str(tmp_path / "acc"), str(tmp_path / "ds")
    args = ["--ep", "2", "--max-steps", "4", "--warmup-steps", "2", *SMALL]
    cmd = ["accelerate", "launch", "--config_file", os.path.join(ROOT, "configs/accelerate/ep2.yaml"),
           "--main_process_port", str(_free_port()), TRAIN, *args, "--output-dir", acc]
    a = subprocess.Popen(cmd, cwd=ROOT, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                         start_new_session=True)
    d = _deepspeed([*args, "--zero-stage", "2", "--output-dir", ds], _free_port())
    try:
        out_a, _ = a.communicate(timeout=300)
        out_d, _ = d.communicate(timeout=300)
    finally:
        for p in (a, d):
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)
    assert a.returncode == 0, out_a[-3000:]
    assert d.returncode == 0, out_d[-3000:]
    assert "epkit train (accelerate): 2 rank(s), ep=2, zero=2" in out_a
    # quiet ranks: the launcher's own accelerator line only, no DeepSpeed build chatter per rank
    assert out_a.count("Setting accelerator to CPU") <= 1 and "built successfully" not in out_a + out_d, out_a
    ra, rd = _metrics(acc), _metrics(ds)
    assert [r["step"] for r in ra] == [1, 2, 3, 4]
    assert [r["lr"] for r in ra] == pytest.approx([r["lr"] for r in rd], rel=1e-12)
    assert len({r["lr"] for r in ra}) == 4, [r["lr"] for r in ra]  # warm-up then decay: it moves every step
    cfg = TrainConfig(warmup_steps=2, max_steps=4)
    assert [r["lr"] for r in ra] == pytest.approx([schedule_lr(cfg, s) for s in range(4)], rel=1e-9)
    assert [r["loss"] for r in ra] == pytest.approx([r["loss"] for r in rd], rel=1e-5)
    saved = torch.load(os.path.join(acc, "final", "engine", "rank00000.pt"), weights_only=False)
    assert saved["scheduler"] is not None and saved["scheduler"]["last_epoch"] == 4


def test_accelerate_path_trains_lora(tmp_path):
    out = str(tmp_path / "acc_lora")
    cmd = ["accelerate", "launch", "--config_file", os.path.join(ROOT, "configs/accelerate/ep2.yaml"),
           "--main_process_port", str(_free_port()), TRAIN, "--ep", "2", "--max-steps", "2", "--output-dir", out,
           *SMALL, "--lora-rank", "4", "--lora-targets", "attention,experts,router"]
    p = subprocess.run(cmd, cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, (p.stdout + p.stderr)[-3000:]
    assert "epkit train (accelerate): 2 rank(s), ep=2, zero=2" in p.stdout + p.stderr
    assert "trainable {'lora_attention'" in p.stdout + p.stderr
    assert [r["step"] for r in _metrics(out)] == [1, 2]
    from safetensors.torch import load_file  # a PEFT adapter directory; the adapters trained (B starts at 0)
    adapter = load_file(os.path.join(out, "final", "adapter_model.safetensors"))
    assert len(adapter) == 2 * 7 * 2 and all(v.abs().max() > 0 for k, v in adapter.items() if "lora_B" in k)


def test_short_finetune_lowers_the_loss(tmp_path):
    import importlib.util
    out = str(tmp_path / "ft")
    evals_file = os.path.join(ROOT, "epkit", "assets", "instructions.jsonl")
    tensorboard = importlib.util.find_spec("tensorboard") is not None  # optional dependency
    p = subprocess.run([sys.executable, TRAIN, "--max-steps", "30", "--warmup-steps", "3", "--eval-data", evals_file,
                        "--eval-every", "15", "--output-dir", out, *SMALL, *(["--tensorboard"] if tensorboard else [])],
                       cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, (p.stdout + p.stderr)[-3000:]
    assert f"checkpoint: {os.path.join(out, 'final')}" in p.stdout
    rows = _metrics(out)
    losses = [r["loss"] for r in rows if "loss" in r]
    assert len(losses) == 30 and losses[-1] < losses[0] - 1.0, losses
    evals = [r for r in rows if "eval_loss" in r]
    assert [r["step"] for r in evals] == [15, 30] and evals[1]["eval_loss"] < evals[0]["eval_loss"]
    assert evals[1]["eval_ppl"] == pytest.approx(2.718281828 ** evals[1]["eval_loss"], rel=1e-6)
    first = rows[0]
    assert {"aux_loss", "lr", "grad_norm", "tokens_per_s"} <= first.keys()
    assert len(first["expert_tokens"]) == 2 and sum(first["expert_tokens"][0]) == 2 * first["tokens"]
    # the learning rate of every step is the schedule's (warm-up then cosine), not a constant
    cfg = TrainConfig(max_steps=30, warmup_steps=3)
    train_rows = [r for r in rows if "loss" in r]
    assert [r["lr"] for r in train_rows] == pytest.approx([schedule_lr(cfg, s) for s in range(30)], rel=1e-9)
    # the eval loss of the final checkpoint, recomputed by transformers from final/ alone
    want, tokens = eval_loss_with_transformers(os.path.join(out, "final"), evals_file, 64)
    assert evals[1]["eval_tokens"] == tokens
    assert evals[1]["eval_loss"] == pytest.approx(want, rel=1e-4), (evals[1], want)
    if tensorboard:
        assert any(f.startswith("events.out.tfevents") for f in os.listdir(os.path.join(out, "tensorboard")))
    _check_heatmap(out, train_rows, tmp_path)


def _check_heatmap(out, train_rows, tmp_path):
    """The heatmap shows what the run logged: per layer and expert, the sum of the steps' expert_tokens,
    which is also the final checkpoint's routed_tokens."""
    sys.path.insert(0, os.path.join(ROOT, "launch"))
    import heatmap
    logged = [[sum(r["expert_tokens"][layer][e] for r in train_rows) for e in range(8)] for layer in range(2)]
    with open(os.path.join(out, "final", "epkit_plan.json")) as f:
        assert json.load(f)["routed_tokens"] == logged
    counts, _ = heatmap.load_counts(out, None)
    assert counts == logged
    last = [[sum(r["expert_tokens"][layer][e] for r in train_rows[-5:]) for e in range(8)] for layer in range(2)]
    assert heatmap.load_counts(out, 5)[0] == last
    assert heatmap.load_counts(os.path.join(out, "final"), None)[0] == logged
    heat = str(tmp_path / "heat.png")
    h = subprocess.run([sys.executable, os.path.join(ROOT, "launch", "heatmap.py"), out, "-o", heat],
                       capture_output=True, text=True)
    assert h.returncode == 0 and os.path.getsize(heat) > 1000, h.stderr
    assert "wrote" in h.stdout and "(2 layers x 8 experts)" in h.stdout


@pytest.mark.parametrize("argv, message", [
    (["--data", "/nonexistent/x.jsonl"], "data set '/nonexistent/x.jsonl' does not exist"),
    (["--data", "BAD_RECORDS"], "record 1 has no 'response'"),
    (["--data", "EMPTY"], "is empty"),
    (["--seq-len", "100000"], "--seq-len 100000 is beyond the model's context (max_position_embeddings=512)"),
    (["--zero-stage", "3"], "--zero-stage=3 is not supported"),
    (["--model", "no-such-preset"], "unknown model preset 'no-such-preset'"),
    (["--model", "./missing_dir"], "--model './missing_dir': no such checkpoint directory"),
    (["--plan-strategy", "by_hand"], "--plan-strategy='by_hand' is not one of contiguous, round_robin, balanced"),
    (["--ep", "2", "--plan-strategy", "balanced"], "--plan-strategy balanced places experts by their load"),
    (["--lr", "0"], "--lr=0.0 must be > 0"),
    (["--warmup-steps", "-1"], "--warmup-steps=-1 must be >= 0"),
    (["--eval-every", "-2"], "--eval-every=-2 must be >= 0"),
    (["--keep-last", "0"], "--keep-last=0 must be at least 1"),
])
def test_bad_input_in_process(tmp_path, capsys, argv, message):
    sys.path.insert(0, os.path.join(ROOT, "launch"))
    import train as launcher
    (tmp_path / "bad.jsonl").write_text(json.dumps({"prompt": "q", "response": "a"}) + "\n" +
                                        json.dumps({"prompt": "q"}) + "\n")
    (tmp_path / "empty.txt").write_text("")
    argv = [{"BAD_RECORDS": str(tmp_path / "bad.jsonl"), "EMPTY": str(tmp_path / "empty.txt")}.get(a, a) for a in argv]
    out = str(tmp_path / "out")
    assert launcher.run([*argv, "--output-dir", out, "--no-progress"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0], err
    assert not os.path.exists(out)


def test_ep_not_dividing_world_fails_on_every_rank(tmp_path):
    for argv, message in [(["--ep", "3"], "--ep 3 does not divide the number of ranks (2)")]:
        out = str(tmp_path / "out")
        p = _deepspeed([*argv, "--output-dir", out, *SMALL], _free_port())
        text, _ = p.communicate(timeout=120)
        assert p.returncode != 0
        for rank in (0, 1):
            lines = [line for line in text.splitlines() if line.startswith(f"error (rank {rank}):")]
            assert len(lines) == 1 and message in lines[0], text[-2000:]
        assert not os.path.exists(out)


def test_default_recipe_matches_the_defaults_and_tensorboard_message(tmp_path, monkeypatch):
    from epkit.train.config import TrainConfig, parse_config
    from epkit.train.metrics import Metrics
    assert parse_config(["--config", os.path.join(ROOT, "configs/train/default.yaml")]) == TrainConfig()
    recipe = os.path.join(ROOT, "configs/train/ep2_zero2.yaml")
    cfg = parse_config(["--config", recipe, "--lr", "1e-4", "--no-progress"])
    assert (cfg.lr, cfg.ep_size, cfg.zero_stage, cfg.progress) == (1e-4, 2, 2, False)
    with pytest.raises(ValueError, match="unknown setting"):
        (tmp_path / "bad.yaml").write_text("learning_rate: 1\n")
        parse_config(["--config", str(tmp_path / "bad.yaml")])
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # as if tensorboard were not installed
    with pytest.raises(ImportError, match="pip install tensorboard"):
        Metrics(str(tmp_path), 1, 0, enabled=True, progress=False, tensorboard=True)
    assert {f.name for f in dataclasses.fields(TrainConfig)} >= {"ep_size", "zero_stage", "save_every", "resume"}


def test_prune_keeps_the_newest_complete_checkpoints(tmp_path):
    from epkit.train import state
    for step, complete in [(2, True), (4, True), (6, False), (8, True), (10, True)]:
        d = tmp_path / f"checkpoint-{step:06d}"
        d.mkdir()
        (d / "epkit_plan.json").write_text(json.dumps({"trainer_state": {"step": step, "run_id": "A"}}))
        if complete:
            (d / state.STATE_FILE).write_text(json.dumps({"step": step}))
            (d / state.MARKER_FILE).write_text(json.dumps({"run_id": "A", "step": step, "files": {}}))
    (tmp_path / "checkpoint-000012.tmp-0123abcd").mkdir()  # a save that crashed
    (tmp_path / "final.old-0123abcd").mkdir()  # may be the only copy after a crash: kept
    state.prune(str(tmp_path), keep_last=2, run_id="A")
    assert sorted(os.listdir(tmp_path)) == ["checkpoint-000008", "checkpoint-000010", "final.old-0123abcd"]
    assert state.latest_checkpoint(str(tmp_path), "A").endswith("checkpoint-000010")


def test_checkpoint_without_tokenizer_needs_one(tmp_path, capsys):
    from epkit import Mixtral, save_pretrained
    from tests.conftest import tiny_args
    ckpt = str(tmp_path / "bare")
    save_pretrained(Mixtral(tiny_args()).init_weights(), ckpt)
    sys.path.insert(0, os.path.join(ROOT, "launch"))
    import train as launcher
    assert launcher.run(["--model", ckpt, "--output-dir", str(tmp_path / "out")]) == 2
    assert "has no tokenizer files; pass --tokenizer" in capsys.readouterr().err


def test_tensorboard_missing_fails_before_any_collective(tmp_path, capsys, monkeypatch):
    """Checked in check_inputs, on every rank, not only on rank 0 after deepspeed.initialize (other ranks hung)."""
    from epkit.train import loop
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # as if tensorboard were not installed
    monkeypatch.setattr(loop, "_join_world",
                        lambda timeout_s: pytest.fail("joined the world before checking --tensorboard"))
    sys.path.insert(0, os.path.join(ROOT, "launch"))
    import train as launcher
    out = str(tmp_path / "out")
    assert launcher.run(["--tensorboard", "--output-dir", out, "--no-progress"]) == 2
    assert "--tensorboard needs the tensorboard package" in capsys.readouterr().err
    assert not os.path.exists(out)


def test_balanced_placement_takes_the_checkpoints_routing(tmp_path):
    from epkit import Mixtral, save_pretrained
    from epkit.train.config import TrainConfig
    from epkit.train.optim import check_plan_strategy, plan_loads
    from tests.conftest import tiny_args
    model = Mixtral(tiny_args()).init_weights()
    model.routing_stats.counts().copy_(torch.stack([torch.arange(8) * (layer + 1) for layer in range(2)]))
    ckpt = str(tmp_path / "ck")
    save_pretrained(model, ckpt)
    cfg = TrainConfig(model=ckpt, ep_size=2, plan_strategy="balanced")
    check_plan_strategy(cfg)
    assert plan_loads(cfg) == [list(range(8)), [2 * e for e in range(8)]]
    assert plan_loads(TrainConfig(model=ckpt, ep_size=2)) is None  # other strategies need no loads


def test_saved_routing_counts_missing_or_malformed(tmp_path):
    from epkit.train import state
    (tmp_path / "epkit_plan.json").write_text(json.dumps({"plan": {}}))
    with pytest.warns(UserWarning, match="records no routed_tokens"):
        assert state.saved_routing_counts(str(tmp_path), 2, 3) == [[0, 0, 0], [0, 0, 0]]
    (tmp_path / "epkit_plan.json").write_text(json.dumps({"routed_tokens": [[1, 2, 3]]}))
    with pytest.raises(ValueError, match="routed_tokens is not 2 layers x 3 experts"):
        state.saved_routing_counts(str(tmp_path), 2, 3)
    (tmp_path / "epkit_plan.json").write_text(json.dumps({"routed_tokens": [[1, 2, 3], [4, 5, 6]]}))
    assert state.saved_routing_counts(str(tmp_path), 2, 3) == [[1, 2, 3], [4, 5, 6]]


def test_metrics_skip_a_torn_last_line(tmp_path):
    """A run killed mid-write leaves a torn last line; --resume (and read_metrics) must get past it."""
    from epkit.train.metrics import METRICS_FILE, Metrics, read_metrics
    file = tmp_path / METRICS_FILE
    good = [json.dumps({"step": s, "loss": 1.0 / s}) + "\n" for s in (1, 2, 3)]
    file.write_text("".join(good) + '{"step": 4, "lo')
    assert [r["step"] for r in read_metrics(str(tmp_path))] == [1, 2, 3]
    Metrics(str(tmp_path), 10, 2, enabled=True, progress=False, tensorboard=False).close()  # resume at step 2
    assert file.read_text() == "".join(good[:2])
    file.write_text(good[0] + "{torn\n" + good[1])  # not the last line: an error naming the line
    with pytest.raises(ValueError, match="line 2 is not JSON"):
        read_metrics(str(tmp_path))


# ---- collectives on the model's device; exact clipping ----------------------------------------------------

def test_reduce_on_device_moves_to_the_target_device(monkeypatch):
    """NCCL takes only CUDA tensors: the helper must hand the collective a tensor on the run's device."""
    import torch.distributed as dist

    from epkit.train import optim
    seen = []
    monkeypatch.setattr(optim, "is_distributed", lambda: True)
    monkeypatch.setattr(dist, "all_reduce", lambda t, group=None: seen.append((t.device, group)))
    out = optim.reduce_on_device(torch.ones(3), torch.device("meta"), group="G")
    assert out.device.type == "meta" and seen == [(torch.device("meta"), "G")]


def test_every_collective_in_train_goes_through_reduce_on_device():
    """A CPU run (gloo) cannot see a CPU tensor handed to NCCL, so forbid direct collectives in epkit/train:
    each must go through optim.reduce_on_device (which moves the tensor to the device)."""
    import ast
    names = {"all_reduce", "broadcast", "all_gather", "all_gather_into_tensor", "reduce_scatter",
             "reduce_scatter_tensor", "reduce", "all_to_all", "all_to_all_single", "gather", "scatter"}
    folder = os.path.join(ROOT, "epkit", "train")
    bad = []
    for file in sorted(os.listdir(folder)):
        if not file.endswith(".py"):
            continue
        tree = ast.parse(open(os.path.join(folder, file)).read())
        allowed = set()
        for fn in ast.walk(tree):
            if isinstance(fn, ast.FunctionDef) and fn.name == "reduce_on_device":
                allowed |= {id(n) for n in ast.walk(fn)}
        for node in ast.walk(tree):
            if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr in names
                    and id(node) not in allowed):
                bad.append(f"{file}:{node.lineno} {node.func.attr}")
    assert not bad, bad


def _grads(model, seed):
    g = torch.Generator().manual_seed(seed)
    for p in model.parameters():
        p.grad = torch.randn(p.shape, generator=g)


def test_clip_exact_matches_torch_and_syncs_once(monkeypatch):
    from epkit import Mixtral
    from epkit.train.optim import clip_exact
    from tests.conftest import tiny_args
    model = Mixtral(tiny_args()).init_weights()
    ref = Mixtral(tiny_args()).init_weights()
    _grads(model, 0)
    _grads(ref, 0)
    expected = float(torch.nn.utils.clip_grad_norm_(ref.parameters(), 1.0))
    reads = []
    real_float = torch.Tensor.__float__
    monkeypatch.setattr(torch.Tensor, "__float__", lambda t: reads.append(1) or real_float(t))
    monkeypatch.setattr(torch.Tensor, "cpu", lambda t, *a, **k: pytest.fail("per-tensor .cpu() in clip_exact"))
    monkeypatch.setattr(torch.Tensor, "item", lambda t: pytest.fail(".item() in clip_exact"))
    norm = clip_exact(model, 1.0)
    monkeypatch.undo()
    assert len(reads) == 1, "one device-to-host read per step"
    assert norm == pytest.approx(expected, rel=1e-5) and norm > 1.0
    for p, q in zip(model.parameters(), ref.parameters()):
        torch.testing.assert_close(p.grad, q.grad, atol=1e-6, rtol=1e-5)
    _grads(model, 1)
    before = [p.grad.clone() for p in model.parameters()]
    assert clip_exact(model, 0.0) > 0  # 0: measure only
    assert all(torch.equal(a, p.grad) for a, p in zip(before, model.parameters()))


def _bf16_zero0_clip_reaches_adamw(rank, world):
    import deepspeed

    from epkit.train.config import TrainConfig
    from epkit.train.optim import clip_exact, deepspeed_config, model_args_for, model_for, uses_exact_clip
    cfg = TrainConfig(model="tiny", dtype="bf16", zero_stage=0, micro_batch=1, lr=1e-3, grad_clip=1e-3)
    model = model_for(cfg, model_args_for(cfg), torch.device("cpu"), torch.bfloat16)
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr)
    engine, opt, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, config=deepspeed_config(cfg, torch.bfloat16),
                                             dist_init_required=False)
    assert uses_exact_clip(engine)
    seen = []
    inner_step = opt.optimizer.step  # the fp32 AdamW under DeepSpeed's bf16 wrapper

    def step(*a, **k):
        grads = [p.grad.float() for g in opt.optimizer.param_groups for p in g["params"] if p.grad is not None]
        seen.append(float(torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(x) for x in grads]))))
        return inner_step(*a, **k)

    opt.optimizer.step = step
    tokens = torch.randint(0, 512, (1, 16), generator=torch.Generator().manual_seed(0))
    logits, _ = engine(tokens)
    engine.backward(logits.float().logsumexp(-1).mean())
    norm = clip_exact(model, cfg.grad_clip)
    engine.step()
    return norm, seen


def test_bf16_zero0_exact_clip_reaches_the_fp32_optimizer():
    """bf16 + ZeRO 0: DeepSpeed copies p.grad into the fp32 masters in step(), after clip_exact scaled it,
    so the gradients AdamW sees have the clipped norm (not the raw one)."""
    from tests.distributed import run
    (norm, seen), = run(_bf16_zero0_clip_reaches_adamw, 1, timeout=240)
    assert norm > 1e-2, "the raw norm must be well above the clip for this test to mean anything"
    assert len(seen) == 1 and seen[0] == pytest.approx(1e-3, rel=2e-2), (norm, seen)


def _engines_left(rank, world, root):
    """Train to the end, then train again into a step that raises; after each, count the DeepSpeed engines and
    epkit models still alive in this process."""
    import gc

    from deepspeed import DeepSpeedEngine

    from epkit import Mixtral
    from epkit.train import loop

    def alive():
        gc.collect()
        return sum(isinstance(o, (DeepSpeedEngine, Mixtral)) for o in gc.get_objects())
    cfg = TrainConfig(model="tiny", ep_size=2, zero_stage=2, max_steps=2, seq_len=16, micro_batch=1,
                      warmup_steps=0, progress=False, output_dir=os.path.join(root, "run"), seed=1)
    loop.main(cfg)
    after_return = alive()

    def broken(self, record):
        raise RuntimeError("metrics disk full")
    loop.Metrics.advance = broken
    try:
        loop.main(dataclasses.replace(cfg, output_dir=os.path.join(root, "broken")))
        raised = False
    except RuntimeError as e:
        raised = "metrics disk full" in str(e)
    return after_return, raised, alive()


def test_training_frees_its_engine_on_return_and_on_error(tmp_path):
    """DeepSpeed keeps every engine in a hook that outlives it: before `trained_engine`, a fine-tune run from
    Python (epkit.train.main) left its model, gradients and optimizer states allocated for the rest of the
    process, so serving the result in the same process had the training memory still taken. On 2 real gloo
    ranks (EP=2, ZeRO 2): no engine or model is left after main returns, nor after it raises mid-run."""
    from tests.distributed import run
    results = run(_engines_left, 2, str(tmp_path), timeout=300)
    assert results == [(0, True, 0), (0, True, 0)], results


def _compiled_vs_eager(rank, world, root):
    import time as _time

    from epkit.train import loop
    rows = {}
    for name, compile_ in (("eager", False), ("compiled", True)):
        cfg = TrainConfig(model="tiny", ep_size=2, zero_stage=1, max_steps=3, seq_len=16, micro_batch=2, lr=1e-2,
                          warmup_steps=0, progress=False, output_dir=os.path.join(root, name), seed=3,
                          compile=compile_)
        t = _time.perf_counter()
        loop.main(cfg)
        rows[name] = _time.perf_counter() - t
    return rows


def test_compile_trains_like_eager(tmp_path):
    """--compile (torch.compile over each layer's attention block and norms) on 2 gloo ranks at EP=2: the same
    losses and gradient norms as eager, step by step, and the same saved weights, in fp32."""
    from tests.distributed import run
    run(_compiled_vs_eager, 2, str(tmp_path), timeout=600)
    eager, compiled = _metrics(str(tmp_path / "eager")), _metrics(str(tmp_path / "compiled"))
    assert len(eager) == len(compiled) == 3
    for a, b in zip(eager, compiled):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-5, abs=1e-6), (a, b)
        assert a["grad_norm"] == pytest.approx(b["grad_norm"], rel=1e-4), (a, b)
    want, got = saved_tensors(str(tmp_path / "eager" / "final")), saved_tensors(str(tmp_path / "compiled" / "final"))
    assert want.keys() == got.keys()
    for k in want:
        torch.testing.assert_close(got[k], want[k], atol=1e-4, rtol=1e-3)  # fp32 rounding, through Adam
