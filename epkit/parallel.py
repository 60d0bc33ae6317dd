"""Expert parallelism applied to a built model: process groups, dispatch/combine, parameter markers.

World = data-parallel x expert-parallel. Expert-parallel (EP) groups are contiguous ranks and
expert-data-parallel groups strided, built by `deepspeed.utils.groups`, so DeepSpeed's engine and
ZeRO reduce expert gradients over the right group. Serving's data-parallel replicas use the same
layout (`data_parallel_replicas`): one engine per EP group.

Two dispatch modes (DESIGN.md):
  all_to_all  ranks hold different tokens; tokens travel to the rank that owns their expert and back.
  replicated  every EP rank holds the same tokens; each computes its own experts, one all-reduce sums.

Legend: N tokens, D hidden, K experts per token, E experts, L local experts, R ep ranks.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from .moe import Experts, LocalDispatch, combine, permute
from .plan import ShardingPlan

DISPATCH_MODES = ("all_to_all", "replicated")


# ---- world helpers that also work without a distributed run ------------------------------------

def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def world_rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def barrier() -> None:
    if is_distributed():
        dist.barrier()


def broadcast_object(obj, src: int = 0):
    if not is_distributed():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def all_ranks_ok(ok: bool) -> bool:
    """True when `ok` holds on every rank (a collective: every rank must call it)."""
    if not is_distributed():
        return ok
    flags = [None] * world_size()
    dist.all_gather_object(flags, bool(ok))  # NOTE: collective, host-side objects
    return all(flags)


def init_distributed(backend: str | None = None, timeout_s: float = 600) -> None:
    """Join the run started by `deepspeed`, `torchrun` or `accelerate` (no-op without one).

    Every collective then waits at most `timeout_s` for the other ranks: the world group gets it, and so does
    every group created afterwards (DeepSpeed's expert and data-parallel groups pass no timeout of their own,
    so torch gives them its module default, which is set here). On GPUs NCCL's watchdog ends the job when a
    collective times out (TORCH_NCCL_ASYNC_ERROR_HANDLING=1); on CPU (gloo) the collective raises, and the
    launchers turn that into one line naming the rank that stopped answering
    (`runtime.comm_failure_message`)."""
    if is_distributed() or "WORLD_SIZE" not in os.environ:
        return
    import datetime

    import torch.distributed.distributed_c10d as c10d
    backend = backend or ("nccl" if torch.cuda.is_available() else "gloo")
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
        os.environ.setdefault("TORCH_NCCL_ASYNC_ERROR_HANDLING", "1")
    timeout = datetime.timedelta(seconds=timeout_s)
    c10d.default_pg_timeout = c10d.default_pg_nccl_timeout = timeout  # groups created later (new_group)
    from . import runtime
    runtime.dist_timeout_s = timeout_s  # for the error line if a collective times out
    from .runtime import note_cpu_op_build, quiet_stdout
    note_cpu_op_build()
    with quiet_stdout():  # DeepSpeed prints "... built successfully" on every rank at every start
        _deepspeed_init(backend, timeout)


def _deepspeed_init(backend: str, timeout=None) -> None:
    """deepspeed.init_distributed, then give back the names of its CPU shared-memory buffers (see
    `runtime.release_cpu_shm_names`): the one place epkit starts DeepSpeed's communication."""
    import deepspeed

    from .runtime import release_cpu_shm_names
    deepspeed.init_distributed(dist_backend=backend, **({} if timeout is None else {"timeout": timeout}))
    release_cpu_shm_names()


@dataclass
class ExpertGroups:
    """This rank's place in the data-parallel x expert-parallel grid."""

    ep_size: int
    ep_rank: int
    ep_group: object  # ranks that split the experts between them
    edp_rank: int
    edp_group: object  # ranks holding the same experts (gradients of experts reduce here)
    name: str  # DeepSpeed's group name, "ep_size_{ep_size}"


