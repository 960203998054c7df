"""The settings of the placement methods chosen per study and of the variants that need their own: the probe and
``auto``, KappaTune, EVA and AdaLoRA, each a section of the study config (``core.config.StudyConfig``).

Usage::

    cfg.auto.settings("auto:rank")   # ("rank", "lora_drop"): the allocation and score of an auto strategy
    check_auto_name("auto:fisher")   # a one-line ConfigError for a name with unknown parts

Like the rest of the config, every field's comment is its documentation; ``check`` names the field, the bad
value and what is valid.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from loraplace.core.names import ALLOCATIONS, auto_parts, is_selected
from loraplace.core.typed import ConfigError, check_choice, check_finite, check_positive

PROBE_CRITERIA = ("lora_drop", "grad_norm", "fisher")  # documented in measure/probe.py and docs/results.md


@dataclass
class ProbeSpec:
    """The probe (``loraplace probe``, and ``study`` before placing ``auto``): a short uniform low-rank run on
    every module a strategy can adapt (the block linears whose role is known) that scores each; see measure/probe.py."""

    steps: int = 20  # optimizer steps per probe seed (a trial has train.steps)
    rank: int = 4  # uniform LoRA rank of the probe adapter (alpha keeps the trials' alpha/rank scale)
    seeds: list[int] = field(default_factory=lambda: [0, 1])  # probe seeds: the spread and rank correlation need >= 2
    lr: float | None = None  # peak learning rate; None: train.lr
    score_batches: int = 4  # train batches the LoRA-drop norm is averaged over after the probe steps

    def check(self) -> None:
        check_positive("probe.steps", self.steps)
        check_positive("probe.rank", self.rank)
        check_positive("probe.score_batches", self.score_batches)
        if self.lr is not None:
            check_positive("probe.lr", self.lr)
        if not self.seeds:
            raise ConfigError("probe.seeds: empty; give at least one seed, e.g. probe.seeds=[0,1]")
        if len(set(self.seeds)) != len(self.seeds):
            raise ConfigError(f"probe.seeds: duplicates in {self.seeds}")


@dataclass
class AutoSpec:
    """Strategy ``auto``: the modules the probe scores highest, at train.rank, until the budget is met
    (``allocate: subset``), or every module with ranks proportional to the scores (``allocate: rank``)."""

    score: str = "lora_drop"  # lora_drop | grad_norm | fisher (the probe's criteria)
    budget: str | None = None  # "same:STRATEGY" or a count; None: the study's budget
    allocate: str = "subset"  # subset | rank; auto:rank, auto:subset:grad_norm, ... override it per strategy

    def check(self) -> None:
        check_choice("auto.score", self.score, PROBE_CRITERIA)
        check_choice("auto.allocate", self.allocate, ALLOCATIONS)
        if self.budget is not None and str(self.budget).startswith("same:") and is_selected(str(self.budget)[5:]):
            raise ConfigError(f"auto.budget: {self.budget!r} names a strategy placed per study (auto, kappa, eva, "
                              "random:K), which auto cannot be matched to; use same:STRATEGY of a fixed strategy or a count")

    def settings(self, name: str = "auto") -> tuple[str, str]:
        """(allocation, score) of auto strategy ``name``: what its name says (auto:rank:grad_norm), else these."""
        allocate, score = auto_parts(name)
        return allocate or self.allocate, score or self.score


def check_auto_name(name: str) -> None:
    """auto:ALLOCATE, auto:SCORE or auto:ALLOCATE:SCORE with known parts, else a one-line ConfigError."""
    form = f"auto:ALLOCATE, auto:SCORE or auto:ALLOCATE:SCORE (ALLOCATE: {', '.join(ALLOCATIONS)}; SCORE: {', '.join(PROBE_CRITERIA)})"
    try:
        _, score = auto_parts(name)
    except ValueError:
        raise ConfigError(f"strategy {name!r}: expected {form}") from None
    if score is not None and score not in PROBE_CRITERIA:
        raise ConfigError(f"strategy {name!r}: {score!r} is not a probe score; expected {form}")


@dataclass
class KappaSpec:
    """Strategy ``kappa`` (PEFT's KappaTune): the modules whose weights have the lowest condition number."""

    top_p: float = 0.2  # share of the adaptable modules it adapts (PEFT's default); ranks: train.rank, or the budget's

    def check(self) -> None:
        check_finite("kappa.top_p", self.top_p)
        if not 0 < self.top_p <= 1:
            raise ConfigError(f"kappa.top_p: must be a share in (0, 1], got {self.top_p}")


@dataclass
class EvaSpec:
    """Strategy ``eva`` (PEFT's EVA, measure/eva.py): ranks and A matrices from an SVD of each module's inputs."""

    rho: float = 2.0  # a module gets at most rho x r0 ranks (PEFT's default; 1: no redistribution)
    tau: float = 0.99  # the SVD stops when consecutive right-singular vectors agree to this cosine (PEFT's default)

    def check(self) -> None:
        check_finite("eva.rho", self.rho)
        check_finite("eva.tau", self.tau)
        if self.rho < 1:
            raise ConfigError(f"eva.rho: must be >= 1 (the largest rank is rho x r0), got {self.rho}")
        if not 0 < self.tau <= 1:
            raise ConfigError(f"eva.tau: must be in (0, 1], got {self.tau}")


@dataclass
class AdaLoraSpec:
    """Variant ``adalora`` (strategy ``adalora``: every linear layer): PEFT's AdaLoRA prunes and reallocates rank
    while training. PEFT's defaults; with a study budget the final count is matched to it (``target_r`` becomes the
    budget's even rank, ``init_r`` scales with it) and the schedule's steps are optimizer steps of the trial."""

    init_r: int = 12  # rank every module starts with
    target_r: int = 8  # average rank per module at the end (without a budget)
    tinit: int = 0  # steps before pruning starts
    tfinal: int = 0  # steps at the end with the final allocation fixed (0: it is fixed after the last step)
    delta_t: int = 1  # steps between reallocations (PEFT's deltaT)
    beta1: float = 0.85  # EMA of the sensitivity
    beta2: float = 0.85  # EMA of its uncertainty
    orth_reg_weight: float = 0.5  # weight of the orthogonality penalty on A and B

    def check(self) -> None:
        for key in ("init_r", "target_r", "delta_t"):
            check_positive(f"adalora.{key}", getattr(self, key))
        for key in ("tinit", "tfinal"):
            if getattr(self, key) < 0:
                raise ConfigError(f"adalora.{key}: must be >= 0 steps, got {getattr(self, key)}")
        if self.target_r > self.init_r:
            raise ConfigError(f"adalora.target_r: {self.target_r} exceeds adalora.init_r {self.init_r} (AdaLoRA only prunes)")
        for key in ("beta1", "beta2"):
            check_finite(f"adalora.{key}", getattr(self, key))
            if not 0 < getattr(self, key) < 1:
                raise ConfigError(f"adalora.{key}: must be in (0, 1), got {getattr(self, key)}")
        check_finite("adalora.orth_reg_weight", self.orth_reg_weight)
        if self.orth_reg_weight < 0:
            raise ConfigError(f"adalora.orth_reg_weight: must be >= 0, got {self.orth_reg_weight}")
