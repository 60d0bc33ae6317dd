"""Data pipeline: formats, prompt masking, packing, seeded shuffling, rank sharding, bad input."""
from __future__ import annotations

import json
import os

import pytest
import torch

from epkit import data as D

KW = dict(bos_id=1, eos_id=2, pad_id=3, vocab_size=512, seed=0)


@pytest.fixture(scope="module")
def tok():
    return D.Tokenizer(D.DEFAULT_TOKENIZER)


def _write(path, text):
    path.write_text(text)
    return str(path)


def _jsonl(path, records):
    with open(path, "w") as f:
        for r in records:
            f.write(json.dumps(r) + "\n")
    return str(path)


def test_embedded_tokenizer_loads_in_transformers_and_matches(tok):
    from transformers import AutoTokenizer
    hf = AutoTokenizer.from_pretrained(D.DEFAULT_TOKENIZER)
    assert (hf.unk_token_id, hf.bos_token_id, hf.eos_token_id, hf.pad_token_id) == (0, 1, 2, 3)
    assert len(hf) == tok.vocab_size == 512
    text = "The golden owl lives in the marsh and eats honey. 3 + 4 = 7."
    ids = tok.encode([text])[0]
    assert hf(text)["input_ids"] == [1] + ids  # transformers adds <s> like the data pipeline does
    assert hf.decode(ids) == text
    chat = hf.apply_chat_template([{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}],
                                  tokenize=False)
    assert chat == "<s>### User:\nhi\n\n### Assistant:\nyo</s>"


def test_text_records_train_every_token_but_bos(tmp_path, tok):
    path = tmp_path / "a.txt"
    path.write_text("The red fox.\n\nThe blue owl.\n")
    ds = D.load_records(str(path))
    assert len(ds) == 2
    ids, labels = D.tokenize(ds, tok, 1, 2, str(path))
    fox, owl = tok.encode(["The red fox.", "The blue owl."])
    assert ids == [1, *fox, 2, 1, *owl, 2]
    assert labels == [-100, *fox, 2, -100, *owl, 2]


def test_instruction_and_chat_mask_prompts(tmp_path, tok):
    path = _jsonl(tmp_path / "i.jsonl", [
        {"prompt": "What is 1 plus 1?", "response": "2."},
        {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
                      {"role": "assistant", "content": "Hello."}]},
    ])
    ids, labels = D.tokenize(D.load_records(path), tok, 1, 2, path)
    trained = [i for i, lab in zip(ids, labels) if lab != -100]
    two, hello = tok.encode(["2.", "Hello."])
    assert trained == [*two, 2, *hello, 2]  # only the answers and their </s>
    text = tok.decode(ids)
    assert "### User:\nWhat is 1 plus 1?\n\n### Assistant:\n2." in text
    assert "### System:\nBe brief.\n\n### User:\nHi\n\n### Assistant:\nHello." in text


def test_parquet_and_saved_dataset_dir(tmp_path, tok):
    import datasets
    ds = datasets.Dataset.from_dict({"text": ["one plus one is two.", "two plus two is four."]})
    ds.to_parquet(str(tmp_path / "d.parquet"))
    ds.save_to_disk(str(tmp_path / "saved"))
    a = D.tokenize(D.load_records(str(tmp_path / "d.parquet")), tok, 1, 2, "p")
    b = D.tokenize(D.load_records(str(tmp_path / "saved")), tok, 1, 2, "s")
    assert a == b and len(a[0]) > 10


