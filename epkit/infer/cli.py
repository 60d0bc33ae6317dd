"""The `launch/infer.py` command: JSONL requests in, JSONL results out, in input order.

    deepspeed --num_gpus 2 launch/infer.py --ep 2 --checkpoint DIR --prompts FILE.jsonl
    python launch/infer.py --checkpoint DIR < prompts.jsonl > results.jsonl
    python launch/infer.py --checkpoint BASE --lora RUN/final   # a LoRA adapter merged at load
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


from ..settings import add_flags, from_flags, parse_flags, settings_parser
from .config import EngineConfig
from .sampling import SamplingParams

DEFAULT_RUN_DIR = "outputs/default"
DEFAULT_CONFIG = os.path.join(os.path.dirname(__file__), "..", "..", "configs", "infer", "default.yaml")
BUILTIN_TEXT = ["The capital of France is", "Mixture-of-experts models route each token to",
                "Once upon a time", "The quick brown fox"]
BUILTIN_IDS = [[1, 15, 27, 301, 42], [1, 99, 7], [1, 250, 251, 252, 253, 254, 255, 256], [1, 5]]
SAMPLING_FLAGS = ("max_tokens", "temperature", "top_p", "top_k", "seed")


def model_flags(description: str) -> argparse.ArgumentParser:
    """A parser with the model and engine flags (launch/infer.py and launch/serve.py); the engine's are
    generated from `EngineConfig`'s fields."""
    p = settings_parser(description)
    p.add_argument("--checkpoint", default=None, help="HF Mixtral dir (or a fine-tune run dir holding final/); "
                   f"default: {DEFAULT_RUN_DIR} if it exists, else --preset with random weights")
    p.add_argument("--lora", default=None, help="a LoRA adapter (PEFT directory, or a --lora-rank run dir holding "
                   "final/) to merge into --checkpoint at load (default --checkpoint: the adapter's base)")
    p.add_argument("--preset", default=None, help="serve this preset with seeded random weights (no checkpoint)")
    p.add_argument("--random-seed", type=int, default=None, help="seed of the random weights (presets)")
    p.add_argument("--kv-cache-mib", type=float, default=None, help="KV cache size (default: from GPU memory)")
    add_flags(p, EngineConfig)
    p.set_defaults(ep=None)  # the command serves at the launched ranks' EP size unless told otherwise
    return p


def read_config(p: argparse.ArgumentParser, argv=None) -> argparse.Namespace:
    """Parse `argv`: configs/infer/default.yaml, then --config, give the defaults. A recipe may set this
    command's flags and the request defaults the shipped recipe gives (launch/serve.py shares it); any other
    setting is an error naming it. `engine` holds the EngineConfig; the other settings are attributes."""
    recipes = (os.path.abspath(DEFAULT_CONFIG),) if os.path.isfile(DEFAULT_CONFIG) else ()
    values = parse_flags(p, argv, recipes, allow=set(SAMPLING_FLAGS) | {"ignore_eos"})
    engine = from_flags(EngineConfig, values)
    if values.get("kv_cache_mib") is not None:
        engine.kv_cache_memory = int(values["kv_cache_mib"] * (1 << 20))
    engine.check()  # a bad --device, --max-model-len, --dist-timeout: one line, before any work
    return argparse.Namespace(engine=engine, **values)


def parse_args(argv=None) -> argparse.Namespace:
    p = model_flags("Serve a Mixtral checkpoint: JSONL prompts in, JSONL results out.")
    p.epilog = ("exit status: 0 every request served; 1 --compare found requests that differ; 2 bad input (nothing "
                "served); 3 some requests failed (their lines say why); 4 a rank stopped answering")
    p.add_argument("--prompts", default=None, help="JSONL file, '-' for stdin (default: stdin if piped, else "
                   "built-in prompts)")
    p.add_argument("--output", default=None, help="JSONL results (default: stdout)")
    for f in SAMPLING_FLAGS:
        p.add_argument("--" + f.replace("_", "-"), type=float if f in ("temperature", "top_p") else int, default=None,
                       help="default for requests that do not set it")
    p.add_argument("--ignore-eos", action="store_true", default=None, help="do not stop at the EOS token")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--verbose", action="store_true", default=None, help="also show DeepSpeed's and torch's log lines "
                   "and known warnings (hidden by default)")
    p.add_argument("--compare", default=None, help="a previous JSONL result (e.g. from another EP size): report "
                   "whether every request's token_ids agree and name those that differ; exit 1 if any does")
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


