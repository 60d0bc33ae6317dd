"""Issue 14 on the 4-GPU machine: the steps that belong together, each a launch of the product's own commands,
their figures merged into ONE JSON (GPU name, config, figures; rewritten after every step, so a part cut short
keeps what it measured). `bash bench/run_gpu.sh x4train` / `x4serve` call it; EPKIT_REHEARSAL=1 runs the same
steps on the CPU with the tiny preset (4 gloo ranks), to prove the commands, flags and files.

    torchrun --nproc_per_node 4 bench/scale4.py model --layers 1 --dir /tmp/x4/model    # random checkpoint
    python bench/scale4.py chain --model /tmp/x4/model --work /tmp/x4 --out bench/results/x4train.json
    python bench/scale4.py parity --work /tmp/x4 --out bench/results/x4serve.json
    python bench/scale4.py collect --out bench/results/x4serve.json generate=FILE scaling=FILE

model   a layer-reduced Mixtral-8x7B-shape checkpoint with random weights and the shipped tokenizer, written
        once: each rank builds and writes its own experts (`random_model` + `save_pretrained`).
chain   (section "chain") the fine-tune's checkpoint story, at EP=4 on 4 GPUs:
          1. run A: launch/train.py --ep 4, 3 steps, a checkpoint after step 2 and final/ (losses, tokens/s);
          2. A's final/ (saved at EP=4) served by launch/infer.py at once at EP=1 on GPU 3 (the reference)
             and at EP=3 with the `balanced` plan on GPUs 0-2, then at EP=2 x DP=2 (`--compare` with EP=1);
          3. per-rank routed-token shares at EP=3 from A's recorded routing (epkit_plan.json), contiguous
             (3/3/2 experts) against balanced, beside the shares the EP=3 serve counted;
          4. run B: the same command SIGKILLed (its whole process group) once checkpoint-000002 is complete,
             then `--resume`d to the end: its per-step losses against A's (`losses_equal`, `max_abs_diff`)
             and its final weights against A's, byte for byte.
parity  (section "parity") launch/infer.py --preset (full 32-layer shape; random weights built on the GPUs,
        the same at any EP size, so nothing is written) at EP=4, EP=1 (one GPU) and EP=2 x DP=2, greedy,
        each `--compare`d with EP=4's tokens.
collect (section per NAME=FILE) folds other benchmarks' JSON (bench/train.py, generate.py, scaling.py) in.

Legend: A the uninterrupted run, B the killed and resumed one.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import random
import re
import signal
import socket
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run from a checkout

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
REHEARSAL = os.environ.get("EPKIT_REHEARSAL") == "1"
TRAIN, INFER = os.path.join(ROOT, "launch", "train.py"), os.path.join(ROOT, "launch", "infer.py")


def log(msg: str) -> None:
    print(f"[scale4 {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# ---- the combined JSON ----------------------------------------------------------------------------

def gpu_name() -> tuple[str, int]:
    """(name, count) from nvidia-smi, without starting CUDA in this process; ("cpu", 0) without GPUs."""
    try:
        names = subprocess.run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"], capture_output=True,
                               text=True, timeout=30).stdout.split("\n")
        names = [n.strip() for n in names if n.strip()]
        return (names[0], len(names)) if names else ("cpu", 0)
    except (OSError, subprocess.SubprocessError):
        return "cpu", 0


def update(path: str, section: str, data) -> dict:
    """Set `section` of the combined JSON at `path` (created with the GPU name and versions), atomically."""
    doc = {}
    if os.path.isfile(path):
        with open(path) as f:
            doc = json.load(f)
    if "gpu" not in doc:
        import torch
        name, count = gpu_name()
        doc = {"benchmark": "issue 14: Mixtral-8x7B shape on 4 GPUs (bench/scale4.py)", "gpu": name,
               "gpu_count": count, "rehearsal": REHEARSAL, "versions": {"torch": torch.__version__}, "sections": {}}
    doc["sections"][section] = data
    doc["updated_utc"] = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    from bench.timing import write_json  # imports torch: the orchestrator itself stays light
    write_json(path, doc)
    return doc


# ---- launching the product's commands -------------------------------------------------------------

def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


_STARTED: list[subprocess.Popen] = []  # ended with this process: a step's time limit (SIGTERM) kills them too


def _end_children(signum, frame):
    for proc in _STARTED:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    log(f"signal {signum}: ended {sum(p.returncode is None for p in _STARTED)} running launch(es); the JSON keeps "
        f"what finished")
    sys.exit(128 + signum)


def start(ranks: int, script: str, args: list, gpus: list[int] | None = None, name: str = "") -> dict:
    """Start `torchrun --nproc_per_node ranks script args` in its own process group (so a SIGKILL reaches
    every rank); `gpus`: CUDA_VISIBLE_DEVICES."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(ranks), "--master_port",
           str(free_port()), script, *map(str, args)]
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    if gpus is not None and not REHEARSAL:
        env["CUDA_VISIBLE_DEVICES"] = ",".join(map(str, gpus))
    log(f"{name}: {' '.join(cmd[2:])}" + (f" on GPUs {gpus}" if gpus is not None else ""))
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    _STARTED.append(proc)
    return {"name": name, "cmd": " ".join(cmd[2:]), "t0": time.perf_counter(), "ranks": ranks, "proc": proc}


