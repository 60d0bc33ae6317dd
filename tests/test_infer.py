"""Inference engine on one process (EP=1): parity with transformers' greedy `generate`, continuous
batching, chunked prefill, preemption, sampling, streaming, stop strings, bad input.

Helpers here (reference decoding, checkpoints with a tokenizer) are shared with test_infer_ep.py.
"""
import dataclasses
import math

import pytest
import torch

from conftest import hf_model, tiny_args
from epkit.infer import LLM, SamplingParams
from epkit.infer.kv_cache import BlockAllocator, blocks_for_budget, bytes_per_block

torch.set_num_threads(1)  # tiny models: threads only contend on the shared cores

MAX_NEW = 12
LENGTHS = [1, 3, 5, 8, 13, 21, 2, 30]  # 8 prompts of different lengths
TEXT = ["the quick brown fox jumps over the lazy dog", "a stitch in time saves nine",
        "to be or not to be that is the question", "all that glitters is not gold",
        "the early bird catches the worm", "actions speak louder than words"] * 4


def make_prompts(vocab: int, lengths=LENGTHS, seed: int = 0) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, vocab, (n,), generator=g).tolist() for n in lengths]


def make_checkpoint(path: str, seed: int = 0, tokenizer: bool = False, **overrides) -> str:
    """transformers' own MixtralForCausalLM, random weights, saved by transformers (hub names)."""
    args = tiny_args(**overrides)
    hf = hf_model(args, seed=seed)
    hf.save_pretrained(path)
    if tokenizer:
        make_tokenizer(path, args.vocab_size)
    return path


def make_tokenizer(path: str, vocab_size: int) -> None:
    """A small BPE tokenizer whose specials match config.json: <unk>=0, <s>=1 (BOS), </s>=2 (EOS)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer, tok.decoder = pre_tokenizers.Metaspace(), decoders.Metaspace()
    tok.train_from_iterator(TEXT, trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<unk>", "<s>", "</s>"]))
    assert tok.get_vocab_size() <= vocab_size
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>"
                            ).save_pretrained(path)


def hf_reference(path: str, prompts, max_new: int = MAX_NEW):
    """transformers' greedy generate, one prompt at a time: (tokens, top-two logit gap per step)."""
    from transformers import AutoModelForCausalLM
    hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    refs = []
    for p in prompts:
        ids = torch.tensor([p])
        out = hf.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=max_new,
                          output_logits=True, return_dict_in_generate=True, pad_token_id=0)
        gaps = [float(torch.topk(l[0].float(), 2).values.diff().abs()) for l in out.logits]
        refs.append((out.sequences[0, len(p):].tolist(), gaps))
    return refs


def assert_greedy_matches(ours: list[int], ref, label: str = "") -> None:
    """Token-identical, except that the comparison may stop at a step where the reference's top two
    logits are within 1e-4 (a near tie that rounding can flip)."""
    tokens, gaps = ref
    for i, t in enumerate(tokens):
        assert i < len(ours), f"{label}: ours stopped after {len(ours)} tokens, reference has {tokens}"
        if ours[i] != t:
            assert gaps[i] < 1e-4, f"{label}: step {i}: ours {ours} vs reference {tokens} (top-2 gap {gaps[i]:.2e})"
            return
    assert len(ours) == len(tokens), f"{label}: ours {ours} vs reference {tokens}"


GREEDY = SamplingParams(temperature=0, max_tokens=MAX_NEW)


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    path = make_checkpoint(str(tmp_path_factory.mktemp("infer") / "ck"), seed=0, tokenizer=True)
    prompts = make_prompts(96)
    return path, prompts, hf_reference(path, prompts)


def record_rows(llm) -> list[tuple[str, int, int, int]]:
    """Log (request id, first position, tokens, prompt length) of every row the scheduler runs."""
    log, schedule = [], llm.scheduler.schedule

    def logged():
        plan = schedule()
        log.extend((seq.request_id, start, n, seq.prompt_len) for seq, start, n in plan.rows)
        return plan
    llm.scheduler.schedule = logged
    return log


