"""Examples, train/eval split, tokenization with completion-only labels, and length-grouped batches.

Usage::

    examples = load_examples(spec)                   # spec: config.DataSpec
    train, evals = split_examples(examples, spec)    # seeded by spec.split_seed only
    ts = tokenize(train, tokenizer, spec)            # memoized: a second call costs a hash
    for batch in batches(ts, 8, seed=0, pad_id=tokenizer.pad_token_id): ...   # input_ids, attention_mask, labels
    prompt_ids = encode_prompt(example, tokenizer, spec)   # for generation, as in training

Sources (``spec.source``): ``builtin`` (the default, generated here), a local ``.json`` (array of
objects, or JSON lines), ``.jsonl``, ``.csv`` or ``.parquet`` file, or ``hub:NAME[:CONFIG]`` (needs the
``datasets`` package and a reachable hub). Formats, detected from the fields when ``format: auto``,
and their ``plain`` templates (the prompt is loss-masked; the completion, plus EOS, is the target):

- alpaca (instruction, output, optional input):
  ``### Instruction:\\n{instruction}\\n\\n### Input:\\n{input}\\n\\n### Response:\\n`` -> ``{output}``
  (the Input section is left out when input is empty)
- prompt_completion (prompt, completion): used as they are
- qa (question, answer): ``Question: {question}\\nAnswer:`` -> `` {answer}``; ``Example.answer`` is the
  number after ``####`` (GSM8K, commas removed), else the whole answer
- text (text): empty prompt, loss on every token

``template: chat`` wraps the plain prompt as one user message in the tokenizer's chat template
(``add_generation_prompt=True``) and strips the completion's leading whitespace. Prompt and completion
are tokenized separately and concatenated (no merges across the boundary); BOS is prepended only if
the tokenizer adds it by default; the first token is never a target. Sequences longer than
``max_length`` lose their tail; examples left with no target token are dropped (``TokenizedSet.dropped``).
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import logging
import random
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Sequence

import torch

from .config import DataSpec
from .core import LoraplaceError
from .metrics import IGNORE_INDEX

log = logging.getLogger(__name__)


class DataError(LoraplaceError, ValueError):
    """Bad data or data settings; the one-line message names the file, line and field."""


@dataclass(frozen=True)
class Example:
    prompt: str  # everything the model is given (loss masked)
    completion: str  # what it must produce (loss computed)
    answer: str | None = None  # checkable final answer, for exact-match accuracy


FORMATS = {"alpaca": ("instruction", "output"), "prompt_completion": ("prompt", "completion"),
           "qa": ("question", "answer"), "text": ("text",)}


# -- loading ----------------------------------------------------------------------------------------
def load_examples(spec: DataSpec) -> list[Example]:
    """All examples of ``spec.source`` in file order, formatted with the plain template."""
    src = spec.source
    if src == "builtin":
        from .builtin_data import builtin_examples

        return builtin_examples()
    rows = _hub_rows(src[4:], spec.hub_split) if src.startswith("hub:") else _file_rows(Path(src))
    if not rows:
        raise DataError(f"{src}: no examples")
    fmt = spec.format if spec.format != "auto" else detect_format(*rows[0])
    return [format_example(fmt, row, where) for where, row in rows]


def detect_format(where: str, row: dict) -> str:
    for fmt, required in FORMATS.items():
        if all(k in row for k in required):
            return fmt
    raise DataError(f"{where}: cannot tell the format from fields {sorted(row)}; expected instruction/output "
                    "(alpaca), prompt/completion, question/answer (qa) or text, or set data.format")


def format_example(fmt: str, row: dict, where: str) -> Example:
    """One row of format ``fmt`` as an Example (plain template, documented above)."""
    if fmt not in FORMATS:
        raise DataError(f"data.format: {fmt!r} is not one of {', '.join(FORMATS)}")

    def get(name: str, optional: bool = False) -> str:
        if name not in row:
            if optional:
                return ""
            raise DataError(f"{where}: missing field {name!r} (format {fmt}; fields present: {sorted(row)})")
        v = row[name]
        if v is None and optional:
            return ""
        if isinstance(v, bool) or not isinstance(v, (str, int, float)):
            raise DataError(f"{where}: field {name!r} must be text, got {type(v).__name__}")
        return str(v)

    if fmt == "alpaca":
        inp = get("input", optional=True).strip()
        section = f"### Input:\n{inp}\n\n" if inp else ""
        return Example(f"### Instruction:\n{get('instruction')}\n\n{section}### Response:\n", get("output"))
    if fmt == "prompt_completion":
        return Example(get("prompt"), get("completion"))
    if fmt == "qa":
        answer = get("answer")
        return Example(f"Question: {get('question')}\nAnswer:", " " + answer.lstrip(), final_answer(answer))
    return Example("", get("text"))


def final_answer(answer: str) -> str:
    """The checkable answer: the number after GSM8K's ``####`` (commas removed), else the stripped text."""
    if "####" in answer:
        return answer.rsplit("####", 1)[1].strip().replace(",", "")
    return answer.strip()


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
            raise DataError(f"{path}: not a readable Parquet file ({_first_line(e)})") from None
        return [(f"{path}: row {i + 1}", r) for i, r in enumerate(table)]
    try:
        text = path.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as e:
        raise DataError(f"{path}: cannot read ({_first_line(e)})") from None
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


