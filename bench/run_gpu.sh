#!/usr/bin/env bash
# One device-machine call per part: install the carried wheels, then run that part's benchmarks in
# priority order, each under its own time limit, copying every JSON to $OUT as soon as it exists.
#   bash bench/run_gpu.sh infer    # decode profile, scaling EP=1 vs EP=2 (replicated, dp), serving vs transformers
#   bash bench/run_gpu.sh train    # gpu_check, training vs peers, LoRA on the full 8x7B shape
#   bash bench/run_gpu.sh peers    # serving vs transformers CB, training peers in fresh processes, decode vs generate
# Needs the wheels of ../shared/gpu-wheels copied into .whl/ (carried) on the CUDA image.
set -u
part=${1:?infer or train}
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    || { echo "wheel install failed"; exit 1; }
export PYTHONPATH=/tmp/site:$PWD PATH=/tmp/site/bin:$PATH PYTHONUNBUFFERED=1
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 TORCH_CUDA_ARCH_LIST=9.0
nvidia-smi -L
T0=$(date +%s)
touch /tmp/run_gpu.start
step() {  # step NAME SECONDS CMD...: run with a limit, say how it ended and how long it took
    local name=$1 limit=$2; shift 2
    local t=$(date +%s)
    echo "=== [$(( t - T0 ))s] $name (limit ${limit}s)"
    timeout --signal=TERM --kill-after=15 "$limit" "$@" 2>&1 | grep -v -E "^\[rank[0-9]\]:\[W|UserWarning|warnings.warn"
    echo "=== $name rc=${PIPESTATUS[0]} in $(( $(date +%s) - t ))s"
    find bench/results -name "*.json" -newer /tmp/run_gpu.start -exec cp {} "$OUT"/ \;  # only this call's files
}
R=bench/results
case $part in
infer)
    step profile_decode 170 torchrun --nproc_per_node 2 bench/profile_decode.py --variants reference,triton,compile \
        --batch-sizes 1,16,64,256 --steps 16 --profile-steps 4 --out $R/profile_decode-h200x2.json
    step scaling_ep1 110 torchrun --nproc_per_node 1 bench/scaling.py --out $R/scaling-h200x2.json
    step scaling_ep2 140 torchrun --nproc_per_node 2 bench/scaling.py --out $R/scaling-h200x2.json
    step serve 150 torchrun --nproc_per_node 2 bench/serve.py --hf-timeout 90 --out $R/serve-h200x2.json
    ;;
train)
    step gpu_check 240 torchrun --nproc_per_node 2 bench/gpu_check.py
    step train 260 torchrun --nproc_per_node 2 bench/train.py --grad-accum 4 --steps 6 --out $R
    step lora 200 torchrun --nproc_per_node 2 bench/lora.py --steps 50 --activation-checkpointing --out $R
    ;;
peers)  # each training peer in a fresh process (in one process the earlier variants' memory starved them)
    step serve 230 torchrun --nproc_per_node 2 bench/serve.py --hf-timeout 90 --out $R/serve-h200x2.json
    step train_tf 100 torchrun --nproc_per_node 2 bench/train.py --grad-accum 4 --steps 6 --profile-steps 1 \
        --variants epkit_ep2,transformers_zero2 --out $R
    step train_ds 100 torchrun --nproc_per_node 2 bench/train.py --grad-accum 4 --steps 6 --profile-steps 1 \
        --variants deepspeed_moe_ep2 --out $R
    step generate 110 torchrun --nproc_per_node 2 bench/generate.py --batch-sizes 1,64 --new-tokens 32
    ;;
recheck)  # the decode path after the set-up-time expert-tile choice, beside transformers generate
    step profile_decode 150 torchrun --nproc_per_node 2 bench/profile_decode.py --variants triton,reference \
        --batch-sizes 1,16,64,256 --steps 16 --profile-steps 4 --out $R/profile_decode-h200x2-recheck.json
    step generate 110 torchrun --nproc_per_node 2 bench/generate.py --batch-sizes 1,64 --new-tokens 32
    ;;
symm)  # after the symmetric-memory EP sum: the asserting GPU check, decode with and without it, beside transformers
    step gpu_check 170 torchrun --nproc_per_node 2 bench/gpu_check.py --out $R
    step profile_decode 170 torchrun --nproc_per_node 2 bench/profile_decode.py --variants triton,triton-nccl \
        --batch-sizes 1,16,64,256 --steps 16 --profile-steps 4 --out $R/profile_decode-h200x2-symm.json
    step generate 110 torchrun --nproc_per_node 2 bench/generate.py --batch-sizes 1,64 --new-tokens 32
    ;;
scale4)  # on the 4-GPU machine: EP=1 on one GPU, EP=4 and the uneven EP=3 (3/3/2 experts) on 4 and 3
    step scaling_ep1 110 torchrun --nproc_per_node 1 bench/scaling.py --out $R/scaling-h200x4.json
    step scaling_ep4 150 torchrun --nproc_per_node 4 bench/scaling.py --out $R/scaling-h200x4.json
    step scaling_ep3 150 torchrun --nproc_per_node 3 bench/scaling.py --out $R/scaling-h200x4.json
    ;;
esac
echo "=== total $(( $(date +%s) - T0 ))s"
