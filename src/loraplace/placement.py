"""Strategies -> explicit LoRA placements: full module names, a rank and alpha per module.

Usage::

    anat = anatomy.analyze(model)
    p = resolve(get_strategy("attention_only"), anat, rank=16, alpha=32)
    p = match_budget(get_strategy("mlp_only"), anat, target=resolve(get_strategy("all_linear"), anat).trainable_params)
    peft_model = apply(model, p, dropout=0.05)     # checked: LoRA lands exactly on p.modules
    record = p.record(dropout=0.05)                 # torch-free: stored with the trial, read back by export
    record.lora_config()                            # the one PEFT LoraConfig, for training and export alike

A strategy says which roles (``all``, ``attn``, ``mlp`` or ``attn.q+attn.v``), which blocks
(see ``BLOCKS_HELP``) and what rank (one number, or per role / role group). PEFT receives the
explicit sorted list of full module names plus ``rank_pattern``/``alpha_pattern`` keyed by full
names; its suffix matching is never relied on, and the result is verified after wrapping.
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from .core import ROLE_GROUPS, ROLES, LoraplaceError, role_rank

if TYPE_CHECKING:  # placement.py stays torch-free: the record and export need no model
    import torch

    from .anatomy import Anatomy

BLOCKS_HELP = (
    "all | first:N | last:N | middle:N (N a count or a percent like 25%) | top:P% | bottom:P% | "
    "every:K or every:K:OFFSET | A-B (inclusive range) | an explicit list like 0,3,7"
)
BUDGET_TOLERANCE = 0.05  # budget-matched strategies land within 5% of the target


class PlacementError(LoraplaceError, ValueError):
    """A strategy cannot be resolved on this model; the message names the bad value and what is valid."""


@dataclass(frozen=True)
class Strategy:
    name: str
    roles: str = "all"  # all | attn | mlp | role+role (e.g. attn.q+attn.v)
    blocks: str = "all"  # see BLOCKS_HELP
    rank: int | dict | None = None  # None: the study's default rank; dict: per role or role group
    description: str = ""

    @classmethod
    def from_dict(cls, name: str, data: dict) -> "Strategy":
        unknown = sorted(set(data) - {"roles", "blocks", "rank", "description"})
        if unknown:
            raise PlacementError(f"strategy {name!r}: unknown key {unknown[0]!r}; valid: roles, blocks, rank, description")
        blocks = data.get("blocks", "all")
        if isinstance(blocks, (list, tuple)):
            blocks = ",".join(str(b) for b in blocks)
        roles = data.get("roles", "all")
        if isinstance(roles, (list, tuple)):
            roles = "+".join(roles)
        return cls(name, roles=str(roles), blocks=str(blocks), rank=data.get("rank"), description=data.get("description", ""))

    def to_dict(self) -> dict:
        return {"roles": self.roles, "blocks": self.blocks, "rank": self.rank, "description": self.description}


BUILTIN: dict[str, Strategy] = {
    s.name: s
    for s in [
        Strategy("all_linear", "all", description="every linear layer in every block (the usual baseline)"),
        Strategy("attention_only", "attn", description="attention projections only"),
        Strategy("mlp_only", "mlp", description="MLP projections only"),
        Strategy("qv_only", "attn.q+attn.v", description="query and value projections (the LoRA paper's choice)"),
        Strategy("top_half", "all", "last:50%", description="all linear layers in the upper half of the blocks"),
        Strategy("bottom_half", "all", "first:50%", description="all linear layers in the lower half of the blocks"),
        Strategy("every_other", "all", "every:2", description="all linear layers in blocks 0, 2, 4, ..."),
    ]
}


def get_strategy(name: str, defined: dict[str, dict] | None = None) -> Strategy:
    """A built-in strategy or one defined in the study config (same vocabulary)."""
    defined = defined or {}
    if is_selected(name):
        return selected_strategy(name)
    if name in defined:
        return Strategy.from_dict(name, defined[name] or {})
    if name in BUILTIN:
        return BUILTIN[name]
    raise PlacementError(f"unknown strategy {name!r}; valid: {', '.join([*BUILTIN, *defined])}, auto, random:K "
                         "(or define it in the study YAML)")


# -- selected strategies: module sets chosen from probe scores (auto) or at random (random:K) ------
AUTO_DESCRIPTION = "the modules the probe scores highest (auto.score), at the default rank, filled to the budget"


def is_selected(name: str) -> bool:
    """``auto`` and ``random:K`` (K = 0, 1, ...): module sets chosen per model, not by roles x blocks."""
    kind, colon, k = name.partition(":")
    return name == "auto" or (kind == "random" and colon == ":" and k.isdigit())


def selected_strategy(name: str) -> Strategy:
    if name == "auto":
        return Strategy("auto", description=AUTO_DESCRIPTION)
    k = int(name.partition(":")[2])
    return Strategy(name, description=f"random module set, draw {k} (seeded by {k}), at the default rank, filled "
                                      "to the budget")


def fill_budget(order: list[str], anat: Anatomy, target: int, rank: int) -> dict[str, int]:
    """Modules taken in ``order`` at ``rank`` while each brings the count closer to ``target`` without passing
    target + 5%; a module that does not fit is skipped (a later, smaller one may). Returns name -> rank.

    Raises PlacementError when the count cannot land within 5% of the target."""
    total, chosen = 0, {}
    for name in order:
        layer = anat.layer(name)
        cost = min(rank, layer.in_features, layer.out_features) * (layer.in_features + layer.out_features)
        if total + cost / 2 < target and total + cost <= target * (1 + BUDGET_TOLERANCE):
            chosen[name] = min(rank, layer.in_features, layer.out_features)
            total += cost
    if abs(total - target) > BUDGET_TOLERANCE * target:
        every = sum(min(rank, l.in_features, l.out_features) * (l.in_features + l.out_features) for l in anat.layers
                    if l.name in set(order))
        raise PlacementError(
            f"budget {target:,} cannot be met by choosing modules at rank {rank}: the closest is {total:,} "
            f"(all {len(order)} candidate modules together train {every:,}); change the budget or train.rank")
    return chosen


def _candidates(anat: Anatomy) -> list[str]:
    """Every module a strategy with roles all and blocks all adapts, by name."""
    return sorted(l.name for l in anat.layers if l.role in ROLES and l.block >= 0)


def auto_placement(anat: Anatomy, scores: dict[str, float], target: int, rank: int = 16, alpha: float = 32,
                   alpha_per_rank: bool = False) -> Placement:
    """Strategy ``auto``: the highest-scored modules (ties by name) filled to ``target`` (see ``fill_budget``)."""
    cands = _candidates(anat)
    missing = [n for n in cands if n not in scores]
    if missing:
        raise PlacementError(f"probe scores miss {len(missing)} module(s) of this model (e.g. {missing[0]}); "
                             "the probe was run on another model")
    order = sorted(cands, key=lambda n: (-scores[n], n))
    ranks = fill_budget(order, anat, target, rank)
    return resolve(selected_strategy("auto"), anat, rank=rank, alpha=alpha, alpha_per_rank=alpha_per_rank,
                   ranks=ranks)


def random_order(anat: Anatomy, draw: int) -> list[str]:
    """The candidate modules in a random order seeded by ``draw`` (the same on every run and machine)."""
    import random

    order = _candidates(anat)
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
    return resolve(selected_strategy(f"random:{draw}"), anat, rank=rank, alpha=alpha, alpha_per_rank=alpha_per_rank,
                   ranks=ranks)



@dataclass(frozen=True)
class ModuleSpec:
    """One adapted module as trained: LoRA rank and alpha, the module's role and block in the base model."""

    rank: int
    alpha: float
    role: str
    block: int


