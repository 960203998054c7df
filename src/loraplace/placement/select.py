"""Placements chosen per study, filled to a budget: ``auto`` (by probe scores) and ``random:K`` (seeded).

Usage::

    p = auto_placement(anat, scores, target=2_442_240, rank=16)     # scores: module -> probe score
    p = auto_placement(anat, scores, target=2_442_240, rank=16, allocate="rank")
    p = random_placement(anat, draw=0, target=2_442_240, rank=16)

Subsets (``auto``'s default ``allocate="subset"``, and ``random:K``) take modules in their order (by score, or
shuffled) while each brings the count closer to the target without passing it by more than the budget
tolerance; a module too large for what is left is skipped. ``allocate="rank"`` adapts every module, with
ranks proportional to the scores (``resolve.scale_ranks``).
"""

from __future__ import annotations

import random
from typing import TYPE_CHECKING

from loraplace.core.names import AUTO, KAPPA, RANDOM_PREFIX
from loraplace.placement.resolve import BUDGET_TOLERANCE, Placement, lora_params, max_rank, resolve, scale_ranks
from loraplace.placement.strategy import PlacementError, selected_strategy

if TYPE_CHECKING:
    from loraplace.model.anatomy import Anatomy


def fill_budget(order: list[str], anat: Anatomy, target: int, rank: int) -> dict[str, int]:
    """Modules taken in ``order`` at ``rank`` while each brings the count closer to ``target`` without passing
    target + ``BUDGET_TOLERANCE``; a module that does not fit is skipped (a later, smaller one may). Returns name -> rank.

    Raises PlacementError when the count cannot land within the tolerance of the target."""
    total, chosen = 0, {}
    for name in order:
        layer = anat.layer(name)
        cost = lora_params(layer, rank)
        if total + cost / 2 < target and total + cost <= target * (1 + BUDGET_TOLERANCE):
            chosen[name] = min(rank, max_rank(layer))
            total += cost
    if abs(total - target) > BUDGET_TOLERANCE * target:
        every = sum(lora_params(l, rank) for l in anat.layers
                    if l.name in set(order))
        raise PlacementError(
            f"budget {target:,} cannot be met by choosing modules at rank {rank}: the closest is {total:,} "
            f"(all {len(order)} candidate modules together train {every:,}); change the budget or train.rank")
    return chosen


def auto_placement(anat: Anatomy, scores: dict[str, float], target: int, rank: int = 16, alpha: float = 32,
                   alpha_per_rank: bool = False, allocate: str = "subset", name: str = AUTO,
                   score: str | None = None) -> Placement:
    """Strategy ``auto`` (named ``name``; ``score`` names the criterion of ``scores`` for its description).
    ``allocate="subset"``: the highest-scored modules (ties by name) at ``rank``, filled to ``target`` (see
    ``fill_budget``). ``"rank"``: every module, ranks proportional to its score, scaled to ``target``."""
    cands = anat.adaptable()
    missing = [n for n in cands if n not in scores]
    if missing:
        raise PlacementError(f"probe scores miss {len(missing)} module(s) of this model (e.g. {missing[0]}); "
                             "the probe was run on another model")
    if allocate == "rank":
        ranks = scale_ranks({n: max(0.0, float(scores[n])) for n in cands}, anat, target,
                            what=f"strategy {name!r} (ranks proportional to probe scores)")
    else:
        ranks = fill_budget(sorted(cands, key=lambda n: (-scores[n], n)), anat, target, rank)
    return resolve(selected_strategy(name, allocate, score), anat, rank=rank, alpha=alpha,
                   alpha_per_rank=alpha_per_rank, ranks=ranks)


def kappa_placement(anat: Anatomy, order: list[str], top_p: float, target: int | None, rank: int = 16,
                    alpha: float = 32, alpha_per_rank: bool = False) -> Placement:
    """Strategy ``kappa``: the first ``top_p`` share of ``order`` (adaptable modules by increasing condition
    number, ``model.conditioning.kappa_order``), counted as PEFT counts it (int(n x top_p), at least one), at
    ``rank``; with a ``target`` count their uniform rank is scaled to it (``scale_ranks``)."""
    missing = sorted(set(anat.adaptable()) - set(order))
    if missing and all(anat.layer(n).is_parameter for n in missing):
        raise PlacementError("kappa: PEFT's KappaTune ranks routed experts (fused parameters) apart from the modules, "
                             "so one order over both does not exist; kappa does not place mixture-of-experts models")
    if missing:
        raise PlacementError(f"kappa's condition numbers miss {len(missing)} module(s) of this model (e.g. {missing[0]}); "
                             "they were computed on another model")
    chosen = order[:max(1, int(len(order) * top_p))]
    what = f"strategy 'kappa' ({len(chosen)} modules, kappa.top_p={top_p})"
    ranks = ({n: min(rank, max_rank(anat.layer(n))) for n in chosen} if target is None
             else scale_ranks(dict.fromkeys(chosen, 1.0), anat, target, what=what))
    return resolve(selected_strategy(KAPPA, top_p=top_p), anat, rank=rank, alpha=alpha, alpha_per_rank=alpha_per_rank,
                   ranks=ranks)


def random_order(anat: Anatomy, draw: int) -> list[str]:
    """The adaptable modules (``Anatomy.adaptable``) in a random order seeded by ``draw`` (the same on every run
    and machine)."""
    order = anat.adaptable()
    random.Random(f"loraplace-random-{draw}").shuffle(order)
    return order


def random_placement(anat: Anatomy, draw: int, target: int, rank: int = 16, alpha: float = 32,
                     alpha_per_rank: bool = False) -> Placement:
    """Strategy ``random:K``: modules in a seeded random order filled to ``target``. Draw K differs from every
    draw 0..K-1 (a draw that repeats an earlier module set is reshuffled with a further seed)."""
    earlier: list[set[str]] = []
    for k in range(draw + 1):
        attempt = 0
        while True:
            ranks = fill_budget(random_order(anat, k if attempt == 0 else f"{k}.{attempt}"), anat, target, rank)
            if set(ranks) not in earlier or attempt >= 100:  # 100: the budget admits too few distinct sets
                break
            attempt += 1
        if set(ranks) in earlier:
            raise PlacementError(f"random:{k}: no module set at budget {target:,} differs from the earlier draws")
        earlier.append(set(ranks))
    return resolve(selected_strategy(f"{RANDOM_PREFIX}{draw}"), anat, rank=rank, alpha=alpha, alpha_per_rank=alpha_per_rank,
                   ranks=ranks)