def build_llm(cfg):
    """(LLM, a description of what it serves) from read_config's settings; every rank calls it."""
    from ..args import ModelArgs
    from ..parallel import init_distributed
    from ..runtime import cpu_threads_per_rank
    from ..tokenizer import embedded_tokenizer
    from .build import random_model
    from .llm import LLM
    launched = int(os.environ.get("WORLD_SIZE", 1))
    engine = cfg.engine
    ep = engine.resolve_ep_size()
    engine.check_world(launched, ep)  # ep x dp = the launched ranks: one line on every rank, before any collective
    engine = engine.replace(ep_size=ep)
    init_distributed(timeout_s=engine.dist_timeout)
    cpu_threads_per_rank()
    lora = cfg.lora
    if lora is not None and cfg.preset:
        raise ValueError("--lora needs a base checkpoint (--checkpoint), not --preset")
    base = cfg.checkpoint if lora is None else lora_base(cfg.checkpoint, lora)
    ckpt = None if cfg.preset else resolve_checkpoint(base)
    if ckpt is not None:
        llm = LLM(ckpt, engine, lora=lora)
        total = sum(os.path.getsize(os.path.join(ckpt, f)) for f in os.listdir(ckpt) if f.endswith(".safetensors"))
        return llm, (f"{ckpt}{f' + LoRA {lora}' if lora else ''} (rank 0 read "
                     f"{llm.load_report.bytes_read / 2 ** 20:.1f} of {total / 2 ** 20:.1f} MiB of weights)")
    device = engine.resolve_device()
    preset = cfg.preset or "tiny"
    args = ModelArgs.from_name(preset)
    model = random_model(args, ep, device, engine.resolve_dtype(device), seed=cfg.random_seed or 0, router_std=0.5,
                         split=engine.expert_split)
    # presets are served with the shipped tokenizer (the default fine-tune's), if its ids fit the model
    return (LLM.from_model(model, engine, tokenizer=embedded_tokenizer(args.vocab_size)),
            f"preset {preset} (random weights, seed {cfg.random_seed or 0})")


def lora_base(checkpoint: str | None, lora: str) -> str:
    """--checkpoint, or else the base the adapter records (adapter_config.json's base_model_name_or_path)."""
    import json

    from ..lora_io import ADAPTER_CONFIG, adapter_dir
    if checkpoint is not None:
        return checkpoint
    file = os.path.join(adapter_dir(lora), ADAPTER_CONFIG)
    with open(file) as f:
        base = json.load(f).get("base_model_name_or_path")
    if not base or not os.path.isdir(base):
        raise ValueError(f"--lora {lora}: pass --checkpoint BASE (the adapter records base {base!r}, which is not a "
                         f"checkpoint directory here)")
    return base


def check_files(cfg) -> None:
    """--prompts, --output and --compare, checked on every rank before any work or collective."""
    if cfg.prompts not in (None, "-") and not os.path.isfile(cfg.prompts):
        raise FileNotFoundError(f"--prompts {cfg.prompts}: no such file")
    if not cfg.output and "WORLD_SIZE" in os.environ:
        raise ValueError("under a launcher the results would share stdout with its log lines; pass --output FILE")
    if cfg.output:
        out = os.path.abspath(cfg.output)
        if os.path.isdir(out):
            raise ValueError(f"--output {cfg.output} is a directory; give a file name")
        if cfg.prompts not in (None, "-") and out == os.path.abspath(cfg.prompts):
            raise ValueError(f"--output {cfg.output} is the --prompts file; the results would overwrite the prompts")
        from ..runtime import check_writable_dir
        check_writable_dir(os.path.dirname(out), "--output", cfg.output)  # the folder is created when missing
        if os.path.exists(out) and not os.access(out, os.W_OK):
            raise ValueError(f"--output {cfg.output} is not writable")
    if cfg.compare:
        read_results(cfg.compare)
    if cfg.lora is not None:
        from ..lora_io import adapter_dir
        adapter_dir(cfg.lora)  # raises FileNotFoundError on every rank alike