@dataclass(frozen=True)
class PlacementRecord:
    """A placement as plain data: what a trial stores (``placement_json``), what analysis, figures and export
    read, and the one source of the PEFT ``LoraConfig`` (``lora_kwargs``), so "exported" means "trained".

    ``from_dict(record.to_dict()) == record``; records stored before ``dropout``/``fan_in_fan_out`` existed
    read back with dropout None (unknown: exports then leave the tool's default) and fan_in_fan_out False.
    """

    strategy: str
    modules: dict[str, ModuleSpec]  # full module name -> spec, sorted by name
    model_type: str = ""
    n_blocks: int | None = None
    trainable_params: int | None = None  # sum of r * (in + out)
    base_params: int | None = None  # base model, adapters excluded, tied weights once
    definition: dict = field(default_factory=dict)  # the strategy as defined (roles, blocks, rank, description)
    dropout: float | None = None  # LoRA dropout used in training
    fan_in_fan_out: bool = False  # GPT-2 style Conv1D layers store weights as (in, out)

    @property
    def rank(self) -> int:
        """The rank most modules share (PEFT's ``r``; the others go to ``rank_pattern``)."""
        return _most_common([m.rank for m in self.modules.values()])

    @property
    def alpha(self) -> float:
        return _most_common([m.alpha for m in self.modules.values()])

    def names(self) -> list[str]:
        """Module names in reading order: by block, then role (``core.ROLES``), then name."""
        return sorted(self.modules, key=lambda n: (self.modules[n].block, role_rank(self.modules[n].role), n))

    def to_dict(self) -> dict:
        return {
            "strategy": self.strategy,
            "definition": self.definition,
            "model_type": self.model_type,
            "n_blocks": self.n_blocks,
            "rank": self.rank if self.modules else None,
            "modules": {n: {"rank": m.rank, "alpha": m.alpha, "role": m.role, "block": m.block}
                        for n, m in self.modules.items()},
            "trainable_params": self.trainable_params,
            "base_params": self.base_params,
            "dropout": self.dropout,
            "fan_in_fan_out": self.fan_in_fan_out,
        }

    @classmethod
    def from_dict(cls, data: dict) -> "PlacementRecord":
        mods = data.get("modules") or {}
        try:
            modules = {n: ModuleSpec(int(m["rank"]), float(m["alpha"]), str(m.get("role", "other")),
                                     int(m["block"]) if m.get("block") is not None else -1)
                       for n, m in sorted(mods.items())}
        except (KeyError, TypeError, ValueError) as e:
            raise PlacementError(f"stored placement of {data.get('strategy', '?')!r} is malformed ({e!r})") from None
        dropout = data.get("dropout")
        return cls(
            strategy=str(data.get("strategy", "")), modules=modules, model_type=data.get("model_type") or "",
            n_blocks=data.get("n_blocks"), trainable_params=data.get("trainable_params"),
            base_params=data.get("base_params"), definition=dict(data.get("definition") or {}),
            dropout=None if dropout is None else float(dropout), fan_in_fan_out=bool(data.get("fan_in_fan_out", False)),
        )

    def lora_kwargs(self) -> dict:
        """``LoraConfig`` keyword arguments: explicit full module names; ``rank_pattern``/``alpha_pattern``
        (keyed by full name) only for modules that differ from ``r``/``lora_alpha``."""
        r, alpha, names = self.rank, self.alpha, self.names()
        kw = {
            "r": r,
            "lora_alpha": _plain(alpha),
            "target_modules": names,
            "rank_pattern": {n: self.modules[n].rank for n in names if self.modules[n].rank != r},
            "alpha_pattern": {n: _plain(self.modules[n].alpha) for n in names if self.modules[n].alpha != alpha},
            "bias": "none",
            "task_type": "CAUSAL_LM",
        }
        if self.dropout is not None:
            kw["lora_dropout"] = self.dropout
        if self.fan_in_fan_out:
            kw["fan_in_fan_out"] = True
        return kw

    def lora_config(self):
        """The PEFT ``LoraConfig`` of this placement (imports peft)."""
        from peft import LoraConfig

        return LoraConfig(**self.lora_kwargs())


