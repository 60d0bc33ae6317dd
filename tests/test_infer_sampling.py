"""Sampling (epkit/infer/sampling.py) against distributions computed here from the formulas.

Draws are counter-based (seed, output index, vocab id), so every test below is deterministic: a
chi-square statistic over 20000 seeded draws either clears the 0.1% critical value or it never does.
The oracle applies temperature to the log-probabilities, then top-k, then top-p on the renormalised
top-k distribution (the order transformers' warpers use).
"""
import math
import warnings

import numpy as np
import pytest
import torch

from epkit.infer.sampling import (GREEDY_BELOW, HostCopy, SamplingBatch, SamplingParams, filter_logits, sample,
                                  to_device, token_logprobs, uniform_noise)

N = 20000
PROBS = [0.2, 0.05, 0.28, 0.1, 0.22, 0.15]  # unsorted on purpose: the filters must sort
CRITICAL_0_001 = {1: 10.828, 2: 13.816, 3: 16.266, 4: 18.467, 5: 20.515}  # chi2.ppf(0.999, df)


def expected(probs, temperature=1.0, top_k=0, top_p=1.0) -> np.ndarray:
    """The distribution a correct sampler draws from, in float64, written from the definitions."""
    p = np.asarray(probs, dtype=np.float64) ** (1.0 / temperature)
    p /= p.sum()
    order = np.argsort(-p, kind="stable")
    keep = np.zeros(len(p), dtype=bool)
    keep[order[: top_k if top_k > 0 else len(p)]] = True
    q = np.where(keep, p, 0.0)
    q /= q.sum()
    mass_above = 0.0
    for i in order:  # top-p: the most likely tokens until their mass reaches top_p (at least one)
        if keep[i] and mass_above >= top_p:
            keep[i] = False
        mass_above += q[i]
    out = np.where(keep, p, 0.0)
    return out / out.sum()


def draws(probs, n=N, temperature=1.0, top_k=0, top_p=1.0, counter=7, seed0=0) -> np.ndarray:
    V = len(probs)
    logits = torch.log(torch.tensor(probs)).expand(n, V).contiguous()
    batch = SamplingBatch([temperature] * n, [top_k if top_k > 0 else V] * n, [top_p] * n,
                          list(range(seed0, seed0 + n)), [counter] * n)
    return torch.bincount(sample(logits, batch), minlength=V).numpy()


def chi_square(counts: np.ndarray, probs: np.ndarray) -> tuple[float, int]:
    """Pearson's statistic over the tokens with non-zero probability, and its degrees of freedom."""
    support = probs > 0
    exp = probs[support] * counts.sum()
    return float(((counts[support] - exp) ** 2 / exp).sum()), int(support.sum()) - 1


def critical(df: int) -> float:
    try:
        from scipy.stats import chi2
        return float(chi2.ppf(0.999, df))
    except ImportError:
        return CRITICAL_0_001[df]


@pytest.mark.parametrize("settings", [
    dict(temperature=1.0), dict(temperature=0.5), dict(temperature=2.0),
    dict(top_k=3), dict(top_p=0.75), dict(temperature=0.5, top_k=5, top_p=0.9), dict(temperature=2.0, top_k=4),
], ids=lambda s: ",".join(f"{k}={v}" for k, v in s.items()))
def test_draws_follow_the_distribution(settings):
    want = expected(PROBS, **settings)
    counts = draws(PROBS, **settings)
    assert counts.sum() == N
    assert (counts[want == 0] == 0).all(), f"filtered tokens were drawn: {counts} for {want}"
    stat, df = chi_square(counts, want)
    assert stat < critical(df), f"chi-square {stat:.1f} (df {df}) for {settings}: counts {counts}, want {want * N}"


def test_the_chi_square_test_can_fail():
    """Power check: draws at temperature 2 are far from the temperature-0.5 distribution (what `logits * T`
    instead of `logits / T` would sample), and top-k 3 draws are far from top-k 4."""
    for got, wrong in [(dict(temperature=2.0), dict(temperature=0.5)), (dict(top_k=3), dict(top_k=4)),
                       (dict(top_p=0.75), dict(top_p=0.9))]:
        stat, df = chi_square(draws(PROBS, n=4000, **got), expected(PROBS, **wrong))
        assert stat > 10 * critical(df), (got, wrong, stat)


