"""Examples (records and conversations), train/eval sets, tokenization with target-only labels, and batches.

Usage::

    train, evals = train_eval_examples(spec)         # spec: config.DataSpec; a split, or data.eval_source
    ts = tokenize(train, tokenizer, spec)            # memoized: a second call costs a hash
    for batch in batches(ts, 8, seed=0, pad_id=tokenizer.pad_token_id): ...   # input_ids, attention_mask, labels
    prompt_ids = encode_prompt(example, tokenizer, spec)   # for generation, as in training

Sources (``spec.source``): ``builtin`` (the default, generated here), a local ``.json`` (array of
objects, or JSON lines), ``.jsonl``, ``.csv`` or ``.parquet`` file, or ``hub:NAME[:CONFIG]`` (needs the
``datasets`` package and a reachable hub). ``spec.eval_source`` (same kinds; hub split
``spec.eval_hub_split``) is a fixed eval set, used in file order (its first ``spec.eval_limit``
examples); all of ``spec.source`` (after ``limit``) is then the train set. Formats, detected from
each file's fields when ``format: auto``, and their ``plain`` templates (the prompt is loss-masked;
the completion, plus EOS, is the target):

- messages (messages: a list of {role, content}; roles system, user, assistant) and sharegpt
  (conversations: a list of {from, value}; from system, human/user, gpt/assistant): rendered with
  the tokenizer's chat template whatever ``template`` says; every assistant turn, through the
  template's end-of-turn marker (whitespace after it excluded), is a target, the rest (system
  prompts, default ones included, and user turns) is context. Found by rendering the conversation
  up to each assistant turn (``add_generation_prompt=True``) and through it, so any template works
  that renders a conversation's prefixes as prefixes of its whole. ``Example.answer`` is
  ``final_answer`` of the last assistant turn, and the prompt to generate from is everything before it.
- alpaca (instruction, output, optional input):
  ``### Instruction:\\n{instruction}\\n\\n### Input:\\n{input}\\n\\n### Response:\\n`` -> ``{output}``
  (the Input section is left out when input is empty)
- prompt_completion (prompt, completion): used as they are
- qa (question, answer): ``Question: {question}\\nAnswer:`` -> `` {answer}``; ``Example.answer`` is the
  number after ``####`` (GSM8K, commas removed), else the whole answer
- text (text): empty prompt, loss on every token

``template: chat`` wraps the plain prompt as one user message in the tokenizer's chat template
(``add_generation_prompt=True``) and strips the completion's leading whitespace. Prompt and completion
(and a conversation's context and target pieces) are tokenized separately and concatenated (no merges
across a boundary); with ``template: plain``, BOS is prepended only if the tokenizer adds it by
default (a chat template writes its own); the first token is never a target. Sequences longer than
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
from .answers import final_answer
from .builtin_data import builtin_rows
from .core import LoraplaceError, first_line
from .metrics import IGNORE_INDEX

log = logging.getLogger(__name__)


class DataError(LoraplaceError, ValueError):
    """Bad data or data settings; the one-line message names the file, line and field."""


@dataclass(frozen=True)
class Example:
    prompt: str  # everything the model is given (loss masked); "" for a conversation
    completion: str  # what it must produce (loss computed); "" for a conversation
    answer: str | None = None  # checkable final answer, for exact-match accuracy
    messages: tuple[tuple[str, str], ...] | None = None  # a conversation: (role, content) turns, roles in ROLES
    where: str = field(default="", compare=False, repr=False)  # "file:line", for errors found when tokenizing


# Detection order: the first format whose fields are all present (chat first: chat datasets often
# carry a "prompt" or a pre-rendered "text" beside their messages).
FORMATS = {"messages": ("messages",), "sharegpt": ("conversations",), "alpaca": ("instruction", "output"),
           "prompt_completion": ("prompt", "completion"), "qa": ("question", "answer"), "text": ("text",)}
ROLES = ("system", "user", "assistant")
_CHAT = {  # format -> (list field, role key, text key, accepted role names -> role)
    "messages": ("messages", "role", "content", {r: r for r in ROLES}),
    "sharegpt": ("conversations", "from", "value",
                 {"system": "system", "human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant"}),
}


# -- loading ----------------------------------------------------------------------------------------
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


def detect_format(where: str, row: dict) -> str:
    for fmt, required in FORMATS.items():
        if all(k in row for k in required):
            return fmt
    raise DataError(f"{where}: cannot tell the format from fields {sorted(row)}; expected messages, conversations "
                    "(sharegpt), instruction/output (alpaca), prompt/completion, question/answer (qa) or text, "
                    "or set data.format")


def format_example(fmt: str, row: dict, where: str) -> Example:
    """One row of format ``fmt`` as an Example (plain template, documented above)."""
    if fmt not in FORMATS:
        raise DataError(f"data.format: {fmt!r} is not one of {', '.join(FORMATS)}")
    if fmt in _CHAT:
        return _conversation(fmt, row, where)

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


def _conversation(fmt: str, row: dict, where: str) -> Example:
    key, role_key, text_key, roles = _CHAT[fmt]
    if key not in row:
        raise DataError(f"{where}: missing field {key!r} (format {fmt}; fields present: {sorted(row)})")
    turns = row[key]
    if not isinstance(turns, (list, tuple)) or not turns:
        raise DataError(f"{where}: field {key!r} must be a non-empty list of {{{role_key!r}, {text_key!r}}} objects, "
                        f"got {type(turns).__name__ if turns else 'an empty list'}")
    messages = []
    for i, turn in enumerate(turns):
        at = f"{where}: {key}[{i}]"
        if not isinstance(turn, dict):
            raise DataError(f"{at}: expected an object with {role_key!r} and {text_key!r}, got {type(turn).__name__}")
        for k in (role_key, text_key):
            if k not in turn:
                raise DataError(f"{at}: missing field {k!r} (fields present: {sorted(turn)})")
        role, text = turn[role_key], turn[text_key]
        if not isinstance(role, str) or role not in roles:
            raise DataError(f"{at}: unknown {role_key} {role!r}; expected one of {', '.join(roles)}")
        if not isinstance(text, str):
            raise DataError(f"{at}: {text_key!r} must be text, got {type(text).__name__}")
        if not text.strip():
            raise DataError(f"{at}: empty {text_key!r}")
        messages.append((roles[role], text))
    said = [r for r, _ in messages]
    if "assistant" not in said:
        raise DataError(f"{where}: the conversation has no assistant turn (roles {', '.join(said)}); nothing to learn")
    if "user" not in said[: said.index("assistant")]:
        raise DataError(f"{where}: {key}[{said.index('assistant')}]: the first assistant turn must follow a user turn")
    last = next(text for role, text in reversed(messages) if role == "assistant")
    return Example("", "", final_answer(last), tuple(messages), where)


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
        h.update(json.dumps([e.prompt, e.completion] + ([e.messages] if e.messages is not None else [])).encode())
    return h.hexdigest()


Piece = tuple  # (text: str, or token ids: list[int] kept as they are; is_target: bool)


def encode_prompt(example: Example, tokenizer, spec: DataSpec) -> list[int]:
    """The prompt's token ids exactly as in training (template, BOS), to generate a completion from:
    everything before the completion, or before a conversation's last assistant turn."""
    pieces = _pieces(example, tokenizer, spec.template, _bos(tokenizer), _eos(tokenizer))
    start = max(i for i, (_, target) in enumerate(pieces) if target)
    while start > 0 and pieces[start - 1][1]:
        start -= 1  # the start of the last run of targets
    return [t for ids in _encode([p for p, _ in pieces[:start]], tokenizer) for t in ids]


