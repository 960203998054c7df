"""Examples and their formats: one record with named fields -> prompt (no loss) and completion (loss).

Usage::

    fmt = detect_format("data.jsonl:1", row)          # the first format whose fields are all present
    example = format_example(fmt, row, "data.jsonl:1")

Formats, detected from each file's fields when ``format: auto``, and their ``plain`` templates (the prompt
is loss-masked; the completion, plus EOS, is the target):

- messages (messages: a list of {role, content}; roles system, user, assistant) and sharegpt
  (conversations: a list of {from, value}; from system, human/user, gpt/assistant): rendered with
  the tokenizer's chat template whatever ``template`` says (``data.tokenize``); every assistant turn
  is a target, the rest is context. ``Example.answer`` is ``final_answer`` of the last assistant turn.
- alpaca (instruction, output, optional input):
  ``### Instruction:\\n{instruction}\\n\\n### Input:\\n{input}\\n\\n### Response:\\n`` -> ``{output}``
  (the Input section is left out when input is empty)
- prompt_completion (prompt, completion): used as they are
- qa (question, answer): ``Question: {question}\\nAnswer:`` -> `` {answer}``; ``Example.answer`` is the
  number after ``####`` (GSM8K, commas removed), else the whole answer
- text (text): empty prompt, loss on every token
"""

from __future__ import annotations

from dataclasses import dataclass, field

from loraplace.core.errors import LoraplaceError
from loraplace.data.answers import final_answer


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
