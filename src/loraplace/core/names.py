"""Strategy names that are chosen per study rather than defined: ``auto`` (and ``auto:...``) and ``random:K``.

Usage::

    is_selected("random:2"), random_draw("random:2")   # True, 2
    auto_parts("auto:rank:grad_norm")                   # ("rank", "grad_norm"); ("subset"|None, None) etc.

``auto`` places by the probe's scores: ``auto.allocate=subset`` takes the modules it scores highest at the
default rank, ``rank`` spreads the budget over every module with ranks proportional to the scores;
``auto:ALLOCATE``, ``auto:SCORE`` and ``auto:ALLOCATE:SCORE`` override ``auto.allocate``/``auto.score`` for that
strategy, so one study can compare them. ``random:K`` is a seeded random module set. All are filled to a
budget. ``kappa`` takes the modules whose weights have the lowest condition number (PEFT's KappaTune), ``eva`` the
ranks PEFT's EVA gives from the activations of the train data. The
rule for which names these are lives here only.
"""

from __future__ import annotations

AUTO = "auto"
KAPPA = "kappa"  # the modules of lowest weight condition number (PEFT's KappaTune), a share kappa.top_p
EVA = "eva"  # ranks and A matrices from an SVD of every module's inputs (PEFT's EVA)
AUTO_PREFIX = "auto:"
RANDOM_PREFIX = "random:"
ALLOCATIONS = ("subset", "rank")  # auto.allocate: a module subset at the default rank | ranks over every module


def is_auto(name: str) -> bool:
    """``auto``, ``auto:ALLOCATE``, ``auto:SCORE`` or ``auto:ALLOCATE:SCORE`` (the score is checked by the config)."""
    return name == AUTO or (name.startswith(AUTO_PREFIX) and 1 <= len(name.split(":")) - 1 <= 2
                            and all(name.split(":")[1:]))


def auto_parts(name: str) -> tuple[str | None, str | None]:
    """(allocation, score) named by an auto strategy; None where the name leaves it to ``auto.allocate``/``auto.score``."""
    if not is_auto(name):
        raise ValueError(f"{name!r} is not auto or auto:...")
    allocate = score = None
    for part in name.split(":")[1:]:
        if part in ALLOCATIONS and allocate is None:
            allocate = part
        elif score is None and part not in ALLOCATIONS:
            score = part
        else:
            raise ValueError(f"strategy {name!r}: expected auto:ALLOCATE:SCORE with ALLOCATE one of {', '.join(ALLOCATIONS)}")
    return allocate, score


def is_random(name: str) -> bool:
    """``random:K`` with K = 0, 1, ..."""
    return name.startswith(RANDOM_PREFIX) and name[len(RANDOM_PREFIX):].isdigit()


def is_selected(name: str) -> bool:
    """``auto`` (``auto:...``), ``kappa``, ``eva`` and ``random:K``: module sets chosen per model (its weights,
    activations, the probe's scores, a seeded draw) and budget, not by roles x blocks."""
    return is_auto(name) or is_random(name) or name in (KAPPA, EVA)


def random_draw(name: str) -> int:
    """K of ``random:K``."""
    if not is_random(name):
        raise ValueError(f"{name!r} is not random:K")
    return int(name[len(RANDOM_PREFIX):])
