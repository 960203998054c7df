"""Strategies -> explicit LoRA placements: full module names, a rank and alpha per module.

Usage::

    anat = anatomy.analyze(model)
    p = resolve(get_strategy("attention_only"), anat, rank=16, alpha=32)
    p = match_budget(get_strategy("mlp_only"), anat, target=resolve(get_strategy("all_linear"), anat).trainable_params)
    peft_model = apply(model, p, dropout=0.05)     # checked: LoRA lands exactly on p.modules

A strategy says which roles (``all``, ``attn``, ``mlp`` or ``attn.q+attn.v``), which blocks
(see ``BLOCKS_HELP``) and what rank (one number, or per role / role group). PEFT receives the
explicit sorted list of full module names plus ``rank_pattern``/``alpha_pattern`` keyed by full
names; its suffix matching is never relied on, and the result is verified after wrapping.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from .anatomy import ROLE_GROUPS, ROLES, Anatomy

BLOCKS_HELP = (
    "all | first:N | last:N | middle:N (N a count or a percent like 25%) | top:P% | bottom:P% | "
    "every:K or every:K:OFFSET | A-B (inclusive range) | an explicit list like 0,3,7"
)
BUDGET_TOLERANCE = 0.05  # budget-matched strategies land within 5% of the target


class PlacementError(ValueError):
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
    if name in defined:
        return Strategy.from_dict(name, defined[name] or {})
    if name in BUILTIN:
        return BUILTIN[name]
    raise PlacementError(f"unknown strategy {name!r}; valid: {', '.join([*BUILTIN, *defined])} (or define it in the study YAML)")


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

    def to_dict(self) -> dict:
        """The placement as stored with a trial and read by the report and exporters."""
        ranks = list(self.modules.values())
        return {
            "strategy": self.strategy.name,
            "definition": self.strategy.to_dict(),
            "model_type": self.anatomy.model_type,
            "n_blocks": self.anatomy.n_blocks,
            "rank": _most_common(ranks),
            "modules": {
                n: {"rank": r, "alpha": self.alphas[n], "role": self.anatomy.layer(n).role, "block": self.anatomy.layer(n).block}
                for n, r in self.modules.items()
            },
            "trainable_params": self.trainable_params,
            "base_params": self.anatomy.base_params,
        }

    def lora_config(self, dropout: float = 0.0):
        """PEFT LoraConfig with explicit full names; patterns only for modules that differ from r."""
        from peft import LoraConfig

        ranks = list(self.modules.values())
        r = _most_common(ranks)
        alphas = list(self.alphas.values())
        alpha = _most_common(alphas)
        kinds = {self.anatomy.layer(n).kind for n in self.modules}
        return LoraConfig(
            r=r,
            lora_alpha=alpha,
            lora_dropout=dropout,
            target_modules=list(self.modules),
            rank_pattern={n: k for n, k in self.modules.items() if k != r},
            alpha_pattern={n: a for n, a in self.alphas.items() if a != alpha},
            fan_in_fan_out=kinds == {"Conv1D"},  # GPT-2 style Conv1D stores weights (in, out)
            bias="none",
            task_type="CAUSAL_LM",
        )


def _most_common(values: list):
    """The value most modules share: PEFT's r / lora_alpha, with patterns only for the others."""
    return max(set(values), key=values.count)


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
def apply(model: torch.nn.Module, placement: Placement, dropout: float = 0.0):
    """Wrap ``model`` with PEFT LoRA on exactly ``placement.modules`` and verify the result."""
    from peft import get_peft_model

    peft_model = get_peft_model(model, placement.lora_config(dropout))
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