def finish(run: dict, timeout: float) -> dict:
    """Wait for a started launch (killing its group after `timeout` s); its rc, wall time and last lines."""
    try:
        out, _ = run["proc"].communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(run["proc"].pid, signal.SIGKILL)
        out, _ = run["proc"].communicate()
        out += f"\n(killed after {timeout:.0f}s)"
    lines = [x for x in out.splitlines() if x.strip() and "Warning" not in x and "warn(" not in x]
    errors = [x for x in lines if x.startswith("error (rank") or re.match(r"\w*(Error|Exception): ", x)][:6]
    log(f"{run['name']}: rc={run['proc'].returncode} in {time.perf_counter() - run['t0']:.1f}s")
    if run["proc"].returncode:
        print("\n".join(errors or lines[-15:]), file=sys.stderr, flush=True)
    return {"cmd": run["cmd"], "ranks": run["ranks"], "rc": run["proc"].returncode,
            "wall_s": round(time.perf_counter() - run["t0"], 1), "errors": errors, "log_tail": lines[-12:],
            "_lines": lines}


def launch(ranks, script, args, gpus=None, name="", timeout=300) -> dict:
    r = finish(start(ranks, script, args, gpus, name), timeout)
    r.pop("_lines")
    return r


def infer(ranks: int, args: list, output: str, name: str, timeout: float, gpus=None) -> dict:
    """launch/infer.py with `args` writing `output`: its figures (`served`)."""
    return served(finish(start(ranks, INFER, args + ["--output", output], gpus, name), timeout), output)


# ---- reading the commands' outputs ----------------------------------------------------------------

def served(result: dict, output: str, reference: str | None = None) -> dict:
    """launch/infer.py's figures from its result file and stderr lines (tokens/s, --compare, expert load);
    `reference`: a result file to compare the tokens with here (for a run started before it existed)."""
    text = "\n".join(result.pop("_lines", result["log_tail"]))
    done = re.search(r"generated tokens in ([\d.]+)s = ([\d.]+) tokens/s", text)
    load = re.search(r"expert load \(routed tokens per EP rank\): (.*)", text)
    tokens = read_tokens(output)
    agree = re.search(r"compare: (\d+)/(\d+) requests token-identical", text)  # --compare's verdict
    same = (int(agree.group(1)), int(agree.group(2))) if agree else None
    if reference:
        theirs = read_tokens(reference)
        same = (sum(x == y for x, y in zip(tokens, theirs)) if len(tokens) == len(theirs) else 0, len(theirs))
    return {**result, "requests": len(tokens), "generated_tokens": sum(map(len, tokens)),
            "generate_s": float(done.group(1)) if done else None,
            "tokens_per_s": float(done.group(2)) if done else None,
            "identical_to_reference": None if same is None else same[0] == same[1] > 0,
            "identical_requests": None if same is None else f"{same[0]}/{same[1]}",
            "served_rank_share": [float(x) / 100 for x in re.findall(r"rank \d+: ([\d.]+)%", load.group(1))]
            if load else None}


def read_tokens(path: str) -> list[list[int]]:
    if not os.path.isfile(path):
        return []
    with open(path) as f:
        return [json.loads(x)["token_ids"] for x in f if x.strip()]