def partial_chunks(log) -> list[tuple[str, int, int, int]]:
    """Prefill rows of several tokens that neither start nor finish their prompt (mid-prompt chunks)."""
    return [r for r in log if r[2] > 1 and r[1] > 0 and r[1] + r[2] < r[3]]


@pytest.mark.parametrize("engine", [dict(), dict(max_num_batched_tokens=11, block_size=4, long_prefill_tokens=5)],
                         ids=["one_step_prefill", "chunked_prefill"])
def test_greedy_matches_transformers(ckpt, engine):
    path, prompts, refs = ckpt
    llm = LLM(path, **engine)
    log = record_rows(llm)
    prepared, view = [], llm.cache.view  # forwards (one, or merged segments): fresh (causal, own keys) or not

    def spy(table, positions, fresh=False):
        if positions.shape[1] > 1:  # multi-token rows
            prepared.append((fresh, bool((positions[:, 0] == 0).all())))
        return view(table, positions, fresh)
    llm.cache.view = spy
    outs = llm.generate(prompts, GREEDY)
    assert prepared and all(fresh == starts_at_0 for fresh, starts_at_0 in prepared), prepared
    assert {f for f, _ in prepared} == ({True, False} if engine else {True})  # later chunks read the cache
    for i, (out, ref) in enumerate(zip(outs, refs)):
        assert out.error is None and out.finish_reason in ("stop", "length")
        assert_greedy_matches(out.token_ids, ref, f"prompt {i}")
    load = llm.expert_load()
    real = sum(len(p) for p in prompts) + sum(len(o.token_ids) - 1 for o in outs)  # tokens run through the model
    assert sum(load["per_expert"][0]) == real * 2  # top-2, padding not counted
    if engine:
        # several multi-token chunks inside prompts, crossing KV blocks: the path this case exists for
        chunks = partial_chunks(log)
        assert len(chunks) >= 3 and any(start % 4 + n > 4 for _, start, n, _ in chunks), log
        assert any(n > 1 and start + n == plen and start > 0 for _, start, n, plen in log), log  # a last chunk
        one_shot = LLM(path).generate(prompts, GREEDY)
        assert [o.token_ids for o in outs] == [o.token_ids for o in one_shot]
    else:
        assert all(start == 0 and n == plen for _, start, n, plen in log if start < plen), "prefill in one step"


def test_requests_arriving_while_others_run(ckpt):
    path, prompts, refs = ckpt
    llm = LLM(path, max_num_batched_tokens=16, block_size=4)
    first = [llm.add_request(p, GREEDY) for p in prompts[:3]]
    results = {}
    for _ in range(3):
        results.update({o.request_id: o for o in llm.step() if o.finished})
    assert not results, "the first requests should still be running when the others arrive"
    later = [llm.add_request(p, GREEDY) for p in prompts[3:]]
    while llm.has_unfinished():
        results.update({o.request_id: o for o in llm.step() if o.finished})
    solo = LLM(path)
    for i, rid in enumerate(first + later):
        alone = solo.generate([prompts[i]], GREEDY)[0]
        assert results[rid].token_ids == alone.token_ids, f"prompt {i}"


def test_steps_that_decode_hold_at_most_max_tokens_while_decoding(ckpt):
    """With max_tokens_while_decoding, a step that decodes runs at most that many tokens (all its decoding rows,
    then prefill chunks in what is left), so running requests keep getting tokens while later prompts prefill in
    small chunks; a step with nothing decoding still takes the whole budget. Outputs equal transformers'."""
    path, prompts, refs = ckpt
    llm = LLM(path, max_num_batched_tokens=32, block_size=4, max_tokens_while_decoding=5)
    assert llm.scheduler.max_tokens_while_decoding == 5
    log, schedule = [], llm.scheduler.schedule

    def logged():
        plan = schedule()
        log.append([(n, start + n >= seq.num_tokens and start >= seq.prompt_len) for seq, start, n in plan.rows])
        return plan
    llm.scheduler.schedule = logged
    ids = [llm.add_request(prompts[i], GREEDY) for i in (0, 1)]  # 1 and 3 tokens: decoding after one step
    llm.step()
    ids += [llm.add_request(p, GREEDY) for p in prompts[2:]]  # 5..30-token prompts arrive while those decode
    outs = {}
    while llm.has_unfinished():
        outs.update({o.request_id: o for o in llm.step() if o.finished})
    decoding_steps = [rows for rows in log if any(dec for _, dec in rows)]
    assert decoding_steps and all(sum(n for n, _ in rows) <= max(5, sum(d for _, d in rows)) for rows in decoding_steps)
    assert any(sum(n for n, _ in rows) == 5 and any(not d for _, d in rows) for rows in decoding_steps), log
    assert sum(n for n, _ in log[0]) == 4  # the first step decodes nothing: its 4 prompt tokens, uncapped
    for i, rid in enumerate(ids):
        assert_greedy_matches(outs[rid].token_ids, refs[i], f"prompt {i}")
    with pytest.raises(ValueError, match="max_tokens_while_decoding=0 must be a positive integer"):
        LLM(path, max_tokens_while_decoding=0)


