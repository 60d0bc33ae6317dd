"""`main(cfg)`: a fine-tune from start (or `--resume`) to the final checkpoint.

Runs under `deepspeed --num_gpus N launch/train.py`, `accelerate launch ... launch/train.py` (Accelerate's
DeepSpeed plugin builds the same engine) or plain `python launch/train.py` (a world of one).

Every rank checks the settings, the model and the data before any collective and before anything is
written, so bad input gives the same one-line error on every rank and no half-written checkpoint.

Legend: B micro batch, T seq_len, V vocab.
"""
from __future__ import annotations

import dataclasses
import math
import os
import random
import socket
import time

import torch
import torch.nn.functional as F

from .. import data as data_lib
from ..moe import load_balancing_loss, router_z_loss
from ..parallel import init_distributed, is_distributed, world_rank, world_size
from . import state as ckpt
from .config import TrainConfig
from .engine import (build_model, check_plan_strategy, clip_exact, freeze, initialize, model_args_for,
                     reduce_on_device, resolve_dtype, uses_exact_clip)
from .metrics import Metrics


def using_accelerate() -> bool:
    return os.environ.get("ACCELERATE_USE_DEEPSPEED", "").lower() == "true"


def _join_world():
    """Start or join the process group; `python launch/train.py` becomes a world of one."""
    if "WORLD_SIZE" not in os.environ:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    if using_accelerate():
        from accelerate import Accelerator
        return Accelerator()
    init_distributed()
    return None


def check_inputs(cfg: TrainConfig):
    """Everything that can be checked without a collective; the same verdict on every rank."""
    cfg.check()
    if cfg.tensorboard:  # here, on every rank, not in Metrics (rank 0 only, after the first collectives)
        try:
            from torch.utils.tensorboard import SummaryWriter  # noqa: F401
        except ImportError:
            raise ImportError("--tensorboard needs the tensorboard package: pip install tensorboard") from None
    args = model_args_for(cfg)
    check_plan_strategy(cfg)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world % cfg.ep:
        raise ValueError(f"--ep {cfg.ep} does not divide the number of ranks ({world})")
    if cfg.ep > args.num_experts:
        raise ValueError(f"--ep {cfg.ep} is larger than the model's {args.num_experts} experts")
    if cfg.seq_len > args.max_position_embeddings:
        raise ValueError(f"--seq-len {cfg.seq_len} is beyond the model's context (max_position_embeddings="
                         f"{args.max_position_embeddings})")
    tok_dir = cfg.tokenizer or data_lib.tokenizer_dir_for(cfg.model)
    if tok_dir is None and os.path.isdir(cfg.model):
        raise ValueError(f"--model {cfg.model!r} has no tokenizer files; pass --tokenizer DIR (its tokenizer)")
    tok_dir = tok_dir or data_lib.DEFAULT_TOKENIZER  # presets: the embedded tokenizer
    tokenizer = data_lib.Tokenizer(tok_dir)
    pad = args.pad_token_id if args.pad_token_id is not None else (args.eos_token_id or 0)
    kw = dict(bos_id=args.bos_token_id if args.bos_token_id is not None else 1,
              eos_id=args.eos_token_id if args.eos_token_id is not None else 2,
              pad_id=pad, vocab_size=args.vocab_size, seed=cfg.seed)
    train = data_lib.load_packed(cfg.data or data_lib.DEFAULT_DATA, tokenizer, cfg.seq_len, **kw)
    train.check_fits(cfg.micro_batch, world)
    evals = data_lib.load_packed(cfg.eval_data, tokenizer, cfg.seq_len, **kw) if cfg.eval_data else None
    return args, tok_dir, train, evals


@torch.no_grad()
def count_routed(router_logits: list[torch.Tensor], real: torch.Tensor, k: int) -> torch.Tensor:
    """Tokens per expert per layer, [L, E] int64, over the real tokens (mask real [B, T])."""
    real = real.reshape(-1)  # [B*T]
    out = []
    for logits in router_logits:  # [B*T, E]
        chosen = logits[real].topk(k, dim=-1).indices.reshape(-1)  # Mixtral's top-k (softmax keeps the order)
        out.append(torch.zeros(logits.shape[-1], dtype=torch.int64, device=logits.device)
                   .scatter_add_(0, chosen, torch.ones_like(chosen)))
    return torch.stack(out)


