"""Checkable answers: what an answer commits to, whether a generation matches it, which examples are scored.

Usage::

    final_answer("... #### 1,080")                     # "1080": the checkable part of a reference answer
    answer_matches("so it is 18.", "18")               # True: numbers compare by value
    scored = accuracy_examples(eval_examples, 50)      # the fixed examples every trial is scored on

Plain text only; the greedy generation that produces the answers is ``train.generate``.
"""

from __future__ import annotations

import re


def final_answer(answer: str) -> str:
    """The checkable part of a reference answer: after GSM8K's ``####`` the number ``final_number`` reads there
    (the same rule that reads a generation), else the stripped text."""
    if "####" in answer:
        return final_number(answer) or answer.split("####", 1)[1].strip()
    return answer.strip()


# part of the zero-shot accuracy key: a change of the rule measures the base model again
STOP_RULE = "greedy; stop at eos, a completed '#### <number>' line (numeric answers) or the first line (text answers)"


def accuracy_examples(eval_examples, limit: int) -> list:
    """The examples accuracy is measured on: the first ``limit`` eval examples with an answer.

    The eval split is fixed by data.split_seed, so every trial of a study (and the zero-shot base
    model) is scored on exactly these examples, in this order."""
    return [e for e in eval_examples if e.answer is not None][:limit]


def final_number(text: str) -> str | None:
    """The answer a generation commits to: the number after '####' if present, else the last number."""
    tail = text.split("####", 1)[1] if "####" in text else text
    nums = re.findall(r"-?\d[\d,]*(?:\.\d+)?", tail)
    if not nums:
        return None
    value = nums[0] if "####" in text else nums[-1]
    value = value.replace(",", "")
    return value[:-2] if value.endswith(".0") else value


def answer_matches(generated: str, answer: str) -> bool:
    """Numbers compare by value (GSM8K); other answers by their first line, case and final period aside."""
    expected = final_number(answer)
    if expected is not None:
        return final_number(generated) == expected

    def norm(t: str) -> str:
        return (t.strip().splitlines() or [""])[0].strip().rstrip(".").lower()

    return norm(generated) == norm(answer)


FINAL_LINE = re.compile(r"####[^\n]*\d[^\n]*\n")  # a GSM8K final-answer line, complete once its newline is out


FIRST_LINE = re.compile(r"\S[^\n]*\n")  # a complete first non-empty line


def final_line_stop(tokenizer, answer: str | None = None):
    """A ``stop(ids)`` for ``generate_greedy``: True once the generated text holds its final answer line.

    For a numeric answer (and by default) that is a complete '#### <number>' line (GSM8K style;
    before it the model may reason over many lines); for a text answer, which ``answer_matches``
    compares on its first line, the first non-empty line. The text is decoded only after tokens
    that contain a newline."""
    line = FIRST_LINE if answer is not None and final_number(answer) is None else FINAL_LINE
    has_newline: dict[int, bool] = {}

    def stop(ids: list[int]) -> bool:
        t = ids[-1]
        if t not in has_newline:
            has_newline[t] = "\n" in tokenizer.decode([t])
        return has_newline[t] and line.search(tokenizer.decode(ids)) is not None

    return stop
