#!/usr/bin/env bash
# The main job on the embedded default (no arguments, no download):
#   1. fine-tune the `tiny` Mixtral on the embedded corpus with its experts split over 2 ranks (EP=2),
#   2. serve the checkpoint it wrote at EP=2 and at EP=1,
#   3. show that both servings produced the same tokens.
# On a machine without GPUs, DeepSpeed runs both ranks on the CPU (gloo).
set -euo pipefail
cd "$(dirname "$0")/.."
RUN=${EPKIT_RUN_DIR:-outputs/default}
free_port() { python -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }

echo "== 1/3 fine-tune at EP=2 -> $RUN"
deepspeed --master_port "$(free_port)" --num_gpus 2 launch/train.py --ep 2 --output-dir "$RUN"

echo "== 2/3 serve $RUN/final at EP=2 and at EP=1"
deepspeed --master_port "$(free_port)" --num_gpus 2 launch/infer.py --ep 2 --checkpoint "$RUN/final" --output "$RUN/served-ep2.jsonl"
python launch/infer.py --checkpoint "$RUN/final" --output "$RUN/served-ep1.jsonl"

echo "== 3/3 compare"
python launch/compare_outputs.py "$RUN/served-ep2.jsonl" "$RUN/served-ep1.jsonl"
