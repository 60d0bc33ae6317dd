"""Training data: load records with `datasets`, tokenise, mask prompts, pack, shuffle, shard.

Records (one per row of a jsonl / json / parquet file or a saved dataset directory; a .txt file gives
one text record per blank-line-separated paragraph):
  {"text": ...}                                 every token is trained
  {"prompt"|"instruction" [, "input"], "response"|"output"|"completion"}
                                                the prompt is masked out of the loss (label -100)
  {"messages": [{"role", "content"}, ...]}      only assistant turns are trained
Prompts are rendered as `epkit.assets.build.ROLE_HEADERS` spell them (the tokenizer's chat template
renders the same text, so the inference engine can use `apply_chat_template`).

Packing concatenates the documents (each <s> ... </s>) and cuts rows of exactly seq_len tokens; the
last row is padded (label -100, position -1). `PackedData.batch(step, micro, rank)` gives every
rank of the world different rows: with all_to_all expert parallelism each rank holds its own tokens.

`datasets` is imported here only, so inference never imports it.

Legend: B micro batch (rows), T seq_len.
"""
from __future__ import annotations

import os
import sys
from dataclasses import dataclass, field

import torch

from .tokenizer import EMBEDDED, Tokenizer

ASSETS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "assets")
DEFAULT_DATA = os.path.join(ASSETS, "corpus.txt")
DEFAULT_TOKENIZER = EMBEDDED
IGNORE = -100
_FORMATS = {".jsonl": "json", ".json": "json", ".txt": "text", ".parquet": "parquet"}


class DataError(ValueError):
    """Bad training data; the message names the file, the record and the field."""


# ---- records --------------------------------------------------------------------------------------

def load_records(path: str):
    """A `datasets.Dataset` of the records in `path` (a file or a `save_to_disk` directory)."""
    if not path or not os.path.exists(path):
        raise DataError(f"data set {path!r} does not exist")
    import datasets
    datasets.disable_progress_bars()
    datasets.logging.set_verbosity_error()
    if os.path.isdir(path):
        try:
            ds = datasets.load_from_disk(path)
        except FileNotFoundError:
            raise DataError(f"data set {path!r} is a directory but not one written by datasets' save_to_disk") \
                from None
        if isinstance(ds, datasets.DatasetDict):
            ds = ds["train"] if "train" in ds else ds[next(iter(ds))]
    else:
        ext = os.path.splitext(path)[1].lower()
        if ext not in _FORMATS:
            raise DataError(f"data file {path!r} has extension {ext!r}; use one of {', '.join(_FORMATS)}")
        if os.path.getsize(path) == 0:
            raise DataError(f"data set {path!r} is empty")
        kw = {"sample_by": "paragraph"} if ext == ".txt" else {}
        try:
            ds = datasets.load_dataset(_FORMATS[ext], data_files=path, split="train", **kw)
        except Exception as e:  # datasets raises many types; keep one line
            raise DataError(f"data set {path!r} could not be read: {str(e).splitlines()[0]}") from None
    if len(ds) == 0:
        raise DataError(f"data set {path!r} is empty")
    return ds


def record_kind(record: dict, index: int, source: str) -> str:
    """'text', 'instruction' or 'chat' from the fields a record fills (files may mix kinds)."""
    if record.get("messages") is not None:
        return "chat"
    if record.get("prompt") is not None or record.get("instruction") is not None:
        return "instruction"
    if record.get("text") is not None:
        return "text"
    fields = sorted(k for k, v in record.items() if v is not None)
    raise DataError(f"{source}: record {index} has fields {fields}; expected 'text', 'prompt'+'response' "
                    f"(or 'instruction'+'output') or 'messages'")


def _field(record: dict, names: tuple[str, ...], index: int, source: str, optional: bool = False) -> str:
    for n in names:
        value = record.get(n)
        if value is not None:
            if not isinstance(value, str):
                raise DataError(f"{source}: record {index} field {n!r} is {type(value).__name__}, not a string")
            return value
    if optional:
        return ""
    raise DataError(f"{source}: record {index} has no {' / '.join(repr(n) for n in names)} field")


