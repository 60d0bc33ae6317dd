#!/usr/bin/env bash
# The main job on the embedded default (no arguments, no download):
#   1. fine-tune the `tiny` Mixtral on the embedded corpus with its experts split over 2 ranks (EP=2),
#   2. serve the checkpoint it wrote at EP=2,
#   3. serve it again at EP=1 and check both servings produced the same tokens (exit 1 if not).
# On a machine without GPUs, DeepSpeed runs both ranks on the CPU (gloo).
set -euo pipefail
cd "$(dirname "$0")/.."
RUN=${EPKIT_RUN_DIR:-outputs/default}
free_port() { python -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }

echo "== 1/3 fine-tune at EP=2 -> $RUN"
deepspeed --master_port "$(free_port)" --num_gpus 2 launch/train.py --ep 2 --output-dir "$RUN" --resume  # a re-run continues it

echo "== 2/3 serve $RUN/final at EP=2"
deepspeed --master_port "$(free_port)" --num_gpus 2 launch/infer.py --ep 2 --checkpoint "$RUN/final" \
    --output "$RUN/served-ep2.jsonl"
python - "$RUN/served-ep2.jsonl" <<'PY'
import json, sys
for line in open(sys.argv[1]):
    r = json.loads(line)
    print(f"  #{r['index']}: {r['text']!r}" if r.get("text") is not None else f"  #{r['index']}: {r['token_ids']}")
PY

echo "== 3/3 serve it at EP=1 and compare with EP=2"
python launch/infer.py --checkpoint "$RUN/final" --output "$RUN/served-ep1.jsonl" --compare "$RUN/served-ep2.jsonl"