def test_oracle_itself():
    """The oracle's filters on hand-checked cases."""
    np.testing.assert_allclose(expected([0.5, 0.3, 0.2], temperature=0.5), np.array([25, 9, 4]) / 38)
    np.testing.assert_allclose(expected([0.5, 0.3, 0.2], top_k=2), [0.625, 0.375, 0.0])
    np.testing.assert_allclose(expected([0.5, 0.3, 0.2], top_p=0.5), [1.0, 0.0, 0.0])
    np.testing.assert_allclose(expected([0.5, 0.3, 0.2], top_p=0.51), [0.625, 0.375, 0.0])
    np.testing.assert_allclose(expected([0.1, 0.2, 0.3, 0.4], top_k=3, top_p=0.5), [0, 0, 3 / 7, 4 / 7])


def test_filter_logits_keeps_exactly_the_oracles_support():
    g = torch.Generator().manual_seed(0)
    for trial in range(40):
        V = 2 + trial % 9
        probs = torch.softmax(torch.randn(V, generator=g, dtype=torch.float64) * 2, -1)
        top_k = int(torch.randint(1, V + 1, (1,), generator=g))
        top_p = float(torch.rand(1, generator=g, dtype=torch.float64)) * 0.98 + 0.01
        out = filter_logits(torch.log(probs)[None], torch.tensor([top_k]), torch.tensor([top_p], dtype=torch.float64))
        want = expected(probs.tolist(), top_k=top_k, top_p=top_p)
        assert torch.isfinite(out[0]).numpy().tolist() == (want > 0).tolist(), (probs, top_k, top_p)
        kept = torch.isfinite(out[0])
        torch.testing.assert_close(out[0][kept], torch.log(probs)[kept])  # survivors keep their logits


def test_filter_logits_rows_are_independent():
    logits = torch.log(torch.tensor([[0.5, 0.2, 0.2, 0.1], [0.1, 0.2, 0.3, 0.4], [0.25] * 4]))
    out = filter_logits(logits, torch.tensor([2, 4, 4]), torch.tensor([1.0, 0.5, 1.0]))
    keep = torch.isfinite(out)
    # row 0: top-2 keeps 0.5 and one of the 0.2s; row 1: top-p 0.5 keeps 0.4 and 0.3 (0.4 < 0.5); row 2: all
    assert keep[0].tolist().count(True) == 2 and keep[0, 0]
    assert keep[1].tolist() == [False, False, True, True]
    assert keep[2].all()


def test_rows_mix_greedy_and_sampled_and_do_not_depend_on_the_batch():
    probs = torch.tensor([0.1, 0.2, 0.3, 0.4])
    logits = torch.log(probs).expand(6, 4).contiguous()
    logits[1] = torch.tensor([3.0, 0.0, 0.0, 0.0])  # a greedy row whose argmax is not the others'
    temps, seeds = [1.0, 0.0, 0.7, 0.0, 1.3, 1.0], [11, 12, 13, 14, 15, 16]
    batch = SamplingBatch(temps, [4] * 6, [1.0] * 6, seeds, [0, 1, 2, 3, 4, 5])
    out = sample(logits, batch)
    assert out[1] == 0 and out[3] == 3  # greedy rows: argmax, whatever their seed
    for i in range(6):  # each row alone gives the same token as in the batch
        alone = SamplingBatch([temps[i]], [4], [1.0], [seeds[i]], [i])
        assert sample(logits[i: i + 1], alone).item() == out[i].item(), i
    assert sample(logits[[1, 3]], SamplingBatch([0.0, 0.0], [4, 4], [1.0, 1.0], [1, 2], [0, 0])).tolist() == [0, 3]


