"""epkit/infer/request.py: chat prompts from the shipped tokenizer's template (the fine-tune data format,
token for token) and output text that only grows while streaming (partial characters and stop-string
starts held back)."""
import pytest
import torch

from epkit import data as D
from epkit.infer import LLM, SamplingParams
from epkit.infer.build import random_model
from epkit.infer.request import chat_prompt, next_text
from epkit.args import ModelArgs

torch.set_num_threads(1)

CHAT = [{"role": "system", "content": "You are a helpful storyteller."},
        {"role": "user", "content": "Who has a map?"}, {"role": "assistant", "content": "Ada has a map."},
        {"role": "user", "content": [{"type": "text", "text": "Why"}, {"type": "text", "text": "?"}]}]


@pytest.fixture(scope="module")
def tok():
    from transformers import AutoTokenizer
    return AutoTokenizer.from_pretrained(D.DEFAULT_TOKENIZER)


def test_chat_prompt_is_the_fine_tune_format_token_for_token(tok):
    ids, text = chat_prompt(tok, CHAT)
    assert text == ("<s>### System:\nYou are a helpful storyteller.\n\n### User:\nWho has a map?\n\n"
                    "### Assistant:\nAda has a map.</s>### User:\nWhy?\n\n### Assistant:\n")
    # The data pipeline's tokens for the same conversation, up to where the model starts answering.
    record = {"messages": [{**m, "content": "Why?"} if i == 3 else m for i, m in enumerate(CHAT)]
              + [{"role": "assistant", "content": "x"}]}
    pieces = D.segments(record, 0, "test")[:-2]  # without the answer "x" and its </s>
    data_tok = D.Tokenizer(D.DEFAULT_TOKENIZER)
    expect = [1]
    for piece, _ in pieces:
        expect += [2] if piece is None else data_tok.encode([piece])[0]
    assert ids == expect
    for bad, msg in (([], "messages must be a non-empty list"), ([{"role": "robot", "content": "hi"}],
                     "messages[0].role='robot'"), ([{"role": "user", "content": 5}], "messages[0].content"),
                     (["hi"], "messages[0] must be an object")):
        with pytest.raises(ValueError, match=msg.replace("[", r"\[")):
            chat_prompt(tok, bad)
    with pytest.raises(ValueError, match="no tokenizer"):
        chat_prompt(None, CHAT)


def test_llm_chat_equals_generate_on_the_rendered_ids(tok):
    llm = LLM.from_model(random_model(ModelArgs.from_name("tiny"), seed=1, router_std=0.5), tokenizer=tok)
    p = SamplingParams(temperature=0, max_tokens=8)
    out = llm.chat(CHAT, p)[0]
    ids, text = chat_prompt(tok, CHAT)
    assert out.prompt == text and out.prompt_token_ids == ids
    assert out.token_ids == llm.generate([ids], p)[0].token_ids
    bad = llm.chat([[{"role": "robot", "content": "x"}]], p)[0]
    assert bad.finish_reason == "error" and "robot" in bad.error


def _stream_text(tok, ids, params):
    text, pieces = "", []
    for n in range(1, len(ids) + 1):
        text, new, stopped = next_text(tok, ids[:n], text, params, final=n == len(ids))
        pieces.append(new)
        if stopped:
            break
    return text, pieces


def test_streamed_text_only_grows(tok):
    ids = tok("a fox 🦊 met an owl 🦉 near the river; the fox said hello", add_special_tokens=False)["input_ids"]
    full = tok.decode(ids)
    text, pieces = _stream_text(tok, ids, SamplingParams())
    assert "".join(pieces) == text == full and not any("\ufffd" in p for p in pieces)
    # A stop string: nothing of it is ever streamed, even where a piece of it arrived before the rest.
    params = SamplingParams(stop=["the fox said"])
    text, pieces = _stream_text(tok, ids, params)
    assert "".join(pieces) == text == full[: full.index("the fox said")]
    # Running out of tokens in the middle of a stop string's start: the final text keeps it.
    cut = tok("the river; the fox", add_special_tokens=False)["input_ids"]
    text, pieces = _stream_text(tok, cut, params)
    assert "".join(pieces) == text == tok.decode(cut) and pieces[-1].endswith("the fox")
