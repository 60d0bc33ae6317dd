"""The CUDA-graph decode path's bookkeeping, checked on the CPU: bucket padding (rows at position -1
writing to the scratch block, zero block-table entries), static inputs, which batches replay, and that
the outputs equal eager decoding token for token."""
import torch

from conftest import hf_model, tiny_args
from epkit.infer import LLM, SamplingParams
from epkit.infer.graphs import DecodeGraphs, bucket


class _Replay:
    """Stands in for a captured CUDA graph: replaying re-runs the step on the same static buffers."""

    def __init__(self, step, out):
        self.step, self.out = step, out

    def replay(self):
        self.out.copy_(self.step()) if self.out is not None and self.out.numel() else self.step()


class EagerGraphs(DecodeGraphs):
    def __init__(self, *a, **k):
        super().__init__(*a, **k)
        self.replays = 0

    def _record(self, step):
        out = step()
        return _Replay(step, out), out

    def run(self, *a, **k):
        self.replays += 1
        return super().run(*a, **k)


def _llm(path, graphs: bool, **engine):
    llm = LLM(path, **engine)
    if graphs:
        llm.runner.graphs = EagerGraphs(llm.runner._forward, llm.device)
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
        assert llm.runner.graphs.replays > 0 and llm.runner.graphs.graphs
        assert all(Bb in (1, 2, 4, 8) for Bb, _, _ in llm.runner.graphs.graphs)


def test_eligibility():
    g = EagerGraphs(lambda *a: None, torch.device("cpu"), max_rows=8)
    assert g.eligible(4, 1, 4) and not g.eligible(4, 1, 0) and not g.eligible(4, 2, 4) and not g.eligible(9, 1, 9)
