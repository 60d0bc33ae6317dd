"""What a person sees during a run: a tqdm bar, one JSON line per step, TensorBoard scalars on request.

Only rank 0 writes. OUTPUT_DIR/metrics.jsonl holds one object per logged step:
  {"step", "loss", "lm_loss", "aux_loss", "z_loss", "lr", "grad_norm", "tokens", "tokens_per_s",
   "expert_tokens": [[tokens routed to expert e of layer l]]}
where expert_tokens counts every step since the previous logged one (with --log-every N, N steps), so the
logged records sum to the run's routing; after --resume the count restarts at the checkpoint's step.
and one per evaluation: {"step", "eval_loss", "eval_ppl", "eval_tokens"}.
`launch/heatmap.py OUTPUT_DIR` renders the summed expert_tokens as a layer x expert image.
"""
from __future__ import annotations

import json
import os

METRICS_FILE = "metrics.jsonl"


class Metrics:
    def __init__(self, output_dir: str, total_steps: int, start_step: int, enabled: bool, progress: bool,
                 tensorboard: bool):
        self.enabled = enabled
        self.file = os.path.join(output_dir, METRICS_FILE)
        self.bar = None
        self.tb = None
        if not enabled:
            return
        os.makedirs(output_dir, exist_ok=True)
        _truncate_after(self.file, start_step)  # a resumed run rewrites the steps after its checkpoint
        if progress:
            from tqdm.auto import tqdm
            self.bar = tqdm(total=total_steps, initial=start_step, desc="train", unit="step", dynamic_ncols=True)
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                raise ImportError("--tensorboard needs the tensorboard package: pip install tensorboard") from None
            self.tb = SummaryWriter(os.path.join(output_dir, "tensorboard"))

    def log(self, record: dict) -> None:
        if not self.enabled:
            return
        with open(self.file, "a") as f:
            f.write(json.dumps(record) + "\n")
        if self.tb is not None:
            for k, v in record.items():
                if isinstance(v, (int, float)) and k != "step":
                    self.tb.add_scalar(("eval/" if k.startswith("eval") else "train/") + k, v, record["step"])
            if "expert_tokens" in record:  # load imbalance per layer: busiest expert / mean (1 = balanced)
                for layer, row in enumerate(record["expert_tokens"]):
                    mean = max(1e-9, sum(row) / len(row))
                    self.tb.add_scalar(f"experts/layer{layer}_max_over_mean", max(row) / mean, record["step"])

    def advance(self, record: dict) -> None:
        if self.bar is not None:
            self.bar.update(1)
            self.bar.set_postfix(loss=f"{record['loss']:.4f}", tok_s=f"{record['tokens_per_s']:.0f}",
                                 lr=f"{record['lr']:.2e}")

    def write(self, text: str) -> None:
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.write(text)
        else:
            print(text, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        if self.tb is not None:
            self.tb.close()


def _records(file: str) -> list[tuple[str, dict]]:
    """(line, object) for each JSON line of `file`. A torn last line (a run killed mid-write) is skipped;
    a bad line before the last is an error naming it."""
    with open(file) as f:
        lines = [(n, line) for n, line in enumerate(f, 1) if line.strip()]
    out = []
    for i, (n, line) in enumerate(lines):
        try:
            out.append((line if line.endswith("\n") else line + "\n", json.loads(line)))
        except json.JSONDecodeError as e:
            if i == len(lines) - 1:
                break  # torn trailing line
            raise ValueError(f"{file}: line {n} is not JSON ({e.msg}): {line[:80]!r}") from None
    return out


def _truncate_after(file: str, step: int) -> None:
    if not os.path.isfile(file):
        return
    keep = [line for line, r in _records(file) if r.get("step", 0) <= step]
    with open(file, "w") as f:
        f.writelines(keep)


def read_metrics(output_dir: str) -> list[dict]:
    file = os.path.join(output_dir, METRICS_FILE) if os.path.isdir(output_dir) else output_dir
    if not os.path.isfile(file):
        raise FileNotFoundError(f"{output_dir}: no {METRICS_FILE} (is this a training run directory?)")
    return [r for _, r in _records(file)]