def setup_expert_parallel(ep_size: int) -> ExpertGroups:
    """Create (or reuse) DeepSpeed's expert and expert-data-parallel groups for `ep_size`."""
    world = world_size()
    if not isinstance(ep_size, int) or ep_size < 1:
        raise ValueError(f"ep_size={ep_size!r} must be an integer of at least 1")
    if ep_size > world:
        raise ValueError(f"ep_size={ep_size} is larger than the world size {world}; launch at least {ep_size} "
                         f"ranks (e.g. deepspeed --num_gpus {ep_size})")
    if world % ep_size:
        raise ValueError(f"the world size {world} is not divisible by ep_size={ep_size}")
    name = f"ep_size_{ep_size}"
    if not is_distributed():  # one process, EP=1
        return ExpertGroups(1, 0, None, 0, None, name)
    from deepspeed import comm as ds_comm
    from deepspeed.utils import groups
    if not ds_comm.is_initialized():
        _deepspeed_init(dist.get_backend())
    if name not in groups._get_expert_parallel_group_dict():
        groups._create_expert_and_data_parallel(ep_size)
    ep_group = groups._get_expert_parallel_group(name)
    edp_group = groups._get_expert_data_parallel_group(name)
    return ExpertGroups(ep_size, dist.get_rank(ep_group), ep_group, dist.get_rank(edp_group), edp_group, name)


def data_parallel_replicas(ep_size: int) -> tuple[int, list[int]]:
    """Serving's data-parallel replicas (`epkit.infer.replicas`), laid out as the training groups are: replica r
    is the EP group of ranks r*ep .. r*ep+ep-1 (DeepSpeed's expert groups are contiguous, so it is this rank's
    `ExpertGroups.ep_group` and r its `edp_rank`), and the replicas' leaders, ranks 0, ep, 2*ep, ..., are rank
    0's expert-data-parallel group. Returns (this rank's replica, the leaders' global ranks)."""
    return world_rank() // ep_size, list(range(0, world_size(), ep_size))


# ---- dispatchers ----------------------------------------------------------------------------------

class _SumOverRanks(torch.autograd.Function):
    """All-reduce of partial expert outputs. Every rank computes the same loss from the sum, so the
    gradient of each partial is the gradient of the sum: backward is the identity."""

    @staticmethod
    def forward(ctx, x, group):
        ctx.mark_dirty(x)
        dist.all_reduce(x, group=group)  # NOTE: collective, once per MoE layer (in place: x is fresh)
        return x

    @staticmethod
    def backward(ctx, grad):
        return grad, None


class _CopyToRanks(torch.autograd.Function):
    """Identity forward; backward sums the input's gradient over ranks, because each rank's experts
    contribute only their share of it (the pair of _SumOverRanks, as in tensor parallelism)."""

    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        grad = grad.contiguous().clone()
        dist.all_reduce(grad, group=ctx.group)  # NOTE: collective, backward only
        return grad, None


class _AllToAll(torch.autograd.Function):
    """all_to_all_single with uneven splits; its gradient travels the same way back. (Integer tensors,
    e.g. slot ids, pass through without a gradient.)"""

    @staticmethod
    def forward(ctx, x, recv: list[int], send: list[int], group):
        ctx.recv, ctx.send, ctx.group = recv, send, group
        out = x.new_empty(sum(recv), *x.shape[1:])
        dist.all_to_all_single(out, x.contiguous(), recv, send, group=group)  # NOTE: collective
        return out

    @staticmethod
    def backward(ctx, grad):
        return _AllToAll.apply(grad.contiguous(), ctx.send, ctx.recv, ctx.group), None, None, None


