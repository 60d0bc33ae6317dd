"""Units of epkit/train/optim.py that need no process group: the learning-rate schedule against values
worked out by hand, and how a `--deepspeed-config` file merges into the generated engine config.

`schedule_lr` is the oracle the run-level tests (test_train.py, test_train_ep.py) compare logged learning
rates with: linear warm-up over `warmup_steps` steps to the peak, then a cosine from the peak down to
`lr * min_lr_ratio` at `max_steps`, flat after. Optimizer step s (0-based) uses schedule_lr(s).
"""
import json
import math

import pytest
import torch

from epkit.train.config import TrainConfig
from epkit.train.optim import ZERO2_DEFAULTS, deepspeed_config, lr_lambda


def schedule_lr(cfg: TrainConfig, step: int) -> float:
    """Learning rate of optimizer step `step` (0-based), from the definition."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / (cfg.warmup_steps + 1)
    done = min(1.0, (step - cfg.warmup_steps) / max(1, cfg.max_steps - cfg.warmup_steps))
    return cfg.lr * (cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * (1 + math.cos(math.pi * done)) / 2)


def test_lr_lambda_by_hand():
    cfg = TrainConfig(lr=2.0, warmup_steps=3, max_steps=13, min_lr_ratio=0.1)
    f = lr_lambda(cfg)
    by_hand = {0: 0.25, 1: 0.5, 2: 0.75, 3: 1.0, 8: 0.55, 13: 0.1, 20: 0.1}
    for step, want in by_hand.items():
        assert f(step) == pytest.approx(want, abs=1e-12), step
        assert schedule_lr(cfg, step) == pytest.approx(2.0 * want, abs=1e-12), step
    # a quarter of the way down the cosine: 0.1 + 0.9 * (1 + cos(pi/4)) / 2
    assert f(3 + 10 / 4) == pytest.approx(0.1 + 0.9 * (1 + 2 ** -0.5) / 2)
    ramp, decay = [f(s) for s in range(4)], [f(s) for s in range(3, 14)]
    assert ramp == sorted(ramp) and decay == sorted(decay, reverse=True) and len(set(decay)) == len(decay)


@pytest.mark.parametrize("warmup, max_steps, ratio", [(0, 5, 0.0), (0, 1, 0.5), (4, 5, 0.2), (2, 30, 0.1)])
def test_lr_lambda_edges(warmup, max_steps, ratio):
    cfg = TrainConfig(lr=1.0, warmup_steps=warmup, max_steps=max_steps, min_lr_ratio=ratio)
    f = lr_lambda(cfg)
    if warmup == 0:
        assert f(0) == 1.0  # no warm-up: the first step runs at the peak
    else:
        assert f(0) == pytest.approx(1 / (warmup + 1)) and f(warmup - 1) == pytest.approx(warmup / (warmup + 1))
    assert f(max_steps) == pytest.approx(ratio) and f(max_steps + 7) == pytest.approx(ratio)
    for s in range(max_steps + 3):
        assert f(s) == pytest.approx(schedule_lr(cfg, s)), s


def test_lr_lambda_drives_torch_scheduler_as_logged():
    """The optimizer's lr after k scheduler steps is schedule_lr(k): what the loop logs for step k + 1."""
    cfg = TrainConfig(lr=0.5, warmup_steps=2, max_steps=6, min_lr_ratio=0.2)
    opt = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=cfg.lr)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(cfg))
    seen = []
    for _ in range(8):
        seen.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert seen == pytest.approx([schedule_lr(cfg, s) for s in range(8)], rel=1e-12)


# ---- --deepspeed-config merging -------------------------------------------------------------------

def _cfg(tmp_path, user: dict | None, **kw) -> TrainConfig:
    path = None
    if user is not None:
        path = str(tmp_path / "ds.json")
        with open(path, "w") as f:
            json.dump(user, f)
    return TrainConfig(deepspeed_config=path, micro_batch=3, grad_accum=2, grad_clip=0.7, **kw)


