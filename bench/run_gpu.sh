#!/usr/bin/env bash
# One device-machine call per part: install the carried wheels, then run that part's benchmarks in
# priority order, each under its own time limit, copying every JSON to $OUT as soon as it exists.
#   bash bench/run_gpu.sh infer    # decode profile, scaling EP=1 vs EP=2 (replicated, dp), serving vs transformers
#   bash bench/run_gpu.sh train    # gpu_check, training vs peers, LoRA on the full 8x7B shape
#   bash bench/run_gpu.sh peers    # serving vs transformers CB, training peers in fresh processes, decode vs generate
#   bash bench/run_gpu.sh x4train  # nvidia-h200-x4, issue 14: fine-tune figures, kill + resume, cross-EP serving
#   bash bench/run_gpu.sh prefill  # 2 GPUs: prefill vs transformers, MoE layer at 4096 tokens, serving load
#   bash bench/run_gpu.sh kernels  # 2 GPUs: sampler mutants on the GPU, gpu_check, prefill profile and vs transformers
#   bash bench/run_gpu.sh x4serve  # 4 GPUs (nvidia-h200-x4), issue 14: full 8x7B greedy parity, decode, 128 requests
#   bash bench/run_gpu.sh x1d      # 1 GPU: training fast path vs transformers (50-step losses, accumulation 8), serving
#   bash bench/run_gpu.sh x1g      # 1 GPU: the 512-request serving load at EP=1
#   bash bench/run_gpu.sh x2train  # 2 GPUs, issue 12: the training fast path at EP=2 beside the peers
# Needs the wheels of ../shared/gpu-wheels copied into .whl/ (carried) on the CUDA image.
# EPKIT_REHEARSAL=1: the same steps on this machine's CPU (tiny preset, 4 gloo ranks, no wheels, no GPU).
set -u
part=${1:?infer or train}
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
if [ "${EPKIT_REHEARSAL:-0}" = 1 ]; then
    export PYTHONPATH=$PWD PYTHONUNBUFFERED=1 OMP_NUM_THREADS=1 EPKIT_REHEARSAL=1
else
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
        || { echo "wheel install failed"; exit 1; }
    export PYTHONPATH=/tmp/site:$PWD PATH=/tmp/site/bin:$PATH PYTHONUNBUFFERED=1
    export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 TORCH_CUDA_ARCH_LIST=9.0
    nvidia-smi -L
fi
rehearse() { [ "${EPKIT_REHEARSAL:-0}" = 1 ] && echo "$1" || echo "$2"; }  # rehearse CPU-ARGS GPU-ARGS
T0=$(date +%s)
touch /tmp/run_gpu.start
step() {  # step NAME SECONDS CMD...: run with a limit, say how it ended and how long it took
    local name=$1 limit=$2; shift 2
    local t=$(date +%s)
    echo "=== [$(( t - T0 ))s] $name (limit ${limit}s)"
    timeout --signal=TERM --kill-after=15 "$limit" "$@" 2>&1 | grep -v -E "^\[rank[0-9]\]:\[W|UserWarning|warnings.warn"
    echo "=== $name rc=${PIPESTATUS[0]} in $(( $(date +%s) - t ))s"
    find $R -name "*.json" -newer /tmp/run_gpu.start -exec cp {} "$OUT"/ \;  # only this call's files
}
R=$(rehearse /tmp/epkit-rehearsal/results bench/results)  # a rehearsal leaves the checkout's results alone
mkdir -p $R
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
x2rows)  # 2 x H200: the asserting gpu_check, decode with whole experts vs rows beside transformers, training with
    # the exact and the fixed-capacity all-to-all beside transformers + ZeRO-2
    step gpu_check 150 torchrun --nproc_per_node 2 bench/gpu_check.py --out $R
    step generate 150 torchrun --nproc_per_node 2 bench/generate.py --batch-sizes 1,16,64 --new-tokens 32 \
        --expert-splits experts,rows
    step train 230 torchrun --nproc_per_node 2 bench/train.py --grad-accum 4 --steps 6 --profile-steps 1 \
        --variants epkit_ep2,epkit_ep2_fixed_capacity,transformers_zero2 --out $R
    ;;