def _bos(tokenizer) -> list[int]:
    """[BOS] if the tokenizer adds it by default (plain template), else []."""
    bos_id, probe = tokenizer.bos_token_id, tokenizer("a")["input_ids"]
    return [bos_id] if bos_id is not None and probe and probe[0] == bos_id else []


def _eos(tokenizer) -> int:
    if tokenizer.eos_token_id is None:
        raise DataError(f"tokenizer {tokenizer.name_or_path!r} has no EOS token to end completions with")
    return tokenizer.eos_token_id


def _pieces(e: Example, tokenizer, template: str, bos: list[int], eos: int) -> list[Piece]:
    """The example as consecutive pieces of context and target, in order."""
    if e.messages is not None:
        return _chat_pieces(e, tokenizer)
    if template == "chat":
        if not getattr(tokenizer, "chat_template", None):
            raise DataError(f"data.template=chat: tokenizer {tokenizer.name_or_path!r} has no chat template; "
                            "use data.template=plain")
        prompt = tokenizer.apply_chat_template([{"role": "user", "content": e.prompt.strip()}], tokenize=False,
                                               add_generation_prompt=True)
        return [(prompt, False), (e.completion.lstrip(), True), ([eos], True)]  # the template writes its own BOS
    if template != "plain":
        raise DataError(f"data.template: {template!r} is not one of plain, chat")
    return [(bos, False), (e.prompt, False), (e.completion, True), ([eos], True)]


