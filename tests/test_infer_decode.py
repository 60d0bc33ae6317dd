"""The decode forward (epkit/infer/decode.py) against the model's own forward, the engine's overlap of
step n+1's planning with step n, and the engine settings sized from memory."""
import os
import subprocess
import sys
import textwrap

import pytest
import torch

from conftest import tiny_args
from epkit.infer import LLM, PagedKVCache, SamplingParams
from epkit.infer.build import random_model
from epkit.infer.decode import DecodeForward, choose_kernels
from epkit.infer.kv_cache import bytes_per_block

torch.set_num_threads(1)


def _prefilled(model, lengths, block_size=4):
    """A cache holding `lengths` random tokens per row (written by the model's forward), and the tables."""
    cache = PagedKVCache(model.args, 40, block_size, "cpu", torch.float32)
    g = torch.Generator().manual_seed(5)
    T, NB = max(lengths), -(-(max(lengths) + 1) // block_size)
    table = torch.arange(1, 1 + len(lengths) * NB).view(len(lengths), NB)
    tokens = torch.randint(3, model.args.vocab_size, (len(lengths), T), generator=g)
    positions = torch.tensor([list(range(n)) + [-1] * (T - n) for n in lengths])
    cache.prepare(table, positions)
    with torch.no_grad():
        model(tokens, positions, cache)
    return cache, table


@pytest.mark.parametrize("kernels", ["torch", "compile"])
def test_decode_forward_matches_model_forward(kernels):
    """One decode step (three rows at different lengths, one padding row): the same logits, routing counts
    and keys/values written as `Mixtral.forward` through the paged cache."""
    args = tiny_args(sliding_window=6)  # rows longer than the window: the window must apply
    model = random_model(args, 1, "cpu", torch.float32, seed=4, router_std=0.5)
    lengths = [3, 9, 14]
    cache, table = _prefilled(model, lengths)
    table = torch.cat([table, torch.zeros(1, table.shape[1], dtype=table.dtype)])  # a padding row
    tokens = torch.tensor([[7], [11], [13], [0]])
    positions = torch.tensor([[n] for n in lengths] + [[-1]])
    rows = torch.arange(3)
    ref_cache = PagedKVCache(args, 40, 4, "cpu", torch.float32)
    ref_cache.k.copy_(cache.k), ref_cache.v.copy_(cache.v)
    ref_cache.prepare(table, positions)
    model.routing_stats.reset()
    with torch.no_grad():
        ref_logits, _ = model(tokens, positions, ref_cache, logits_rows=rows)
    ref_counts = model.routing_stats.counts().clone()
    model.routing_stats.reset()
    decode = DecodeForward(model, cache, kernels, compile_backend="aot_eager")
    logits = decode(tokens, positions, table, rows)
    torch.testing.assert_close(logits, ref_logits, atol=1e-5, rtol=1e-5)
    assert torch.equal(model.routing_stats.counts(), ref_counts) and ref_counts.sum() == 3 * 2 * args.num_layers
    written = cache.write_slots(table, positions)[:3, 0]
    torch.testing.assert_close(cache.k[:, written], ref_cache.k[:, written], atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(cache.v[:, written], ref_cache.v[:, written], atol=1e-6, rtol=1e-6)


TRITON_ENGINE = textwrap.dedent('''
    import os
    os.environ["TRITON_INTERPRET"] = "1"
    import torch
    torch.set_num_threads(1)
    from epkit.args import ModelArgs
    from epkit.infer import LLM, SamplingParams
    from epkit.infer.build import random_model
    from epkit.kernels.attention import paged_decode_attention
    args = ModelArgs.from_name("tiny", sliding_window=9)  # head_dim 16: the kernels' smallest
    model = random_model(args, 1, "cpu", torch.float32, seed=1, router_std=0.5)
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(3, 500, (n,), generator=g).tolist() for n in (3, 9, 17, 5)]
    p = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
    ref = [o.token_ids for o in LLM.from_model(model, decode_kernels="reference", block_size=4).generate(prompts, p)]
    llm = LLM.from_model(model, decode_kernels="triton", block_size=4)
    assert llm.runner.decode.attention is paged_decode_attention
    assert [o.token_ids for o in llm.generate(prompts, p)] == ref
    print("TRITON ENGINE OK")
''')


def test_triton_decode_path_in_interpreter():
    """The engine on the Triton kernels (run by the interpreter) gives the reference path's greedy tokens."""
    pytest.importorskip("triton")
    env = dict(os.environ, TRITON_INTERPRET="1")
    out = subprocess.run([sys.executable, "-c", TRITON_ENGINE], capture_output=True, text=True, env=env, timeout=600)
    assert "TRITON ENGINE OK" in out.stdout, out.stdout + out.stderr


def test_choose_kernels():
    from epkit.model import Mixtral
    model = Mixtral(tiny_args(), device="meta")
    assert choose_kernels(None, model, "cpu") == "torch"
    with pytest.raises(ValueError, match="decode_kernels='fast'"):
        choose_kernels("fast", model, "cpu")
    with pytest.raises(ValueError, match="head_dim 8"):
        choose_kernels("triton", model, "cpu")


class _Spy:
    """Records the order in which the engine launches steps and reads their tokens back."""

    def __init__(self, llm):
        self.events = []
        launch, resolve = llm._launch, llm._resolve

        def launched():
            step = launch()
            if step is not None:
                self.events.append(("launch", step))
            return step

        def resolved(step):
            self.events.append(("wait", step))
            return resolve(step)
        llm._launch, llm._resolve = launched, resolved


def test_overlap_plans_next_step_before_reading_tokens():
    """Each step is queued before the previous step's tokens are read (the GPU never idles while the host
    schedules); requests stopping on a token keep exactly the tokens they would get one step at a time."""
    model = random_model(tiny_args(), 1, "cpu", torch.float32, seed=6, router_std=0.5)
    g = torch.Generator().manual_seed(2)
    prompts = [torch.randint(3, 96, (n,), generator=g).tolist() for n in (4, 9, 2, 13)]
    free = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
    serial = LLM.from_model(model, block_size=4, overlap=False)
    full = [o.token_ids for o in serial.generate(prompts, free)]
    # stop each request on its own 4th token: the step after it is already computing when it arrives
    stops = [SamplingParams(temperature=0, max_tokens=12, ignore_eos=True, stop_token_ids=[t[3]]) for t in full]
    expected = [t[: t.index(t[3]) + 1] for t in full]
    assert [o.token_ids for o in serial.generate(prompts, stops)] == expected

    llm = LLM.from_model(model, block_size=4)
    spy = _Spy(llm)
    outs = llm.generate(prompts, stops)
    assert [o.token_ids for o in outs] == expected
    assert all(o.finish_reason == "stop" for o in outs)
    assert [o.token_ids for o in llm.generate(prompts, free)] == full
    assert [e[0] for e in spy.events[:3]] == ["launch", "launch", "wait"]
    ahead = _steps_queued_behind_each_wait(spy.events)
    assert len(ahead) == sum(1 for e in spy.events if e[0] == "launch") and llm._inflight is None
    # Only the last steps of each generate call (nothing left to plan) are waited for with an empty queue.
    assert sum(a == 0 for a in ahead) <= 4 < len(ahead) // 2, ahead
    serial_spy = _Spy(serial)
    serial.generate(prompts, stops)
    assert set(_steps_queued_behind_each_wait(serial_spy.events)) == {0}


def _steps_queued_behind_each_wait(events) -> list[int]:
    launched, ahead = [], []
    for name, step in events:
        if name == "launch":
            launched.append(step)
        else:
            k = next(i for i, s in enumerate(launched) if s is step)
            ahead.append(len(launched) - 1 - k)
    return ahead


def test_engine_sizes_max_num_seqs_from_the_kv_cache():
    model = random_model(tiny_args(), 1, "cpu", torch.float32, seed=1)
    block = bytes_per_block(model.args, 16, torch.float32)
    llm = LLM.from_model(model, kv_cache_memory=(40 * 64 + 1) * block)  # 40 x 1024 tokens (+ scratch block)
    assert llm.scheduler.max_num_seqs == 40 and llm.scheduler.max_num_batched_tokens == 2048
    small = LLM.from_model(model, kv_cache_memory=20 * block)
    assert small.scheduler.max_num_seqs == 16  # the floor
    assert LLM.from_model(model, max_num_seqs=3).scheduler.max_num_seqs == 3


@pytest.mark.parametrize("window", [None, 6])
def test_fresh_prefill_runs_causal_and_writes_the_same_cache(window):
    """Rows that all start at position 0 (new prompts, padded at the end) take causal attention over their own
    keys (no cache read, no mask: the flash kernel on a GPU). Against the masked path over the paged cache: the
    same logits, the same keys and values in the pool (the scratch block, where padding writes, aside), and
    the same next decode step. With a sliding window
    shorter than the rows the cache keeps the mask (causal alone would see too far)."""
    args = tiny_args(sliding_window=window)
    model = random_model(args, 1, "cpu", torch.float32, seed=6, router_std=0.5)
    g = torch.Generator().manual_seed(2)
    lengths, bs = [9, 4, 7], 4
    T, NB = max(lengths), -(-(max(lengths) + 1) // bs)
    table = torch.arange(1, 1 + len(lengths) * NB).view(len(lengths), NB)
    tokens = torch.randint(3, args.vocab_size, (len(lengths), T), generator=g)
    positions = torch.tensor([list(range(n)) + [-1] * (T - n) for n in lengths])
    rows = torch.tensor([i * T + n - 1 for i, n in enumerate(lengths)])
    out = {}
    for fresh in (False, True):
        cache = PagedKVCache(args, 40, bs, "cpu", torch.float32)
        cache.prepare(table, positions, fresh=fresh)
        calls = []
        update = cache.update

        def spy(*a):
            got = update(*a)
            calls.append(got[2] is None)  # no key positions: causal over the forward's own keys
            return got
        cache.update = spy
        with torch.no_grad():
            logits, _ = model(tokens, positions, cache, logits_rows=rows)
        cache.update = update
        nxt = torch.tensor([[5], [6], [7]])
        cache.prepare(table, torch.tensor([[n] for n in lengths]))
        with torch.no_grad():
            step, _ = model(nxt, torch.tensor([[n] for n in lengths]), cache)
        out[fresh] = (logits, cache.k[:, bs:].clone(), cache.v[:, bs:].clone(), step, calls)  # past scratch
    assert out[False][4] == [False] * args.num_layers
    assert out[True][4] == [window is None] * args.num_layers  # window 6 < 9 tokens: masked
    for a, b in zip(out[False][:4], out[True][:4]):
        torch.testing.assert_close(b, a, atol=1e-5, rtol=1e-5)
