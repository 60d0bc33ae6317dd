"""epkit/infer/engine_loop.py in one process (EP=1, tiny preset): the engine thread admits a request's
prompts and n choices with the offline results, fails a request with a bad prompt as a whole, frees KV
blocks when a request is aborted, keeps the queue limit, and a step that never returns (a rank that
stopped answering) makes the watchdog fail every waiting request with 503."""
import asyncio
import threading

import pytest
import torch

from epkit.args import ModelArgs
from epkit.infer import LLM, SamplingParams
from epkit.infer.build import random_model
from epkit.tokenizer import embedded_tokenizer
from epkit.infer.engine_loop import EngineLoop, Submission

torch.set_num_threads(1)
PROMPTS = ["Once upon a time", [1, 15, 27, 301]]
SAMPLED = SamplingParams(temperature=0.9, seed=4, max_tokens=6, ignore_eos=True)


def tiny_llm(**engine) -> LLM:
    args = ModelArgs.from_name("tiny")
    return LLM.from_model(random_model(args, seed=0, router_std=0.5), tokenizer=embedded_tokenizer(args.vocab_size),
                          **engine)


async def answers(sub: Submission, timeout: float = 60) -> dict[int, list]:
    """Each choice's tokens and finish reason, once every choice finished."""
    got: dict[int, list] = {}
    done = 0
    while done < sub.size:
        kind, delta = await asyncio.wait_for(sub.events.get(), timeout)
        assert kind == "update", (kind, delta)
        entry = got.setdefault(delta.index, [[], None])
        entry[0] += delta.token_ids
        entry[1] = delta.finish_reason
        done += delta.finish_reason is not None
    return got


def submission(sub_id, prompts, params, n=1):
    return Submission(sub_id, prompts, [params] * len(prompts), n, asyncio.Queue(), asyncio.get_running_loop())


def test_choices_bad_prompts_abort_and_the_queue_limit():
    ref = tiny_llm().generate([PROMPTS[0]] * 2 + [PROMPTS[1]] * 2, SAMPLED.choices(2) * 2)
    engine = EngineLoop(tiny_llm(), capacity=6, ping_s=0.2)
    engine.start()

    async def main():
        sub = submission("a", PROMPTS, SAMPLED, n=2)
        assert engine.reserve(sub.size) and not engine.reserve(3) and engine.reserve(2)  # 4 + 3 > 6
        engine.release(2)
        engine.submit(sub)
        assert await sub.events.get() == ("admitted",)
        got = await answers(sub)
        assert [got[i][0] for i in range(4)] == [r.token_ids for r in ref]
        engine.release(sub.size)
        bad = submission("b", ["fine", ""], SAMPLED)
        engine.submit(bad)
        assert await bad.events.get() == ("error", 400, "prompt 1: empty prompt")
        long = submission("c", PROMPTS[:1], SamplingParams(max_tokens=400, ignore_eos=True))
        engine.submit(long)
        assert await long.events.get() == ("admitted",)
        for _ in range(50):  # tokens arrive: it runs (the snapshot follows each step)
            await long.events.get()
            if engine.snapshot["kv_blocks_used"] > 0:
                break
        assert engine.snapshot["kv_blocks_used"] > 0 and engine.snapshot["running"] == 1
        engine.abort("c")
        while True:
            kind, delta = await asyncio.wait_for(long.events.get(), 60)
            if delta.finish_reason is not None:
                break
        assert delta.finish_reason == "abort" and delta.completion_tokens < 400
        for _ in range(100):
            if engine.snapshot["kv_blocks_used"] == 0 and engine.snapshot["running"] == 0:
                break
            await asyncio.sleep(0.05)
        assert engine.snapshot["kv_blocks_used"] == 0 and engine.snapshot["running"] == 0
        assert engine.snapshot["routed"]["per_rank"][0] > 0

    try:
        asyncio.run(main())
    finally:
        engine.stop()
    assert not engine._thread.is_alive() and engine.dead is None


def test_a_step_that_never_returns_fails_everyone_with_503():
    llm = tiny_llm()
    release, real_step = threading.Event(), llm.step

    def stuck():  # what a step looks like when another rank stopped answering inside a collective
        release.wait(60)
        return real_step()

    llm.step = stuck
    dead = []
    engine = EngineLoop(llm, capacity=8, ping_s=0.2, step_timeout_s=0.5, on_dead=dead.append)
    engine.start()

    async def main():
        sub = submission("a", PROMPTS[:1], SAMPLED)
        engine.submit(sub)
        assert await sub.events.get() == ("admitted",)
        kind, status, message = await asyncio.wait_for(sub.events.get(), 30)
        assert (kind, status) == ("error", 503) and "no answer from the other ranks for 0.5 s" in message
        assert dead == [message] == [engine.dead]
        later = submission("b", PROMPTS[:1], SAMPLED)
        engine.submit(later)
        assert await asyncio.wait_for(later.events.get(), 30) == ("error", 503, message)

    try:
        asyncio.run(main())
    finally:
        release.set()
        engine._thread.join(30)
    assert not engine._thread.is_alive()


@pytest.mark.parametrize("bad", [0, -1])
def test_choices_need_a_positive_n(bad):
    with pytest.raises(ValueError, match=f"n={bad}"):
        SAMPLED.choices(bad)
