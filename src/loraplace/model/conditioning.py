"""The base weights' condition numbers, as PEFT's KappaTune computes them: the order strategy ``kappa`` takes.

Usage::

    order, seconds = kappa_order(model, anat)     # adaptable module names, lowest condition number first

KappaTune (``peft.helpers.find_kappa_target_modules``) adapts the modules whose weight matrices have the
lowest condition number sigma_max / sigma_min, aiming to forget less; PEFT computes them by SVD of every
linear weight (skipping matrices with a side above 16384). Here PEFT's whole order is kept, restricted to the
modules a strategy can adapt (block linears of known role), so ``placement.select.kappa_placement`` can take
its share of them at the study's rank or budget. Imports torch and peft.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

    from loraplace.model.anatomy import Anatomy


def kappa_order(model: "torch.nn.Module", anat: Anatomy) -> tuple[list[str], float]:
    """(adaptable modules by increasing condition number, as PEFT orders them; seconds the SVDs took)."""
    from peft.helpers import find_kappa_target_modules

    t0 = time.perf_counter()
    order = find_kappa_target_modules(model, top_p=1.0, show_progress=False)["target_modules"]  # every module
    seconds = time.perf_counter() - t0
    adaptable = set(anat.adaptable())
    return [n for n in order if n in adaptable], seconds