def losses(run_dir: str) -> list[dict]:
    """Per logged step of a run: loss and tokens/s ([] when the run logged nothing)."""
    from epkit.train.metrics import METRICS_FILE, read_metrics
    if not os.path.isfile(os.path.join(run_dir, METRICS_FILE)):
        return []
    return [{k: r[k] for k in ("step", "loss", "tokens_per_s")} for r in read_metrics(run_dir) if "loss" in r]


def same_weights(x: str, y: str) -> bool | None:
    """Whether two checkpoints hold byte-identical safetensors files (None: one is missing)."""
    import filecmp
    names = [sorted(f for f in os.listdir(d) if f.endswith(".safetensors")) if os.path.isdir(d) else None
             for d in (x, y)]
    if not names[0] or names[0] != names[1]:
        return None
    return all(filecmp.cmp(os.path.join(x, f), os.path.join(y, f), shallow=False) for f in names[0])


def write_prompts(path: str, vocab: int, n: int, lo: int, hi: int, new: int, seed: int = 0) -> str:
    rng = random.Random(seed)
    with open(path, "w") as f:
        for _ in range(n):
            ids = [rng.randrange(3, vocab) for _ in range(rng.randint(lo, hi))]
            f.write(json.dumps({"prompt_token_ids": ids, "max_tokens": new, "temperature": 0,
                                "ignore_eos": True}) + "\n")
    return path


def rank_shares(checkpoint: str, ep: int) -> dict:
    """Per-rank share of the routed tokens the checkpoint records, under contiguous and balanced plans."""
    from epkit.checkpoint import Manifest
    from epkit.plan import ShardingPlan
    m = Manifest.read(checkpoint)
    counts = m.routed_tokens
    out = {"routed_tokens_per_layer_expert": counts}
    for strategy in ("contiguous", "balanced"):
        plan = ShardingPlan.from_manifest(m, ep, strategy)
        per_rank = [sum(plan.rank_loads(row, layer)[r] for layer, row in enumerate(counts)) for r in range(ep)]
        total = sum(per_rank) or 1
        out[strategy] = {"experts_per_rank_layer0": [len(plan.local_experts(r, 0)) for r in range(ep)],
                         "owners_per_layer": [plan.owners(layer) for layer in range(len(counts))],
                         "rank_share": [round(x / total, 4) for x in per_rank],
                         "busiest_share": round(max(per_rank) / total, 4)}
    return out


# ---- the steps ------------------------------------------------------------------------------------

def cmd_model(a) -> int:
    """Every rank (torchrun): build the layer-reduced model at EP=world on its device and write its experts."""
    import torch

    import epkit
    from epkit.args import ModelArgs
    from epkit.infer.build import random_model
    from epkit.parallel import init_distributed, world_rank, world_size
    from epkit.runtime import quiet
    quiet()
    init_distributed()
    cuda = torch.cuda.is_available()
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if cuda else torch.device("cpu")
    args = ModelArgs.from_name(a.preset, num_layers=a.layers)
    t = time.perf_counter()
    model = random_model(args, world_size(), device, torch.bfloat16 if cuda else torch.float32, seed=a.seed,
                         router_std=0.5 if a.preset == "tiny" else None)
    from epkit.tokenizer import EMBEDDED
    epkit.save_pretrained(model, a.dir, tokenizer_dir=EMBEDDED)  # the shipped tokenizer: the fine-tune's data
    if world_rank() == 0:
        log(f"wrote {args.num_parameters() / 1e9:.2f}B-parameter {a.preset} with {a.layers} layer(s) to {a.dir} "
            f"in {time.perf_counter() - t:.1f}s")
    import torch.distributed as dist
    if dist.is_initialized():  # an orderly end: gloo's threads left to the interpreter's exit can abort it
        dist.barrier()  # NOTE: collective
        dist.destroy_process_group()
    return 0