def test_packing_shuffle_and_sharding(tok):
    data = D.load_packed(D.DEFAULT_DATA, tok, 64, **KW)
    assert data.tokens.shape[1] == 64 and len(data) > 100
    # the last row is padded: position -1, label -100
    pad = data.positions[-1] < 0
    assert (data.labels[-1][pad] == -100).all()
    assert (data.positions[:-1] == torch.arange(64)).all()
    # one step: 4 ranks x 3 rows, all different rows; the same seed gives the same order
    rows = [data.rows((0 * 4 + r) * 3, 3) for r in range(4)]
    flat = torch.cat(rows).tolist()
    assert len(set(flat)) == 12
    again = D.load_packed(D.DEFAULT_DATA, tok, 64, **KW)
    assert torch.equal(again.batch(5, 3, 2, 4)["tokens"], data.batch(5, 3, 2, 4)["tokens"])
    other = D.load_packed(D.DEFAULT_DATA, tok, 64, **{**KW, "seed": 1})
    assert not torch.equal(other.batch(0, 3, 0, 4)["tokens"], data.batch(0, 3, 0, 4)["tokens"])
    # an epoch visits every row once
    epoch = data.rows(0, len(data)).tolist()
    assert sorted(epoch) == list(range(len(data)))


def test_eval_batches_cover_every_row_once_with_equal_counts(tok, tmp_path):
    path = tmp_path / "e.txt"
    path.write_text("\n\n".join(f"Fact number {i}: the fox eats {i} nuts." for i in range(40)))
    data = D.load_packed(str(path), tok, 32, **KW)
    seen, per_rank = [], []
    for r in range(3):
        batches = list(data.eval_batches(2, r, 3))
        per_rank.append(len(batches))
        for b in batches:
            seen += [t for t, p in zip(b["tokens"].tolist(), b["positions"][:, 0].tolist()) if p >= 0]
    assert len(set(per_rank)) == 1
    assert sorted(map(tuple, seen)) == sorted(map(tuple, data.tokens.tolist()))


@pytest.mark.parametrize("make, message", [
    (lambda p: str(p / "missing.jsonl"), "does not exist"),
    (lambda p: _write(p / "empty.jsonl", ""), "is empty"),
    (lambda p: _write(p / "blank.txt", "   \n\n  \t \n\n \n"), "is empty (its records hold only whitespace)"),
    (lambda p: _jsonl(p / "blank.jsonl", [{"text": "   "}, {"text": "\n\t"}]), "is empty (its records hold only "
                                                                              "whitespace)"),
    (lambda p: _jsonl(p / "bad.jsonl", [{"body": "x"}]), "record 0 has fields ['body']"),
    (lambda p: _jsonl(p / "noresp.jsonl", [{"prompt": "q", "response": "a"}, {"prompt": "q2"}]),
     "record 1 has no 'response'"),
    (lambda p: _jsonl(p / "chat.jsonl", [{"messages": [{"role": "user", "content": "hi"}]}]),
     "record 0 has no assistant turn"),
    (lambda p: _write(p / "x.csv", "a,b\n"), "has extension '.csv'"),
])
def test_bad_data_gives_one_clear_line(tmp_path, tok, make, message):
    with pytest.raises(D.DataError) as e:
        D.load_packed(make(tmp_path), tok, 32, **KW)
    assert message in str(e.value) and "\n" not in str(e.value)


def test_too_little_data_for_one_step(tmp_path, tok):
    path = tmp_path / "s.txt"
    path.write_text("The red fox.")
    data = D.load_packed(str(path), tok, 32, **KW)
    with pytest.raises(D.DataError, match="fewer than the 8 one step needs"):
        data.check_fits(2, 4)


def test_token_ids_beyond_the_model_vocab(tok):
    with pytest.raises(D.DataError, match="vocab_size is 96"):
        D.load_packed(D.DEFAULT_DATA, tok, 32, **{**KW, "vocab_size": 96})


def test_build_tokenizer_is_reproducible(tmp_path):
    from epkit.assets.build import build_tokenizer
    build_tokenizer([D.DEFAULT_DATA, os.path.join(D.ASSETS, "instructions.jsonl")], out_dir=str(tmp_path))
    with open(tmp_path / "tokenizer.json") as a, open(os.path.join(D.ASSETS, "tokenizer.json")) as b:
        assert json.load(a)["model"] == json.load(b)["model"]
