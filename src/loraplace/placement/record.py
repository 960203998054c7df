"""A placement as plain data: what a trial stores, what analysis and export read, the one PEFT LoraConfig.

Usage::

    record = PlacementRecord.from_dict(trial.placement)   # from the store (placement_json)
    record.lora_kwargs()                                  # LoraConfig(**...): training and export alike
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

from loraplace.core.identity import plain
from loraplace.core.roles import is_expert_role, role_rank
from loraplace.placement.strategy import PlacementError
from loraplace.placement.variants import VARIANTS


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
    trainable_params: int | None = None  # sum of r * (in + out), plus what the variant trains beside A and B
    base_params: int | None = None  # base model, adapters excluded, tied weights once
    definition: dict = field(default_factory=dict)  # the strategy as defined (roles, blocks, rank, description)
    dropout: float | None = None  # LoRA dropout used in training
    fan_in_fan_out: bool = False  # GPT-2 style Conv1D layers store weights as (in, out)
    variant: str = "lora"  # how each adapter learns: a name in placement.variants.VARIANTS
    init: str = "default"  # how A started: PEFT's default (seeded random), or "eva" (PEFT's EVA, measure.eva)

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
            "variant": self.variant,
            "init": self.init,
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
            variant=str(data.get("variant") or "lora"), init=str(data.get("init") or "default"),
        )

    def parameters(self) -> list[str]:
        """The fused expert parameters it adapts (roles ``mlp.experts.*``), full names in reading order: PEFT's
        ``target_parameters``; every other name is a module (``target_modules``)."""
        return [n for n in self.names() if is_expert_role(self.modules[n].role)]

    def lora_kwargs(self) -> dict:
        """``LoraConfig`` keyword arguments: explicit full module names (and full parameter names of routed experts
        in ``target_parameters``, only when there are any); ``rank_pattern``/``alpha_pattern`` (keyed by full name)
        only for modules and parameters that differ from ``r``/``lora_alpha``."""
        r, alpha, names, params = self.rank, self.alpha, self.names(), self.parameters()
        kw = {
            "r": r,
            "lora_alpha": plain(alpha),
            "target_modules": [n for n in names if not is_expert_role(self.modules[n].role)],
            **({"target_parameters": params} if params else {}),
            "rank_pattern": {n: self.modules[n].rank for n in names if self.modules[n].rank != r},
            "alpha_pattern": {n: plain(self.modules[n].alpha) for n in names if self.modules[n].alpha != alpha},
            "bias": "none",
            "task_type": "CAUSAL_LM",
        }
        if self.dropout is not None:
            kw["lora_dropout"] = self.dropout
        if self.fan_in_fan_out:
            kw["fan_in_fan_out"] = True
        if self.variant not in VARIANTS:
            raise PlacementError(f"stored placement of {self.strategy!r} has an unknown variant {self.variant!r}")
        kw.update(VARIANTS[self.variant].switches)
        return kw

    def lora_config(self):
        """The PEFT ``LoraConfig`` of this placement (imports peft)."""
        from peft import LoraConfig

        return LoraConfig(**self.lora_kwargs())


def _most_common(values: list):
    """The value most modules share (ties: the smallest): PEFT's r / lora_alpha, patterns for the others."""
    counts = Counter(values)
    return min(counts, key=lambda v: (-counts[v], v))