def _chat_pieces(e: Example, tokenizer) -> list[Piece]:
    """Context and assistant-turn pieces of a conversation, located by rendering its prefixes."""
    name = tokenizer.name_or_path
    if not getattr(tokenizer, "chat_template", None):
        raise DataError(f"{e.where}: a conversation needs a chat template and tokenizer {name!r} has none; "
                        "use a chat model's tokenizer, or a prompt/completion format")
    messages = [{"role": r, "content": c} for r, c in e.messages]

    def render(n: int, generation_prompt: bool) -> str:
        try:
            return tokenizer.apply_chat_template(messages[:n], tokenize=False, add_generation_prompt=generation_prompt)
        except Exception as err:  # jinja raises its own errors (roles must alternate, ...)
            raise DataError(f"{e.where}: the chat template of {name!r} cannot render this conversation "
                            f"({type(err).__name__}: {first_line(err, limit=None)})") from None

    full, pieces, pos = render(len(messages), False), [], 0
    for k, (role, _) in enumerate(e.messages):
        if role != "assistant":
            continue
        before, through = render(k, True), render(k + 1, False)
        end = len(through.rstrip())  # whitespace after the end-of-turn marker is context
        if not (full.startswith(through) and through.startswith(before) and pos <= len(before) < end):
            raise DataError(f"{e.where}: the chat template of {name!r} renders turn {k} differently once later turns "
                            "follow, so the assistant turns cannot be located; use a prompt/completion format")
        pieces += [(full[pos:len(before)], False), (full[len(before):end], True)]
        pos = end
    return pieces + [(full[pos:], False)]


def _encode(pieces: list, tokenizer) -> list[list[int]]:
    """Token ids of each piece: texts tokenized in one batch (no special tokens added), ids kept."""
    texts = [p for p in pieces if isinstance(p, str) and p]
    encoded = iter(tokenizer(texts, add_special_tokens=False)["input_ids"] if texts else [])
    return [list(p) if isinstance(p, list) else list(next(encoded)) if p else [] for p in pieces]


def _tokenize(examples: Sequence[Example], tokenizer, template: str, max_length: int) -> TokenizedSet:
    if not examples:
        raise DataError("data: nothing to tokenize (no examples)")
    bos, eos = _bos(tokenizer), _eos(tokenizer)
    pieces = [_pieces(e, tokenizer, template, bos, eos) for e in examples]
    encoded = iter(_encode([p for ps in pieces for p, _ in ps], tokenizer))
    ts = TokenizedSet([], [])
    need_one, need_all = [], 0
    specials, stops = set(tokenizer.all_special_ids), None  # stops: do a conversation's targets hold a special token
    for i, ps in enumerate(pieces):
        full, labels = [], []
        for _, target in ps:
            ids = next(encoded)
            full += ids
            labels += ids if target else [IGNORE_INDEX] * len(ids)
        if stops is None and examples[i].messages is not None:
            stops = not specials.isdisjoint(t for t in labels if t != IGNORE_INDEX)
        labels[0] = IGNORE_INDEX  # nothing predicts the first token
        need_one.append(next((j + 1 for j, t in enumerate(labels) if t != IGNORE_INDEX), len(labels) + 1))
        need_all = max(need_all, len(full))
        ids, labels = full[:max_length], labels[:max_length]
        if all(t == IGNORE_INDEX for t in labels):
            ts.dropped += 1
            continue
        ts.truncated += len(full) > max_length
        ts.input_ids.append(ids)
        ts.labels.append(labels)
        ts.index.append(i)
    if not ts.input_ids:
        raise DataError(f"data.max_length={max_length} truncates away the completion of all {len(examples)} "
                        f"examples; max_length >= {min(need_one)} keeps some, >= {need_all} keeps all whole")
    if stops is False:
        log.warning("data: the chat template of %r closes assistant turns with no special token; the model will "
                    "not learn to stop", tokenizer.name_or_path)
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
            drop_last: bool = False, index: bool = False) -> Iterator[dict[str, torch.Tensor]]:
    """Right-padded batches ``{"input_ids", "attention_mask", "labels"}`` (labels IGNORE_INDEX on padding),
    with ``index`` also ``"index"`` (B,): each row's position in ``ts``.

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
        batch = {"input_ids": ids, "attention_mask": mask, "labels": labels}
        if index:
            batch["index"] = torch.tensor(group, dtype=torch.long)
        yield batch


def padding_fraction(ts: TokenizedSet | Sequence[int], batch_size: int, seed: int | None = 0,
                     group_by_length: bool = True, drop_last: bool = False) -> float:
    """Share of padding among the token slots of ``batches`` with these settings (a set or its lengths)."""
    lengths = ts.lengths if isinstance(ts, TokenizedSet) else list(ts)
    slots = real = 0
    for g in batch_indices(lengths, batch_size, seed, group_by_length, drop_last):
        slots += len(g) * max(lengths[i] for i in g)
        real += sum(lengths[i] for i in g)
    return 1 - real / slots if slots else 0.0
