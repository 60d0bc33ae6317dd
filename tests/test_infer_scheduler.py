"""The continuous-batching scheduler (epkit/infer/scheduler.py) without a model: step plans worked out by hand,
and random workloads driven to completion with every step checked against the rules the module states.

`drive` plays the engine's part: a scheduled row computes its tokens, and a row that reaches the end of
its known tokens samples one more (a dummy id) until the request has its tokens.
"""
import random

import pytest

from epkit.infer.kv_cache import BlockAllocator
from epkit.infer.sampling import SamplingParams
from epkit.infer.scheduler import FINISHED, RUNNING, WAITING, Scheduler, Sequence, StepPlan, group_rows


def seq(name: str, prompt: int, new: int = 4, computed: int = 0, generated: int = 0) -> Sequence:
    tokens = list(range(prompt + generated))
    s = Sequence(name, prompt, tokens, SamplingParams(max_tokens=new), seed=0, max_len=prompt + new)
    s.num_computed = computed
    return s


def sched(blocks=64, block_size=4, seqs=8, budget=10, long_prefill=None) -> Scheduler:
    return Scheduler(BlockAllocator(blocks), block_size, seqs, budget, long_prefill)


def rows(plan: StepPlan) -> list[tuple[str, int, int]]:
    return [(s.request_id, start, n) for s, start, n in plan.rows]


def run_step(s: Scheduler) -> StepPlan:
    """One engine step: schedule, compute the rows, sample where a row ends the known tokens."""
    return compute(s, s.schedule())


def compute(s: Scheduler, plan: StepPlan) -> StepPlan:
    for q, start, n in plan.rows:
        q.num_computed = start + n
        if start + n == q.num_tokens:
            q.token_ids.append(7)
            if q.num_tokens >= q.max_len:
                s.finish(q, "length")
    return plan


def test_settings_and_their_errors():
    assert sched(budget=8).long_prefill_tokens == 2 and sched(budget=7).long_prefill_tokens == 1
    assert sched(budget=3).long_prefill_tokens == 1 and sched(budget=9, long_prefill=5).long_prefill_tokens == 5
    assert sched().num_preemptions == 0 and not sched().has_unfinished()
    for kw, msg in [(dict(seqs=0), "max_num_seqs=0 must be at least 1"),
                    (dict(budget=0), "max_num_batched_tokens=0 must be at least 1"),
                    (dict(long_prefill=-1), "long_prefill_tokens=-1 must be at least 1")]:
        with pytest.raises(ValueError, match=msg):
            sched(**kw)
    s = sched(seqs=1, budget=1)  # the smallest legal scheduler still serves
    s.add(seq("a", 2, new=1))
    assert rows(run_step(s)) == [("a", 0, 1)] and rows(run_step(s)) == [("a", 1, 1)] and not s.has_unfinished()


def test_admission_caps_each_prompt_while_others_wait():
    s = sched(budget=10)  # long prefill cap 10 // 4 = 2
    a, b, c = seq("a", 11), seq("b", 9), seq("c", 3, new=8)
    for q in (a, b, c):
        s.add(q)
        assert q.status == WAITING and s.has_unfinished()
    # a and b are capped (others wait behind them); c, the last waiting, may take what is left
    assert rows(run_step(s)) == [("a", 0, 2), ("b", 0, 2), ("c", 0, 3)]
    assert [q.status for q in (a, b, c)] == [RUNNING] * 3 and s.running == [a, b, c] and not s.waiting
    # c decodes first; a and b prefill on, still capped while their 9 + 7 tokens (and c's 1) exceed the budget
    assert rows(run_step(s)) == [("c", 3, 1), ("a", 2, 2), ("b", 2, 2)]
    assert rows(run_step(s)) == [("c", 4, 1), ("a", 4, 2), ("b", 4, 2)]  # 1 + 7 + 5 = 13 > 10
    # 1 + 5 + 3 = 9 tokens fit the budget: no cap, both prompts finish in this step
    assert rows(run_step(s)) == [("c", 5, 1), ("a", 6, 5), ("b", 6, 3)]
    assert [len(q.blocks) for q in (a, b, c)] == [3, 3, 2]  # 11, 9, 6 tokens in blocks of 4


