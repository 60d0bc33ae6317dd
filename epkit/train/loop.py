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

from .. import data as data_lib
from ..tokenizer import EMBEDDED, Tokenizer, tokenizer_dir_for
from ..moe import load_balancing_loss, router_z_loss
from ..parallel import broadcast_object, init_distributed, world_rank, world_size
from ..runtime import cpu_threads_per_rank, quiet
from . import state as ckpt
from .config import TrainConfig
from .losses import linear_cross_entropy
from .optim import (check_plan_strategy, clip_exact, compile_dense, make_trainable, model_args_for, model_for,
                    reduce_on_device, resolve_dtype, trained_engine, uses_exact_clip)
from .metrics import Metrics


class DivergedError(RuntimeError):
    """The loss or the gradient norm stopped being finite; the run stops without saving the damage."""


def using_accelerate() -> bool:
    return os.environ.get("ACCELERATE_USE_DEEPSPEED", "").lower() == "true"


def _join_world(timeout_s: float):
    """Start or join the process group; `python launch/train.py` becomes a world of one. Under Accelerate the
    group is joined here too (Accelerate then uses it), so both paths get the same --dist-timeout."""
    if "WORLD_SIZE" not in os.environ:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    init_distributed(timeout_s=timeout_s)
    if using_accelerate():
        from accelerate import Accelerator
        return Accelerator()
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
    if world % cfg.ep_size:
        raise ValueError(f"--ep {cfg.ep_size} does not divide the number of ranks ({world})")
    if cfg.ep_size > args.num_experts:
        raise ValueError(f"--ep {cfg.ep_size} is larger than the model's {args.num_experts} experts")
    if cfg.seq_len > args.max_position_embeddings:
        raise ValueError(f"--seq-len {cfg.seq_len} is beyond the model's context (max_position_embeddings="
                         f"{args.max_position_embeddings})")
    tok_dir = cfg.tokenizer or tokenizer_dir_for(cfg.model)
    if tok_dir is None and os.path.isdir(cfg.model):
        raise ValueError(f"--model {cfg.model!r} has no tokenizer files; pass --tokenizer DIR (its tokenizer)")
    tok_dir = tok_dir or EMBEDDED  # presets: the embedded tokenizer
    tokenizer = Tokenizer(tok_dir)
    pad = args.pad_token_id if args.pad_token_id is not None else (args.eos_token_id or 0)
    kw = dict(bos_id=args.bos_token_id if args.bos_token_id is not None else 1,
              eos_id=args.eos_token_id if args.eos_token_id is not None else 2,
              pad_id=pad, vocab_size=args.vocab_size, seed=cfg.seed)
    train = data_lib.load_packed(cfg.data or data_lib.DEFAULT_DATA, tokenizer, cfg.seq_len, **kw)
    train.check_fits(cfg.micro_batch, world)
    evals = data_lib.load_packed(cfg.eval_data, tokenizer, cfg.seq_len, **kw) if cfg.eval_data else None
    run = ckpt.check_run_dir(cfg)  # last: the other checks are cheaper to fix
    return args, tok_dir, train, evals, run


def unpadded(batch: dict) -> bool:
    """True when every row of a (host-side) batch holds positions 0..T-1: the model may then attend with
    the causal flag alone (no mask). Checked on the CPU before the batch moves, so no device sync."""
    positions = batch["positions"]
    return bool((positions == torch.arange(positions.shape[1], device=positions.device)).all())


def lm_and_router_losses(model, batch: dict, aux_coef: float, z_coef: float, causal: bool = False,
                         count_routing: bool = True):
    """(total loss, [lm sum, trained tokens, aux, z]) for one micro-batch of this rank.

    `causal`: the batch is `unpadded`, so the model gets no positions and attends with SDPA's causal flag.
    The LM head and cross-entropy run chunk by chunk (`linear_cross_entropy`: no [B*T, V] fp32 logits).
    The model counts the routed real tokens into its `routing_stats` (unless `count_routing` is False);
    the aux loss reuses the expert ids the forward routed."""
    tokens, labels, positions = batch["tokens"], batch["labels"], batch["positions"]
    module = model.module if hasattr(model, "module") else model  # the DeepSpeed engine wraps the model
    out = model(tokens, None if causal else positions, count_routing=count_routing, return_hidden=True)
    h, router_logits = out  # [B, T, D], per layer [B*T, E]
    # token t+1 is the target of position t; the last position has none
    targets = torch.cat([labels[:, 1:], torch.full_like(labels[:, :1], data_lib.IGNORE)], dim=1)  # [B, T]
    lm_sum = linear_cross_entropy(h, module.lm_head.weight, targets)
    count = (targets != data_lib.IGNORE).sum()
    lm = lm_sum / count.clamp(min=1)
    args = module.args
    aux = load_balancing_loss(router_logits, args.num_experts, args.experts_per_token, mask=positions >= 0,
                              expert_ids=out.expert_ids)
    z = router_z_loss(router_logits) if z_coef > 0 else lm.new_zeros(())
    loss = lm + aux_coef * aux + z_coef * z
    return loss, torch.stack([lm_sum.detach(), count.float(), aux.detach(), z.detach()])


