"""Fine-tuning: DeepSpeed engine (ZeRO 0/1/2, MoE optimizer groups), loop, metrics, save/resume.

    config   TrainConfig, YAML recipe + command line
    optim    model build, freezing, optimizer groups, schedule, exact clipping, deepspeed.initialize / Accelerate
    losses   the LM head + cross-entropy in chunks (no [tokens, vocab] fp32 logits)
    state    checkpoints (HF directory + per-rank engine state), resume, keep-last-K
    metrics  tqdm, metrics.jsonl, TensorBoard
    loop     main(cfg)
"""
from .config import TrainConfig, parse_config
from .loop import main

__all__ = ["TrainConfig", "parse_config", "main"]