def test_the_draw_is_the_exponential_race_over_the_noise():
    """sample() = argmax p / -log(u) with u = uniform_noise(seed, counter): the documented draw, so
    a seeded request is reproducible from (seed, output index) alone."""
    probs = torch.tensor([0.1, 0.2, 0.3, 0.4], dtype=torch.float64)
    seeds, counters = torch.tensor([5, 2**40 + 3, 77]), torch.tensor([0, 9, 123])
    u = uniform_noise(seeds, counters, 4)
    assert u.dtype == torch.float64 and ((u > 0) & (u < 1)).all()
    want = torch.argmax(probs / -torch.log(u), dim=-1)
    got = sample(torch.log(probs.float()).expand(3, 4).contiguous(),
                 SamplingBatch([1.0] * 3, [4] * 3, [1.0] * 3, seeds.tolist(), counters.tolist()))
    assert got.tolist() == want.tolist()


def test_uniform_noise_is_uniform_and_keyed_by_every_input():
    seeds = torch.arange(4000)
    u = uniform_noise(seeds, torch.zeros(4000, dtype=torch.int64), 5)  # [4000, 5]
    counts = np.histogram(u.numpy().ravel(), bins=10, range=(0, 1))[0]
    stat, df = chi_square(counts, np.full(10, 0.1))
    assert stat < critical(5) + 10, counts  # df 9: 27.9 at 0.1%; critical(5) + 10 = 30.5
    assert math.isclose(float(u.mean()), 0.5, abs_tol=0.01)
    base = uniform_noise(torch.tensor([7]), torch.tensor([3]), 8)
    assert not torch.equal(base, uniform_noise(torch.tensor([8]), torch.tensor([3]), 8))  # seed
    assert not torch.equal(base, uniform_noise(torch.tensor([7]), torch.tensor([4]), 8))  # counter
    assert not torch.equal(base, uniform_noise(torch.tensor([7 + 2**32]), torch.tensor([3]), 8))  # high seed bits
    assert len(set(base[0].tolist())) == 8  # vocab ids


def test_params_from_requests():
    batch = SamplingBatch.from_params([SamplingParams(temperature=0.3, top_k=0, top_p=0.5),
                                       SamplingParams(top_k=-1), SamplingParams(top_k=7)], [1, 2, 3], [0, 4, 8], 50)
    assert batch.temperature == [0.3, 1.0, 1.0] and batch.top_k == [50, 50, 7] and batch.top_p == [0.5, 1.0, 1.0]
    assert batch.seeds == [1, 2, 3] and batch.counters == [0, 4, 8]
    assert SamplingParams(temperature=0).greedy and not SamplingParams(temperature=0.01).greedy
    assert SamplingParams(stop="x").stop_strings == ["x"] and SamplingParams(stop=["a", "b"]).stop_strings == ["a", "b"]
    assert SamplingParams().stop_strings == []


def test_filter_boundaries():
    """top_p is reached, not exceeded: with four equal tokens, top_p 0.5 keeps exactly two. top_p 1 with top_k:
    when the kept tokens' float32 mass sums to just under 1, the top-k cut must still hold."""
    out = filter_logits(torch.zeros(1, 4), torch.tensor([4]), torch.tensor([0.5]))
    assert int(torch.isfinite(out).sum()) == 2
    out = filter_logits(torch.zeros(1, 4), torch.tensor([4]), torch.tensor([0.5000001]))
    assert int(torch.isfinite(out).sum()) == 3
    g = torch.Generator().manual_seed(0)
    for _ in range(100):  # find logits whose top-3 probabilities sum below 1 in float32
        logits = torch.randn(1, 8, generator=g) * 2
        p = torch.softmax(logits.sort(descending=True).values[:, :3], -1)
        if float(p.cumsum(-1)[0, -1]) < 1.0:
            break
    else:
        raise AssertionError("no case found")
    out = filter_logits(logits, torch.tensor([3]), torch.tensor([1.0]))
    assert int(torch.isfinite(out).sum()) == 3 and torch.equal(torch.isfinite(out[0]), logits[0] >= logits.topk(3).values[0, -1])


def test_noise_values_differ_across_a_large_vocabulary():
    """Each vocab id gets its own draw: no two ids of a row share a noise value (a hash that lost bits would
    repeat values across a 32000-token vocabulary and tie their draws)."""
    u = uniform_noise(torch.tensor([3, 2**40 + 1]), torch.tensor([0, 17]), 32000)
    for row in u:
        assert len(torch.unique(row)) == 32000