def lm_and_router_losses(model, batch: dict, aux_coef: float, z_coef: float):
    """(total loss, [lm sum, trained tokens, aux, z], tokens per expert [L, E]) for one micro-batch of this rank.

    Routing is counted here from the router logits, over real tokens only: the MoE layers' own counters
    would count padding, and count twice under activation checkpointing (the forward runs again)."""
    tokens, labels, positions = batch["tokens"], batch["labels"], batch["positions"]
    logits, router_logits = model(tokens, positions)  # [B, T, V], per layer [B*T, E]
    targets = labels[:, 1:]  # [B, T-1]: token t+1 is the target of position t
    lm_sum = F.cross_entropy(logits[:, :-1].float().reshape(-1, logits.shape[-1]), targets.reshape(-1),
                             ignore_index=data_lib.IGNORE, reduction="sum")
    count = (targets != data_lib.IGNORE).sum()
    lm = lm_sum / count.clamp(min=1)
    args = model.args if hasattr(model, "args") else model.module.args
    aux = load_balancing_loss(router_logits, args.num_experts, args.experts_per_token, mask=positions >= 0)
    z = router_z_loss(router_logits) if z_coef > 0 else lm.new_zeros(())
    loss = lm + aux_coef * aux + z_coef * z
    routed = count_routed(router_logits, positions >= 0, args.experts_per_token)
    return loss, torch.stack([lm_sum.detach(), count.float(), aux.detach(), z.detach()]), routed


@torch.no_grad()
def evaluate(engine, model, evals: data_lib.PackedData, micro_batch: int, device) -> dict:
    """Loss and perplexity over every eval row (sharded over ranks). NOTE: one all-reduce at the end."""
    was_training = model.training
    engine.eval()
    sums = torch.zeros(2, dtype=torch.float64, device=device)
    for b in evals.eval_batches(micro_batch, world_rank(), world_size()):
        b = {k: v.to(device) for k, v in b.items()}
        _, parts, _ = lm_and_router_losses(engine, b, 0.0, 0.0)
        sums += parts[:2].double()
    sums = reduce_on_device(sums, device).cpu()
    engine.train(was_training)
    loss = float(sums[0] / sums[1].clamp(min=1))
    return {"eval_loss": loss, "eval_ppl": math.exp(min(loss, 50.0)), "eval_tokens": int(sums[1])}


def _load_counters(model, routed: torch.Tensor) -> None:
    """Put the run totals into the MoE counters for save_pretrained: under EP it sums every rank's counters;
    a plain model's are read on rank 0 only, so that rank gets the world's sum. NOTE: collective (EP=1)."""
    if getattr(model, "expert_parallel", None) is None and is_distributed():
        routed = reduce_on_device(routed.clone(), next(model.parameters()).device)
    for moe, row in zip(model.moe_layers(), routed):
        moe.routed_tokens.copy_(row.to(moe.routed_tokens.device))