class ReplicatedDispatch(LocalDispatch):
    """Every EP rank holds the same tokens: each computes the pairs its own experts own (a LocalDispatch
    that drops the other ranks' experts), then one all-reduce sums the partial outputs over the EP group
    (NCCL's, or at inference `fast_sum`, set by `symm_sum.set_ep_all_reduce`)."""

    sync_free = True  # the all-reduce runs on the device; NCCL's can be captured in a CUDA graph

    def __init__(self, slots: list[int], owners: list[int], ep_rank: int, group):
        super().__init__([s if o == ep_rank else -1 for s, o in zip(slots, owners)])
        self.group = group
        self.fast_sum = None  # epkit.symm_sum.SymmMemAllReduce, set by set_ep_all_reduce

    def __call__(self, experts: Experts, x, weights, ids, mask=None):
        if self.group is None:
            return super().__call__(experts, x, weights, ids, mask)
        if torch.is_grad_enabled():
            x, weights = _CopyToRanks.apply(x, self.group), _CopyToRanks.apply(weights, self.group)
        y = self.partial(experts, x, weights, ids, mask)  # [N, D] fp32, summed in fp32 as one device would
        if self.fast_sum is not None and not torch.is_grad_enabled() and self.fast_sum.fits(y):
            return self.fast_sum(y).to(x.dtype)
        return _SumOverRanks.apply(y, self.group).to(x.dtype)


class _Exchange:
    """One uneven all-to-all layout over the EP group: `send_counts` [R] rows go to each rank; the sizes
    to receive are exchanged once, and every `send`/`send_back` reuses them (differentiable both ways).

    NOTE: one collective for the sizes and one device-to-host sync per layer (split sizes are Python
    ints). `AllToAllDispatch._padded` is the fixed-capacity exchange that needs neither."""

    def __init__(self, send_counts: torch.Tensor, group):
        recv_counts = torch.empty_like(send_counts)
        dist.all_to_all_single(recv_counts, send_counts, group=group)  # NOTE: collective
        self.send_sizes, self.recv_sizes = send_counts.tolist(), recv_counts.tolist()  # NOTE: host sync
        self.group = group

    def send(self, t: torch.Tensor) -> torch.Tensor:
        """Rows grouped by destination rank -> the rows this rank receives, grouped by source rank."""
        return _AllToAll.apply(t, self.recv_sizes, self.send_sizes, self.group)

    def send_back(self, t: torch.Tensor) -> torch.Tensor:
        """The reverse of `send`: received rows (in arrival order) back to the ranks they came from."""
        return _AllToAll.apply(t, self.send_sizes, self.recv_sizes, self.group)


