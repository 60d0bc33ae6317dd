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
    outs = llm.generate(prompts, GREEDY)
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