def test_large_and_negative_seeds():
    probs = torch.log(torch.tensor([[0.1, 0.2, 0.3, 0.4]])).expand(64, 4).contiguous()

    def draw(seed):
        return sample(probs, SamplingBatch([1.0] * 64, [4] * 64, [1.0] * 64, [seed] * 64, list(range(64)))).tolist()
    assert draw(2**63 + 5) == draw(5) and draw(2**64 + 5) == draw(5)  # seeds count modulo 2^63
    assert draw(-1) == draw(2**63 - 1) and draw(5) != draw(6)


@pytest.mark.parametrize("bad, message", [
    (dict(max_tokens=True), "max_tokens=True must be a positive integer"),
    (dict(max_tokens=2.0), "max_tokens=2.0 must be a positive integer"),
    (dict(max_tokens=0), "max_tokens=0 must be a positive integer"),
    (dict(temperature=True), "temperature=True must be a finite number >= 0"),
    (dict(temperature="1"), "temperature='1' must be a finite number >= 0"),
    (dict(temperature=float("inf")), "temperature=inf must be a finite number >= 0"),
    (dict(temperature=-0.1), "temperature=-0.1 must be a finite number >= 0"),
    (dict(top_p=True), "top_p=True must be in"),
    (dict(top_p="0.5"), "top_p='0.5' must be in"),
    (dict(top_p=0), "top_p=0 must be in"),
    (dict(top_k=True), "top_k=True must be an integer >= -1"),
    (dict(top_k=1.0), "top_k=1.0 must be an integer >= -1"),
    (dict(top_k=-2), "top_k=-2 must be an integer >= -1"),
    (dict(seed=True), "seed=True must be an integer or None"),
    (dict(stop=3), "stop=3 must be a non-empty string or a list of them"),
    (dict(stop=["a", ""]), "stop=\\['a', ''\\] must be a non-empty string"),
    (dict(stop=["a", 3]), "stop=\\['a', 3\\] must be a non-empty string"),
    (dict(stop_token_ids="x"), "stop_token_ids='x' must be a list of token ids"),
    (dict(stop_token_ids=[True]), "stop token id True is outside the vocabulary \\(size 50\\)"),
    (dict(stop_token_ids=[50]), "stop token id 50 is outside the vocabulary \\(size 50\\)"),
    (dict(stop_token_ids=[-1]), "stop token id -1 is outside the vocabulary"),
    (dict(stop_token_ids=[1.0]), "stop token id 1.0 is outside the vocabulary"),
    (dict(logprobs=True), "logprobs=True must be None or an integer in \\[0, 20\\]"),
    (dict(logprobs=21), "logprobs=21 must be None or an integer in"),
    (dict(logprobs=-1), "logprobs=-1 must be None or an integer in"),
    (dict(logprobs=2.0), "logprobs=2.0 must be None or an integer in"),
])
def test_validate_names_the_bad_value(bad, message):
    with pytest.raises(ValueError, match=f"^{message}"):
        SamplingParams(**bad).validate(50)


def test_validate_accepts_the_edges():
    for ok in (dict(max_tokens=1), dict(temperature=0), dict(temperature=2), dict(top_p=1.0), dict(top_p=1e-9),
               dict(top_k=-1), dict(top_k=0), dict(top_k=50), dict(seed=-3), dict(seed=None), dict(stop="x"),
               dict(stop=("a", "b")), dict(stop_token_ids=[0, 49]), dict(stop_token_ids=(2,)), dict(logprobs=0),
               dict(logprobs=20)):
        SamplingParams(**ok).validate(50)
    with pytest.raises(ValueError, match=r"^unknown sampling field\(s\) temprature, topp; known: ignore_eos, logprobs, "
                                         r"max_tokens, seed, skip_special_tokens, stop, stop_token_ids, temperature, "
                                         r"top_k, top_p$"):
        SamplingParams.from_dict({"topp": 1, "temprature": 1, "seed": 2})
    assert SamplingParams.from_dict({"seed": 2, "stop": ["x"]}) == SamplingParams(seed=2, stop=["x"])