class AllToAllDispatch:
    """Ranks hold different tokens: each token's pairs travel to their experts' owners and back.

    Two exchanges, chosen by `capacity` (set per forward by the caller, the same on every rank):

    None (uneven, `_Exchange`): the exact pair counts travel first and are read on the host (one sync
    per layer); moves only the routed pairs; differentiable (training) and best for large batches.
      dispatch  permute pairs by destination rank, exchange the rows and their local slots
      experts   permute the arrived rows by local slot, Experts.forward
      combine   rows back to arrival order, exchanged back, unpermute (weighted sum per token)
    Autograd flows through both row exchanges. A rank that receives no rows still runs its experts (on
    zero rows), so its backward joins every collective the other ranks wait on.

    C (fixed capacity, `_padded`): every rank pads its tokens to C rows and sends each rank a [C, D]
    block; sizes come from shapes, nothing is read on the host, so a CUDA graph can capture it. Also
    differentiable: training uses it with C = micro_batch x seq_len (`--all-to-all fixed_capacity`).
    """

    def __init__(self, slots: list[int], owners: list[int], ep_size: int, group):
        self.slot = torch.tensor(slots)
        self.owner = torch.tensor(owners)
        self.ep_size, self.group = ep_size, group
        self.capacity: int | None = None
        rank = dist.get_rank(group)
        # The experts' side of the fixed-capacity exchange: this rank's pairs only; id E marks filler rows.
        self.local = LocalDispatch([s if o == rank else -1 for s, o in zip(slots, owners)] + [-1])

    @property
    def sync_free(self) -> bool:
        return self.capacity is not None

    def __call__(self, experts: Experts, x, weights, ids, mask=None):
        """`mask` is accepted and not used: every token is exchanged (padding too)."""
        if self.slot.device != ids.device:
            self.slot, self.owner = self.slot.to(ids.device), self.owner.to(ids.device)
        if self.capacity is not None:
            return self._padded(experts, x, weights, ids, self.capacity)
        K = ids.shape[1]
        order, send_counts = permute(self.owner[ids], self.ep_size)  # [N*K] choices by destination EP rank
        exchange = _Exchange(send_counts, self.group)
        slot_recv = exchange.send(self.slot[ids].reshape(-1)[order])  # [M] local slot of each arriving row
        x_recv = exchange.send(x[order // K])  # [M, D]
        local, counts = permute(slot_recv, experts.num_local)
        out = experts(x_recv, counts, rows=local, dense=True)  # [M, D] grouped by local slot (all arrived)
        out = torch.zeros_like(out).index_copy(0, local, out)  # back to arrival order
        back = exchange.send_back(out)  # [N*K, D] in `order` order
        return combine(back, order, weights).to(x.dtype)

    def _padded(self, experts: Experts, x, weights, ids, C: int):
        """Fixed-capacity exchange, no host sync, differentiable. x [N, D] with N <= C on every rank.

        A token travels at most once to each rank: block r of the send buffer [R, C, D] lists, in token
        order, the tokens with an expert on rank r, then the other tokens and filler rows. With the rows
        travel their router weights and expert ids [C, K] (id E on filler rows). Each rank computes the
        weighted sum of its own experts per arrived row in fp32 (`LocalDispatch.partial`: choices of other
        ranks' experts, and every choice of an unwanted or filler row, add 0) and sends the partial sums
        back; each rank adds its tokens' R partials in fp32, as the replicated all-reduce does (with
        top-2 routing the result is bit-equal to one device).

        Memory: the experts see R*C*K pair rows, the worst case (every pair of every rank's tokens here), of
        which the grouped GEMM computes only the real ones; their saved activations are R times the exact
        exchange's (C*K pairs on average). The rows past the real ones are padding: zero, with zero gradient
        (`Experts.forward`).
        """
        N, K = ids.shape
        if N > C:
            raise ValueError(f"{N} tokens exceed the all-to-all capacity of {C} rows per rank")
        R, D, E, dev = self.ep_size, x.shape[1], self.owner.shape[0], x.device
        need = (self.owner[ids][None] == torch.arange(R, device=dev)[:, None, None]).any(-1)  # [R, N]
        if N < C:
            x = torch.cat([x, x.new_zeros(C - N, D)])
            weights = torch.cat([weights, weights.new_zeros(C - N, K)])
            ids = torch.cat([ids, ids.new_full((C - N, K), E)])
            need = torch.cat([need, need.new_zeros(R, C - N)], 1)
        order = torch.argsort((~need).to(torch.int8), dim=1, stable=True)  # [R, C] wanted tokens first
        send = x[order.reshape(-1)]  # [R*C, D]
        meta = torch.cat([weights.float(), ids.float()], -1)[order].reshape(R * C, 2 * K)  # ids exact in fp32
        # NOTE: three equal-split all-to-alls per layer (rows, metadata, partial sums); no host sync. Through
        # _AllToAll, so gradients travel back the same way (to x, and to the router weights in `meta`).
        blocks = [C] * R
        recv = _AllToAll.apply(send, blocks, blocks, self.group)
        recv_meta = _AllToAll.apply(meta, blocks, blocks, self.group)
        part = self.local.partial(experts, recv, recv_meta[:, :K], recv_meta[:, K:].long())  # [R*C, D] fp32
        back = _AllToAll.apply(part, blocks, blocks, self.group)
        # block r of `back` holds rank r's partial sums of our tokens in `order` order: undo the order
        at = torch.empty_like(order).scatter_(1, order, torch.arange(C, device=dev).expand(R, C))  # [R, C]
        y = back.view(R, C, D).gather(1, at[..., None].expand(R, C, D)).sum(0)  # [C, D] fp32
        return y[:N].to(x.dtype)


# ---- applying EP to a model ----------------------------------------------------------------------

@dataclass
class ExpertParallelInfo:
    plan: ShardingPlan
    groups: ExpertGroups
    dispatch: str
    split: str = "experts"  # "rows": every rank holds a part of every expert (`apply_expert_rows`)

    @property
    def ep_rank(self) -> int:
        return self.groups.ep_rank

    @property
    def writes_experts(self) -> bool:
        """One copy of each expert is written: by the first expert-data-parallel replica."""
        return self.groups.edp_rank == 0


def _deepspeed_moe_class(cls):
    """A subclass of both epkit's MoE and DeepSpeed's MoE, so DeepSpeed's engine sees MoE layers
    (`has_moe_layers`) and builds ZeRO with expert groups. Only the type is borrowed: forward,
    parameters and names stay epkit's, and DeepSpeed's own layer is never constructed."""
    try:
        from deepspeed.moe.layer import MoE as DeepSpeedMoE
    except ImportError:  # inference without deepspeed installed
        return cls

    def set_deepspeed_parallelism(self, *args, **kwargs):  # groups already exist (setup_expert_parallel)
        pass

    return type("ExpertParallelMoE", (cls, DeepSpeedMoE), {"set_deepspeed_parallelism": set_deepspeed_parallelism})


def apply_expert_parallel(model, plan: ShardingPlan, groups: ExpertGroups | None = None,
                          dispatch: str = "all_to_all"):
    """Keep only this rank's experts in every MoE layer and route tokens through `dispatch`.

    Works on a real or a meta model (build on meta, shard, then load only the local experts).
    The router is untouched: it scores all experts and picks exactly what the single-device model picks.
    """
    if dispatch not in DISPATCH_MODES:
        raise ValueError(f"unknown dispatch mode {dispatch!r}; choose one of {', '.join(DISPATCH_MODES)}")
    groups = groups or setup_expert_parallel(plan.ep_size)
    if groups.ep_size != plan.ep_size:
        raise ValueError(f"the plan is for ep_size={plan.ep_size} but the process groups have {groups.ep_size}")
    plan.check_matches(model.args.num_experts, model.args.num_layers)
    moe_cls = None
    for layer, moe in enumerate(model.moe_layers()):
        local = plan.local_experts(groups.ep_rank, layer)
        old = moe.experts
        new = Experts(plan.num_experts, old.w13.shape[2], old.intermediate_size, expert_ids=local,
                      device=old.w13.device, dtype=old.w13.dtype)
        new.impl = old.impl
        with torch.no_grad():
            for name in ("w13", "w2"):
                src = getattr(old, name)
                if src.device.type != "meta":
                    getattr(new, name).copy_(src[local])
                getattr(new, name).requires_grad_(src.requires_grad)
        moe.experts = new
        moe.dispatcher = _dispatcher(dispatch, plan, groups, layer)
        moe_cls = moe_cls or _deepspeed_moe_class(type(moe))
        moe.__class__ = moe_cls
        moe.ep_size, moe.expert_group_name, moe.num_local_experts = plan.ep_size, groups.name, len(local)
    model.expert_parallel = ExpertParallelInfo(plan, groups, dispatch)
    mark_expert_params(model)
    return model


def apply_expert_rows(model, ep_size: int, groups: ExpertGroups | None = None):
    """Inference layout for small batches: each of the `ep_size` ranks holds part r of every expert's
    intermediate rows (I / ep_size of w1, w3 and w2), every rank computes every routed pair on its part, and
    the replicated all-reduce sums the parts. The same bytes per rank as splitting whole experts, but each
    rank reads exactly 1/ep_size of what a token's experts need, where whole experts leave the rank that owns
    both of a token's top-2 experts doing all of it (with 8 experts on 2 ranks: 43% of tokens). Not for
    training or saving. Works on a real or a meta model."""
    groups = groups or setup_expert_parallel(ep_size)
    if groups.ep_size != ep_size:
        raise ValueError(f"expert rows over ep_size={ep_size} but the process groups have {groups.ep_size}")
    E = model.args.num_experts
    for moe in model.moe_layers():
        old = moe.experts
        new = Experts(E, old.w13.shape[2], old.intermediate_size, device=old.w13.device, dtype=old.w13.dtype,
                      rows=(groups.ep_rank, ep_size))
        new.impl = old.impl
        with torch.no_grad():
            for name in ("w13", "w2"):
                src = getattr(old, name)
                if src.device.type != "meta":
                    for e in range(E):
                        getattr(new, name)[e].copy_(new.take_rows(name, src[e]))
                getattr(new, name).requires_grad_(False)
        moe.experts = new
        moe.dispatcher = ReplicatedDispatch(list(range(E)), [groups.ep_rank] * E, groups.ep_rank, groups.ep_group)
    plan = ShardingPlan(E, ep_size, num_layers=model.args.num_layers)  # the group layout; owners do not apply
    model.expert_parallel = ExpertParallelInfo(plan, groups, "replicated", split="rows")
    return model


def mark_expert_params(model) -> None:
    """Put DeepSpeed's expert markers (see deepspeed.moe.utils.is_moe_param) on the expert weights, so
    the engine reduces their gradients over the expert-data-parallel group only.

    NOTE: materialising a meta model (`to_empty`, `load_state_dict(assign=True)`) makes new
    Parameters without these attributes; loaders call this again afterwards.
    """
    name = model.expert_parallel.groups.name
    for moe in model.moe_layers():
        for p in moe.experts.parameters():
            p.allreduce, p.group_name = False, name


def set_dispatch(model, dispatch: str) -> None:
    """Switch an expert-parallel model between the two dispatch modes."""
    if dispatch not in DISPATCH_MODES:
        raise ValueError(f"unknown dispatch mode {dispatch!r}; choose one of {', '.join(DISPATCH_MODES)}")
    info = model.expert_parallel
    if info.split == "rows":
        raise ValueError("a model whose experts are split by rows (inference, --expert-split rows) keeps its "
                         "replicated dispatch")
    for layer, moe in enumerate(model.moe_layers()):
        moe.dispatcher = _dispatcher(dispatch, info.plan, info.groups, layer)
    info.dispatch = dispatch


def set_dispatch_capacity(model, capacity: int | None) -> None:
    """Make the all-to-all layers of `model` use the fixed-capacity exchange with `capacity` rows per
    rank (every rank must pass the same value for the same forward), or the uneven one (None)."""
    for moe in model.moe_layers():
        if isinstance(moe.dispatcher, AllToAllDispatch):
            moe.dispatcher.capacity = capacity


def _dispatcher(dispatch: str, plan: ShardingPlan, groups: ExpertGroups, layer: int):
    owners, slots = plan.owners(layer), plan.slots(layer)
    if groups.ep_group is None or dispatch == "replicated":
        return ReplicatedDispatch(slots, owners, groups.ep_rank, groups.ep_group)
    return AllToAllDispatch(slots, owners, plan.ep_size, groups.ep_group)


# ---- routing telemetry ----------------------------------------------------------------------------

def gather_routing_counts(model) -> list[list[int]]:
    """`model.routing_stats` summed over every rank that saw distinct tokens: tokens routed to each expert
    of each layer. NOTE: collective when distributed (every rank calls it), and one host read."""
    device = next(model.parameters()).device
    counts = model.routing_stats.counts(device).clone()  # [layers, E]
    info = model.expert_parallel
    if is_distributed():
        dist.all_reduce(counts)  # NOTE: collective
        if info is not None and info.dispatch == "replicated":
            counts //= info.plan.ep_size  # every EP rank saw the same tokens
    return counts.tolist()


def rank_loads(model, counts: list[list[int]] | None = None) -> list[list[float]]:
    """Per layer, the routed tokens each EP rank processed under the model's plan."""
    info = model.expert_parallel
    counts = counts if counts is not None else gather_routing_counts(model)
    if info is None:
        return [[float(sum(row))] for row in counts]
    if info.split == "rows":  # every rank computes every pair, on its part of the rows
        return [[sum(row) / info.plan.ep_size] * info.plan.ep_size for row in counts]
    return [info.plan.rank_loads(row, layer) for layer, row in enumerate(counts)]