@torch.no_grad()
def evaluate(engine, model, evals: data_lib.PackedData, micro_batch: int, device) -> dict:
    """Loss and perplexity over every eval row (sharded over ranks). NOTE: one all-reduce at the end."""
    was_training = model.training
    engine.eval()
    sums = torch.zeros(2, dtype=torch.float64, device=device)
    for b in evals.eval_batches(micro_batch, world_rank(), world_size()):
        causal = unpadded(b)
        b = {k: v.to(device) for k, v in b.items()}
        _, parts = lm_and_router_losses(engine, b, 0.0, 0.0, causal, count_routing=False)
        sums += parts[:2].double()
    sums = reduce_on_device(sums, device).cpu()
    engine.train(was_training)
    loss = float(sums[0] / sums[1].clamp(min=1))
    return {"eval_loss": loss, "eval_ppl": math.exp(min(loss, 50.0)), "eval_tokens": int(sums[1])}


@torch.no_grad()
def _drop_gradients(model) -> None:
    """Make the coming optimizer step a no-op for every parameter (AdamW skips parameters without a gradient)."""
    for p in model.parameters():
        p.grad = None


def _check_nonfinite(cfg: TrainConfig, model, record: dict, count: int, last: str | None) -> None:
    """After a step whose loss or gradient norm is not finite (the same verdict on every rank: both are global):
    stop, unless --skip-nonfinite allows one more and the weights are still finite. NOTE: collective."""
    from ..parallel import all_ranks_ok
    where = f"the last checkpoint, {last}, is intact" if last else "no checkpoint was saved"
    what = f"step {record['step']}: the loss is {record['loss']:.4g} and the gradient norm {record['grad_norm']:.4g}"
    if count > cfg.skip_nonfinite:
        raise DivergedError(f"{what}: training diverged; stopping without saving ({where}). Lower --lr, or pass "
                            f"--skip-nonfinite N to skip up to N such steps")
    # NOTE: one host sync per parameter, only after a non-finite step
    if not all_ranks_ok(all(bool(torch.isfinite(p).all()) for p in model.parameters())):
        raise DivergedError(f"{what} and the weights are no longer finite; stopping without saving ({where})")