def _seed_everything(seed: int) -> None:
    import numpy as np
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def main(cfg: TrainConfig) -> str:
    """Train; return the path of the final checkpoint (a Hugging Face directory)."""
    args, tok_dir, train, evals = check_inputs(cfg)
    resume_from = ckpt.latest_checkpoint(cfg.output_dir) if cfg.resume else None
    accelerator = _join_world()
    rank, world = world_rank(), world_size()
    device = torch.device(f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}" if torch.cuda.is_available() else "cpu")
    _seed_everything(cfg.seed)
    dtype = resolve_dtype(cfg)
    model = build_model(cfg, args, device, dtype, checkpoint=resume_from)
    for moe in model.moe_layers():
        moe.track_routing = False  # counted in lm_and_router_losses
    trainable = freeze(model, cfg.train_only)
    engine, optimizer, scheduler = initialize(cfg, model, dtype, accelerator)
    exact_clip = uses_exact_clip(engine)

    start_step, tokens_seen = 0, 0
    # This rank's tokens per expert over the whole run; checkpoints record the world's sum (epkit_plan.json
    # "routed_tokens"), which the inference engine's balanced placement reads.
    # Kept on `device`: the collectives below must get tensors there (NCCL takes only CUDA tensors).
    routed = torch.zeros(args.num_layers, args.num_experts, dtype=torch.int64, device=device)
    if resume_from is not None:
        saved = ckpt.load_engine_state(engine, model, resume_from)
        start_step, tokens_seen = saved["step"], saved["tokens_seen"]
        # read (and checked) on every rank, so a bad file fails every rank alike; rank 0 carries the world's sum
        counts = ckpt.saved_routing_counts(resume_from, args.num_layers, args.num_experts)
        if rank == 0:
            routed += torch.tensor(counts, dtype=torch.int64, device=device)
    metrics = Metrics(cfg.output_dir, cfg.max_steps, start_step, enabled=rank == 0, progress=cfg.progress,
                      tensorboard=cfg.tensorboard)
    if rank == 0:
        where = f"resuming from {resume_from} at step {start_step}" if resume_from else "starting from step 0"
        if cfg.resume and resume_from is None:
            where = f"--resume: no complete checkpoint in {cfg.output_dir}, starting from step 0"
        via = "accelerate" if accelerator is not None else "deepspeed"
        metrics.write(f"epkit train ({via}): {world} rank(s), ep={cfg.ep}, zero={engine.zero_optimization_stage()}, "
                      f"{dtype}, "
                      f"{len(train)} rows x {cfg.seq_len} tokens, trainable {trainable}; {where}")
    aux_coef = args.router_aux_loss_coef if cfg.aux_loss_coef is None else cfg.aux_loss_coef
    unlogged = torch.zeros(args.num_layers, args.num_experts, dtype=torch.int64)  # routed since the last log line
    for step in range(start_step, cfg.max_steps):
        t0 = time.perf_counter()
        engine.train()
        sums = torch.zeros(5, dtype=torch.float64, device=device)  # lm mean, trained tokens, aux, z, tokens
        lr = optimizer.param_groups[0]["lr"]
        grad_norm = None
        step_routed = torch.zeros_like(routed)
        for micro in range(cfg.grad_accum):
            batch = train.batch(step * cfg.grad_accum + micro, cfg.micro_batch, rank, world)
            batch = {k: v.to(device) for k, v in batch.items()}
            loss, parts, micro_routed = lm_and_router_losses(engine, batch, aux_coef, cfg.z_loss_coef)
            step_routed += micro_routed
            engine.backward(loss)
            if exact_clip and engine.is_gradient_accumulation_boundary():
                grad_norm = clip_exact(model, cfg.grad_clip)
            engine.step()
            # per micro-batch: lm mean, aux, z as the loss saw them; token count for throughput
            sums += torch.stack([parts[0] / parts[1].clamp(min=1), parts[1], parts[2], parts[3],
                                 (batch["positions"] >= 0).sum().to(parts.dtype)]).double()
        if grad_norm is None:
            grad_norm = float(engine.get_global_grad_norm() or 0.0)
        routed += step_routed
        # NOTE: collectives: loss/token sums and routing counts over the world, on `device`
        sums = reduce_on_device(sums, device).cpu()
        step_routed = reduce_on_device(step_routed, device).cpu()
        lm, aux, z = (sums[i].item() / (world * cfg.grad_accum) for i in (0, 2, 3))
        step_tokens = int(sums[4])
        tokens_seen += step_tokens
        elapsed = time.perf_counter() - t0
        unlogged += step_routed
        record = {"step": step + 1, "loss": lm + aux_coef * aux + cfg.z_loss_coef * z, "lm_loss": lm,
                  "aux_loss": aux, "z_loss": z, "lr": lr, "grad_norm": grad_norm, "tokens": step_tokens,
                  "tokens_per_s": step_tokens / max(elapsed, 1e-9), "expert_tokens": unlogged.tolist()}
        if (step + 1) % cfg.log_every == 0 or step + 1 == cfg.max_steps:
            metrics.log(record)
            unlogged.zero_()
        metrics.advance(record)
        done = step + 1 == cfg.max_steps
        if evals is not None and ((cfg.eval_every and (step + 1) % cfg.eval_every == 0) or done):
            result = {"step": step + 1, **evaluate(engine, model, evals, cfg.micro_batch, device)}
            metrics.log(result)
            metrics.write(f"step {step + 1}: eval loss {result['eval_loss']:.4f}, perplexity {result['eval_ppl']:.2f}")
        trainer_state = {"step": step + 1, "tokens_seen": tokens_seen, "config": dataclasses.asdict(cfg)}
        if cfg.save_every and (step + 1) % cfg.save_every == 0 and not done:
            _load_counters(model, routed)
            ckpt.save(engine, model, ckpt.step_dir(cfg.output_dir, step + 1), trainer_state, tok_dir)
            if rank == 0:
                ckpt.prune(cfg.output_dir, cfg.keep_last)
    final = os.path.abspath(os.path.join(cfg.output_dir, "final"))
    if start_step < cfg.max_steps or resume_from is None or os.path.basename(resume_from) != "final":
        trainer_state = {"step": cfg.max_steps, "tokens_seen": tokens_seen, "config": dataclasses.asdict(cfg)}
        _load_counters(model, routed)
        ckpt.save(engine, model, final, trainer_state, tok_dir)
    metrics.close()
    if rank == 0:
        print(f"checkpoint: {final}", flush=True)
    return final
