"""The fixed-capacity (sync-free) all-to-all dispatch on real gloo processes: it returns what the
uneven all-to-all and the single-device layer return, for any token count up to the capacity (a rank
with no tokens included), and it runs without a host sync where the uneven one cannot."""
import pytest
import torch

from conftest import tiny_args
from distributed import run
from hostsync import HostSync, NoHostSync


def _layer_outputs(rank, world, counts, capacity):
    from epkit.infer.build import random_model
    from epkit.parallel import set_dispatch, set_dispatch_capacity
    args = tiny_args(num_layers=1)
    ep = random_model(args, world, "cpu", torch.float32, seed=5, router_std=0.5)
    set_dispatch(ep, "all_to_all")
    one = random_model(args, 1, "cpu", torch.float32, seed=5, router_std=0.5)  # every expert, same numbers
    x = torch.randn(counts[rank], 1, args.hidden_size, generator=torch.Generator().manual_seed(rank))
    out = {}
    with torch.no_grad():
        ref, _ = one.layers[0].moe(x)
        set_dispatch_capacity(ep, None)
        uneven, _ = ep.layers[0].moe(x)
        try:
            with NoHostSync():
                ep.layers[0].moe(x)
        except HostSync as e:  # every rank stops at the same point: after the count exchange
            out["uneven_sync"] = str(e)
        set_dispatch_capacity(ep, capacity)
        with NoHostSync():
            padded, _ = ep.layers[0].moe(x)
    out.update(ref=ref.numpy(), uneven=uneven.numpy(), padded=padded.numpy())  # by value through the queue
    return out


def test_padded_all_to_all_equals_uneven_and_one_device():
    # 3 ranks (3/3/2 experts), one of them with no tokens, one with a full block of 8 rows
    counts, capacity = [8, 0, 3], 8
    outs = run(_layer_outputs, len(counts), counts, capacity)
    for rank, o in enumerate(outs):
        o.update({k: torch.from_numpy(o[k]) for k in ("ref", "uneven", "padded")})
        assert o["padded"].shape == (counts[rank], 1, tiny_args().hidden_size)
        torch.testing.assert_close(o["padded"], o["uneven"], atol=1e-6, rtol=0)
        torch.testing.assert_close(o["padded"], o["ref"], atol=1e-6, rtol=0)
        assert o["uneven_sync"] == "tolist", o  # the detector can fail: the uneven path syncs


def test_host_sync_detector():
    x = torch.arange(6)
    for bad in (lambda: x.tolist(), lambda: x[x > 2], lambda: torch.where(x > 2), lambda: bool(x[0]),
                lambda: x.nonzero(), lambda: torch.bincount(x), lambda: x.repeat_interleave(x)):
        with pytest.raises(HostSync), NoHostSync():
            bad()
    with NoHostSync():  # device-side equivalents pass
        torch.where(x > 2, x, 0).argsort(stable=True)
        x.repeat_interleave(x, output_size=15)