scale4)  # on the 4-GPU machine: EP=1 on one GPU, EP=4 and the uneven EP=3 (3/3/2 experts) on 4 and 3
    step scaling_ep1 110 torchrun --nproc_per_node 1 bench/scaling.py --out $R/scaling-h200x4.json
    step scaling_ep4 150 torchrun --nproc_per_node 4 bench/scaling.py --out $R/scaling-h200x4.json
    step scaling_ep3 150 torchrun --nproc_per_node 3 bench/scaling.py --out $R/scaling-h200x4.json
    ;;
x4train)  # issue 14 on nvidia-h200-x4, <= 540 s: 4-layer 8x7B shape throughput (EP=4, EP=2 x DP=2; ZeRO 2 then 1)
    # and the 1-layer 8x7B-shape chain (bench/scale4.py): write, fine-tune at EP=4, serve at 1/3 balanced/2x2,
    # kill + --resume
    W=/tmp/x4train; rm -rf $W
    [ "${EPKIT_REHEARSAL:-0}" = 1 ] || step gpu_check 80 env CUDA_VISIBLE_DEVICES=0,1 torchrun --nproc_per_node 2 \
        bench/gpu_check.py --out $R
    SHAPE=$(rehearse "--cpu --steps 3" \
        "--layers 4 --seq-len 4096 --grad-accum 1 --steps 4 --warmup 1 --profile-steps 0")
    step train_zero2 120 torchrun --nproc_per_node 4 bench/train.py $SHAPE --zero-stage 2 \
        --variants epkit_ep4,epkit_ep2 --out $R/x4train-zero2
    step chain 230 python3 bench/scale4.py chain --work $W --out $R/x4train.json
    step train_zero1 90 torchrun --nproc_per_node 4 bench/train.py $SHAPE --zero-stage 1 \
        --variants epkit_ep4,epkit_ep2 --out $R/x4train-zero1
    step collect 10 python3 bench/scale4.py collect --out $R/x4train.json train_zero2=$R/x4train-zero2 \
        train_zero1=$R/x4train-zero1
    rm -rf $W
    ;;
x4serve)  # issue 14 on nvidia-h200-x4, <= 540 s: full 32-layer 8x7B shape, random weights built on the GPUs
    # (launch/infer.py --preset --random-seed: the same weights at any EP size, nothing written)
    W=/tmp/x4serve; rm -rf $W
    step parity 180 python3 bench/scale4.py parity --work $W --out $R/x4serve.json
    step decode_ep4 120 torchrun --nproc_per_node 4 bench/generate.py --skip-hf --expert-splits experts,rows \
        --out $R/x4serve-generate.json \
        $(rehearse "--preset tiny --batch-sizes 1,4 --prompt-len 8 --new-tokens 4" \
            "--batch-sizes 1,16,64 --new-tokens 64")
    SCALE=$(rehearse "--small --warmup none" "")
    step scaling_ep4 105 torchrun --nproc_per_node 4 bench/scaling.py $SCALE --workloads mixed --modes replicated,dp \
        --out $R/x4serve-scaling.json
    step scaling_ep2dp2 100 torchrun --nproc_per_node 4 bench/scaling.py $SCALE --ep 2 --workloads mixed \
        --modes replicated --out $R/x4serve-scaling.json
    step collect 15 python3 bench/scale4.py collect --out $R/x4serve.json decode_ep4=$R/x4serve-generate.json \
        scaling=$R/x4serve-scaling.json
    rm -rf $W
    ;;
kernels)  # 2 x H200 after the prefill MoE kernels (swiglu, combine) and causal fresh prefill: the asserting
    # gpu_check on both GPUs; then, one GPU each, the sampler's CUDA-branch mutants (needs mutants/ from
    # tests/mutation.sh, carried) and one prefill step's kernels at EP=1; then prefill beside transformers
    step gpu_check 100 torchrun --nproc_per_node 2 bench/gpu_check.py --out $R
    CUDA_VISIBLE_DEVICES=0 step mutation_gpu 60 python tests/mutation_gpu.py --out $R &
    CUDA_VISIBLE_DEVICES=1 step profile_prefill 120 python bench/profile_prefill.py --prompts 2 --prompt-len 4096 \
        --out $R/profile_prefill-2x4096-h200x1-$(date +%Y%m%dT%H%M).json &
    wait
    step generate_prefill 150 python bench/generate.py --ep 1 --batch-sizes 2 --prompt-len 4096 --new-tokens 1 \
        --out $R/generate-prefill4096-h200x1-$(date +%Y%m%dT%H%M).json
    ;;