def test_preemption_keeps_tokens(ckpt):
    path, prompts, refs = ckpt
    block = bytes_per_block(tiny_args(), 4, torch.float32)
    llm = LLM(path, block_size=4, kv_cache_memory=12 * block)  # 11 usable blocks = 44 tokens for 8 prompts
    outs = llm.generate(prompts, GREEDY)
    assert llm.scheduler.num_preemptions > 0
    assert any(o.timings["preemptions"] for o in outs)
    for i, (out, ref) in enumerate(zip(outs, refs)):
        assert_greedy_matches(out.token_ids, ref, f"prompt {i}")


def test_seeded_sampling_reproducible(ckpt):
    path, prompts, _ = ckpt
    llm = LLM(path, max_num_batched_tokens=9)
    p = SamplingParams(temperature=0.9, top_p=0.95, top_k=50, seed=1234, max_tokens=16, ignore_eos=True)
    alone = llm.generate([prompts[4]], p)[0].token_ids
    crowd = llm.generate(prompts, [p if i == 4 else SamplingParams(temperature=1.0, seed=i, max_tokens=16)
                                   for i in range(len(prompts))])
    assert crowd[4].token_ids == alone
    again = LLM(path, block_size=4, kv_cache_memory=12 * bytes_per_block(tiny_args(), 4, torch.float32))
    pressed = again.generate([prompts[4]] * 3, p)  # other engine, preemption pressure
    assert again.scheduler.num_preemptions > 0 and pressed[2].timings["preemptions"] > 0
    assert pressed[2].token_ids == alone
    other = llm.generate([prompts[4]], SamplingParams(temperature=0.9, seed=99, max_tokens=16, ignore_eos=True))
    assert other[0].token_ids != alone
    # top_k=1 and a tiny top_p leave one candidate: sampling must then be greedy.
    greedy = llm.generate([prompts[5]], SamplingParams(temperature=0, max_tokens=8, ignore_eos=True))[0]
    for filt in (dict(top_k=1), dict(top_p=1e-6)):
        out = llm.generate([prompts[5]], SamplingParams(temperature=1.5, max_tokens=8, ignore_eos=True, **filt))[0]
        assert out.token_ids == greedy.token_ids, filt


def test_bad_requests_fail_alone(ckpt):
    path, prompts, _ = ckpt
    llm = LLM(path, max_model_len=40)
    bad = [("", GREEDY, "empty prompt"), ([], GREEDY, "empty prompt"),
           ([5] * 40, GREEDY, "prompt has 40 tokens"),
           (prompts[1], SamplingParams(max_tokens=0), "max_tokens=0"),
           (prompts[1], SamplingParams(top_p=0.0), "top_p=0.0"),
           (prompts[1], SamplingParams(top_p=1.5), "top_p=1.5"),
           ([3, 96, 4], GREEDY, "token id 96 is outside the vocabulary"),
           ([3, -1], GREEDY, "token id -1 is outside the vocabulary"),
           ({"nothing": 1}, GREEDY, "needs 'prompt' or 'prompt_token_ids'")]
    good = [prompts[0], prompts[3]]
    reqs = [good[0]] + [b[0] for b in bad] + [good[1]]
    params = [GREEDY] + [b[1] for b in bad] + [GREEDY]
    outs = llm.generate(reqs, params)
    for out, (_, _, msg) in zip(outs[1:-1], bad):
        assert out.finish_reason == "error" and msg in out.error, (out.error, msg)
        assert out.token_ids == []
    alone = llm.generate(good, GREEDY)
    assert [o.token_ids for o in (outs[0], outs[-1])] == [o.token_ids for o in alone]
    assert all(o.error is None for o in alone)
    # Long prompts are cut off at the context: generation stops with "length".
    out = llm.generate([[5] * 35], SamplingParams(temperature=0, max_tokens=100, ignore_eos=True))[0]
    assert out.finish_reason == "length" and len(out.token_ids) == 5