def segments(record: dict, index: int, source: str) -> list[tuple[str | None, bool]]:
    """A record as (text, trained) pieces, in order; text None stands for the </s> token."""
    from .assets.build import ROLE_HEADERS, TURN_END
    kind = record_kind(record, index, source)
    if kind == "text":
        # newlines at the ends are paragraph separators (.txt files); </s> marks the document's end
        return [(_field(record, ("text",), index, source).strip("\n"), True), (None, True)]
    if kind == "instruction":
        prompt = _field(record, ("prompt", "instruction"), index, source)
        extra = _field(record, ("input",), index, source, optional=True)
        response = _field(record, ("response", "output", "completion"), index, source)
        messages = [{"role": "user", "content": prompt + ("\n\n" + extra if extra else "")},
                    {"role": "assistant", "content": response}]
    else:
        messages = record.get("messages")
        if not isinstance(messages, list) or not messages:
            raise DataError(f"{source}: record {index} field 'messages' is not a non-empty list")
    out: list[tuple[str, bool]] = []
    for j, m in enumerate(messages):
        if not isinstance(m, dict) or m.get("role") not in ROLE_HEADERS or not isinstance(m.get("content"), str):
            raise DataError(f"{source}: record {index} message {j} needs 'role' in {sorted(ROLE_HEADERS)} and a "
                            f"string 'content'")
        if m["role"] == "assistant":
            out += [(ROLE_HEADERS["assistant"], False), (m["content"], True), (None, True)]  # None: </s>
        else:
            out.append((ROLE_HEADERS[m["role"]] + m["content"] + TURN_END, False))
    if not any(trained for _, trained in out):
        raise DataError(f"{source}: record {index} has no assistant turn, so nothing would be trained")
    return out


def tokenize(ds, tokenizer: Tokenizer, bos_id: int, eos_id: int, source: str) -> tuple[list[int], list[int]]:
    """Concatenate every record as <s> tokens (</s>): (ids, labels) streams, labels -100 where masked."""
    ids, labels = [], []
    chunk = 1000
    has_text = False
    for start in range(0, len(ds), chunk):
        rows = ds[start:start + chunk]
        records = [{k: rows[k][i] for k in rows} for i in range(len(next(iter(rows.values()))))]
        pieces = [segments(r, start + i, source) for i, r in enumerate(records)]
        texts = [t for p in pieces for t, _ in p if t is not None]
        has_text = has_text or any(t.strip() for t in texts)
        encoded = iter(tokenizer.encode(texts))
        for p in pieces:
            ids.append(bos_id)
            labels.append(IGNORE)  # <s> is never a target
            for text, trained in p:
                tok = [eos_id] if text is None else next(encoded)
                ids += tok
                labels += tok if trained else [IGNORE] * len(tok)
    if not has_text:
        raise DataError(f"data set {source!r} is empty (its records hold only whitespace)")
    return ids, labels


# ---- packing and sharding ---------------------------------------------------------------------------

