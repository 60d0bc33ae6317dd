"""Settings dataclasses (`train.TrainConfig`, `infer.EngineConfig`) as command lines and YAML recipes.

A setting is a dataclass field made by `setting(default, help)`. `add_flags(parser, cls)` adds one flag
per field (`max_num_seqs` -> `--max-num-seqs`; `flag="ep"` renames it, as `ep_size` is `--ep`; a bool
gets `--x/--no-x`; `cli=False` leaves a library-only setting out). A YAML recipe names settings as the
flags do (`max_num_seqs: 64`, `ep: 2`) and gives defaults that flags override (`parse_flags`).
"""
from __future__ import annotations

import argparse
import dataclasses
import os


def setting(default, help: str, flag: str | None = None, cli: bool = True, **argparse_kw):
    """A dataclass field with its command-line help (and argparse extras: choices, nargs, type)."""
    return dataclasses.field(default=default, metadata={"help": help, "flag": flag, "cli": cli, **argparse_kw})


def flag_name(f: dataclasses.Field) -> str:
    """The flag (and recipe key) of a settings field, with underscores: `ep_size` -> `ep`."""
    return f.metadata.get("flag") or f.name


def add_flags(parser: argparse.ArgumentParser, cls) -> None:
    """One flag per command-line field of dataclass `cls`, defaulting to the field's default."""
    for f in dataclasses.fields(cls):
        meta = dict(f.metadata)
        help_, name = meta.pop("help"), flag_name(f)
        meta.pop("flag", None)
        if not meta.pop("cli", True):
            continue
        flag = "--" + name.replace("_", "-")
        if str(f.type).split(" |")[0] == "bool":
            parser.add_argument(flag, dest=name, action=argparse.BooleanOptionalAction, default=f.default, help=help_)
            continue
        kind = meta.pop("type", None) or {"int": int, "float": float}.get(str(f.type).split(" |")[0], str)
        parser.add_argument(flag, dest=name, type=kind, default=f.default, help=help_, **meta)


def from_flags(cls, values: dict):
    """An instance of `cls` from parsed flag values (taken out of `values`); fields without a flag keep
    their defaults."""
    kw = {f.name: values.pop(flag_name(f)) for f in dataclasses.fields(cls) if f.metadata.get("cli", True)}
    return cls(**kw)


def settings_parser(description: str) -> argparse.ArgumentParser:
    """A parser with `--config FILE` (a YAML recipe) and the `--local_rank` that launchers add."""
    p = argparse.ArgumentParser(description=description, formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--config", default=None, help="YAML recipe; its values are the defaults, flags override them")
    p.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)  # deepspeed's
    return p


def parse_flags(parser: argparse.ArgumentParser, argv: list[str] | None = None, recipes: tuple[str, ...] = (),
                strict: bool = True, allow: set[str] = frozenset()) -> dict:
    """Flag values by name: defaults from the YAML `recipes`, then from `--config FILE`, then the flags.
    `strict`: a recipe setting without a flag (and not in `allow`) is an error naming it (else it is passed
    through)."""
    known = (set(vars(parser.parse_known_args([])[0])) | set(allow)) - {"config", "local_rank"} if strict else None
    first, _ = parser.parse_known_args(argv)
    for path in [*recipes, *([first.config] if first.config else [])]:
        parser.set_defaults(**read_recipe(path, known))
    values = vars(parser.parse_args(argv))
    values.pop("config"), values.pop("local_rank")
    return values


def read_recipe(path: str, known: set[str] | None = None) -> dict:
    """A YAML recipe of `setting: value` (dashes read as underscores); with `known`, an unknown setting is
    an error naming it."""
    import yaml
    if not os.path.isfile(path):
        raise FileNotFoundError(f"--config {path}: no such file")
    with open(path) as f:
        values = yaml.safe_load(f) or {}
    if not isinstance(values, dict):
        raise ValueError(f"--config {path}: expected a mapping of setting: value")
    values = {str(k).replace("-", "_"): v for k, v in values.items()}
    unknown = sorted(set(values) - known) if known is not None else []
    if unknown:
        raise ValueError(f"--config {path}: unknown setting(s) {', '.join(unknown)}")
    return values