def test_bad_request_types_and_tokenizer_failures_fail_alone(ckpt):
    """Wrong types (a string of ids, "no" for a boolean), a lone surrogate, a detokeniser that throws: each
    fails its own request with one line; the rest of the batch completes as if alone (issue 9 items 3, 5)."""
    path, prompts, _ = ckpt
    llm = LLM(path)
    lone = "ab\ud800cd"  # what json.loads makes of "ab\\ud800cd"
    bad = [({"prompt_token_ids": "5 6 7"}, GREEDY, "prompt_token_ids='5 6 7' must be a list of token ids"),
           ({"prompt": [5, 6, 7]}, GREEDY, "prompt=[5, 6, 7] must be a string"),
           (lone, GREEDY, "the prompt cannot be tokenised"),
           (prompts[1], SamplingParams(max_tokens=4, skip_special_tokens="no"), "skip_special_tokens='no' must be"),
           (prompts[1], SamplingParams(max_tokens=4, ignore_eos="false"), "ignore_eos='false' must be true or false")]
    good = [prompts[0], "the quick brown fox"]
    outs = llm.generate([good[0]] + [b[0] for b in bad] + [good[1]], [GREEDY] + [b[1] for b in bad] + [GREEDY])
    for out, (_, _, msg) in zip(outs[1:-1], bad):
        assert out.finish_reason == "error" and msg in out.error, (out.error, msg)
    alone = llm.generate(good, GREEDY)
    assert [o.token_ids for o in (outs[0], outs[-1])] == [o.token_ids for o in alone]
    # A temperature that underflows (1e-40) decodes greedily instead of always drawing token 0.
    tiny = llm.generate(good, SamplingParams(temperature=1e-40, max_tokens=MAX_NEW, seed=0))
    assert [o.token_ids for o in tiny] == [o.token_ids for o in alone]
    # A detokeniser failure mid-generation ends that request only, and its KV blocks return to the pool.
    real, calls = llm.tokenizer.decode, []

    def flaky(ids, **kw):
        calls.append(1)
        if len(calls) == 1:
            raise RuntimeError("injected decode failure")
        return real(ids, **kw)

    llm.tokenizer.decode = flaky
    try:
        outs = llm.generate(["the quick brown fox", "to be or"], GREEDY)
    finally:
        llm.tokenizer.decode = real
    failed = [o for o in outs if o.finish_reason == "error"]
    assert len(failed) == 1 and "cannot be detokenised (RuntimeError: injected decode failure)" in failed[0].error
    assert [o.error for o in outs].count(None) == 1
    assert llm.scheduler.allocator.num_free == llm.cache.num_blocks - 1  # all but the scratch block


