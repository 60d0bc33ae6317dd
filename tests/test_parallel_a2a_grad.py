"""The fixed-capacity all-to-all in training (`--all-to-all fixed_capacity`): on 2 gloo ranks its outputs
and gradients (to the tokens, the router weights and the expert weights) equal the exact exchange's, also
when one rank receives no token and when a rank has fewer tokens than the capacity; also through a grouped
GEMM that leaves padding rows undefined as the GPU's does (tests/gpu_grouped_mm.py: the cause of the NaN/inf
gradients of the first bf16 GPU runs), with the exact exchange through the same kernel."""
from __future__ import annotations

import torch

from distributed import run
from gpu_grouped_mm import undefined_padding
from hostsync import NoHostSync


def _compare(rank, skew, n, capacity, gpu_kernel=False):
    from epkit.moe import Experts
    from epkit.parallel import AllToAllDispatch, setup_expert_parallel
    from epkit.plan import ShardingPlan
    E, D, I, K = 4, 8, 12, 2
    plan, groups = ShardingPlan(E, 2), setup_expert_parallel(2)
    full = Experts(E, D, I)
    with torch.no_grad():
        g = torch.Generator().manual_seed(0)
        full.w13.normal_(0, 0.3, generator=g)
        full.w2.normal_(0, 0.3, generator=g)
    g = torch.Generator().manual_seed(10 + rank)
    x0 = torch.randn(n, D, generator=g)
    ids = torch.tensor([[0, 1]] * n) if skew else torch.stack([torch.randperm(E, generator=g)[:K] for _ in range(n)])
    w0 = torch.softmax(torch.randn(n, K, generator=g), -1)
    out = {}
    for cap in (None, capacity):
        local = Experts(E, D, I, expert_ids=plan.local_experts(groups.ep_rank))
        with torch.no_grad():
            local.w13.copy_(full.w13[local.expert_ids])
            local.w2.copy_(full.w2[local.expert_ids])
        dispatch = AllToAllDispatch(plan.slots(), plan.owners(), 2, groups.ep_group)
        dispatch.capacity = cap
        x, w = x0.clone().requires_grad_(True), w0.clone().requires_grad_(True)
        y = dispatch(local, x, w, ids)
        y.pow(2).sum().backward()
        out[cap] = (y.detach(), x.grad, w.grad, local.w13.grad, local.w2.grad)
        if cap is not None and not gpu_kernel:  # (the stand-in reads its group sizes on the host)
            with torch.no_grad(), NoHostSync():  # forward only: the CPU's training kernels read group sizes
                dispatch(local, x0, w0, ids)
    return [(a - b).abs().max().item() for a, b in zip(out[None], out[capacity])], out[None][0].abs().max().item()


def _cases(rank, world):
    # random routing at full capacity; every pair on rank 0's experts (rank 1 receives nothing); 5 of 8 rows
    cases = [(False, 6, 6), (True, 6, 6), (False, 5, 8)]
    plain = [_compare(rank, *case) for case in cases]
    with undefined_padding():
        return plain + [_compare(rank, *case, gpu_kernel=True) for case in cases]


def test_fixed_capacity_exchange_trains_like_the_exact_one():
    for per_rank in run(_cases, 2, timeout=120):
        for case, (diffs, size) in enumerate(per_rank):
            assert all(d < 1e-6 for d in diffs), (case, diffs)  # (a NaN fails this too)
            assert size > 0.01, case  # the layer produced something