def _first_line(e: BaseException) -> str:
    lines = str(e).strip().splitlines()
    return lines[0] if lines else type(e).__name__


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
        raise DataError(f"hub:{name}: cannot load split {split!r} ({type(e).__name__}: {_first_line(e)}); "
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


# -- tokenization ---------------------------------------------------------------------------------------
@dataclass
class TokenizedSet:
    """Token ids and labels (IGNORE_INDEX on prompt tokens and on position 0). Shared by the cache: read only."""

    input_ids: list[list[int]]
    labels: list[list[int]]
    index: list[int] = field(default_factory=list)  # position of each kept example in the tokenized list
    dropped: int = 0  # examples left with no target token by truncation
    truncated: int = 0  # kept examples that lost tokens at the end

    def __len__(self) -> int:
        return len(self.input_ids)

    @property
    def lengths(self) -> list[int]:
        return [len(x) for x in self.input_ids]

    @property
    def n_target_tokens(self) -> int:
        return sum(sum(1 for t in lab if t != IGNORE_INDEX) for lab in self.labels)


_CACHE: OrderedDict[tuple, TokenizedSet] = OrderedDict()  # the 8 most recent sets


def tokenize(examples: Sequence[Example], tokenizer, spec: DataSpec) -> TokenizedSet:
    """Tokenize with completion-only labels, memoized on (tokenizer, template, max_length, data)."""
    key = (tokenizer_fingerprint(tokenizer), spec.template, spec.max_length, data_fingerprint(examples))
    if key in _CACHE:
        _CACHE.move_to_end(key)
        return _CACHE[key]
    ts = _tokenize(examples, tokenizer, spec.template, spec.max_length)
    _CACHE[key] = ts
    if len(_CACHE) > 8:
        _CACHE.popitem(last=False)
    return ts


def tokenizer_fingerprint(tokenizer) -> str:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    h = hashlib.sha256(backend.to_str().encode() if backend is not None
                       else repr(sorted(tokenizer.get_vocab().items())).encode())
    h.update(repr((type(tokenizer).__name__, tokenizer.eos_token_id, tokenizer.bos_token_id,
                   getattr(tokenizer, "chat_template", None))).encode())
    return h.hexdigest()


def data_fingerprint(examples: Sequence[Example]) -> str:
    h = hashlib.sha256()
    for e in examples:
        h.update(json.dumps([e.prompt, e.completion]).encode())
    return h.hexdigest()


def encode_prompt(example: Example, tokenizer, spec: DataSpec) -> list[int]:
    """The prompt's token ids exactly as in training (template, BOS), to generate a completion from."""
    (text,), _, bos = _apply_template([example.prompt], [], tokenizer, spec.template)
    return bos + tokenizer(text, add_special_tokens=False)["input_ids"]


def _apply_template(prompts: list[str], completions: list[str], tokenizer, template: str):
    """(prompt texts, completion texts, BOS ids to prepend to each prompt) for ``template``."""
    if template == "chat":
        if not getattr(tokenizer, "chat_template", None):
            raise DataError(f"data.template=chat: tokenizer {tokenizer.name_or_path!r} has no chat template; "
                            "use data.template=plain")
        prompts = [tokenizer.apply_chat_template([{"role": "user", "content": p.strip()}], tokenize=False,
                                                 add_generation_prompt=True) for p in prompts]
        return prompts, [c.lstrip() for c in completions], []  # the template writes its own BOS, if any
    if template != "plain":
        raise DataError(f"data.template: {template!r} is not one of plain, chat")
    bos_id, probe = tokenizer.bos_token_id, tokenizer("a")["input_ids"]
    return prompts, completions, [bos_id] if bos_id is not None and probe and probe[0] == bos_id else []


def _tokenize(examples: Sequence[Example], tokenizer, template: str, max_length: int) -> TokenizedSet:
    if not examples:
        raise DataError("data: nothing to tokenize (no examples)")
    eos = tokenizer.eos_token_id
    if eos is None:
        raise DataError(f"tokenizer {tokenizer.name_or_path!r} has no EOS token to end completions with")
    prompts, completions, bos = _apply_template([e.prompt for e in examples], [e.completion for e in examples],
                                                tokenizer, template)
    p_ids = tokenizer(prompts, add_special_tokens=False)["input_ids"]
    c_ids = tokenizer(completions, add_special_tokens=False)["input_ids"]
    ts = TokenizedSet([], [])
    need_one, need_all = [], 0
    for i, (p, c) in enumerate(zip(p_ids, c_ids)):
        p, c = bos + list(p), list(c) + [eos]
        need_one.append(max(len(p) + 1, 2))
        need_all = max(need_all, len(p) + len(c))
        ids = (p + c)[:max_length]
        labels = [IGNORE_INDEX] * len(p) + ids[len(p):]
        labels[0] = IGNORE_INDEX  # nothing predicts the first token
        if all(t == IGNORE_INDEX for t in labels):
            ts.dropped += 1
            continue
        ts.truncated += len(p) + len(c) > max_length
        ts.input_ids.append(ids)
        ts.labels.append(labels)
        ts.index.append(i)
    if not ts.input_ids:
        raise DataError(f"data.max_length={max_length} truncates away the completion of all {len(examples)} "
                        f"examples; max_length >= {min(need_one)} keeps some, >= {need_all} keeps all whole")
    if ts.dropped or ts.truncated:
        log.warning("data: max_length=%d dropped %d of %d examples (no completion token left) and truncated %d",
                    max_length, ts.dropped, len(examples), ts.truncated)
    return ts


# -- batches ------------------------------------------------------------------------------------------
def batch_indices(lengths: Sequence[int], batch_size: int, seed: int | None, group_by_length: bool = True,
                  drop_last: bool = False) -> list[list[int]]:
    """The example indices of each batch, in order (see ``batches``)."""
    if batch_size < 1:
        raise DataError(f"batch_size must be >= 1, got {batch_size}")
    order = list(range(len(lengths)))
    rng = None if seed is None else random.Random(seed)
    if rng is not None:
        rng.shuffle(order)
    mega = 50 * batch_size if rng is not None else max(len(order), 1)  # unseeded: sort the whole set
    groups = []
    for s in range(0, len(order), mega):
        chunk = sorted(order[s:s + mega], key=lambda i: -lengths[i]) if group_by_length else order[s:s + mega]
        groups += [chunk[j:j + batch_size] for j in range(0, len(chunk), batch_size)]
    if rng is not None and group_by_length:
        rng.shuffle(groups)  # no long-to-short curriculum
    return [g for g in groups if len(g) == batch_size] if drop_last else groups


def batches(ts: TokenizedSet, batch_size: int, seed: int | None, pad_id: int, group_by_length: bool = True,
            drop_last: bool = False) -> Iterator[dict[str, torch.Tensor]]:
    """Right-padded batches ``{"input_ids", "attention_mask", "labels"}`` (labels IGNORE_INDEX on padding).

    ``seed`` set: shuffle with it; with ``group_by_length``, sort each mega-chunk of 50 batches by length
    and shuffle the batch order (about 2% padding on GSM8K instead of about 30%). ``seed=None`` (eval):
    no randomness; dataset order, or longest first with ``group_by_length``. Same seed, same batches.
    """
    if pad_id is None:
        raise DataError("batches: pad_id is None; pass tokenizer.pad_token_id or eos_token_id")
    for group in batch_indices(ts.lengths, batch_size, seed, group_by_length, drop_last):
        width = max(len(ts.input_ids[i]) for i in group)
        ids = torch.full((len(group), width), pad_id, dtype=torch.long)
        labels = torch.full((len(group), width), IGNORE_INDEX, dtype=torch.long)
        mask = torch.zeros((len(group), width), dtype=torch.long)
        for row, i in enumerate(group):
            n = len(ts.input_ids[i])
            ids[row, :n] = torch.tensor(ts.input_ids[i])
            labels[row, :n] = torch.tensor(ts.labels[i])
            mask[row, :n] = 1
        yield {"input_ids": ids, "attention_mask": mask, "labels": labels}


def padding_fraction(ts: TokenizedSet | Sequence[int], batch_size: int, seed: int | None = 0,
                     group_by_length: bool = True, drop_last: bool = False) -> float:
    """Share of padding among the token slots of ``batches`` with these settings (a set or its lengths)."""
    lengths = ts.lengths if isinstance(ts, TokenizedSet) else list(ts)
    slots = real = 0
    for g in batch_indices(lengths, batch_size, seed, group_by_length, drop_last):
        slots += len(g) * max(lengths[i] for i in g)
        real += sum(lengths[i] for i in g)
    return 1 - real / slots if slots else 0.0
