"""The one tokenizer loader, for training, serving and the embedded demo.

`load_tokenizer(path)` gives a transformers (fast) tokenizer: `tok(text)["input_ids"]` starts with <s> as
the data pipeline does, `tok.decode(ids)`, `len(tok)`. Training encodes through `Tokenizer` (no special
tokens: the data pipeline adds <s> and </s> itself). `EMBEDDED` is the tokenizer shipped in epkit/assets,
which presets use (`embedded_tokenizer`).
"""
from __future__ import annotations

import os

EMBEDDED = os.path.join(os.path.dirname(os.path.abspath(__file__)), "assets")
_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")


def tokenizer_dir_for(model: str) -> str | None:
    """The tokenizer that travels with a checkpoint directory, or None (a preset or a bare checkpoint)."""
    if os.path.isdir(model) and any(os.path.isfile(os.path.join(model, f)) for f in _FILES):
        return model
    return None


def load_tokenizer(path: str, vocab_size: int | None = None):
    """The tokenizer at `path`: a directory with tokenizer files, or a tokenizer.json file. None when the
    directory has no tokenizer, or when `vocab_size` is given and its ids do not fit a model that size."""
    if os.path.isfile(path):
        from transformers import PreTrainedTokenizerFast
        tok = PreTrainedTokenizerFast(tokenizer_file=path)
    elif tokenizer_dir_for(path) is not None:
        from transformers import AutoTokenizer
        tok = AutoTokenizer.from_pretrained(path)
    else:
        return None
    return tok if vocab_size is None or len(tok) <= vocab_size else None


def embedded_tokenizer(vocab_size: int | None = None):
    """The shipped tokenizer (the default fine-tune's), if its ids fit `vocab_size`."""
    return load_tokenizer(EMBEDDED, vocab_size)


class Tokenizer:
    """Training's view of a tokenizer: batch encoding without special tokens."""

    def __init__(self, path: str):
        self.path = path
        self.hf = load_tokenizer(path)
        if self.hf is None:
            what = "no tokenizer files there" if os.path.isdir(path) else "no such file or directory"
            raise ValueError(f"tokenizer {path!r}: {what}")
        self.vocab_size = len(self.hf)

    def encode(self, texts: list[str]) -> list[list[int]]:
        """Token ids of each text, without special tokens."""
        return self.hf(texts, add_special_tokens=False)["input_ids"]

    def decode(self, ids: list[int]) -> str:
        return self.hf.decode(ids, skip_special_tokens=True)
