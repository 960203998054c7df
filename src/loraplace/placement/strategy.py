"""The strategy vocabulary: which roles, which blocks, what rank; built-in strategies and user definitions.

Usage::

    s = get_strategy("top_half")                                    # Strategy("top_half", "all", "last:50%")
    s = Strategy.from_dict("qv_top", {"roles": "attn.q+attn.v", "blocks": "top:25%", "rank": 32})
    parse_blocks("every:3:1", 30)                                   # [1, 4, ..., 28]
    parse_roles("attn+mlp.down")                                    # ["attn.q", ..., "attn.o", "mlp.down"]
"""

from __future__ import annotations

from dataclasses import dataclass

from loraplace.core.errors import LoraplaceError
from loraplace.core.names import AUTO, EVA, KAPPA, is_auto, is_selected, random_draw
from loraplace.core.roles import ROLE_GROUPS, ROLES, role_keys


BLOCKS_HELP = (
    "all | first:N | last:N | middle:N (N a count or a percent like 25%) | top:P% | bottom:P% | "
    "every:K or every:K:OFFSET | A-B (inclusive range) | an explicit list like 0,3,7"
)


ADALORA = "adalora"  # the variant (placement.variants.adalora) and the built-in strategy that trains it


class PlacementError(LoraplaceError, ValueError):
    """A strategy cannot be resolved on this model; the message names the bad value and what is valid."""


@dataclass(frozen=True)
class Strategy:
    name: str
    roles: str = "all"  # all | attn | mlp | role+role (e.g. attn.q+attn.v)
    blocks: str = "all"  # see BLOCKS_HELP
    rank: int | dict | None = None  # None: the study's default rank; dict: per role or role group
    description: str = ""
    variant: str = "lora"  # how the adapters learn: a name in placement.variants.VARIANTS (checked by from_dict)

    @classmethod
    def from_dict(cls, name: str, data: dict) -> "Strategy":
        from loraplace.placement.variants import get_variant  # the variants import PlacementError from here

        keys = ("roles", "blocks", "rank", "description", "variant")
        unknown = sorted(set(data) - set(keys))
        if unknown:
            raise PlacementError(f"strategy {name!r}: unknown key {unknown[0]!r}; valid: {', '.join(keys)}")
        try:
            get_variant(str(data.get("variant", "lora")))
        except PlacementError as e:
            raise PlacementError(f"strategy {name!r}: {e}") from None
        blocks = data.get("blocks", "all")
        if isinstance(blocks, (list, tuple)):
            blocks = ",".join(str(b) for b in blocks)
        roles = data.get("roles", "all")
        if isinstance(roles, (list, tuple)):
            roles = "+".join(roles)
        return cls(name, roles=str(roles), blocks=str(blocks), rank=data.get("rank"), description=data.get("description", ""),
                   variant=str(data.get("variant", "lora")))

    def to_dict(self) -> dict:
        """The definition as data (part of a trial's identity: ``variant`` only when not plain LoRA, so the ids
        of plain-LoRA trials are those of studies from before variants)."""
        d = {"roles": self.roles, "blocks": self.blocks, "rank": self.rank, "description": self.description}
        return d if self.variant == "lora" else {**d, "variant": self.variant}


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
        Strategy(ADALORA, "all", variant=ADALORA, description="every linear layer under PEFT's AdaLoRA, which "
                 "prunes and reallocates rank while training (adalora settings), ending at the budget"),
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
    raise PlacementError(f"unknown strategy {name!r}; valid: {', '.join([*BUILTIN, *defined])}, auto, "
                         "auto:ALLOCATE:SCORE, kappa, eva, random:K (or define it in the study YAML)")


# -- selected strategies: module sets chosen from probe scores (auto) or at random (random:K) ------
AUTO_DESCRIPTION = "the modules the probe scores highest (auto.score), at the default rank, filled to the budget"
AUTO_RANK_DESCRIPTION = "every module, ranks proportional to the probe's scores (auto.score), filled to the budget"


def selected_strategy(name: str, allocate: str = "subset", score: str | None = None, top_p: float = 0.2,
                      rho: float = 2.0) -> Strategy:
    """The Strategy of ``auto`` (``auto:...``, placed by ``allocate`` on ``score``), ``kappa`` (its share
    ``top_p``), ``eva`` (its ``rho``) or ``random:K``: roles and blocks all; the module set and ranks come from
    ``select`` (``measure.eva`` for eva)."""
    if name == EVA:
        return Strategy(EVA, description=f"PEFT's EVA: ranks (at most {rho:g} x a module's even share) and A matrices "
                                         "from an SVD of every module's inputs on the train data, the rank sum meeting "
                                         "the budget")
    if name == KAPPA:
        return Strategy(KAPPA, description=f"the {top_p:g} share of modules whose weights have the lowest condition "
                                           "number (PEFT's KappaTune), at the default rank or scaled to the budget")
    if is_auto(name):
        if allocate == "rank":
            text = AUTO_RANK_DESCRIPTION
        else:  # auto's description as it was before allocations: the ids of its stored trials stay
            text = AUTO_DESCRIPTION
        if score is not None and name != AUTO:
            text = text.replace("(auto.score)", f"({score})")
        return Strategy(name, description=text)
    k = random_draw(name)
    return Strategy(name, description=f"random module set, draw {k} (seeded by {k}), at the default rank, filled "
                                      "to the budget")


def parse_roles(spec: str) -> list[str]:
    """Roles (in ``ROLES`` order) named by a roles spec: all, attn, mlp, or roles joined by + (or commas)."""
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
        for key in role_keys(role):  # the role itself wins over its groups, a narrower group over a wider one
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