def test_the_cap_applies_only_when_the_step_cannot_hold_everyone():
    """Capping a prompt's chunk only helps when others would be held out: when every waiting prompt fits the
    step whole (exactly, too), each takes all it needs (two 4096-token prompts under a budget of 8192 prefill
    in one step, not in two chunked ones)."""
    for lengths, want in [((4, 5), [("a", 0, 4), ("b", 0, 5)]), ((5, 5), [("a", 0, 5), ("b", 0, 5)]),
                          ((4, 7), [("a", 0, 2), ("b", 0, 7)]), ((3, 3, 4), [("a", 0, 3), ("b", 0, 3), ("c", 0, 4)]),
                          ((3, 3, 5), [("a", 0, 2), ("b", 0, 2), ("c", 0, 5)])]:
        s = sched(budget=10)  # cap 2
        for name, n in zip("abc", lengths):
            s.add(seq(name, n))
        assert rows(run_step(s)) == want, lengths
    s = sched(budget=10)  # a decoding row counts too: 1 + 5 + 5 = 11 tokens do not fit
    s.add(seq("d", 1, new=5))
    run_step(s)
    s.add(seq("a", 5))
    s.add(seq("b", 5))
    assert rows(run_step(s)) == [("d", 1, 1), ("a", 0, 2), ("b", 0, 5)]


def test_one_prompt_alone_takes_the_whole_budget():
    s = sched(budget=10)
    s.add(seq("a", 25, new=2))
    assert [rows(run_step(s)) for _ in range(4)] == [[("a", 0, 10)], [("a", 10, 10)], [("a", 20, 5)], [("a", 25, 1)]]
    assert not s.has_unfinished() and s.allocator.num_free == 63  # finished: every block back


def test_cap_with_an_uneven_budget():
    s = sched(budget=8)  # cap 2
    s.add(seq("a", 5))
    s.add(seq("b", 5))
    assert rows(run_step(s)) == [("a", 0, 2), ("b", 0, 5)]


def test_budget_runs_out_exactly():
    s = sched(budget=5, long_prefill=4)
    for name, n in (("a", 4), ("b", 3), ("c", 2)):
        s.add(seq(name, n))
    plan = run_step(s)
    assert rows(plan) == [("a", 0, 4), ("b", 0, 1)] and plan.num_tokens == 5
    assert [q.request_id for q in s.waiting] == ["c"]
    # a decodes, b finishes its prompt (capped at 4: c waits), c gets the rest
    assert rows(run_step(s)) == [("a", 4, 1), ("b", 1, 2), ("c", 0, 2)]


def test_running_rows_stop_at_the_budget_and_resume_next_step():
    s = sched(budget=100)
    for name in "abc":
        s.add(seq(name, 1))
    assert rows(run_step(s)) == [("a", 0, 1), ("b", 0, 1), ("c", 0, 1)]
    s.max_num_batched_tokens = 2  # read every step
    assert rows(run_step(s)) == [("a", 1, 1), ("b", 1, 1)]
    assert rows(run_step(s)) == [("a", 2, 1), ("b", 2, 1)]  # oldest first: c waits for a budget slot


def test_row_limit():
    s = sched(seqs=2, budget=100)
    for name in "abc":
        s.add(seq(name, 2))
    assert rows(run_step(s)) == [("a", 0, 2), ("b", 0, 2)] and [q.request_id for q in s.waiting] == ["c"]


