"""Training settings: one dataclass; YAML recipe values are defaults, command-line flags override them.

`parse_config(argv)` builds the command line from the dataclass fields (`epkit.settings`), so
`launch/train.py --help` lists every setting with the recipe's default.
"""
from __future__ import annotations

from dataclasses import dataclass, fields

from ..model import CHECKPOINT_MODES
from ..plan import STRATEGIES
from ..settings import add_flags, flag_name, from_flags, parse_flags, settings_parser
from ..settings import setting as _opt

FREEZE_CHOICES = ("none", "attention", "router", "experts")
ALL_TO_ALL = ("exact", "fixed_capacity")


@dataclass
class TrainConfig:
    # what to train
    model: str = _opt("tiny", "preset name (tiny, mixtral-8x7b, ...) or a Hugging Face Mixtral checkpoint directory")
    tokenizer: str | None = _opt(None, "tokenizer dir/file (default: the checkpoint's, else the embedded one)")
    data: str | None = _opt(None, "training data: jsonl/json/txt/parquet file or a datasets save_to_disk dir "
                                  "(default: the embedded corpus)")
    eval_data: str | None = _opt(None, "held-out data, same formats; evaluated every --eval-every steps and at the end")
    output_dir: str = _opt("outputs/default", "run directory: metrics, checkpoints, final/ (the served checkpoint)")
    # parallelism and precision
    ep_size: int = _opt(1, "expert-parallel size; must divide the number of ranks", flag="ep")
    plan_strategy: str = _opt("contiguous", "expert placement: contiguous, round_robin or balanced (by the "
                                            "tokens per expert --model's epkit_plan.json records)")
    all_to_all: str = _opt("exact", "how EP ranks exchange tokens: exact (pair counts read on the host, one sync per "
                                    "layer) or fixed_capacity (every token to every EP rank in fixed-size blocks: "
                                    "no host sync)", choices=ALL_TO_ALL)
    zero_stage: int | None = _opt(None, "DeepSpeed ZeRO stage 0, 1 or 2 (default: the DeepSpeed/Accelerate config "
                                         "file's, else 0)")
    dtype: str = _opt("auto", "auto (bf16 on GPU, fp32 on CPU), fp32 or bf16")
    deepspeed_config: str | None = _opt(None, "DeepSpeed JSON whose keys override the generated engine config")
    # schedule
    max_steps: int = _opt(200, "optimizer steps")
    seq_len: int = _opt(128, "tokens per packed row")
    micro_batch: int = _opt(4, "rows per rank per micro-step")
    grad_accum: int = _opt(1, "micro-steps per optimizer step")
    lr: float = _opt(3e-3, "peak learning rate (AdamW)")
    min_lr_ratio: float = _opt(0.1, "cosine decays to lr * min_lr_ratio")
    warmup_steps: int = _opt(20, "linear warm-up steps")
    weight_decay: float = _opt(0.01, "AdamW weight decay (not applied to norms)")
    betas: tuple = _opt((0.9, 0.95), "AdamW betas", nargs=2, type=float)
    grad_clip: float = _opt(1.0, "clip the global gradient norm to this (0: off)")
    skip_nonfinite: int = _opt(0, "steps with a non-finite loss or gradient norm to skip (their update is not "
                                  "applied) before the run stops; 0: stop at the first")
    seed: int = _opt(0, "seeds model init, data order and every RNG")
    dist_timeout: float = _opt(600.0, "seconds a collective waits for the other ranks; then the job ends with a "
                                      "line naming the rank that stopped answering")
    # loss
    aux_loss_coef: float | None = _opt(None, "load-balancing loss coefficient (default: the model's "
                                              "router_aux_loss_coef, as transformers uses)")
    z_loss_coef: float = _opt(0.0, "router z-loss coefficient (0: off)")
    # what trains
    train_only: str = _opt("none", "train only this part and freeze the rest: none, attention, router or experts",
                           choices=FREEZE_CHOICES)
    activation_checkpointing: str = _opt("none", "recompute in backward to save memory: none, layers (whole decoder "
                                                 "layers) or selective (attention blocks and the experts' "
                                                 "up-projection: no collective runs twice); the bare flag means "
                                                 "layers", choices=CHECKPOINT_MODES, nargs="?", const="layers")
    compile: bool = _opt(False, "torch.compile each decoder layer's attention block (RMSNorm, q/k/v, rotary, "
                                "attention, o) and MoE RMSNorm, and the final norm: fewer, fused elementwise "
                                "kernels (some 30 s of compiling at the first step; on an H200 at the "
                                "Mixtral-8x7B shape, 4 percent more tokens/s)")
    # LoRA (epkit.lora): a frozen base, adapters saved as a PEFT adapter directory
    lora_rank: int | None = _opt(None, "train LoRA adapters of this rank on a frozen base (default: full fine-tune)")
    lora_alpha: float | None = _opt(None, "LoRA alpha: updates are scaled by alpha / rank (default: the rank)")
    lora_dropout: float = _opt(0.0, "dropout on the adapters' input (attention-only targets: PEFT's router and "
                                    "expert LoRA has none)")
    lora_targets: str = _opt("attention,experts", "what gets adapters: a comma list of attention, experts, router")
    merge: bool = _opt(False, "with --lora-rank: also write OUTPUT_DIR/merged, the base with the adapters folded in "
                              "(a Hugging Face checkpoint)")
    # checkpoints and metrics
    save_every: int = _opt(0, "save a checkpoint every N steps (0: only at the end)")
    keep_last: int = _opt(2, "keep the last K step checkpoints (final/ is always kept)")
    resume: bool = _opt(False, "continue from the newest complete checkpoint in --output-dir")
    eval_every: int = _opt(0, "evaluate every N steps (0: only at the end)")
    log_every: int = _opt(1, "write metrics every N steps")
    tensorboard: bool = _opt(False, "also write TensorBoard scalars to OUTPUT_DIR/tensorboard")
    progress: bool = _opt(True, "tqdm progress bar on rank 0")
    verbose: bool = _opt(False, "also show DeepSpeed's and torch's log lines and known warnings (hidden by default)")

    def __post_init__(self):
        # recipes and callers written when this was a bool
        self.activation_checkpointing = {True: "layers", False: "none"}.get(self.activation_checkpointing,
                                                                            self.activation_checkpointing)

    def check(self) -> None:
        """Settings that are wrong whatever the model and data: one sentence naming the value."""
        flag = {f.name: "--" + flag_name(f).replace("_", "-") for f in fields(self)}
        for name in ("max_steps", "seq_len", "micro_batch", "grad_accum", "ep_size", "log_every"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise ValueError(f"{flag[name]}={getattr(self, name)!r} must be a positive integer")
        if self.zero_stage not in (None, 0, 1, 2):
            raise ValueError(f"--zero-stage={self.zero_stage} is not supported; use 0, 1 or 2")
        if self.dtype not in ("auto", "fp32", "bf16"):
            raise ValueError(f"--dtype={self.dtype!r} is not one of auto, fp32, bf16")
        if self.train_only not in FREEZE_CHOICES:
            raise ValueError(f"--train-only={self.train_only!r} is not one of {', '.join(FREEZE_CHOICES)}")
        if self.activation_checkpointing not in CHECKPOINT_MODES:
            raise ValueError(f"--activation-checkpointing={self.activation_checkpointing!r} is not one of "
                             f"{', '.join(CHECKPOINT_MODES)}")
        if self.all_to_all not in ALL_TO_ALL:
            raise ValueError(f"--all-to-all={self.all_to_all!r} is not one of {', '.join(ALL_TO_ALL)}")
        if self.plan_strategy not in STRATEGIES:
            raise ValueError(f"--plan-strategy={self.plan_strategy!r} is not one of {', '.join(STRATEGIES)}")
        if not self.dist_timeout > 0:
            raise ValueError(f"--dist-timeout={self.dist_timeout!r} must be a positive number of seconds")
        if not self.lr > 0:
            raise ValueError(f"--lr={self.lr!r} must be > 0")
        for name in ("warmup_steps", "save_every", "eval_every", "skip_nonfinite"):
            if getattr(self, name) < 0:
                raise ValueError(f"{flag[name]}={getattr(self, name)!r} must be >= 0")
        if self.keep_last < 1:
            raise ValueError(f"--keep-last={self.keep_last!r} must be at least 1")
        if self.lora_rank is not None:
            self.lora_spec()
            if self.train_only != "none":
                raise ValueError(f"--train-only {self.train_only} and --lora-rank exclude each other: LoRA freezes the "
                                 f"whole base and trains only adapters (choose them with --lora-targets)")
        else:
            given = [f for f in ("lora_alpha", "lora_dropout", "lora_targets", "merge")
                     if getattr(self, f) != TrainConfig.__dataclass_fields__[f].default]
            if given:
                raise ValueError(f"--{given[0].replace('_', '-')} needs --lora-rank (LoRA is off without it)")

    def lora_spec(self):
        """The adapters this run trains (epkit.lora.LoraSpec), or None for a full fine-tune."""
        if self.lora_rank is None:
            return None
        from ..lora import LoraSpec
        return LoraSpec.from_groups(self.lora_rank, self.lora_alpha, self.lora_dropout, self.lora_targets)


def build_parser():
    p = settings_parser("Fine-tune a Mixtral with expert parallelism (DeepSpeed or Accelerate).")
    add_flags(p, TrainConfig)
    return p


def parse_config(argv: list[str] | None = None) -> TrainConfig:
    values = parse_flags(build_parser(), argv)
    if isinstance(values.get("betas"), list):
        values["betas"] = tuple(values["betas"])
    cfg = from_flags(TrainConfig, values)
    cfg.check()
    return cfg
