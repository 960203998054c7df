"""Strategy names that are chosen per study rather than defined: ``auto`` and ``random:K``.

Usage::

    is_selected("random:2"), random_draw("random:2")   # True, 2

``auto`` takes the modules the probe scores highest and ``random:K`` a seeded random module set, both
filled to a budget; the rule for which names these are lives here only.
"""

from __future__ import annotations

AUTO = "auto"
RANDOM_PREFIX = "random:"


def is_random(name: str) -> bool:
    """``random:K`` with K = 0, 1, ..."""
    return name.startswith(RANDOM_PREFIX) and name[len(RANDOM_PREFIX):].isdigit()


def is_selected(name: str) -> bool:
    """``auto`` and ``random:K``: module sets chosen per model and budget, not by roles x blocks."""
    return name == AUTO or is_random(name)


def random_draw(name: str) -> int:
    """K of ``random:K``."""
    if not is_random(name):
        raise ValueError(f"{name!r} is not random:K")
    return int(name[len(RANDOM_PREFIX):])