def test_text_stream_and_stop_strings(ckpt):
    path, _, _ = ckpt
    llm = LLM(path)
    assert llm.tokenizer is not None
    p = SamplingParams(temperature=0, max_tokens=20, ignore_eos=True)
    full = llm.generate(["the quick brown fox", "to be or"], p)
    pieces: dict[str, list] = {}
    final = {}
    for upd in llm.stream(["the quick brown fox", "to be or"], p):
        pieces.setdefault(upd.request_id, []).append(upd)
        if upd.finished:
            final[upd.request_id] = upd
    for out, rid in zip(full, sorted(final, key=int)):
        ups = pieces[rid]
        assert sum((u.new_token_ids for u in ups), []) == out.token_ids == final[rid].token_ids
        assert "".join(u.new_text or "" for u in ups) == out.text == final[rid].text
        assert out.text == llm.tokenizer.decode(out.token_ids, skip_special_tokens=True)
    # A stop string that ends inside a token (and starts in the one before): the text stops before it, and
    # generation stops at the token that completed it (which stays in token_ids). Seeded sampling: the
    # greedy text of this random model repeats one token.
    sampled = SamplingParams(temperature=1.0, seed=5, max_tokens=20, ignore_eos=True)
    base = llm.generate(["the quick brown fox"], sampled)[0]
    ids, text = base.token_ids, base.text
    prefix = [llm.tokenizer.decode(ids[: j + 1], skip_special_tokens=True) for j in range(len(ids))]
    j = next(j for j in range(3, len(ids)) if len(prefix[j]) - len(prefix[j - 1]) >= 2 and len(prefix[j - 1]) > 4)
    stop = prefix[j][len(prefix[j - 1]) - 2: len(prefix[j]) - 1]
    at = text.find(stop)
    first = next(k for k in range(len(ids)) if stop in prefix[k])
    assert at > 0 and len(prefix[first - 1]) < at + len(stop) < len(prefix[first]), (text, stop)  # ends mid-token
    cut = llm.generate(["the quick brown fox"], dataclasses.replace(sampled, stop=[stop, "no such text"]))[0]
    assert cut.finish_reason == "stop" and cut.text == text[:at], (cut.text, text, stop)
    assert cut.token_ids == ids[: first + 1]
    streamed = list(llm.stream(["the quick brown fox"], dataclasses.replace(sampled, stop=stop)))
    assert "".join(u.new_text or "" for u in streamed) == text[:at] and streamed[-1].finish_reason == "stop"
    # A stop token id ends the request and is kept in token_ids.
    tok = full[1].token_ids[3]
    out = llm.generate(["to be or"], SamplingParams(temperature=0, max_tokens=20, ignore_eos=True,
                                                     stop_token_ids=[tok]))[0]
    first = full[1].token_ids.index(tok)
    assert out.finish_reason == "stop" and out.token_ids == full[1].token_ids[: first + 1]


def test_checkpoint_without_tokenizer_serves_ids(tmp_path):
    path = make_checkpoint(str(tmp_path / "ck"), seed=1)
    llm = LLM(path)
    outs = llm.generate(["some text", [5, 6, 7]], SamplingParams(temperature=0, max_tokens=3))
    assert outs[0].finish_reason == "error" and "no tokenizer" in outs[0].error
    assert outs[1].text is None and 1 <= len(outs[1].token_ids) <= 3


# ---- units ----------------------------------------------------------------------------------------

def test_kv_budget_and_allocator_errors():
    args = tiny_args()
    with pytest.raises(ValueError, match="holds 1 block"):
        blocks_for_budget(args, bytes_per_block(args, 16, torch.float32) + 1, 16, torch.float32)
    alloc = BlockAllocator(4)
    got = alloc.allocate(3)
    assert sorted(got) == [1, 2, 3] and alloc.num_free == 0
    with pytest.raises(RuntimeError, match="asked for 1 KV blocks, only 0 free"):
        alloc.allocate(1)
    alloc.free(got)
    assert alloc.num_free == 3
    for bad, msg in ((dict(max_tokens=-1), "max_tokens=-1"), (dict(temperature=-0.5), "temperature=-0.5"),
                     (dict(top_k=-2), "top_k=-2"), (dict(stop=[""]), "stop="), (dict(seed="x"), "seed='x'")):
        with pytest.raises(ValueError, match=msg.replace("[", r"\[")):
            SamplingParams(**bad).validate(96)
    with pytest.raises(ValueError, match="unknown sampling field"):
        SamplingParams.from_dict({"temprature": 1})
    assert math.isclose(SamplingParams.from_dict({"top_p": 0.5}).top_p, 0.5)


def test_sliding_window_matches_transformers(tmp_path):
    """Keys outside the window stay in the paged cache but are masked by position, as in transformers."""
    path = make_checkpoint(str(tmp_path / "ck"), seed=5, sliding_window=4)
    prompts = make_prompts(96, lengths=[2, 9, 6], seed=5)
    refs = hf_reference(path, prompts)
    outs = LLM(path, block_size=4, max_num_batched_tokens=5).generate(prompts, GREEDY)
    for i, (out, ref) in enumerate(zip(outs, refs)):
        assert_greedy_matches(out.token_ids, ref, f"prompt {i}")