def _hold(s: Scheduler, q: Sequence, status=RUNNING) -> Sequence:
    """Put a sequence straight into the running set holding the blocks its computed tokens need."""
    q.blocks = s.allocator.allocate(-(-q.num_computed // s.block_size))
    q.status = status
    s.running.append(q)
    return q


def test_preemption_takes_the_newest_and_stops_admission():
    s = sched(blocks=4, block_size=2, budget=100)  # 3 usable blocks
    a, b, c = (_hold(s, seq(n, 2, computed=2, generated=1)) for n in "abc")  # each needs a second block
    late = seq("late", 1)
    s.add(late)
    plan = run_step(s)
    # a takes c's block; b finds none and no one newer: it preempts itself. Nobody is admitted.
    assert rows(plan) == [("a", 2, 1)] and plan.preempted == [c, b]
    assert s.num_preemptions == 2 and (b.num_preemptions, c.num_preemptions, a.num_preemptions) == (1, 1, 0)
    for q in (b, c):
        assert q.status == WAITING and q.blocks == [] and q.num_computed == 0
    assert list(s.waiting) == [b, c, late] and s.running == [a]  # preempted first, in order, then arrivals
    assert len(a.blocks) == 2 and s.allocator.num_free == 1
    # readmitted later, they prefill their prompt and output again (recompute) and keep their tokens
    plan = run_step(s)
    assert rows(plan)[0] == ("a", 3, 1) and b.token_ids == [0, 1, 2]


def test_a_preempted_row_is_skipped_and_the_rest_still_run():
    s = sched(blocks=6, block_size=2, budget=3)  # 5 usable blocks, all held below
    d0 = _hold(s, seq("d0", 2, computed=2, generated=1))  # decoding, needs 1 more block
    p1 = _hold(s, seq("p1", 8, computed=4))  # prefilling, holds 2 blocks
    d1 = _hold(s, seq("d1", 4, computed=4, generated=1))  # decoding, newest
    assert s.allocator.num_free == 0
    plan = run_step(s)
    # d0 preempts d1 (newest, not yet scheduled), is then skipped; p1 still prefills with what d1 freed
    assert rows(plan) == [("d0", 2, 1), ("p1", 4, 2)] and plan.preempted == [d1]
    assert d1.status == WAITING and list(s.waiting) == [d1]


def test_finish_releases_blocks_from_either_queue():
    s = sched(budget=100)
    a, b = seq("a", 5), seq("b", 5)
    s.add(a)
    run_step(s)
    s.add(b)
    held = len(a.blocks)
    s.finish(b, "error")  # still waiting
    assert b.status == FINISHED and b.finish_reason == "error" and not s.waiting and s.running == [a]
    s.finish(a, "stop")
    assert a.status == FINISHED and a.blocks == [] and not s.running and s.allocator.num_free == 63 and held == 2
    assert not s.has_unfinished()


def _check_step(s: Scheduler, before: dict, plan: StepPlan, budget: int) -> None:
    """The module's rules, checked on one step of any workload."""
    names = [q.request_id for q, _, _ in plan.rows]
    assert len(names) == len(set(names)) and sum(n for _, _, n in plan.rows) <= budget
    assert len(plan.rows) <= s.max_num_seqs and len(s.running) <= s.max_num_seqs
    admitted = False
    for q, start, n in plan.rows:
        was_running, computed, remaining = before[q.request_id]
        assert n >= 1 and n <= remaining and start == computed
        assert len(q.blocks) * s.block_size >= start + n
        if not was_running:
            admitted = True
            assert start == 0
        else:
            assert not admitted, "running sequences are served before waiting ones are admitted"
    assert not (admitted and plan.preempted), "no admission in a step that preempted"
    for q in plan.preempted:
        assert q.status == WAITING and q.blocks == [] and q.num_computed == 0 and q not in s.running
    held = [b for q in s.running for b in q.blocks]
    assert len(held) == len(set(held)) and 0 not in held
    assert s.allocator.num_free + len(held) == s.allocator.num_blocks - 1
    assert all(not q.blocks for q in s.waiting)


def drive_random_workload(seed: int) -> int:
    """Run a seeded random workload to the end, checking every step; returns the most times one request
    was preempted."""
    rng = random.Random(seed)
    bs = rng.choice([2, 4])
    # blocks: enough for the longest request (20 tokens) plus a few, so that the pool runs short often
    s = sched(blocks=-(-20 // bs) + 1 + rng.randint(0, 2), block_size=bs, seqs=rng.randint(3, 6),
              budget=rng.randint(3, 20), long_prefill=rng.choice([None, 1, 3]))
    pending = [seq(f"r{i}", rng.randint(1, 14), new=rng.randint(1, 6)) for i in range(12)]
    everyone = list(pending)
    preempted = {q.request_id: 0 for q in everyone}
    for step in range(2000):
        while pending and rng.random() < 0.8:
            s.add(pending.pop(0))
        if not s.has_unfinished():
            if not pending:
                break
            continue
        before = {q.request_id: (q.status == RUNNING, q.num_computed, q.remaining) for q in s.running + list(s.waiting)}
        plan = s.schedule()
        assert plan.rows, "no progress"
        _check_step(s, before, plan, s.max_num_batched_tokens)
        for q in plan.preempted:
            preempted[q.request_id] += 1
        compute(s, plan)
    assert not pending and not s.has_unfinished(), "did not finish"
    for q in everyone:
        assert q.status == FINISHED and q.num_tokens == q.max_len and q.blocks == []
    assert s.allocator.num_free == s.allocator.num_blocks - 1
    assert s.num_preemptions > 0, "the workload should have run the pool short"
    assert s.num_preemptions == sum(preempted.values())
    assert {q.request_id: q.num_preemptions for q in everyone} == preempted
    return max(preempted.values())


def test_random_workloads_follow_the_rules_and_finish():
    most = [drive_random_workload(seed) for seed in range(6)]
    assert max(most) > 1, "some request should have been preempted twice (each time counted)"


def test_group_rows_by_hand():
    r = {n: (object(), 0, n) for n in (2, 3, 8, 9, 16)}
    one = [(object(), 5, 1), (object(), 9, 1)]

    def sizes(groups):
        return [[x[2] for x in g] for g in groups]
    # decode rows first; then longest first, a row joining while the padded size stays <= 2 x real tokens
    assert sizes(group_rows(one + [r[3], r[16], r[2]], max_groups=4)) == [[1, 1], [16, 3], [2]]
    assert sizes(group_rows([r[2], r[16], r[8], r[9]], max_groups=4)) == [[16, 9, 8, 2]]
    assert sizes(group_rows([r[2], r[16], r[3]], max_groups=4)) == [[16, 3], [2]]
    # exactly twice: 8, 2 and 2 pad to 3 x 8 = 24 = 2 x 12 real tokens, so the second 2 still joins
    assert sizes(group_rows([r[8], r[2], (object(), 0, 2)], max_groups=4)) == [[8, 2, 2]]
    # a cap on forwards per step: the rest join the last group
    assert sizes(group_rows(one + [r[16], r[3], r[2]], max_groups=2)) == [[1, 1], [16, 3, 2]]
    assert sizes(group_rows([r[16], r[3], r[2]], max_groups=1)) == [[16, 3, 2]]
    assert group_rows([], max_groups=4) == [] and sizes(group_rows(one, 4)) == [[1, 1]]


def test_group_rows_bounds_padding():
    rows_ = [(object(), 0, n) for n in (1, 30, 2, 28, 1, 3, 16)]
    groups = group_rows(rows_, max_groups=4)
    assert [r[2] for r in groups[0]] == [1, 1]  # decode rows together
    assert sorted(r[2] for g in groups for r in g) == sorted(r[2] for r in rows_)
    for g in groups[1:]:
        T, real = max(r[2] for r in g), sum(r[2] for r in g)
        assert len(g) * T <= 2 * real, [r[2] for r in g]
    assert len(group_rows(rows_, max_groups=2)) == 2  # a cap on forwards per step wins over padding


def test_steps_that_decode_keep_to_max_tokens_while_decoding():
    """max_tokens_while_decoding bounds a step that decodes: its decoding rows (all of them, even past the
    bound), then prefill in what is left; a step with nothing decoding keeps the whole budget."""
    s = Scheduler(BlockAllocator(64), 4, 8, 10, None, max_tokens_while_decoding=3)
    s.add(seq("a", 2, new=5))
    s.add(seq("b", 2, new=5))
    assert rows(run_step(s)) == [("a", 0, 2), ("b", 0, 2)]  # nothing decodes yet: the whole budget
    s.add(seq("c", 9))
    assert rows(run_step(s)) == [("a", 2, 1), ("b", 2, 1), ("c", 0, 1)]
    assert rows(run_step(s)) == [("a", 3, 1), ("b", 3, 1), ("c", 1, 1)]
    for name in "de":
        s.add(seq(name, 1, new=3))
    assert rows(run_step(s)) == [("a", 4, 1), ("b", 4, 1), ("c", 2, 1)]  # d, e wait: no room this step
    s.max_tokens_while_decoding = 1  # read every step; 1 is the smallest bound allowed
    assert Scheduler(BlockAllocator(64), 4, 8, 10, None, max_tokens_while_decoding=1).max_tokens_while_decoding == 1
    assert rows(run_step(s)) == [("a", 5, 1), ("b", 5, 1)]  # two decoding rows run, past the bound of 1
    for bad in (0, -1, True, 2.5):
        with pytest.raises(ValueError, match=f"max_tokens_while_decoding={bad!r} must be a positive integer"):
            Scheduler(BlockAllocator(64), 4, 8, 10, None, max_tokens_while_decoding=bad)