def _plain(x: float):
    """Integral floats as ints (alpha 32.0 -> 32), as configs are usually written."""
    return int(x) if isinstance(x, float) and x.is_integer() else x


@dataclass(frozen=True)
class Placement:
    strategy: Strategy
    modules: dict[str, int]  # full module name -> rank, sorted by name
    alphas: dict[str, float]  # full module name -> lora_alpha
    anatomy: Anatomy = field(repr=False)

    @property
    def names(self) -> list[str]:
        return list(self.modules)

    @property
    def trainable_params(self) -> int:
        """sum of r * (in + out): LoRA's A is (r, in), B is (out, r); no bias is trained."""
        return sum(r * (self.anatomy.layer(n).in_features + self.anatomy.layer(n).out_features) for n, r in self.modules.items())

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
        )

    def to_dict(self, dropout: float | None = None) -> dict:
        return self.record(dropout).to_dict()


def _most_common(values: list):
    """The value most modules share (ties: the smallest): PEFT's r / lora_alpha, patterns for the others."""
    counts = Counter(values)
    return min(counts, key=lambda v: (-counts[v], v))


# -- resolution --------------------------------------------------------------------------------
def parse_roles(spec: str, anat: Anatomy) -> list[str]:
    out: list[str] = []
    for part in [p.strip() for p in spec.replace(",", "+").split("+") if p.strip()]:
        if part == "all":
            out += list(ROLES)
        elif part in ROLE_GROUPS:
            out += list(ROLE_GROUPS[part])
        elif part in ROLES:
            out.append(part)
        else:
            raise PlacementError(f"unknown role {part!r}; valid: all, {', '.join(ROLE_GROUPS)}, {', '.join(ROLES)}")
    if not out:
        raise PlacementError(f"empty roles {spec!r}; valid: all, attn, mlp or roles joined by +")
    return [r for r in ROLES if r in out]


