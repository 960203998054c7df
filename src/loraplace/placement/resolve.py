"""A strategy on one model: explicit module names and ranks, and budget matching.

Usage::

    p = resolve(get_strategy("mlp_only"), anat, rank=16, alpha=32)
    p = match_budget(get_strategy("mlp_only"), anat, target=4_884_480)     # ranks scaled to the target count
    p.trainable_params, p.record(dropout=0.0)

A module's LoRA adapter trains ``lora_params(layer, r)`` = r x (in + out) parameters (A is r x in, B is
out x r; no bias), its rank at most min(in, out), plus what its variant trains beside A and B (``variant_params``:
DoRA's magnitude vector, AdaLoRA's singular values; ``placement.variants``): the one formula every count here uses.
A fused expert parameter (``mlp.experts.*``) gets rank r on every one of its E experts, as PEFT's ParamWrapper
builds it (A is (r x E) x in, B is out x (r x E)): r x E x (in + out).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING

from loraplace.core.names import is_selected
from loraplace.placement.record import ModuleSpec, PlacementRecord
from loraplace.placement.strategy import ADALORA, PlacementError, Strategy, _check_rank_keys, _rank_for, get_strategy, parse_blocks, parse_roles
from loraplace.placement.variants import Variant, get_variant

if TYPE_CHECKING:  # torch-free: an Anatomy is only read
    from loraplace.model.anatomy import Anatomy, Layer


BUDGET_TOLERANCE = 0.05  # budget-matched strategies land within 5% of the target
# Variants PEFT's ParamWrapper (LoRA on a fused expert parameter) trains: it refuses DoRA and LoRA variants, PiSSA
# needs a module's weight, AdaLoRA has layers of its own.
PARAMETER_VARIANTS = ("lora", "rslora")


def max_rank(layer: Layer) -> int:
    """The largest LoRA rank a module takes: min(in, out)."""
    return min(layer.in_features, layer.out_features)


def lora_params(layer: Layer, rank: int) -> int:
    """Parameters of a rank-``rank`` LoRA adapter on ``layer`` (rank capped at ``max_rank``): r x (in + out); on a
    fused expert parameter, rank r for each of its experts: r x experts x (in + out)."""
    return min(rank, max_rank(layer)) * (layer.in_features + layer.out_features) * max(1, layer.experts)


def variant_params(layer: Layer, variant: str, rank: int = 0) -> int:
    """Parameters ``variant`` trains on a module beside A and B at ``rank`` (capped at ``max_rank``)."""
    return get_variant(variant).extra_params(layer, min(rank, max_rank(layer)))


@dataclass(frozen=True)
class Placement:
    strategy: Strategy
    modules: dict[str, int]  # full module name -> rank, sorted by name
    alphas: dict[str, float]  # full module name -> lora_alpha
    anatomy: Anatomy = field(repr=False)
    init: str = "default"  # how the A matrices start: PEFT's default, or "eva" (measure.eva gives them)
    allocation: dict | None = None  # variant adalora: AdaLoRA's settings and the count it ends at (adalora_placement)

    @property
    def names(self) -> list[str]:
        return list(self.modules)

    @property
    def variant(self) -> Variant:
        """How its adapters learn (``placement.variants``)."""
        return get_variant(self.strategy.variant)

    @property
    def trainable_params(self) -> int:
        """sum of r * (in + out): LoRA's A is (r, in), B is (out, r); no bias is trained; plus what the variant
        trains beside them (``variant_params``)."""
        v = self.strategy.variant
        return sum(lora_params(self.anatomy.layer(n), r) + variant_params(self.anatomy.layer(n), v, r)
                   for n, r in self.modules.items())

    @property
    def trainable_pct(self) -> float:
        return 100.0 * self.trainable_params / self.anatomy.base_params

    def adapter_bytes(self, bytes_per_param: int = 4) -> int:
        """Size of the saved adapter: tensor bytes plus the safetensors header (about 100 bytes a tensor)."""
        header = sum(2 * (len(n) + 100) for n in self.modules)
        return self.trainable_params * bytes_per_param + header

    def record(self, dropout: float | None = None) -> PlacementRecord:
        """The placement as plain data (stored with the trial); ``dropout`` is the trial's LoRA dropout."""
        layer = self.anatomy.layer
        return PlacementRecord(
            strategy=self.strategy.name,
            modules={n: ModuleSpec(r, self.alphas[n], layer(n).role, layer(n).block) for n, r in self.modules.items()},
            model_type=self.anatomy.model_type,
            n_blocks=self.anatomy.n_blocks,
            trainable_params=self.trainable_params,
            base_params=self.anatomy.base_params,
            definition=self.strategy.to_dict(),
            dropout=dropout,
            fan_in_fan_out={layer(n).kind for n in self.modules} == {"Conv1D"},
            variant=self.strategy.variant,
            init=self.init,
        )

    def to_dict(self, dropout: float | None = None) -> dict:
        return self.record(dropout).to_dict()