def test_long_prompt_does_not_hold_back_short_ones(ckpt):
    """A 120-token prompt prefills in chunks while a short request, arriving after it, runs to the end;
    both give what each gives alone with the prompt prefilled in one step."""
    path, prompts, _ = ckpt
    llm = LLM(path, max_num_batched_tokens=16, block_size=4)
    log = record_rows(llm)
    long_prompt = make_prompts(96, lengths=[120], seed=9)[0]
    long_params = SamplingParams(temperature=0, max_tokens=3, ignore_eos=True)
    short_params = SamplingParams(temperature=0, max_tokens=4, ignore_eos=True)
    long_id = llm.add_request(long_prompt, long_params)
    llm.step()
    short_id = llm.add_request(prompts[2], short_params)
    finished = {}
    while llm.has_unfinished():
        finished.update({o.request_id: o for o in llm.step() if o.finished})
    assert list(finished).index(short_id) < list(finished).index(long_id)
    long_rows = [(start, n) for rid, start, n, _ in log if rid == long_id and start < 120]
    assert len(long_rows) > 120 // 16 and all(n > 1 for _, n in long_rows), long_rows  # chunks, several tokens
    assert [s for s, _ in long_rows] == [0] + [s + n for s, n in long_rows[:-1]]  # contiguous, in order
    alone = LLM(path, max_num_batched_tokens=256)
    assert finished[long_id].token_ids == alone.generate([long_prompt], long_params)[0].token_ids
    assert finished[short_id].token_ids == alone.generate([prompts[2]], short_params)[0].token_ids


# ---- the API a server drives: abort, occupancy, logprobs, n choices ---------------------------------

def test_abort_frees_blocks_at_once_and_nothing_is_kept(ckpt):
    path, prompts, _ = ckpt
    llm = LLM(path, block_size=4)
    long = SamplingParams(temperature=0, max_tokens=40, ignore_eos=True)
    a, b = llm.add_request(prompts[6], long), llm.add_request(prompts[7], long)
    got = 0  # tokens of `a` handed out so far (the engine may hand a step's tokens out one call later)
    for _ in range(3):
        got += sum(len(o.new_token_ids) for o in llm.step() if o.request_id == a)
    assert got >= 2
    occ = llm.occupancy()
    assert occ["running"] == 2 and occ["waiting"] == 0 and occ["kv_blocks_used"] > 0
    held = len(llm._seqs[a].blocks)
    assert llm.abort(a) and not llm.abort(a) and not llm.abort("nope")
    assert llm.occupancy()["kv_blocks_used"] == occ["kv_blocks_used"] - held  # freed before the next step
    first = llm.step()
    aborted = [o for o in first if o.request_id == a]
    assert len(aborted) == 1 and aborted[0].finish_reason == "abort" and len(aborted[0].token_ids) == got
    outs = {}
    while llm.has_unfinished():
        outs.update({o.request_id: o for o in llm.step() if o.finished})
    assert a not in outs and outs[b].token_ids == llm.generate([prompts[7]], long)[0].token_ids
    assert llm.occupancy() == {"running": 0, "waiting": 0, "kv_blocks_used": 0,
                               "kv_blocks_total": occ["kv_blocks_total"]}
    assert llm.output(a) is None and llm.output(b) is None and not llm._outputs  # handed back: forgotten
    # A stream the consumer leaves early aborts its request.
    it = llm.stream([prompts[6]], long)
    next(it)
    it.close()
    assert llm.occupancy()["kv_blocks_used"] == 0 and not llm._outputs and not llm._pending
    assert not llm.has_unfinished()