def cmd_chain(a) -> int:
    os.makedirs(a.work, exist_ok=True)
    small = REHEARSAL
    steps, seq = (3, 32) if small else (a.steps, a.seq_len)
    section = {"config": {"layers": a.layers, "preset": a.preset, "ep": 4, "zero_stage": a.zero_stage,
                          "max_steps": steps, "save_every": 2, "seq_len": seq, "micro_batch": 1}}
    save = lambda: update(a.out, "chain", section)  # noqa: E731
    model = a.model or os.path.join(a.work, "model")
    if not os.path.isfile(os.path.join(model, "config.json")):
        section["model_write"] = launch(4, __file__, ["model", "--preset", a.preset, "--layers", a.layers,
                                                      "--dir", model], name="model", timeout=a.timeout)
        save()
    from epkit.args import ModelArgs
    vocab = ModelArgs.load(model).vocab_size
    train = ["--model", model, "--ep", 4, "--zero-stage", a.zero_stage, "--max-steps", steps, "--save-every", 2,
             "--keep-last", 1, "--seq-len", seq, "--micro-batch", 1, "--no-progress", "--seed", 0]
    run_a, run_b = os.path.join(a.work, "run_a"), os.path.join(a.work, "run_b")
    # 1. the uninterrupted run
    section["run_a"] = launch(4, TRAIN, train + ["--output-dir", run_a], name="train A", timeout=a.timeout)
    section["run_a"]["steps"] = losses(run_a)
    save()
    # 2. A's final checkpoint (saved at EP=4) served at EP=1 and EP=3 balanced at once, then EP=2 x DP=2
    final = os.path.join(run_a, "final")
    prompts = write_prompts(os.path.join(a.work, "chain_prompts.jsonl"), vocab, 8 if small else 16, 4,
                            24 if small else 256, 6 if small else 32)
    serve = ["--checkpoint", final, "--prompts", prompts, "--no-progress"]
    outs = {k: os.path.join(a.work, f"chain_{k}.jsonl") for k in ("ep1", "ep3_balanced", "ep2_dp2")}
    one = start(1, INFER, serve + ["--output", outs["ep1"]], gpus=[3], name="serve EP=1")
    three = start(3, INFER, serve + ["--ep", 3, "--strategy", "balanced", "--output", outs["ep3_balanced"]],
                  gpus=[0, 1, 2], name="serve EP=3 balanced")
    section["serve"] = {"ep1": served(finish(one, a.timeout), outs["ep1"])}
    section["serve"]["ep3_balanced"] = served(finish(three, a.timeout), outs["ep3_balanced"], outs["ep1"])
    save()
    section["serve"]["ep2_dp2"] = infer(4, serve + ["--ep", 2, "--dp", 2, "--compare", outs["ep1"]],
                                        outs["ep2_dp2"], "serve EP=2 x DP=2", a.timeout)
    # 3. the balanced plan from the fine-tune's routing
    section["ep3_rank_shares"] = rank_shares(final, 3)
    save()
    # 4. (the most disk: last) the same run killed once its first checkpoint is complete, then resumed
    marker = os.path.join(run_b, "checkpoint-000002", "epkit_checkpoint.json")
    b = start(4, TRAIN, train + ["--output-dir", run_b], name="train B")
    deadline = time.perf_counter() + a.timeout
    while not os.path.isfile(marker) and b["proc"].poll() is None and time.perf_counter() < deadline:
        time.sleep(0.1)
    killed = b["proc"].poll() is None
    if killed:
        os.killpg(b["proc"].pid, signal.SIGKILL)  # every rank at once, mid-run
    present = sorted(os.listdir(run_b)) if os.path.isdir(run_b) else []
    killed_run = finish(b, 60)
    killed_run.pop("_lines")
    section["run_b_killed"] = {**killed_run, "killed_after_checkpoint": killed and os.path.isfile(marker),
                               "steps_logged_before_kill": len(losses(run_b)), "run_dir_at_kill": present}
    section["run_b_resumed"] = launch(4, TRAIN, train + ["--output-dir", run_b, "--resume"], name="train B --resume",
                                      timeout=a.timeout)
    la, lb = section["run_a"]["steps"], losses(run_b)
    section["run_b_resumed"]["steps"] = lb
    pairs = [(x["loss"], y["loss"]) for x, y in zip(la, lb)]
    section["resume_check"] = {"steps_compared": len(pairs), "losses_equal": len(pairs) == steps and all(
        x == y for x, y in pairs), "max_abs_diff": max((abs(x - y) for x, y in pairs), default=None),
        "final_weights_identical": same_weights(os.path.join(run_a, "final"), os.path.join(run_b, "final"))}
    log(f"resume: {section['resume_check']}")
    save()
    return 0


