"""The `launch/infer.py` command: JSONL requests in, JSONL results out, in input order.

    deepspeed --num_gpus 2 launch/infer.py --ep 2 --checkpoint DIR --prompts FILE.jsonl
    python launch/infer.py --checkpoint DIR < prompts.jsonl > results.jsonl
    python launch/infer.py          # outputs/default (the default fine-tune) if there, else the tiny preset

An input line is {"prompt": "..."} or {"prompt_token_ids": [...]}, with optional max_tokens,
temperature, top_p, top_k, seed, stop (and the other SamplingParams fields). A line that cannot be
served gets {"finish_reason": "error", "error": "..."}; the others complete. At the end a summary
(tokens/s, per-rank expert load) goes to stderr.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time


from ..config import read_recipe
from .sampling import SamplingParams

DEFAULT_RUN_DIR = "outputs/default"
DEFAULT_CONFIG = os.path.join(os.path.dirname(__file__), "..", "..", "configs", "infer", "default.yaml")
BUILTIN_TEXT = ["The capital of France is", "Mixture-of-experts models route each token to",
                "Once upon a time", "The quick brown fox"]
BUILTIN_IDS = [[1, 15, 27, 301, 42], [1, 99, 7], [1, 250, 251, 252, 253, 254, 255, 256], [1, 5]]
SAMPLING_FLAGS = ("max_tokens", "temperature", "top_p", "top_k", "seed")
ENGINE_FLAGS = ("block_size", "max_num_seqs", "max_num_batched_tokens", "max_model_len", "gpu_memory_utilization")


def model_flags(description: str) -> argparse.ArgumentParser:
    """A parser with the model, expert-parallel and engine flags (launch/infer.py and launch/serve.py)."""
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--config", default=None, help="YAML of defaults (configs/infer/default.yaml is read first)")
    p.add_argument("--checkpoint", default=None, help="HF Mixtral dir (or a fine-tune run dir holding final/); "
                   f"default: {DEFAULT_RUN_DIR} if it exists, else --preset with random weights")
    p.add_argument("--preset", default=None, help="serve this preset with seeded random weights (no checkpoint)")
    p.add_argument("--ep", type=int, default=None, help="expert-parallel size (= number of launched ranks)")
    p.add_argument("--device", default=None, help="cuda:N or cpu (default: this rank's GPU, else cpu)")
    p.add_argument("--dtype", default=None, choices=["auto", "bf16", "fp16", "fp32"])
    p.add_argument("--kv-cache-mib", type=float, default=None, help="KV cache size (default: from GPU memory)")
    p.add_argument("--random-seed", type=int, default=None, help="seed of the random weights (presets)")
    for f in ENGINE_FLAGS:
        p.add_argument("--" + f.replace("_", "-"), type=float if f == "gpu_memory_utilization" else int, default=None)
    p.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)  # deepspeed's
    return p


def read_config(p: argparse.ArgumentParser, argv=None) -> argparse.Namespace:
    """Parse `argv`; settings not given on the command line come from --config, then the default recipe."""
    args = p.parse_args(argv)
    del args.local_rank
    cfg = read_recipe(os.path.abspath(DEFAULT_CONFIG)) if os.path.isfile(DEFAULT_CONFIG) else {}
    if args.config:
        cfg.update(read_recipe(args.config))
    for k, v in vars(args).items():
        if v is not None or k not in cfg:
            cfg[k] = v
    return argparse.Namespace(**cfg)


def parse_args(argv=None) -> argparse.Namespace:
    p = model_flags("Serve a Mixtral checkpoint: JSONL prompts in, JSONL results out.")
    p.add_argument("--prompts", default=None, help="JSONL file, '-' for stdin (default: stdin if piped, else "
                   "built-in prompts)")
    p.add_argument("--output", default=None, help="JSONL results (default: stdout)")
    for f in SAMPLING_FLAGS:
        p.add_argument("--" + f.replace("_", "-"), type=float if f in ("temperature", "top_p") else int, default=None,
                       help="default for requests that do not set it")
    p.add_argument("--ignore-eos", action="store_true", default=None, help="do not stop at the EOS token")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--compare", default=None, help="a previous JSONL result (e.g. from another EP size): report "
                   "whether every request's token_ids agree, exit 1 if not")
    return read_config(p, argv)


def resolve_checkpoint(path: str | None) -> str | None:
    """A checkpoint dir, or a fine-tune run dir whose final/ is the checkpoint; None: the preset."""
    if path is None:
        path = DEFAULT_RUN_DIR
        if not os.path.isdir(path):
            return None
    for cand in (path, os.path.join(path, "final")):
        if os.path.isfile(os.path.join(cand, "config.json")):
            return cand
    raise FileNotFoundError(f"{path}: no config.json (nor final/config.json), so this is not a checkpoint")


def read_requests(source, defaults: dict) -> list[tuple[object, SamplingParams | None, str | None]]:
    """(prompt, params, error) per line; a bad line keeps its place with an error."""
    reqs = []
    for n, line in enumerate(source, 1):
        if not line.strip():
            continue
        try:
            d = json.loads(line)
            if not isinstance(d, dict):
                raise ValueError(f"line {n}: expected a JSON object, got {type(d).__name__}")
            prompt = {k: d.pop(k) for k in ("prompt", "prompt_token_ids") if k in d}
            d.pop("request_id", None)
            params = SamplingParams.from_dict({**defaults, **d})
            reqs.append((prompt, params, None))
        except (ValueError, TypeError) as e:
            msg = str(e) if str(e).startswith("line ") else f"line {n}: {e}"
            reqs.append((None, None, msg))
    return reqs


def _dtype(name):
    import torch
    return {None: None, "auto": None, "bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[name]


def build_llm(cfg):
    from ..config import ModelArgs
    from ..parallel import init_distributed
    from .build import random_model
    from .engine import LLM, _default_device
    launched = int(os.environ.get("WORLD_SIZE", 1))
    ep = cfg.ep or launched
    if ep != launched:
        raise ValueError(f"--ep {ep} but {launched} rank(s) were launched; launch exactly --ep ranks "
                         f"(e.g. deepspeed --num_gpus {ep}), or leave --ep out to use them all")
    import torch
    if not torch.cuda.is_available() and "OMP_NUM_THREADS" not in os.environ:
        # NOTE: ranks sharing a CPU would otherwise each start one thread per core and contend.
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // int(os.environ.get("LOCAL_WORLD_SIZE", 1))))
    engine = {f: getattr(cfg, f) for f in ENGINE_FLAGS if getattr(cfg, f, None) is not None}
    if cfg.kv_cache_mib is not None:
        engine["kv_cache_memory"] = int(cfg.kv_cache_mib * (1 << 20))
    ckpt = None if cfg.preset else resolve_checkpoint(cfg.checkpoint)
    if ckpt is not None:
        llm = LLM(ckpt, ep=ep, device=cfg.device, dtype=_dtype(cfg.dtype), **engine)
        total = sum(os.path.getsize(os.path.join(ckpt, f)) for f in os.listdir(ckpt) if f.endswith(".safetensors"))
        return llm, (f"{ckpt} (rank 0 read {llm.load_report.bytes_read / 2 ** 20:.1f} of "
                     f"{total / 2 ** 20:.1f} MiB of weights)")
    init_distributed()
    device = torch.device(cfg.device) if cfg.device else _default_device()
    dtype = _dtype(cfg.dtype) or (torch.bfloat16 if device.type == "cuda" else torch.float32)
    preset = cfg.preset or "tiny"
    args = ModelArgs.from_name(preset)
    model = random_model(args, ep, device, dtype, seed=cfg.random_seed or 0, router_std=0.5)
    tokenizer = _embedded_tokenizer(args.vocab_size)
    return (LLM.from_model(model, tokenizer=tokenizer, **engine),
            f"preset {preset} (random weights, seed {cfg.random_seed or 0})")


def _embedded_tokenizer(vocab_size: int):
    """The tokenizer shipped in epkit/assets (the one the default fine-tune uses), if its ids fit the model."""
    from .engine import load_tokenizer
    assets = os.path.join(os.path.dirname(__file__), "..", "assets")
    tok = load_tokenizer(os.path.abspath(assets)) if os.path.isdir(assets) else None
    return tok if tok is not None and len(tok) <= vocab_size else None


def main(argv=None) -> int:
    cfg = parse_args(argv)
    if cfg.prompts not in (None, "-") and not os.path.isfile(cfg.prompts):  # before any rank joins a collective
        raise FileNotFoundError(f"--prompts {cfg.prompts}: no such file")
    llm, source = build_llm(cfg)
    from ..parallel import world_rank
    leader = world_rank() == 0
    defaults = {f: getattr(cfg, f) for f in SAMPLING_FLAGS + ("ignore_eos",) if getattr(cfg, f, None) is not None}
    reqs = []
    if leader:
        if cfg.prompts not in (None, "-"):
            with open(cfg.prompts) as f:
                reqs = read_requests(f, defaults)
        elif cfg.prompts == "-" or not sys.stdin.isatty():
            reqs = read_requests(sys.stdin, defaults)
        if not reqs and cfg.prompts is None:
            builtin = BUILTIN_TEXT if llm.tokenizer is not None else BUILTIN_IDS
            reqs = [({"prompt_token_ids" if isinstance(b, list) else "prompt": b}, SamplingParams(**defaults), None)
                    for b in builtin]
        print(f"serving {source} at EP={cfg.ep or int(os.environ.get('WORLD_SIZE', 1))}: {len(reqs)} request(s)",
              file=sys.stderr, flush=True)
    good = [i for i, r in enumerate(reqs) if r[2] is None]
    t0 = time.perf_counter()
    outs = llm.generate([reqs[i][0] for i in good], [reqs[i][1] for i in good],
                        use_tqdm=leader and not cfg.no_progress)
    elapsed = time.perf_counter() - t0
    load = llm.expert_load()  # collective: every rank
    if not leader:
        return 0
    by_index = dict(zip(good, outs))
    out_file = open(cfg.output, "w") if cfg.output else sys.stdout
    try:
        for i, (prompt, _, err) in enumerate(reqs):
            if err is not None:
                line = {"index": i, "text": None, "token_ids": [], "finish_reason": "error", "error": err}
            else:
                line = {"index": i, **by_index[i].to_dict()}
                line.pop("request_id")
            out_file.write(json.dumps(line) + "\n")
    finally:
        if out_file is not sys.stdout:
            out_file.close()
    n_tok = sum(len(o.token_ids) for o in outs)
    failed = sum(1 for r in reqs if r[2]) + sum(1 for o in outs if o.error)
    print(f"done: {len(reqs)} request(s), {failed} failed, {n_tok} generated tokens in {elapsed:.2f}s "
          f"= {n_tok / max(elapsed, 1e-9):.1f} tokens/s; {llm.stats['steps']} steps, "
          f"{llm.scheduler.num_preemptions} preemptions", file=sys.stderr)
    shares = ", ".join(f"rank {r}: {s:.1%}" for r, s in enumerate(load["per_rank_share"]))
    print(f"expert load (routed tokens per EP rank): {shares}", file=sys.stderr, flush=True)
    if cfg.compare:
        ok = {i: o.token_ids for i, o in by_index.items() if o.error is None}
        return compare(cfg.compare, [ok.get(i) for i in range(len(reqs))])
    return 0


def compare(path: str, ours: list) -> int:
    """Print whether `ours` (token ids per input line, None for a failed line) equals a previous result file."""
    with open(path) as f:
        theirs = [json.loads(line) for line in f if line.strip()]
    if len(theirs) != len(ours):
        print(f"compare: {path} has {len(theirs)} results, this run {len(ours)}", file=sys.stderr, flush=True)
        return 1
    same = sum(1 for t, o in zip(theirs, ours)
               if (None if t.get("finish_reason") == "error" else t.get("token_ids")) == o)
    verdict = "agree" if same == len(ours) else "DIFFER"
    print(f"compare: {same}/{len(ours)} requests token-identical to {path}: outputs {verdict}", file=sys.stderr,
          flush=True)
    return 0 if same == len(ours) else 1