def test_temperature_at_the_greedy_threshold_still_samples_sharply():
    """Below GREEDY_BELOW a row is greedy; at it, it samples at that temperature (a near one-hot draw), never
    at temperature 1."""
    logits = torch.log(torch.tensor([[0.4, 0.6]])).expand(400, 2).contiguous()
    for t in (GREEDY_BELOW, GREEDY_BELOW / 2, 0.0):
        batch = SamplingBatch([t] * 400, [2] * 400, [1.0] * 400, list(range(400)), [0] * 400)
        assert sample(logits, batch).tolist() == [1] * 400, t
    assert SamplingParams(temperature=GREEDY_BELOW / 2).greedy and not SamplingParams(temperature=GREEDY_BELOW).greedy


def test_at_the_greedy_threshold_the_temperature_applies():
    """Exactly at GREEDY_BELOW a row is sampled at that temperature, not decoded greedily: two logits GREEDY_BELOW
    apart are then drawn like logits 0 and 1 (1 : e)."""
    logits = torch.tensor([0.0, GREEDY_BELOW]).expand(N, 2).contiguous()
    batch = SamplingBatch([GREEDY_BELOW] * N, [2] * N, [1.0] * N, list(range(N)), [0] * N)
    counts = torch.bincount(sample(logits, batch), minlength=2).numpy()
    stat, df = chi_square(counts, np.exp([0.0, 1.0]) / np.exp([0.0, 1.0]).sum())
    assert stat < critical(df), counts


def test_sampling_stays_on_the_logits_device():
    """Every tensor sample() makes (temperatures, filter settings, noise) is made on the logits' device. The meta
    device stands in for an accelerator: a tensor made on the CPU by default would not mix with it."""
    batch = SamplingBatch([0.0, 0.7, 1.3], [5, 2, 5], [1.0, 1.0, 0.8], [1, 2, 3], [0, 4, 9])  # greedy, top-k, top-p
    out = sample(torch.randn(3, 5).to("meta"), batch)
    assert out.device.type == "meta" and out.shape == (3,) and out.dtype == torch.int64
    u = uniform_noise(torch.tensor([1, 2], device="meta"), torch.tensor([0, 5], device="meta"), 7)
    assert u.device.type == "meta" and u.shape == (2, 7)


def test_token_logprobs():
    logits = torch.tensor([[1.0, 2.0, 0.5], [0.0, 0.0, 3.0]])
    logp = torch.log_softmax(logits.double(), -1).float()
    chosen = torch.tensor([0, 2])
    got, ids, top = token_logprobs(logits.to(torch.bfloat16).float(), chosen, 0)
    torch.testing.assert_close(got, logp.gather(1, chosen[:, None])[:, 0])
    assert ids.shape == (2, 0) and top.shape == (2, 0) and ids.dtype == torch.int64
    got, ids, top = token_logprobs(logits, chosen, 1)
    assert ids.tolist() == [[1], [2]] and top.shape == (2, 1)
    torch.testing.assert_close(top[:, 0], logp.max(-1).values)
    _, ids, top = token_logprobs(logits, chosen, 3)
    assert ids.tolist() == [[1, 0, 2], [2, 0, 1]] or ids.tolist() == [[1, 0, 2], [2, 1, 0]]
    torch.testing.assert_close(top, logp.sort(-1, descending=True).values)


def test_host_and_device_copies_on_the_cpu():
    t = torch.tensor([1, 2, 3])
    copy = HostCopy(t)
    t.add_(10)  # the copy was taken when it was made
    assert copy.get() == [1, 2, 3]
    assert to_device([1, 2], torch.float32, "cpu").dtype == torch.float32
    assert to_device([1.5, 2], torch.int64, torch.device("cpu")).tolist() == [1, 2]
    with warnings.catch_warnings():  # a CPU tensor (the runner's payload) is converted, not copy-constructed
        warnings.simplefilter("error")
        moved = to_device(torch.tensor([1, 2], dtype=torch.int32), torch.int64, "cpu")
    assert moved.dtype == torch.int64 and moved.tolist() == [1, 2]
    assert to_device([True, False], torch.bool, "meta").device.type == "meta"


def test_choices():
    p = SamplingParams(seed=4)
    assert p.choices(1) == [p] and [c.seed for c in p.choices(3)] == [4, 5, 6]
    with pytest.raises(ValueError, match="^n=0 must be a positive integer$"):
        p.choices(0)