def test_generated_config_without_a_file(tmp_path):
    ds = deepspeed_config(_cfg(tmp_path, None), torch.float32)
    assert ds["train_micro_batch_size_per_gpu"] == 3 and ds["gradient_accumulation_steps"] == 2
    assert ds["train_batch_size"] == 6  # x world size 1
    assert ds["zero_optimization"] == {"stage": 0} and ds["bf16"] == {"enabled": False}
    assert ds["gradient_clipping"] == 0.0  # ZeRO 0: epkit clips (exact norm)
    assert deepspeed_config(_cfg(tmp_path, None), torch.bfloat16)["bf16"] == {"enabled": True}
    assert deepspeed_config(_cfg(tmp_path, None, zero_stage=2), torch.float32)["gradient_clipping"] == 0.7


def test_file_keys_merge_recursively_and_epkit_flags_win(tmp_path):
    user = {"zero_optimization": {"stage": 2, "reduce_bucket_size": 12345, "overlap_comm": "auto"},
            "train_micro_batch_size_per_gpu": 99, "gradient_accumulation_steps": 7, "train_batch_size": 1,
            "gradient_clipping": 5.0, "bf16": "auto", "steps_per_print": 10, "optimizer_extra": {"x": [1, 2]}}
    ds = deepspeed_config(_cfg(tmp_path, user), torch.float32)
    # "auto" keeps epkit's value; what neither sets comes from ZeRO 2's defaults
    assert ds["zero_optimization"] == {**ZERO2_DEFAULTS, "stage": 2, "reduce_bucket_size": 12345}
    assert ds["zero_optimization"]["overlap_comm"] is ZERO2_DEFAULTS["overlap_comm"]
    assert (ds["train_micro_batch_size_per_gpu"], ds["gradient_accumulation_steps"], ds["train_batch_size"]) == (3, 2, 6)
    assert ds["gradient_clipping"] == 0.7  # ZeRO 2 from the file: DeepSpeed clips, at epkit's --grad-clip
    assert ds["bf16"] == {"enabled": False}  # "auto": epkit's value
    assert ds["steps_per_print"] == 10 and ds["optimizer_extra"] == {"x": [1, 2]}
    assert ds["zero_allow_untested_optimizer"] is True  # epkit's keys the file does not name stay
    # --zero-stage overrides the file's stage; stage 0 then clips in epkit
    ds0 = deepspeed_config(_cfg(tmp_path, user, zero_stage=0), torch.float32)
    assert ds0["zero_optimization"] == {"stage": 0, "reduce_bucket_size": 12345} and ds0["gradient_clipping"] == 0.0


def test_accelerate_base_then_file(tmp_path):
    """Accelerate's plugin config is the base; a --deepspeed-config file overrides it; epkit's flags win."""
    base = {"zero_optimization": {"stage": 1, "contiguous_gradients": True}, "gradient_clipping": 9.0,
            "train_micro_batch_size_per_gpu": "auto"}
    ds = deepspeed_config(_cfg(tmp_path, {"zero_optimization": {"stage": 2}}), torch.float32, base=base)
    assert ds["zero_optimization"] == {**ZERO2_DEFAULTS, "stage": 2, "contiguous_gradients": True}
    assert ds["train_micro_batch_size_per_gpu"] == 3 and ds["gradient_clipping"] == 0.7
    assert deepspeed_config(_cfg(tmp_path, None), torch.float32, base=base)["zero_optimization"]["stage"] == 1


def test_bad_deepspeed_config(tmp_path):
    with pytest.raises(ValueError, match=r"--deepspeed-config '/nonexistent/ds.json': no such file"):
        deepspeed_config(TrainConfig(deepspeed_config="/nonexistent/ds.json"), torch.float32)
    with pytest.raises(ValueError, match="ZeRO stage 3 is not supported; use 0, 1 or 2"):
        deepspeed_config(_cfg(tmp_path, {"zero_optimization": {"stage": 3}}), torch.float32)