def cmd_parity(a) -> int:
    os.makedirs(a.work, exist_ok=True)
    small = REHEARSAL
    preset = "tiny" if small else a.preset
    from epkit.args import ModelArgs
    vocab = ModelArgs.from_name(preset).vocab_size
    section = {"config": {"preset": preset, "random_seed": a.seed, "greedy": True, "layers":
                          ModelArgs.from_name(preset).num_layers}}
    prompts = write_prompts(os.path.join(a.work, "parity_prompts.jsonl"), vocab, 8 if small else a.requests,
                            4, 24 if small else 512, 6 if small else a.new_tokens)
    section["config"]["prompts"] = prompts
    base = ["--preset", preset, "--random-seed", a.seed, "--prompts", prompts, "--no-progress"]
    ref = os.path.join(a.work, "parity_ep4.jsonl")
    runs = {"ep4": (4, ["--ep", 4], None), "ep1": (1, ["--compare", ref], [0]),
            "ep2_dp2": (4, ["--ep", 2, "--dp", 2, "--compare", ref], None)}
    for name, (ranks, flags, gpus) in runs.items():  # EP=4 first: the others compare with it
        out = os.path.join(a.work, f"parity_{name}.jsonl")
        section[name] = infer(ranks, base + flags, out, f"parity {name}", a.timeout, gpus)
        update(a.out, "parity", section)
    return 0


def cmd_collect(a) -> int:
    for item in a.files:
        name, _, path = item.partition("=")
        files = sorted(f for f in (path.split(",") if "," in path else [path]) if os.path.isfile(f))
        if os.path.isdir(path):
            files = sorted(os.path.join(path, f) for f in os.listdir(path) if f.endswith(".json"))
        docs = []
        for f in files:
            with open(f) as fh:
                docs.append(json.load(fh))
        update(a.out, name, docs[0] if len(docs) == 1 else docs or {"missing": path})
    log(f"collected {', '.join(x.partition('=')[0] for x in a.files)} into {a.out}")
    return 0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    m = sub.add_parser("model", help="write a random layer-reduced checkpoint (under torchrun)")
    m.add_argument("--preset", default="tiny" if REHEARSAL else "mixtral-8x7b")
    m.add_argument("--layers", type=int, default=1)
    m.add_argument("--seed", type=int, default=0)
    m.add_argument("--dir", required=True)
    c = sub.add_parser("chain", help="fine-tune, kill, resume, serve at EP=4/3/1/2x2, balanced shares")
    c.add_argument("--model", default=None, help="checkpoint to fine-tune (default: WORK/model, written if missing)")
    c.add_argument("--preset", default="tiny" if REHEARSAL else "mixtral-8x7b")
    c.add_argument("--layers", type=int, default=2 if REHEARSAL else 1, help="of the written model")
    c.add_argument("--steps", type=int, default=3, help="optimizer steps; a checkpoint every 2 and a final one")
    c.add_argument("--seq-len", type=int, default=1024)
    c.add_argument("--zero-stage", type=int, default=2)
    v = sub.add_parser("parity", help="greedy tokens of the full preset at EP=4, EP=1 and EP=2 x DP=2")
    v.add_argument("--preset", default="mixtral-8x7b")
    v.add_argument("--seed", type=int, default=1)
    v.add_argument("--requests", type=int, default=32)
    v.add_argument("--new-tokens", type=int, default=32)
    for s in (c, v):
        s.add_argument("--work", required=True, help="folder for run directories, prompts and results")
        s.add_argument("--timeout", type=float, default=240, help="seconds per launch")
    k = sub.add_parser("collect", help="fold other benchmarks' JSON into the combined file")
    k.add_argument("files", nargs="+", help="NAME=FILE (or a folder, or FILE,FILE)")
    for s in (c, v, k):
        s.add_argument("--out", required=True, help="the combined JSON")
    a = p.parse_args(argv)
    signal.signal(signal.SIGTERM, _end_children)
    return {"model": cmd_model, "chain": cmd_chain, "parity": cmd_parity, "collect": cmd_collect}[a.cmd](a)


if __name__ == "__main__":
    sys.exit(main())