prefill)  # 2 x H200, the next call after the prefill kernels and the scheduler change (unmeasured on 2026-11-29):
    # prefill of 1 and 2 prompts of 4096 beside transformers on one GPU, one MoE layer at 4096 tokens per rank
    # (issue 11's 2.4 ms goal), the 512-request serving load (prefill-bound). Rehearsal: EPKIT_REHEARSAL=1
    CUDA_VISIBLE_DEVICES=0 step profile_prefill 90 python bench/profile_prefill.py --prompts 2 \
        $(rehearse "--preset tiny --prompt-len 32" "--prompt-len 4096") \
        --out $R/profile_prefill-2x4096-h200x1-$(date +%Y%m%dT%H%M).json
    step generate_prefill 170 python bench/generate.py --ep 1 --batch-sizes 1,2 --new-tokens 2 \
        $(rehearse "--preset tiny --prompt-len 16" "--prompt-len 4096") \
        --out $R/generate-prefill4096-h200x1-$(date +%Y%m%dT%H%M).json
    step moe_layer 100 torchrun --nproc_per_node 2 bench/moe_layer.py $(rehearse "--small" "--tokens 1,64,4096") \
        --out $R
    step serve 200 torchrun --nproc_per_node 2 bench/serve.py \
        $(rehearse "--preset tiny --requests 16 --max-prompt 64 --max-tokens 16 --skip-hf" "--hf-timeout 60") \
        --out $R/serve-h200x2-$(date +%Y%m%dT%H%M).json
    # issue 11's latency goal: p99 inter-token latency under 60 ms with about 128 requests running (Poisson
    # arrivals), steps that decode held to 1024 tokens
    step serve_itl 200 torchrun --nproc_per_node 2 bench/serve.py --skip-hf --max-tokens-while-decoding 1024 \
        $(rehearse "--preset tiny --requests 16 --max-prompt 64 --max-tokens 16 --rate 50" "--rate 24") \
        --out $R/serve-itl-h200x2-$(date +%Y%m%dT%H%M).json
    ;;
x1)  # 1 x H200 (the only kind lent on 2026-11-29): training per GPU at EP=1 (2 layers of the 8x7B shape)
    # beside transformers + ZeRO-2, eager and with torch.compile over the dense parts, each profiled (top
    # kernels); then prefill of 1 and 2 prompts of 4096 beside transformers
    step train_x1 260 torchrun --nproc_per_node 1 bench/train.py \
        $(rehearse "--cpu" "--layers 2 --grad-accum 4 --steps 6 --profile-steps 1") \
        --variants epkit_ep1,epkit_ep1_compile,transformers_zero2 --out $R
    step generate_prefill 170 python bench/generate.py --ep 1 --batch-sizes 1,2 --new-tokens 2 \
        $(rehearse "--preset tiny --prompt-len 16" "--prompt-len 4096") \
        --out $R/generate-prefill4096-h200x1-$(date +%Y%m%dT%H%M).json
    ;;
x1b)  # 1 x H200, after the fused training SwiGLU and combine: the asserting gpu_check (one GPU: its EP=2 checks
    # SKIP), then training at EP=1 per ZeRO stage, fused kernels vs torch ops, torch.compile, beside transformers
    step gpu_check 170 python bench/gpu_check.py --out $R
    step train_x1 330 torchrun --nproc_per_node 1 bench/train.py \
        $(rehearse "--cpu" "--layers 2 --grad-accum 4 --steps 6 --profile-steps 1") \
        --variants transformers_zero2,epkit_ep1,epkit_ep1_unfused,epkit_ep1@z1,epkit_ep1@z0,epkit_ep1_compile@z1 \
        --out $R
    ;;