def resolve(
    strategy: Strategy, anat: Anatomy, rank: int = 16, alpha: float = 32, alpha_per_rank: bool = False,
    ranks: dict[str, int] | None = None, alphas: dict[str, float] | None = None, init: str = "default",
    allocation: dict | None = None,
) -> Placement:
    """Explicit module names and ranks for a strategy. ``ranks`` (full name -> rank) overrides,
    as budget matching does. With ``alpha_per_rank`` each module keeps alpha/r = alpha/rank; ``alphas``
    (full name -> lora_alpha) overrides that (EVA's rescaled alphas); ``init`` names how A starts; ``allocation``
    is AdaLoRA's (``adalora_placement``), without which a variant-adalora strategy is refused."""
    get_variant(strategy.variant).check(strategy, allocation)
    roles = parse_roles(strategy.roles)
    blocks = set(parse_blocks(strategy.blocks, anat.n_blocks))
    _check_rank_keys(strategy.rank, strategy.name)
    chosen = sorted((l for l in anat.layers if l.role in roles and l.block in blocks), key=lambda l: l.name)
    if is_selected(strategy.name):  # auto / random:K: the module set is data (``ranks``), not roles x blocks
        if not ranks:
            raise PlacementError(f"strategy {strategy.name!r} is chosen per study (probe scores, budget): resolve it "
                                 "with auto_placement / random_placement, or through the study")
        chosen = [l for l in chosen if l.name in ranks]
    if not chosen:
        present = ", ".join(anat.roles_present())
        raise PlacementError(
            f"strategy {strategy.name!r} (roles {strategy.roles}, blocks {strategy.blocks}) matches no module of this "
            f"{anat.model_type} model; its roles are: {present}"
            + ("; its mixture-of-experts MLP keeps the experts in fused 3-D weights whose projections could not be "
               "read (see `loraplace inspect`)" if any(f.role == "moe.experts" for f in anat.fixed) else "")
        )
    expert = next((l for l in chosen if l.is_parameter), None)
    if expert is not None and strategy.variant not in PARAMETER_VARIANTS:
        raise PlacementError(f"strategy {strategy.name!r}: variant {strategy.variant} cannot train routed experts "
                             f"({expert.role}: PEFT adapts fused expert parameters with plain LoRA or rsLoRA only); "
                             "leave mlp.experts out of its roles")
    modules, given = {}, {}
    for layer in chosen:
        r = (ranks or {}).get(layer.name) or _rank_for(layer.role, strategy.rank, rank)
        limit = min(layer.in_features, layer.out_features)
        if not 1 <= r <= limit:
            raise PlacementError(f"rank {r} for {layer.name} ({layer.role}, {layer.in_features}->{layer.out_features}) must be in 1-{limit}")
        modules[layer.name] = r
        given[layer.name] = float(alpha * r / rank) if alpha_per_rank else float(alpha)
    return Placement(strategy, modules, {**given, **{n: a for n, a in (alphas or {}).items() if n in modules}}, anat, init,
                     allocation)


def parse_budget(budget: str | int | float, anat: Anatomy, rank: int, defined: dict | None = None) -> int:
    """A budget as a trainable-parameter count: a number (1e6, 2.5M, 300k) or same:STRATEGY."""
    text = str(budget).strip()
    if text.startswith("same:"):
        return resolve(get_strategy(text[5:], defined), anat, rank=rank).trainable_params
    mult = {"k": 1e3, "m": 1e6, "b": 1e9}.get(text[-1:].lower(), 1)
    try:
        value = float(text[:-1] if mult != 1 else text) * mult
    except ValueError:
        raise PlacementError(f"budget {text!r}: expected a parameter count (e.g. 1e6, 2.5M) or same:STRATEGY") from None
    if value <= 0 or not math.isfinite(value):
        raise PlacementError(f"budget {text!r}: must be a positive parameter count")
    return int(value)


def scale_ranks(weights: dict[str, float], anat: Anatomy, target: int, fixed: int = 0, what: str = "") -> dict[str, int]:
    """Integer ranks proportional to ``weights`` (module -> weight >= 0), each in 1..min(in, out), whose count
    (plus ``fixed`` parameters) lands within ``BUDGET_TOLERANCE`` of ``target``.

    One common factor, found by bisection (capped ranks make the count piecewise); when integer rounding misses,
    single modules (in name order) get one rank more or less until the count is within half the tolerance."""
    width = {n: lora_params(anat.layer(n), 1) for n in weights}  # parameters per unit of rank
    limit = {n: max_rank(anat.layer(n)) for n in weights}
    lo, hi = fixed + sum(width.values()), fixed + sum(width[n] * limit[n] for n in weights)
    if not lo * (1 - BUDGET_TOLERANCE) <= target <= hi * (1 + BUDGET_TOLERANCE):
        raise PlacementError(
            f"budget {target:,} is unreachable for {what or 'these modules'}: its trainable count ranges from "
            f"{lo:,} (rank 1) to {hi:,} (full rank) on this model"
        )
    positive = [w for w in weights.values() if w > 0]
    if not positive or not all(math.isfinite(w) and w >= 0 for w in weights.values()):
        raise PlacementError(f"{what or 'rank weights'}: weights must be finite and >= 0, with one above 0")

    def scaled(f: float) -> dict[str, int]:
        return {n: min(limit[n], max(1, round(w * f))) for n, w in weights.items()}

    def count(ranks: dict[str, int]) -> int:
        return fixed + sum(ranks[n] * width[n] for n in ranks)

    lo_f, hi_f = 0.0, max(limit.values()) / min(positive)
    for _ in range(60):  # bisection on the common factor
        mid = (lo_f + hi_f) / 2
        lo_f, hi_f = (mid, hi_f) if count(scaled(mid)) < target else (lo_f, mid)
    ranks = min((scaled(lo_f), scaled(hi_f)), key=lambda rk: abs(count(rk) - target))
    total = count(ranks)
    improved = True
    while improved and abs(total - target) > BUDGET_TOLERANCE * target / 2:  # nudge single modules
        improved = False
        for n in sorted(ranks):
            step = 1 if total < target else -1
            if 1 <= ranks[n] + step <= limit[n] and abs(total + step * width[n] - target) < abs(total - target):
                ranks[n] += step
                total += step * width[n]
                improved = True
    return ranks


