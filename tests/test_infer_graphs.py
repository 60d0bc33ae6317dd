"""The CUDA-graph decode path, checked on the CPU: bucket padding (rows at position -1 writing to the
scratch block, zero block-table entries), static inputs, which batches replay, and that the outputs
equal eager decoding token for token.

`RecordedGraphs` stands in for torch.cuda.CUDAGraph the way a graph behaves: capture records the aten ops
the step issues (after the same two warm-up runs), and replay re-issues those ops on the same tensors -
no Python of the step runs again. So whatever the step decided in Python at capture time (a shape, a
host value, a branch on data) stays frozen, as on a GPU, and shows up as a wrong token. A host read while
capturing (`.item()`, `.tolist()`, `.cpu()`), which a real capture rejects, fails here too, and so does
an op whose output shape depends on the data.
"""
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from conftest import hf_model, tiny_args
from epkit.infer import LLM, SamplingParams
from epkit.infer.graphs import DecodeGraphs, bucket


class HostSyncWhileCapturing(RuntimeError):
    pass


class _Recorder(TorchDispatchMode):
    """Every aten op issued inside the mode, with its arguments and outputs (kept alive, like graph memory)."""

    def __init__(self):
        super().__init__()
        self.ops = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch.ops.aten._local_scalar_dense.default:
            raise HostSyncWhileCapturing(f"{func} (a host read) while capturing a graph")
        out = func(*args, **kwargs)
        self.ops.append((func, args, kwargs, out))
        return out


class _RecordedGraph:
    def __init__(self, ops):
        self.ops = ops

    def replay(self):
        """Re-issue the recorded ops on the recorded tensors; each op's fresh results are copied into the
        tensors it produced at capture (a graph's kernels write the same addresses every replay)."""
        with torch.no_grad():
            for func, args, kwargs, out in self.ops:
                res = func(*args, **kwargs)
                for new, old in zip(tree_leaves(res), tree_leaves(out)):
                    if isinstance(old, torch.Tensor) and new is not old:
                        assert new.shape == old.shape, f"{func}: output shape {tuple(new.shape)} at replay, " \
                                                       f"{tuple(old.shape)} at capture (data-dependent shape)"
                        old.copy_(new)


def _no_host_read(*a, **k):
    raise HostSyncWhileCapturing("a host read (.tolist() / .cpu() / .numpy()) while capturing a graph")


class RecordedGraphs(DecodeGraphs):
    def __init__(self, forward, *a, **k):
        self.forward_calls = 0

        def counted(*args):
            self.forward_calls += 1
            return forward(*args)
        super().__init__(counted, *a, **k)
        self.replays = 0

    def _record(self, step):
        for _ in range(2):  # warm-up, as the CUDA path does
            step()
        saved = {name: getattr(torch.Tensor, name) for name in ("tolist", "cpu", "numpy")}
        for name in saved:
            setattr(torch.Tensor, name, _no_host_read)
        try:
            with _Recorder() as rec:
                out = step()
        finally:
            for name, fn in saved.items():
                setattr(torch.Tensor, name, fn)
        return _RecordedGraph(rec.ops), out

    def run(self, *a, **k):
        self.replays += 1
        return super().run(*a, **k)


def _llm(path, graphs: bool, **engine):
    llm = LLM(path, **engine)
    if graphs:
        llm.runner.graphs = RecordedGraphs(llm.runner._forward, llm.device)
    return llm


def test_bucket():
    assert [bucket(n) for n in (1, 2, 3, 5, 16, 17)] == [1, 2, 4, 8, 16, 32]


def test_graph_path_matches_eager(tmp_path):
    hf = hf_model(tiny_args(), seed=21)
    hf.save_pretrained(str(tmp_path))
    g = torch.Generator().manual_seed(3)
    # 5 and 3 rows pad to buckets 8 and 4; lengths cross block boundaries (block 4) mid-decode
    prompts = [torch.randint(3, 96, (n,), generator=g).tolist() for n in (5, 10, 3, 9, 14, 6, 21)]
    params = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
    eager = [o.token_ids for o in _llm(str(tmp_path), False, block_size=4).generate(prompts, params)]
    # a small chunk budget makes 1-token mid-prompt chunks: those batches sample nothing and stay eager
    for engine in (dict(block_size=4), dict(block_size=4, max_num_batched_tokens=6, long_prefill_tokens=5)):
        llm = _llm(str(tmp_path), True, **engine)
        outs = [o.token_ids for o in llm.generate(prompts, params)]
        assert outs == eager
        graphs = llm.runner.graphs
        assert graphs.replays > 2 * len(graphs.graphs) > 0
        assert all(Bb in (1, 2, 4, 8) for Bb, _, _ in graphs.graphs)
        assert graphs.forward_calls == 3 * len(graphs.graphs), "replay ran the step's Python again"


def test_eligibility():
    g = RecordedGraphs(lambda *a: None, torch.device("cpu"), max_rows=8)
    assert g.eligible(4, 1, 4) and not g.eligible(4, 1, 0) and not g.eligible(4, 2, 4) and not g.eligible(9, 1, 9)


def test_recorded_graphs_catch_what_a_capture_freezes():
    """The stand-in must be able to fail: a step that reads a host value is refused at capture, and a step
    whose Python reads a tensor's value at capture replays that frozen value."""
    x = torch.zeros(3)
    g = RecordedGraphs(lambda: None, torch.device("cpu"))
    try:
        g._record(lambda: x + float(x.sum()))
    except HostSyncWhileCapturing:
        pass
    else:
        raise AssertionError("a host read while capturing went unnoticed")
    scale = {"v": 1.0}
    graph, out = g._record(lambda: x * scale["v"] + 1)  # Python reads scale at capture only
    x.fill_(2.0)
    scale["v"] = 10.0
    graph.replay()
    assert out.tolist() == [3.0, 3.0, 3.0]  # x's new value flows through; the Python-side scale stayed 1