x1c)  # 1 x H200, x1b's training with each engine freed before the next variant (x1b's OOMed after two)
    step train_x1 400 torchrun --nproc_per_node 1 bench/train.py \
        $(rehearse "--cpu" "--layers 2 --grad-accum 4 --steps 6 --profile-steps 1") \
        --variants transformers_zero2,epkit_ep1,epkit_ep1_unfused,epkit_ep1@z1,epkit_ep1@z0,epkit_ep1_compile \
        --out $R
    ;;
x1d)  # 1 x H200: 50 steps of the current path (torch ops, eager, ZeRO 2) beside the fast one (fused MoE kernels,
    # --compile, ZeRO 1) and transformers (issue 12 goal 4: the loss table), then throughput at accumulation 8,
    # then the 512-request serving load at EP=1 beside transformers' continuous batching
    step train_50 200 torchrun --nproc_per_node 1 bench/train.py \
        $(rehearse "--cpu --steps 6" "--layers 2 --grad-accum 4 --steps 50 --warmup 5 --profile-steps 1") --lr 1e-4 \
        --variants transformers_zero2,epkit_ep1_unfused,epkit_ep1,epkit_ep1_compile@z1 --out $R
    step train_accum8 120 torchrun --nproc_per_node 1 bench/train.py \
        $(rehearse "--cpu" "--layers 2 --grad-accum 8 --steps 6 --profile-steps 1") \
        --variants transformers_zero2,epkit_ep1_compile@z1 --out $R
    step serve 230 torchrun --nproc_per_node 1 bench/serve.py \
        $(rehearse "--preset tiny --requests 16 --max-prompt 64 --max-tokens 16 --skip-hf" "--hf-timeout 90") \
        --out $R/serve-h200x1-$(date +%Y%m%dT%H%M).json
    ;;
x1e)  # 1 x H200: where the 512-request serving load's time goes at EP=1 (steps by kind, 10 profiled steps)
    step serve_profile 200 torchrun --nproc_per_node 1 bench/serve.py --skip-hf \
        $(rehearse "--preset tiny --requests 16 --max-prompt 64 --max-tokens 16 --profile-from 5" "--profile-from 40") \
        --profile-steps 10 --out $R/serve-profile-h200x1-$(date +%Y%m%dT%H%M).json
    ;;
x1f)  # 1 x H200: the 512-request load at EP=1 with the engine's memory default (0.85) and 0.7 (allocator retries?)
    for u in 0.85 0.7; do
        step serve_u$u 150 torchrun --nproc_per_node 1 bench/serve.py --skip-hf --gpu-memory-utilization $u \
            $(rehearse "--preset tiny --requests 16 --max-prompt 64 --max-tokens 16" "") \
            --out $R/serve-mem$u-h200x1-$(date +%Y%m%dT%H%M).json
    done
    ;;
x1g)  # 1 x H200: the 512-request load at EP=1 after eager attention left cuDNN (a plan per new shape)
    step serve 160 torchrun --nproc_per_node 1 bench/serve.py --skip-hf \
        $(rehearse "--preset tiny --requests 16 --max-prompt 64 --max-tokens 16" "") \
        --out $R/serve-h200x1-$(date +%Y%m%dT%H%M).json
    ;;
x2train)  # 2 x H200, issue 12 (not yet run: only 1-GPU machines were lent on 2026-11-29): the fast path at EP=2
    # (fused MoE kernels, --compile, ZeRO 1) beside the ZeRO-2 default, transformers + ZeRO-2 and DeepSpeed's MoE,
    # 4-layer 8x7B shape, accumulation 8 then 4; then the 50-step loss table at EP=2
    for A in 8 4; do
        step train_accum$A 200 torchrun --nproc_per_node 2 bench/train.py \
            $(rehearse "--cpu" "--grad-accum $A --steps 6 --profile-steps 1") \
            --variants transformers_zero2,epkit_ep2_compile@z1,epkit_ep2,deepspeed_moe_ep2 --out $R
    done
    step train_50 200 torchrun --nproc_per_node 2 bench/train.py \
        $(rehearse "--cpu --steps 6" "--grad-accum 4 --steps 50 --warmup 5 --profile-steps 0") --lr 1e-4 \
        --variants epkit_ep2_compile@z1,epkit_ep2 --out $R
    ;;
esac
echo "=== total $(( $(date +%s) - T0 ))s"
