#!/usr/bin/env bash
# Mutation testing with mutmut 3 (pip install -e .[mutation]); not part of CI.
#
#   tests/mutation.sh                 # every mutant of the modules below, then the score per module
#   tests/mutation.sh 'epkit.plan.*'  # (re)test only some mutants (mutmut's name globs); the score is still
#                                     # reported over every module, from the results mutmut keeps
#   tests/mutation.sh $(sed -n 's/^ *\(.*\): survived$/\1/p' mutants/results.txt)   # re-test the survivors
#   MUTMUT_TIME_LIMIT=3600 MUTMUT_CHILDREN=2 tests/mutation.sh
#
# What is mutated: epkit/moe.py, epkit/plan.py, epkit/infer/sampling.py, epkit/infer/scheduler.py and the
# learning-rate schedule (epkit.train.optim.lr_lambda). Which tests run: the fast unit tests of those modules,
# listed under [mutmut] in setup.cfg (no multi-process or launcher tests). mutmut copies the tree to mutants/
# and keeps its results there; every mutant the globs name is tested again (the default: all of them).
# tests/README.md: how long it takes, the scores, and why each surviving mutant is left alive.
set -uo pipefail
cd "$(dirname "$0")/.."
unset PYTHONPATH  # mutmut imports the mutated copy from mutants/; PYTHONPATH=$PWD would import the original
export OMP_NUM_THREADS=1 TOKENIZERS_PARALLELISM=false
wanted=('epkit.moe.*' 'epkit.plan.*' 'epkit.infer.sampling.*' 'epkit.infer.scheduler.*' 'epkit.train.optim.x_lr_lambda*')
[ $# -eq 0 ] && set -- "${wanted[@]}"
mkdir -p mutants
timeout "${MUTMUT_TIME_LIMIT:-7200}" mutmut run --max-children "${MUTMUT_CHILDREN:-2}" "$@" > mutants/run.log 2>&1
status=$?
[ $status -eq 124 ] && echo "mutmut stopped after ${MUTMUT_TIME_LIMIT:-7200}s: the score below is partial"
mutmut results --all true > mutants/results.txt
python - mutants/results.txt "${wanted[@]}" <<'PY'
import collections, fnmatch, sys
results, wanted = sys.argv[1], sys.argv[2:]
count = collections.defaultdict(collections.Counter)
survivors = []
for line in open(results):
    if ":" not in line:
        continue
    name, status = (x.strip() for x in line.rsplit(":", 1))
    if not any(fnmatch.fnmatch(name, w) for w in wanted) or status == "not checked":
        continue
    module = name.split(".x")[0]
    count[module][status] += 1
    if status in ("survived", "no tests"):
        survivors.append(name)
total = collections.Counter()
for module, c in sorted(count.items()):
    total += c
    killed = c["killed"] + c["timeout"]
    print(f"{module:28s} {killed:5d} / {sum(c.values()):5d} killed ({killed / sum(c.values()):.1%})  {dict(c)}")
killed = total["killed"] + total["timeout"]
print(f"{'all':28s} {killed:5d} / {sum(total.values()):5d} killed ({killed / max(1, sum(total.values())):.1%})")
print("survivors (mutmut show NAME):", *survivors, sep="\n  ")
PY
