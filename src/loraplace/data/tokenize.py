"""Examples -> token ids with labels on the targets only, memoized per tokenizer and data.

Usage::

    ts = tokenize(train, tokenizer, spec)            # memoized: a second call costs a hash
    prompt_ids = encode_prompt(example, tokenizer, spec)   # for generation, as in training

``template: chat`` wraps the plain prompt as one user message in the tokenizer's chat template
(``add_generation_prompt=True``) and strips the completion's leading whitespace. Conversations are always
rendered with the chat template: every assistant turn, through the template's end-of-turn marker
(whitespace after it excluded), is a target, the rest (system prompts, default ones included, and user
turns) is context; each turn is found by rendering the conversation up to it (``add_generation_prompt=True``)
and through it, so any template works that renders a conversation's prefixes as prefixes of its whole.
Prompt and completion (and a conversation's context and target pieces) are tokenized separately and
concatenated (no merges across a boundary); with ``template: plain``, BOS is prepended only if the
tokenizer adds it by default (a chat template writes its own); the first token is never a target.
Sequences longer than ``max_length`` lose their tail; examples left with no target token are dropped
(``TokenizedSet.dropped``).
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Sequence

from loraplace.core.config import DataSpec
from loraplace.core.errors import first_line
from loraplace.core.metrics import IGNORE_INDEX
from loraplace.data.examples import DataError, Example

log = logging.getLogger(__name__)


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

    def head(self, n: int | None) -> "TokenizedSet":
        """The first ``n`` examples (all of them when ``n`` is None or not smaller)."""
        if n is None or n >= len(self):
            return self
        return TokenizedSet(self.input_ids[:n], self.labels[:n], self.index[:n])


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


def pad_id(tokenizer) -> int:
    """The id batches are padded with: the tokenizer's pad token, else its EOS (labels mask the padding anyway)."""
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id


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
