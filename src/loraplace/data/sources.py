"""Where examples come from, and the train/eval split.

Usage::

    examples = load_examples(spec)                    # all of spec.source, in file order
    train, evals = train_eval_examples(spec)          # a seeded split, or spec.eval_source as the eval set
    tune_train, selection = selection_split(train, 64) # the learning-rate search's split of the training set

Sources (``spec.source``): ``builtin`` (the default, ``data.builtin``), a local ``.json`` (array of
objects, or JSON lines), ``.jsonl``, ``.csv`` or ``.parquet`` file, or ``hub:NAME[:CONFIG]`` (needs the
``datasets`` package and a reachable hub). ``spec.eval_source`` (same kinds; hub split
``spec.eval_hub_split``) is a fixed eval set, used in file order (its first ``spec.eval_limit``
examples); all of ``spec.source`` (after ``limit``) is then the train set.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import random
from pathlib import Path
from typing import Sequence

from loraplace.core.config import DataSpec
from loraplace.core.errors import first_line
from loraplace.data.builtin import builtin_rows
from loraplace.data.examples import DataError, Example, detect_format, format_example

log = logging.getLogger(__name__)


def load_examples(spec: DataSpec, eval_set: bool = False) -> list[Example]:
    """All examples of ``spec.source`` in file order, formatted with the plain template; with
    ``eval_set``, the first ``spec.eval_limit`` (default: all) of ``spec.eval_source`` instead."""
    src, split = (spec.eval_source, spec.eval_hub_split) if eval_set else (spec.source, spec.hub_split)
    if src is None:
        raise DataError("data.eval_source: not set; the eval set is then a split of data.source (split_examples)")
    if src == "builtin":
        rows = [(f"builtin row {i + 1}", row) for i, row in enumerate(builtin_rows())]
    elif src.startswith("hub:"):
        rows = _hub_rows(src[4:], split)
    else:
        rows = _file_rows(Path(src))
    if not rows:
        raise DataError(f"{src}: no examples")
    fmt = spec.format if spec.format != "auto" else detect_format(*rows[0])
    examples = [format_example(fmt, row, where) for where, row in rows]
    return examples[: spec.eval_limit] if eval_set and spec.eval_limit is not None else examples


def train_eval_examples(spec: DataSpec) -> tuple[list[Example], list[Example]]:
    """(train, eval): ``split_examples`` of ``spec.source``, or, with ``spec.eval_source``, all of
    ``spec.source`` (seeded shuffle, then ``limit``) and the fixed eval set ``load_examples(spec, True)``."""
    if spec.eval_source is None:
        return split_examples(load_examples(spec), spec)
    examples, evals = load_examples(spec), load_examples(spec, eval_set=True)
    order = list(range(len(examples)))
    random.Random(spec.split_seed).shuffle(order)
    train = [examples[i] for i in order[: spec.limit]]
    shared = len(set(evals).intersection(train))
    if shared:
        log.warning("data: %d of the %d eval examples (%s) are also in the train set (%s)", shared, len(evals),
                    spec.eval_source, spec.source)
    return train, evals


def selection_split(train: list[Example], n: int) -> tuple[list[Example], list[Example]]:
    """(what tuning trials train on, the selection split): the last ``n`` examples of the training set (itself in
    the seeded shuffle's order, so they are a random subset) are held out to choose the learning rate on; the
    eval set is never used for it."""
    if not 0 < n < len(train):
        raise DataError(f"tune.selection: {n} examples of a training set of {len(train)}; it needs at least one "
                        "example and must leave one to train on")
    return train[:-n], train[-n:]


def _file_rows(path: Path) -> list[tuple[str, dict]]:
    if not path.is_file():
        raise DataError(f"{path}: data file not found")
    ext = path.suffix.lower()
    if ext not in (".json", ".jsonl", ".csv", ".parquet"):
        raise DataError(f"{path}: unsupported file type {ext!r}; use .json, .jsonl, .csv or .parquet")
    if ext == ".parquet":
        try:
            import pyarrow.parquet as pq
        except ImportError:
            raise DataError(f"{path}: reading Parquet needs pyarrow (pip install pyarrow)") from None
        try:
            table = pq.read_table(path).to_pylist()
        except Exception as e:  # pyarrow raises several types for corrupt files
            raise DataError(f"{path}: not a readable Parquet file ({first_line(e, limit=None)})") from None
        return [(f"{path}: row {i + 1}", r) for i, r in enumerate(table)]
    try:
        text = path.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as e:
        raise DataError(f"{path}: cannot read ({first_line(e, limit=None)})") from None
    if ext == ".csv":
        reader = csv.DictReader(io.StringIO(text, newline=""))
        rows, start = [], 2
        try:
            for r in reader:
                where = f"{path}:{start}"
                if None in r:
                    raise DataError(f"{where}: more cells than the header has columns")
                rows.append((where, {k: v for k, v in r.items() if v is not None}))
                start = reader.line_num + 1
        except csv.Error as e:
            raise DataError(f"{path}:{reader.line_num}: bad CSV ({e})") from None
        return rows
    if ext == ".json":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            if e.msg != "Extra data":  # "Extra data" after the first value: JSON lines in a .json file
                raise DataError(f"{path}:{e.lineno}: not valid JSON ({e.msg}, column {e.colno})") from None
        else:
            if isinstance(data, dict) and len(data) == 1 and isinstance(next(iter(data.values())), list):
                data = next(iter(data.values()))  # {"data": [...]}
            if not isinstance(data, list):
                raise DataError(f"{path}: expected a JSON array of objects (or JSON lines)")
            return [(f"{path}: item {i + 1}", _obj(r, f"{path}: item {i + 1}")) for i, r in enumerate(data)]
    rows = []
    for n, line in enumerate(text.split("\n"), 1):  # not splitlines: JSON strings may hold U+2028
        if line.strip():
            try:
                rows.append((f"{path}:{n}", _obj(json.loads(line), f"{path}:{n}")))
            except json.JSONDecodeError as e:
                raise DataError(f"{path}:{n}: not valid JSON ({e.msg}, column {e.colno})") from None
    return rows


def _obj(row, where: str) -> dict:
    if isinstance(row, dict):
        return row
    raise DataError(f"{where}: expected a JSON object with named fields, got {type(row).__name__}")


def _hub_rows(name: str, split: str) -> list[tuple[str, dict]]:
    repo, _, conf = name.partition(":")
    hint = "download it and set data.source to a local .jsonl/.csv/.parquet file"
    try:
        import datasets
    except ImportError:
        raise DataError(f"hub:{name}: needs the 'datasets' package (pip install datasets, or the [hub] extra) and a reachable "
                        f"Hugging Face hub; or {hint}") from None
    try:
        ds = datasets.load_dataset(repo, conf or None, split=split)
    except Exception as e:  # offline, unknown name, bad split: all end the same way
        raise DataError(f"hub:{name}: cannot load split {split!r} ({type(e).__name__}: {first_line(e, limit=None)}); "
                        f"is the hub reachable? Or {hint}") from None
    return [(f"hub:{name} row {i + 1}", dict(r)) for i, r in enumerate(ds)]


def split_examples(examples: Sequence[Example], spec: DataSpec) -> tuple[list[Example], list[Example]]:
    """(train, eval): a shuffle seeded by ``spec.split_seed``, then ``spec.limit``, then eval first.

    The eval set depends only on the examples, ``split_seed`` and ``eval_size``: trial seeds never move
    it, and with a count ``eval_size`` neither does ``limit``.
    """
    order = list(range(len(examples)))
    random.Random(spec.split_seed).shuffle(order)
    order = order[: spec.limit] if spec.limit is not None else order
    n = len(order)
    n_eval = int(spec.eval_size) if spec.eval_size >= 1 else round(spec.eval_size * n)
    evals = [examples[i] for i in order[:n_eval]]
    train = [examples[i] for i in order[n_eval:]]
    if not evals or not train:
        which = "eval" if not evals else "train"
        raise DataError(f"data: the {which} split is empty ({n} examples after limit={spec.limit}, "
                        f"eval_size={spec.eval_size}); use more data or change data.eval_size")
    return train, evals
