"""Mutation testing of the sampler's CUDA-only code, on a GPU (tests/mutation.sh runs the rest on the CPU).

mutmut's CPU run cannot judge the mutants of `to_device`'s and `HostCopy.__init__`'s CUDA branches. This
script takes every mutant of those two functions from the file mutmut wrote (mutants/epkit/infer/sampling.py),
puts each in place of the original in turn, and runs bench/gpu_check.py's `host_transfers` and `sampling_cuda`
checks: a mutant is killed when a check fails or raises. The unmutated code must pass first.

    MUTMUT_CHILDREN=1 tests/mutation.sh                      # on the CPU: writes mutants/
    python tests/mutation_gpu.py [--mutants mutants/epkit/infer/sampling.py] [--out DIR]   # on a CUDA machine
"""
from __future__ import annotations

import argparse
import ast
import json
import os
import re
import sys
import textwrap
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
TARGETS = {"x_to_device": "to_device", "xǁHostCopyǁ__init__": "HostCopy.__init__"}  # mutmut's name: the original


def mutants_in(path: str) -> dict[str, tuple[str, str]]:
    """{mutant name: (target, source)} for every mutant of TARGETS in mutmut's mutated copy of sampling.py."""
    with open(path) as f:
        src = f.read()
    found = {}
    for node in ast.walk(ast.parse(src)):
        if isinstance(node, ast.FunctionDef):
            m = re.fullmatch(r"(.+)__mutmut_(\d+)", node.name)
            if m and m.group(1) in TARGETS:
                found[node.name] = (TARGETS[m.group(1)], textwrap.dedent(ast.get_source_segment(src, node)))
    return dict(sorted(found.items(), key=lambda kv: (kv[1][0], int(kv[0].rsplit("_", 1)[1]))))


def put_in_place(target: str, name: str, source: str):
    """Define the mutant in sampling's namespace and install it where `target` is; returns the undo."""
    from epkit.infer import sampling
    scope = dict(vars(sampling))
    exec(compile(source, f"<{name}>", "exec"), scope)
    fn = scope[name]
    if target == "HostCopy.__init__":
        orig = sampling.HostCopy.__dict__["__init__"]
        sampling.HostCopy.__init__ = fn
        return lambda: setattr(sampling.HostCopy, "__init__", orig)
    orig = sampling.to_device
    sampling.to_device = fn
    return lambda: setattr(sampling, "to_device", orig)


def verdict(device) -> tuple[bool, str]:
    """(passes, why not): bench/gpu_check.py's host_transfers and sampling_cuda checks, errors as failures."""
    from bench.gpu_check import check_host_transfers, check_sampling_cuda
    for check in (check_host_transfers, check_sampling_cuda):
        try:
            r = check(device)
        except Exception as e:  # noqa: BLE001 - a mutant that raises is killed
            torch.cuda.synchronize(device)
            return False, f"{check.__name__} raised {type(e).__name__}: {str(e).splitlines()[0][:100]}"
        if r.status != "PASS":
            return False, f"{r.name}: {r.detail[:120]}"
    return True, ""


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--mutants", default=os.path.join(ROOT, "mutants/epkit/infer/sampling.py"))
    p.add_argument("--out", default=os.path.join(ROOT, "bench/results"))
    a = p.parse_args(argv)
    if not torch.cuda.is_available():
        print("mutation_gpu needs a CUDA GPU", file=sys.stderr)
        return 2
    dev = torch.device("cuda", 0)
    todo = mutants_in(a.mutants)
    if not todo:
        print(f"no mutants of {', '.join(TARGETS.values())} in {a.mutants}: run tests/mutation.sh first",
              file=sys.stderr)
        return 2
    ok, why = verdict(dev)
    if not ok:
        print(f"the unmutated code fails the checks, so no mutant can be judged: {why}", file=sys.stderr)
        return 1
    rows = []
    for name, (target, source) in todo.items():
        undo = put_in_place(target, name, source)
        try:
            passed, why = verdict(dev)
        finally:
            undo()
        rows.append({"mutant": name, "target": target, "killed": not passed, "by": why})
        print(f"{'killed  ' if not passed else 'SURVIVED'} {name:34s} {why}", flush=True)
    killed = sum(r["killed"] for r in rows)
    print(f"{killed} of {len(rows)} CUDA-branch mutants of sampling.py killed on {torch.cuda.get_device_name(dev)}")
    os.makedirs(a.out, exist_ok=True)
    stamp = time.strftime("%Y%m%dT%H%M")
    with open(os.path.join(a.out, f"mutation_gpu-{stamp}.json"), "w") as f:
        json.dump({"gpu": torch.cuda.get_device_name(dev), "torch": torch.__version__, "killed": killed,
                   "mutants": len(rows), "rows": rows}, f, indent=1)
    return 0 if killed == len(rows) else 1


if __name__ == "__main__":
    sys.exit(main())