def _count(text: str, n: int, what: str) -> int:
    """'8' -> 8 blocks; '25%' or '0.25' -> that share of n, rounded, at least 1."""
    try:
        if text.endswith("%"):
            k = max(1, round(n * float(text[:-1]) / 100))
        elif "." in text:
            k = max(1, round(n * float(text)))
        else:
            k = int(text)
    except ValueError:
        raise PlacementError(f"blocks {what!r}: {text!r} is not a count or a percent; valid: {BLOCKS_HELP}") from None
    if not 1 <= k <= n:
        raise PlacementError(f"blocks {what!r}: {k} blocks out of range; this model has {n} blocks (0-{n - 1})")
    return k


def parse_blocks(spec: str, n: int) -> list[int]:
    """Block indices (sorted) selected by a blocks spec on a model with n blocks."""
    spec = str(spec).strip().replace(" ", "")
    kind, _, arg = spec.partition(":")
    if spec == "all":
        return list(range(n))
    if kind in ("first", "bottom"):
        return list(range(_count(arg, n, spec)))
    if kind in ("last", "top"):
        return list(range(n - _count(arg, n, spec), n))
    if kind == "middle":
        k = _count(arg, n, spec)
        start = (n - k) // 2
        return list(range(start, start + k))
    if kind == "every":
        step, _, offset = arg.partition(":")
        try:
            step_i, off_i = int(step), int(offset or 0)
        except ValueError:
            raise PlacementError(f"blocks {spec!r}: expected every:K or every:K:OFFSET; valid: {BLOCKS_HELP}") from None
        if step_i < 1 or not 0 <= off_i < n:
            raise PlacementError(f"blocks {spec!r}: K must be >= 1 and OFFSET in 0-{n - 1}")
        return list(range(off_i, n, step_i))
    try:
        idx: set[int] = set()
        for part in spec.split(","):
            a, dash, b = part.partition("-")
            idx.update(range(int(a), int(b) + 1) if dash else [int(a)])
    except ValueError:
        raise PlacementError(f"blocks {spec!r} not understood; valid: {BLOCKS_HELP}") from None
    bad = sorted(i for i in idx if not 0 <= i < n)
    if bad:
        raise PlacementError(f"blocks {spec!r}: block {bad[0]} out of range; this model has {n} blocks (0-{n - 1})")
    if not idx:
        raise PlacementError(f"blocks {spec!r} selects no block")
    return sorted(idx)


def _rank_for(role: str, rank, default: int) -> int:
    if rank is None:
        return default
    if isinstance(rank, dict):
        for key in (role, role.split(".")[0]):  # the role itself wins over its group
            if key in rank:
                return rank[key]
        return rank.get("default", default)
    return rank


def _check_rank_keys(rank, name: str) -> None:
    if isinstance(rank, dict):
        valid = {*ROLES, *ROLE_GROUPS, "default"}
        for k, v in rank.items():
            if k not in valid:
                raise PlacementError(f"strategy {name!r}: rank key {k!r} is not a role; valid: {', '.join(sorted(valid))}")
            if not isinstance(v, int) or isinstance(v, bool):
                raise PlacementError(f"strategy {name!r}: rank for {k!r} must be an integer, got {v!r}")
    elif rank is not None and (not isinstance(rank, int) or isinstance(rank, bool)):
        raise PlacementError(f"strategy {name!r}: rank must be an integer or a mapping of role -> rank, got {rank!r}")