@dataclass
class PackedData:
    """Fixed-length rows. tokens/labels/positions [R, T]; position -1 marks padding."""

    tokens: torch.Tensor
    labels: torch.Tensor
    positions: torch.Tensor
    seed: int
    source: str
    _perm: tuple = field(default=(None, None), repr=False)  # (epoch, permutation) last used

    def __len__(self) -> int:
        return self.tokens.shape[0]

    def order(self, epoch: int) -> torch.Tensor:
        g = torch.Generator().manual_seed(self.seed * 1000003 + epoch)
        return torch.randperm(len(self), generator=g)

    def rows(self, first: int, count: int) -> torch.Tensor:
        """Indices of global sample numbers first..first+count-1 (epochs reshuffle with seed + epoch)."""
        out = []
        for g in range(first, first + count):
            epoch, i = divmod(g, len(self))
            if self._perm[0] != epoch:
                self._perm = (epoch, self.order(epoch))
            out.append(int(self._perm[1][i]))
        return torch.tensor(out, dtype=torch.long)

    def batch(self, micro_step: int, micro_batch: int, rank: int, world: int) -> dict[str, torch.Tensor]:
        """The rows rank `rank` trains on in global micro-step `micro_step`: disjoint across ranks within a
        step as long as len(self) >= micro_batch * world (checked by `check_fits`)."""
        first = (micro_step * world + rank) * micro_batch
        idx = self.rows(first, micro_batch)
        return {"tokens": self.tokens[idx], "labels": self.labels[idx], "positions": self.positions[idx]}

    def check_fits(self, micro_batch: int, world: int) -> None:
        if len(self) < micro_batch * world:
            raise DataError(f"{self.source}: {len(self)} packed rows of {self.tokens.shape[1]} tokens, fewer than "
                            f"the {micro_batch * world} one step needs (micro_batch={micro_batch} x {world} ranks); "
                            f"add data or lower --seq-len / --micro-batch")

    def eval_batches(self, micro_batch: int, rank: int, world: int):
        """Every row once, sharded over ranks; every rank yields the same number of batches (all-to-all
        dispatch needs every rank in every forward), padding rows with position -1."""
        per_step = micro_batch * world
        steps = -(-len(self) // per_step)
        for s in range(steps):
            idx = torch.arange(s * per_step + rank * micro_batch, s * per_step + (rank + 1) * micro_batch)
            real = idx < len(self)
            idx = idx.clamp(max=len(self) - 1)
            b = {"tokens": self.tokens[idx], "labels": self.labels[idx].clone(),
                 "positions": self.positions[idx].clone()}
            b["labels"][~real] = IGNORE
            b["positions"][~real] = -1
            yield b


def pack(ids: list[int], labels: list[int], seq_len: int, pad_id: int, seed: int, source: str) -> PackedData:
    n = -(-len(ids) // seq_len)
    tokens = torch.full((n * seq_len,), pad_id, dtype=torch.long)
    lab = torch.full((n * seq_len,), IGNORE, dtype=torch.long)
    pos = torch.full((n * seq_len,), -1, dtype=torch.long)
    tokens[: len(ids)] = torch.tensor(ids)
    lab[: len(ids)] = torch.tensor(labels)
    pos[: len(ids)] = torch.arange(len(ids)) % seq_len
    return PackedData(tokens.view(n, seq_len), lab.view(n, seq_len), pos.view(n, seq_len), seed, source)


def load_packed(path: str, tokenizer: Tokenizer, seq_len: int, *, bos_id: int, eos_id: int, pad_id: int,
                vocab_size: int, seed: int) -> PackedData:
    """Everything above in one call: read, tokenise, check ids fit the model, pack."""
    ds = load_records(path)
    ids, labels = tokenize(ds, tokenizer, bos_id, eos_id, path)
    if max(ids) >= vocab_size:
        raise DataError(f"tokenizer {tokenizer.path!r} produced token id {max(ids)}, but the model's vocab_size is "
                        f"{vocab_size}; use the checkpoint's own tokenizer")
    if all(lab == IGNORE for lab in labels):
        raise DataError(f"{path}: no token would be trained (every label is masked)")
    return pack(ids, labels, seq_len, pad_id, seed, path)


def main(argv: list[str] | None = None) -> int:
    import argparse
    p = argparse.ArgumentParser(prog="python -m epkit.data", description=__doc__.splitlines()[0])
    p.add_argument("--build-tokenizer", action="store_true",
                   help="regenerate the embedded corpus and retrain the tokenizer in epkit/assets")
    p.add_argument("--inspect", metavar="DATA", help="tokenise DATA with the embedded tokenizer and print stats")
    p.add_argument("--seq-len", type=int, default=256)
    args = p.parse_args(argv)
    if args.build_tokenizer:
        from .assets.build import build_all
        build_all()
    if args.inspect:
        tok = Tokenizer(DEFAULT_TOKENIZER)
        data = load_packed(args.inspect, tok, args.seq_len, bos_id=1, eos_id=2, pad_id=3, vocab_size=tok.vocab_size,
                           seed=0)
        trained = int((data.labels != IGNORE).sum())
        print(f"{args.inspect}: {len(data)} rows of {args.seq_len} tokens, {trained} trained tokens")
    if not (args.build_tokenizer or args.inspect):
        p.print_help()
    return 0


if __name__ == "__main__":
    sys.exit(main())