def test_logprobs_of_chosen_tokens(ckpt):
    path, prompts, _ = ckpt
    from transformers import AutoModelForCausalLM
    llm = LLM(path)
    plain = SamplingParams(temperature=0.9, seed=3, max_tokens=6, ignore_eos=True)
    asked = dataclasses.replace(plain, logprobs=2)
    outs = llm.generate([prompts[2], prompts[4]], [plain, asked])
    again = llm.generate([prompts[4]], plain)[0]
    assert outs[0].logprobs is None and outs[1].token_ids == again.token_ids  # asking does not change sampling
    hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    seq = torch.tensor([prompts[4] + outs[1].token_ids])
    with torch.no_grad():
        logp = torch.log_softmax(hf(seq).logits[0, len(prompts[4]) - 1: -1].float(), dim=-1)  # [n, V]
    chosen = logp.gather(1, torch.tensor(outs[1].token_ids)[:, None]).squeeze(1)
    torch.testing.assert_close(torch.tensor(outs[1].logprobs), chosen, atol=1e-4, rtol=0)
    for top, row in zip(outs[1].top_logprobs, logp):
        assert len(top) == 2 and [t for t, _ in top] == row.topk(2).indices.tolist()
        torch.testing.assert_close(torch.tensor([v for _, v in top]), row.topk(2).values, atol=1e-4, rtol=0)
    assert llm.generate([prompts[4]], dataclasses.replace(plain, logprobs=0))[0].top_logprobs == [[]] * 6
    bad = llm.generate([prompts[4]], dataclasses.replace(plain, logprobs=21))[0]
    assert bad.finish_reason == "error" and "logprobs=21" in bad.error


def test_n_choices_of_one_prompt(ckpt):
    path, prompts, _ = ckpt
    llm = LLM(path)
    p = SamplingParams(temperature=1.0, seed=11, max_tokens=8, ignore_eos=True)
    choices = p.choices(3)
    assert [c.seed for c in choices] == [11, 12, 13] and p.choices(2)[0] == p
    assert [c.seed for c in dataclasses.replace(p, seed=None).choices(2)] == [None, None]
    outs = llm.generate([prompts[3]] * 3, choices)
    assert outs[0].token_ids == llm.generate([prompts[3]], p)[0].token_ids  # choice 0 is the request itself
    assert len({tuple(o.token_ids) for o in outs}) == 3
    for bad in (0, -1, 2.0, True):
        with pytest.raises(ValueError, match=f"n={bad!r} must be a positive integer"):
            p.choices(bad)