def resolve(
    strategy: Strategy, anat: Anatomy, rank: int = 16, alpha: float = 32, alpha_per_rank: bool = False,
    ranks: dict[str, int] | None = None,
) -> Placement:
    """Explicit module names and ranks for a strategy. ``ranks`` (full name -> rank) overrides,
    as budget matching does. With ``alpha_per_rank`` each module keeps alpha/r = alpha/rank."""
    roles = parse_roles(strategy.roles, anat)
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
            + ("; its mixture-of-experts MLP keeps the experts in fused 3-D weights, which are not layers LoRA can "
               "wrap (see `loraplace inspect`)" if any(f.role == "moe.experts" for f in anat.fixed) else "")
        )
    modules, alphas = {}, {}
    for layer in chosen:
        r = (ranks or {}).get(layer.name) or _rank_for(layer.role, strategy.rank, rank)
        limit = min(layer.in_features, layer.out_features)
        if not 1 <= r <= limit:
            raise PlacementError(f"rank {r} for {layer.name} ({layer.role}, {layer.in_features}->{layer.out_features}) must be in 1-{limit}")
        modules[layer.name] = r
        alphas[layer.name] = float(alpha * r / rank) if alpha_per_rank else float(alpha)
    return Placement(strategy, modules, alphas, anat)


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


def match_budget(
    strategy: Strategy, anat: Anatomy, target: int, rank: int = 16, alpha: float = 32, alpha_per_rank: bool = False
) -> Placement:
    """Scale the strategy's ranks so its trainable count lands within 5% of ``target``.

    Ranks keep the strategy's per-role proportions and are scaled by one factor (found by
    bisection; no rank exceeds min(in, out)); when integer rounding misses the tolerance, single
    modules (in name order) get one rank more or less until it is met.
    """
    base = resolve(strategy, anat, rank=rank, alpha=alpha, alpha_per_rank=alpha_per_rank)
    width = {n: anat.layer(n).in_features + anat.layer(n).out_features for n in base.modules}
    limit = {n: min(anat.layer(n).in_features, anat.layer(n).out_features) for n in base.modules}
    lo, hi = sum(width.values()), sum(width[n] * limit[n] for n in base.modules)
    if not lo * (1 - BUDGET_TOLERANCE) <= target <= hi * (1 + BUDGET_TOLERANCE):
        raise PlacementError(
            f"budget {target:,} is unreachable for strategy {strategy.name!r}: its trainable count ranges from "
            f"{lo:,} (rank 1) to {hi:,} (full rank) on this model"
        )
    def scaled(f: float) -> dict[str, int]:
        return {n: min(limit[n], max(1, round(r * f))) for n, r in base.modules.items()}

    def count(ranks: dict[str, int]) -> int:
        return sum(ranks[n] * width[n] for n in ranks)

    lo_f, hi_f = 0.0, max(limit.values()) / min(base.modules.values())
    for _ in range(60):  # bisection on the common factor; capped ranks make the count piecewise
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
    placement = resolve(strategy, anat, rank=rank, alpha=alpha, alpha_per_rank=alpha_per_rank, ranks=ranks)
    if abs(placement.trainable_params - target) > BUDGET_TOLERANCE * target:
        raise PlacementError(
            f"budget {target:,}: strategy {strategy.name!r} reaches only {placement.trainable_params:,} "
            f"(more than {BUDGET_TOLERANCE:.0%} away)"
        )
    return placement


# -- applying to a model -----------------------------------------------------------------------
def apply(model: "torch.nn.Module", placement: Placement, dropout: float = 0.0):
    """Wrap ``model`` with PEFT LoRA on exactly ``placement.modules`` and verify the result."""
    from peft import get_peft_model

    peft_model = get_peft_model(model, placement.record(dropout).lora_config())
    verify(peft_model, placement)
    return peft_model


def verify(peft_model, placement: Placement) -> None:
    """The modules carrying LoRA, their ranks and the trainable count must equal the placement."""
    from peft.tuners.lora import LoraLayer

    prefix = "base_model.model."
    found = {}
    for name, mod in peft_model.named_modules():
        if isinstance(mod, LoraLayer) and mod.r:
            found[name[len(prefix):] if name.startswith(prefix) else name] = mod.r["default"]
    if set(found) != set(placement.modules):
        extra = sorted(set(found) - set(placement.modules))[:3]
        missing = sorted(set(placement.modules) - set(found))[:3]
        raise PlacementError(f"PEFT adapted a different set of modules: extra {extra}, missing {missing}")
    wrong = [n for n, r in found.items() if r != placement.modules[n]]
    if wrong:
        raise PlacementError(f"PEFT gave {wrong[0]} rank {found[wrong[0]]}, expected {placement.modules[wrong[0]]}")
    trainable = sum(p.numel() for p in peft_model.parameters() if p.requires_grad)
    if trainable != placement.trainable_params:
        raise PlacementError(f"trainable parameters {trainable:,} differ from the placement's {placement.trainable_params:,}")