def read_results(path: str) -> list[dict]:
    """A previous run's JSONL results (for --compare); one line naming the file and line if it is not one."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"--compare {path}: no such file")
    out = []
    with open(path) as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                r = json.loads(line)
            except ValueError:
                r = None
            if not isinstance(r, dict) or not isinstance(r.get("token_ids", []), list):
                raise ValueError(f"--compare {path}: line {n} is not a result line (a JSON object with token_ids)")
            out.append(r)
    if not out:
        raise ValueError(f"--compare {path} holds no results")
    return out


def result_line(index: int, out=None, error: str | None = None) -> dict:
    """One output line. Every line has the same keys; an error line adds "error" (finish_reason "error")."""
    if out is not None and out.error is None:
        return {"index": index, "text": out.text, "token_ids": out.token_ids, "finish_reason": out.finish_reason,
                "timings": out.timings}
    return {"index": index, "text": None, "token_ids": out.token_ids if out is not None else [],
            "finish_reason": "error", "timings": out.timings if out is not None else {},
            "error": error if error is not None else out.error}


class ResultWriter:
    """Results in input order. To a file: each result is appended to FILE.partial as it finishes (a dead rank
    or a crash keeps every finished one there), and FILE is written whole, in order, at the end. To stdout:
    each result is printed as soon as every earlier one has been."""

    def __init__(self, path: str | None):
        self.path, self.lines, self._next = path, {}, 0
        self.partial = f"{path}.partial" if path else None
        if path:
            os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        self._file = open(self.partial, "w") if path else None

    def add(self, line: dict) -> None:
        self.lines[line["index"]] = line
        if self._file is not None:
            self._file.write(json.dumps(line) + "\n")
            self._file.flush()
            return
        while self._next in self.lines:
            sys.stdout.write(json.dumps(self.lines[self._next]) + "\n")
            self._next += 1
        sys.stdout.flush()

    def close(self) -> None:
        if self._file is None:
            return
        self._file.close()
        tmp = f"{self.path}.tmp"
        with open(tmp, "w") as f:
            f.writelines(json.dumps(self.lines[i]) + "\n" for i in sorted(self.lines))
        os.replace(tmp, self.path)
        os.remove(self.partial)


def main(argv=None) -> int:
    """Serve the requests; the exit status is in the --help epilog (0, 1 compare differs, 3 requests failed)."""
    cfg = parse_args(argv)
    from ..runtime import quiet
    quiet(bool(cfg.verbose))  # before DeepSpeed is imported
    check_files(cfg)  # before any rank joins a collective
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
        dp = f" x DP={cfg.engine.dp_size}" if cfg.engine.dp_size > 1 else ""
        print(f"serving {source} at EP={cfg.engine.resolve_ep_size()}{dp}: {len(reqs)} request(s)",
              file=sys.stderr, flush=True)
    good = [i for i, r in enumerate(reqs) if r[2] is None]
    writer = ResultWriter(cfg.output) if leader else None
    for i, (_, _, err) in enumerate(reqs):
        if err is not None:
            writer.add(result_line(i, error=err))
    t0 = time.perf_counter()
    try:
        outs = llm.generate([reqs[i][0] for i in good], [reqs[i][1] for i in good],
                            use_tqdm=leader and not cfg.no_progress,
                            on_finish=lambda pos, out: writer.add(result_line(good[pos], out)))
    except BaseException:
        if writer is not None and writer.partial:
            print(f"{len(writer.lines)} finished result(s) are in {writer.partial}", file=sys.stderr, flush=True)
        raise
    elapsed = time.perf_counter() - t0
    load = llm.expert_load()  # collective: every rank
    if not leader:
        return 0
    writer.close()
    by_index = dict(zip(good, outs))
    n_tok = sum(len(o.token_ids) for o in outs)
    failed = sum(1 for r in reqs if r[2]) + sum(1 for o in outs if o.error)
    print(f"done: {len(reqs)} request(s), {failed} failed, {n_tok} generated tokens in {elapsed:.2f}s "
          f"= {n_tok / max(elapsed, 1e-9):.1f} tokens/s; {llm.stats['steps']} steps, "
          f"{llm.scheduler.num_preemptions} preemptions", file=sys.stderr)
    shares = ", ".join(f"rank {r}: {s:.1%}" for r, s in enumerate(load["per_rank_share"]))
    print(f"expert load (routed tokens per EP rank): {shares}", file=sys.stderr, flush=True)
    if cfg.compare:
        ok = {i: o.token_ids for i, o in by_index.items() if o.error is None}
        if compare(cfg.compare, [ok.get(i) for i in range(len(reqs))]):
            return 1
    return 3 if failed else 0


def compare(path: str, ours: list) -> int:
    """Print whether `ours` (token ids per input line, None for a failed line) equals a previous result file,
    naming the requests that differ; 1 if any does."""
    theirs = read_results(path)
    if len(theirs) != len(ours):
        print(f"compare: {path} has {len(theirs)} results, this run {len(ours)}", file=sys.stderr, flush=True)
        return 1
    differ = [i for i, (t, o) in enumerate(zip(theirs, ours))
              if (None if t.get("finish_reason") == "error" else t.get("token_ids")) != o]
    same = len(ours) - len(differ)
    verdict = "agree" if not differ else "DIFFER in request(s) " + ", ".join(map(str, differ[:20])) + \
        (f" and {len(differ) - 20} more" if len(differ) > 20 else "")
    print(f"compare: {same}/{len(ours)} requests token-identical to {path}: outputs {verdict}", file=sys.stderr,
          flush=True)
    return 1 if differ else 0