def test_streamed_pieces_with_a_stop_string_join_to_the_final_text(ckpt):
    """A stop string spanning several tokens: its start is held back, never streamed and then taken back."""
    path, _, _ = ckpt
    llm = LLM(path)
    p = SamplingParams(temperature=0, max_tokens=20, ignore_eos=True)
    text = llm.generate(["the quick brown fox"], p)[0].text
    stop = text[len(text) // 3: len(text) // 3 + 8]
    assert len(llm.tokenizer(stop, add_special_tokens=False)["input_ids"]) > 1, stop
    ups = list(llm.stream(["the quick brown fox"], dataclasses.replace(p, stop=[stop])))
    assert ups[-1].finish_reason == "stop" and ups[-1].text == text[: text.find(stop)]
    assert "".join(u.new_text for u in ups) == ups[-1].text


def test_a_step_of_several_batches_runs_as_one_forward(ckpt):
    """A step that decodes some rows and prefills others (several batches) runs them as one forward
    (`Mixtral.forward_segments`: each MoE layer once per step, so the experts' weights are read once, where
    each batch used to read them again), with the greedy tokens of transformers and of batch-by-batch forwards.
    The model-level equality of the two is checked in test_forward_segments_equals_separate_forwards."""
    path, prompts, refs = ckpt
    engine = dict(max_num_batched_tokens=40, block_size=4, max_num_seqs=6)  # new prompts join running decodes
    llm = LLM(path, **engine)
    merged, forward_segments = [], llm.model.forward_segments
    moe_calls, moe_forward = [], llm.model.layers[0].moe.forward
    llm.model.layers[0].moe.forward = lambda x, mask=None: moe_calls.append(x.shape[0]) or moe_forward(x, mask)

    def spy(segments):
        before = len(moe_calls)
        out = forward_segments(segments)
        merged.append((sorted(tokens.shape[1] for tokens, *_ in segments), moe_calls[before:]))
        return out
    llm.model.forward_segments = spy
    outs = llm.generate(prompts, GREEDY)
    assert any(len(s) >= 2 and s[0] == 1 and s[-1] > 1 for s, _ in merged), merged  # decode rows beside prefill
    for shapes, calls in merged:  # the first layer's MoE ran once, on every segment's tokens
        assert len(calls) == 1 and len(shapes) >= 2, merged
    for i, (out, ref) in enumerate(zip(outs, refs)):
        assert_greedy_matches(out.token_ids, ref, f"prompt {i}")
    separate = LLM(path, **engine)
    separate.runner.merge_tokens = 0  # batch by batch, as before
    separate.model.forward_segments = lambda segments: pytest.fail("merged although merge_tokens is 0")
    assert [o.token_ids for o in separate.generate(prompts, GREEDY)] == [o.token_ids for o in outs]


def test_forward_segments_equals_separate_forwards(monkeypatch):
    """Mixtral.forward_segments (one pass over the weights for several batches, each with its own cache view
    and logits rows) gives each batch the logits its own forward gives, and writes the same KV. Each cache view
    builds its attention mask once, not once per layer."""
    from epkit import Mixtral
    from epkit import model as model_lib
    from epkit.infer.kv_cache import PagedKVCache
    masks, build = [], model_lib.attention_mask
    monkeypatch.setattr(model_lib, "attention_mask", lambda *a: masks.append(1) or build(*a))
    args = tiny_args()
    assert args.num_layers > 1
    model = Mixtral(args).init_weights(seed=4).eval()
    g = torch.Generator().manual_seed(0)
    # a fresh prompt (2 rows, the second padded), a later chunk reading 6 cached tokens, two decode rows
    batches = [(torch.randint(0, args.vocab_size, (2, 5), generator=g), torch.tensor([[0, 1, 2, 3, 4], [0, 1, 2, -1, -1]]),
                torch.tensor([[1, 2], [3, 4]]), torch.tensor([4, 7]), True),
               (torch.randint(0, args.vocab_size, (1, 3), generator=g), torch.tensor([[6, 7, 8]]), torch.tensor([[5, 6, 7]]),
                torch.tensor([2]), False),
               (torch.randint(0, args.vocab_size, (2, 1), generator=g), torch.tensor([[9], [4]]), torch.tensor([[8, 9, 10],
                                                                                                    [11, 12, 0]]),
                torch.tensor([0, 1]), False)]
    caches = [PagedKVCache(args, 16, 4, "cpu", torch.float32) for _ in range(2)]
    for c in caches:  # the same earlier keys for both
        for t in (c.k, c.v):
            t.copy_(torch.randn(t.shape, generator=torch.Generator().manual_seed(1)))
    with torch.no_grad():
        want = []
        for tokens, positions, table, rows, fresh in batches:
            caches[0].prepare(table, positions, fresh)
            want.append(model(tokens, positions, caches[0], logits_rows=rows)[0])
        assert len(masks) == 2  # the two batches that read the cache, once each
        got = model.forward_segments([(tokens, positions, caches[1].view(table, positions, fresh), rows)
                                      for tokens, positions, table, rows, fresh in batches])
        assert len(masks) == 4
    for w, x in zip(want, got):
        torch.testing.assert_close(x, w, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(caches[1].k, caches[0].k, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(caches[1].v, caches[0].v, atol=1e-6, rtol=1e-6)


def test_eager_forwards_never_take_cudnn_attention(ckpt):
    """cuDNN's attention builds an execution plan for every new shape, and prefill batches change shape nearly
    every step: the runner's forwards (merged or not) run with flash / memory-efficient / math attention only,
    and the process's own choice is back once the step is done."""
    path, prompts, _ = ckpt
    llm = LLM(path, max_num_batched_tokens=40, block_size=4, max_num_seqs=6)
    seen, forward, forward_segments = [], llm.model.forward, llm.model.forward_segments
    llm.model.forward = lambda *a, **k: seen.append(torch.backends.cuda.cudnn_sdp_enabled()) or forward(*a, **k)
    llm.model.forward_segments = lambda s: seen.append(torch.backends.cuda.cudnn_sdp_enabled()) or forward_segments(s)
    assert torch.backends.cuda.cudnn_sdp_enabled()
    llm.generate(prompts[:8], GREEDY)
    assert seen and not any(seen), seen
    assert torch.backends.cuda.cudnn_sdp_enabled()