def _seed_everything(seed: int) -> None:
    import numpy as np
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def main(cfg: TrainConfig) -> str:
    """Train; return the path of the final checkpoint (a Hugging Face directory)."""
    quiet(cfg.verbose)  # before DeepSpeed is imported
    args, tok_dir, train, evals, run = check_inputs(cfg)
    resume_from = run.resume_from
    accelerator = _join_world(cfg.dist_timeout)
    threads = cpu_threads_per_rank()
    rank, world = world_rank(), world_size()
    run.run_id = broadcast_object(run.run_id)  # NOTE: collective: rank 0's id names the run
    if rank == 0:
        ckpt.write_run_file(cfg.output_dir, run)
    device = torch.device(f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}" if torch.cuda.is_available() else "cpu")
    _seed_everything(cfg.seed)
    dtype = resolve_dtype(cfg)
    # a LoRA checkpoint holds only the adapters: the base comes from --model
    model = model_for(cfg, args, device, dtype, checkpoint=None if cfg.lora_rank else resume_from)
    trainable = make_trainable(model, cfg, resume_from)
    if cfg.compile:
        compile_dense(model)
    with trained_engine(cfg, model, dtype, accelerator) as (engine, optimizer, scheduler):
        exact_clip = uses_exact_clip(engine)

        start_step, tokens_seen = 0, 0
        # This rank's tokens per expert over the whole run (the model's one counter, counted in every training
        # forward); checkpoints record the world's sum (epkit_plan.json "routed_tokens"), which the inference
        # engine's balanced placement reads. On `device`: the collectives below need it there (NCCL: CUDA only).
        model.routing_stats.reset()
        routed = model.routing_stats.counts(device)
        if resume_from is not None:
            saved = ckpt.load_engine_state(engine, model, resume_from)
            start_step, tokens_seen = saved["step"], saved["tokens_seen"]
            # read (and checked) on every rank, so a bad file fails every rank alike; rank 0 carries the world's sum
            counts = ckpt.saved_routing_counts(resume_from, args.num_layers, args.num_experts)
            if rank == 0:
                routed += torch.tensor(counts, dtype=torch.int64, device=device)
        metrics = Metrics(cfg.output_dir, cfg.max_steps, start_step, enabled=rank == 0, progress=cfg.progress,
                          tensorboard=cfg.tensorboard)
        for note in run.notes:
            metrics.write(note)
        if rank == 0:
            where = f"resuming from {resume_from} at step {start_step}" if resume_from else "starting from step 0"
            if cfg.resume and resume_from is None:
                where = f"--resume: no complete checkpoint in {cfg.output_dir}, starting from step 0"
            via = "accelerate" if accelerator is not None else "deepspeed"
            cpu = f", {threads} CPU thread(s) per rank" if device.type == "cpu" else ""
            adapters = " base, fp32 adapters" if cfg.lora_rank else ""
            metrics.write(f"epkit train ({via}): {world} rank(s), ep={cfg.ep_size}, "
                          f"zero={engine.zero_optimization_stage()}, {dtype}{adapters}{cpu}, "
                          f"{len(train)} rows x {cfg.seq_len} tokens, trainable {trainable}; {where}")
        aux_coef = args.router_aux_loss_coef if cfg.aux_loss_coef is None else cfg.aux_loss_coef
        unlogged = torch.zeros(args.num_layers, args.num_experts, dtype=torch.int64)  # routed since the last log line
        nonfinite = 0  # steps skipped for a non-finite loss or gradient norm
        for step in range(start_step, cfg.max_steps):
            t0 = time.perf_counter()
            engine.train()
            sums = torch.zeros(5, dtype=torch.float64, device=device)  # lm mean, trained tokens, aux, z, tokens
            lr = optimizer.param_groups[0]["lr"]
            grad_norm = None
            routed_before = routed.clone()
            for micro in range(cfg.grad_accum):
                batch = train.batch(step * cfg.grad_accum + micro, cfg.micro_batch, rank, world)
                causal = unpadded(batch)
                batch = {k: v.to(device) for k, v in batch.items()}
                loss, parts = lm_and_router_losses(engine, batch, aux_coef, cfg.z_loss_coef, causal)
                engine.backward(loss)
                if exact_clip and engine.is_gradient_accumulation_boundary():
                    grad_norm = clip_exact(model, cfg.grad_clip)
                    if not math.isfinite(grad_norm):
                        _drop_gradients(model)  # never apply a non-finite update (ZeRO 1/2 skip such steps themselves)
                engine.step()
                # per micro-batch: lm mean, aux, z as the loss saw them; token count for throughput
                sums += torch.stack([parts[0] / parts[1].clamp(min=1), parts[1], parts[2], parts[3],
                                     (batch["positions"] >= 0).sum().to(parts.dtype)]).double()
            if grad_norm is None:
                grad_norm = float(engine.get_global_grad_norm() or 0.0)
            # NOTE: collectives: loss/token sums and this step's routing counts over the world, on `device`
            sums = reduce_on_device(sums, device).cpu()
            step_routed = reduce_on_device(routed - routed_before, device).cpu()
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
            if not (math.isfinite(record["loss"]) and math.isfinite(grad_norm)):
                nonfinite += 1
                _check_nonfinite(cfg, model, record, nonfinite, ckpt.latest_checkpoint(cfg.output_dir, run.run_id))
                metrics.write(f"warning: step {step + 1}: loss {record['loss']:.4g}, gradient norm {grad_norm:.4g}: "
                              f"update skipped ({nonfinite} of --skip-nonfinite {cfg.skip_nonfinite})")
            done = step + 1 == cfg.max_steps
            if evals is not None and ((cfg.eval_every and (step + 1) % cfg.eval_every == 0) or done):
                result = {"step": step + 1, **evaluate(engine, model, evals, cfg.micro_batch, device)}
                metrics.log(result)
                metrics.write(f"step {step + 1}: eval loss {result['eval_loss']:.4f}, "
                              f"perplexity {result['eval_ppl']:.2f}")
            trainer_state = {"step": step + 1, "tokens_seen": tokens_seen, "config": dataclasses.asdict(cfg),
                             "run_id": run.run_id}
            if cfg.save_every and (step + 1) % cfg.save_every == 0 and not done:
                ckpt.save(engine, model, ckpt.step_dir(cfg.output_dir, step + 1), trainer_state, tok_dir)
                if rank == 0:
                    ckpt.prune(cfg.output_dir, cfg.keep_last, run.run_id)
        final = os.path.abspath(os.path.join(cfg.output_dir, "final"))
        if start_step < cfg.max_steps or resume_from is None or os.path.basename(resume_from) != "final":
            trainer_state = {"step": cfg.max_steps, "tokens_seen": tokens_seen, "config": dataclasses.asdict(cfg),
                             "run_id": run.run_id}
            ckpt.save(engine, model, final, trainer_state, tok_dir)
        if cfg.merge:
            ckpt.save_merged(model, os.path.join(cfg.output_dir, "merged"), tok_dir)
        metrics.close()
        if rank == 0:
            print(f"checkpoint: {final}", flush=True)
        return final
