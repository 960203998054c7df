"""The built-in default dataset: short question/answer pairs generated from this Python installation.

Usage: ``rows = builtin_rows()``: ``[{"question": ..., "answer": ...}, ...]``, the rows that ``data.source=builtin``
loads; ``data.sources`` formats them like the rows of any file (``data.format`` applies).

Offline and deterministic: nothing is downloaded, and the same Python minor version always gives
the same rows. Kept apart from ``data.sources`` because it is a dataset, not data plumbing; it imports
nothing from the package.
"""

from __future__ import annotations

import codecs
import contextlib
import importlib
import inspect
import io
import keyword
import random
import re
from functools import lru_cache


_DOC_MODULES = ("math cmath string json random statistics itertools functools collections shutil textwrap re "
                "time heapq bisect operator copy glob fnmatch base64 hashlib zlib gzip csv uuid secrets calendar "
                "difflib pprint struct tempfile colorsys binascii codecs contextlib warnings traceback locale "
                "platform queue shlex getpass zipfile tarfile pickle weakref abc numbers mimetypes").split()
_NOT_KEYWORDS = ("print len range list dict str int float open self super object sum min max sorted zip map "
                 "filter input format exec eval id iter next abs round hash vars dir all any set tuple bool "
                 "repr chr ord bytes help").split()
_STRING_TASKS = (
    ("Reverse the order of these words: {}", lambda ws: " ".join(reversed(ws))),
    ("Sort these words alphabetically: {}", lambda ws: " ".join(sorted(ws))),
    ("Write these words in capital letters: {}", lambda ws: " ".join(ws).upper()),
    ("Join these words with underscores: {}", "_".join),
    ("Give the first letter of each word: {}", lambda ws: "".join(w[0] for w in ws).upper()),
    ("How many words are there in: {}", lambda ws: str(len(ws))),
    ("Which of these words is the longest: {}", lambda ws: max(ws, key=len)),
)


def builtin_rows() -> list[dict]:
    """The default dataset: short question/answer rows made from this Python installation (qa format).

    Tasks: string transformations of random word lists drawn from the Zen of Python (`this`) and
    `keyword.kwlist` (7 rules, 60 each), "is X a reserved keyword?" (yes/no), and facts read from the
    interpreter: the first sentence of the docstrings of builtins and of some stdlib modules, and which
    stdlib module defines a function. Deterministic for a given Python minor version; the docstring and
    module tasks (about a third of the examples) can differ between versions, the rest cannot.
    """
    return [{"question": q, "answer": a} for q, a in _builtin()]


@lru_cache(maxsize=1)
def _builtin() -> tuple[tuple[str, str], ...]:
    import builtins

    with contextlib.redirect_stdout(io.StringIO()):
        import this  # prints the Zen on first import
    zen = codecs.decode(this.s, "rot13")
    vocab = sorted(set(re.findall(r"[a-z]{3,}", zen.lower())) | {k for k in keyword.kwlist if k.islower()})
    rng = random.Random(1234)
    qa: dict[str, str] = {}
    for template, rule in _STRING_TASKS:
        made = 0
        while made < 60:
            words = rng.sample(vocab, rng.randint(3, 5))
            q = template.format(" ".join(words))
            if q not in qa:
                qa[q], made = rule(words), made + 1
    for name in keyword.kwlist + _NOT_KEYWORDS:
        qa[f"Is `{name}` a reserved keyword in Python?"] = "Yes" if keyword.iskeyword(name) else "No"
    for name in sorted(dir(builtins)):
        obj = getattr(builtins, name)
        if name.startswith("_") or getattr(obj, "__name__", None) != name:
            continue  # aliases (IOError) and non-callables (True, copyright)
        is_type = isinstance(obj, type)
        q = (f"What does the Python exception `{name}` signal?" if is_type and issubclass(obj, BaseException)
             else f"What is the Python builtin type `{name}`?" if is_type
             else f"What does the Python builtin function `{name}` do?")
        if s := _first_sentence(obj):
            qa[q] = s
    owners: dict[str, list[str]] = {}
    for mod_name in _DOC_MODULES:
        mod = importlib.import_module(mod_name)
        if s := _first_sentence(mod):
            qa[f"What is the Python standard library module `{mod_name}` for?"] = s
        public = [n for n in getattr(mod, "__all__", dir(mod)) if not n.startswith("_")]
        for n in public:
            if inspect.isfunction(getattr(mod, n, None)) or inspect.isbuiltin(getattr(mod, n, None)):
                owners.setdefault(n, []).append(mod_name)
    by_module: dict[str, list[str]] = {}
    for n, mods in sorted(owners.items()):
        if len(mods) == 1 and not hasattr(builtins, n):
            by_module.setdefault(mods[0], []).append(n)
    for mod_name, names in by_module.items():
        for n in rng.sample(names, min(4, len(names))):
            qa[f"Which Python standard library module defines `{n}`?"] = mod_name
    return tuple(qa.items())


def _first_sentence(obj) -> str | None:
    doc = inspect.getdoc(obj) if isinstance(obj, type) or callable(obj) or inspect.ismodule(obj) else None
    for para in (doc or "").split("\n\n"):
        lines = [ln.strip() for ln in para.splitlines() if ln.strip()]
        if not lines or all(re.match(r"[\w.]+\(.*\)|.*->", ln) for ln in lines):
            continue  # signature lines such as "int([x]) -> integer"
        m = re.match(r"(.+?[.!?])(\s|$)", " ".join(lines))
        s = m.group(1) if m else " ".join(lines) + "."
        ok = 8 <= len(s) <= 90 and s[0].isupper() and not re.search(r">>>|->|--|http|__|\w\(", s)
        return s if ok else None
    return None