def match_budget(
    strategy: Strategy, anat: Anatomy, target: int, rank: int = 16, alpha: float = 32, alpha_per_rank: bool = False
) -> Placement:
    """Scale the strategy's ranks so its trainable count lands within ``BUDGET_TOLERANCE`` (5%) of ``target``.

    Ranks keep the strategy's per-role proportions and are scaled by one factor (``scale_ranks``; no rank
    exceeds min(in, out)).
    """
    base = resolve(strategy, anat, rank=rank, alpha=alpha, alpha_per_rank=alpha_per_rank)  # refuses AdaLoRA's
    fixed = sum(variant_params(anat.layer(n), strategy.variant) for n in base.modules)  # DoRA's, whatever the rank
    ranks = scale_ranks(base.modules, anat, target, fixed, what=f"strategy {strategy.name!r}")
    placement = resolve(strategy, anat, rank=rank, alpha=alpha, alpha_per_rank=alpha_per_rank, ranks=ranks)
    if abs(placement.trainable_params - target) > BUDGET_TOLERANCE * target:
        raise PlacementError(
            f"budget {target:,}: strategy {strategy.name!r} reaches only {placement.trainable_params:,} "
            f"(more than {BUDGET_TOLERANCE:.0%} away)"
        )
    return placement


def adalora_placement(strategy: Strategy, anat: Anatomy, spec, target: int | None = None, rank: int = 16,
                      alpha: float = 32, alpha_per_rank: bool = False) -> Placement:
    """Variant adalora: every module of the strategy starts at one rank (AdaLoRA's ``init_r``) and PEFT's AdaLoRA
    prunes rank-triplets (a row of A, a singular value, a column of B) while training (``train.trial``).

    ``spec`` is ``core.config.AdaLoraSpec``. Without ``target``, PEFT's meaning: ``target_r`` triplets per module
    on average in the end, the final count wherever the rank went. With ``target`` (a trainable count), the
    schedule aims at the budget's even rank (the rank that gives ``target`` on every module), ``init_r`` scales
    with it (PEFT's 12:8), and the trial picks the final triplet budget whose count is nearest ``target``."""
    if strategy.rank is not None and not isinstance(strategy.rank, int):
        raise PlacementError(f"strategy {strategy.name!r}: AdaLoRA starts every module at one rank (adalora.init_r), "
                             "not ranks per role")
    base = resolve(replace(strategy, variant="lora"), anat, rank=rank)  # its module set
    width = {n: lora_params(anat.layer(n), 1) + variant_params(anat.layer(n), ADALORA, 1)  # per triplet: A row, E, B column
             for n in base.modules}
    if target is None:
        target_r, init_r = float(spec.target_r), spec.init_r
    else:
        target_r = target / sum(width.values())
        init_r = max(1, math.ceil(spec.init_r * target_r / spec.target_r))
    limit = min(max_rank(anat.layer(n)) for n in base.modules)
    if init_r > limit:
        raise PlacementError(f"strategy {strategy.name!r}: AdaLoRA's starting rank {init_r} exceeds {limit}, the largest "
                             "rank of its smallest module; lower the budget or adalora.init_r")
    triplets = round(target_r * len(width))  # the schedule's final rank budget (PEFT's target_bgt)
    if triplets < 1 or triplets >= init_r * len(width):
        raise PlacementError(f"strategy {strategy.name!r}: AdaLoRA would keep {triplets} of its {init_r * len(width)} "
                             "starting rank-triplets; it needs to prune at least one and keep one")
    allocation = {"init_r": init_r, "triplets": triplets, "target": target, "tinit": spec.tinit,
                  "tfinal": spec.tfinal, "delta_t": spec.delta_t, "beta1": spec.beta1, "beta2": spec.beta2,
                  "orth_reg_weight": spec.orth_reg_weight}
    return resolve(strategy, anat, rank=rank, alpha=alpha, alpha_per_rank=alpha_per_rank,
                   ranks={n: init_r for n in base.modules}, allocation=allocation)
