"""What an analysis finds, as data: per-strategy statistics, failed trials, the recommendation, the whole study.

Usage::

    from loraplace.analysis.findings import StrategyStats, StudyAnalysis
    a.get("mlp_only").retained, a.recommendation.text      # a: StudyAnalysis (analysis.study.analyze)

Plain dataclasses, filled by ``analysis.study`` (statistics), ``analysis.decision`` (the recommendation) and
``analysis.from_store`` (what an open store adds: config, probe, verdict, racing); every other module of the
package only reads them. The statistics themselves are ``core.stats``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from loraplace.analysis.verdict import ProbeVerdict
from loraplace.core.config import StudyConfig
from loraplace.core.stats import Interval, Paired, wilson_interval
from loraplace.placement.record import PlacementRecord


@dataclass
class StrategyStats:
    strategy: str
    seeds: list[int]  # seeds of done trials, ascending
    metrics: dict[str, Interval]  # every numeric metric across seeds
    curve: list[tuple[float, float]]  # (step, mean train loss over the seeds logging that step)
    placement: PlacementRecord | None  # of the first done trial (identical across seeds); None if not stored
    n_failed: int = 0
    paired: Paired | None = None  # eval loss; None for the baseline itself or with no common seeds
    retained: Interval | None = None  # in the analysis metric; None without zero-shot value, baseline or common seeds
    paired_accuracy: Paired | None = None  # accuracy, strategy minus baseline; None as for paired or without accuracy
    stopped: dict | None = None  # stopped by racing: {"step", "reason"}; its metrics are then those at that rung
    paired_forgetting: Paired | None = None  # forgetting, strategy minus baseline, paired by seed
    lr: float | None = None  # the peak learning rate its trials trained at (its chosen rate in a tuned study)

    @property
    def eval_loss(self) -> Interval:
        return self.metrics["eval_loss"]

    @property
    def accuracy(self) -> Interval | None:
        return self.metrics.get("accuracy")

    @property
    def forgetting(self) -> Interval | None:
        return self.metrics.get("forgetting")

    def wilson(self) -> tuple[float, float] | None:
        """95% Wilson interval of the accuracy from accuracy_n examples; only with one seed (else None)."""
        acc, n = self.metrics.get("accuracy"), self.metrics.get("accuracy_n")
        if acc is None or n is None or acc.n != 1 or n.mean < 1:
            return None
        return wilson_interval(acc.mean, int(n.mean))

    def mean(self, metric: str, default: float = math.nan) -> float:
        iv = self.metrics.get(metric)
        return iv.mean if iv is not None else default


@dataclass(frozen=True)
class FailedTrial:
    strategy: str
    seed: int
    status: str  # failed | pending | running
    error: str


@dataclass
class Recommendation:
    decided: bool
    strategy: str | None  # the choice, when decided
    text: str  # plain statement of the choice or of why none can be made
    evidence: list[str] = field(default_factory=list)  # the numbers behind it, one line each
    fallback: str | None = None  # cheapest strategy known to meet the threshold, when undecided
    tentative: str | None = None  # point-estimate pick when there are no intervals (not evidence)
    cost: str = ""  # what "cheaper" meant (decision.cost_rule), shown under the text


@dataclass
class StudyAnalysis:
    baseline: str
    threshold: float
    zero_shot_loss: float | None
    strategies: list[StrategyStats]  # cheapest first: by cost tier (decision.cost_tiers), in a tier by `order`
    pareto_params: list[str]  # frontier over (trainable_params, metric), cheapest first
    pareto_time: list[str]  # frontier over (train_time_s, metric), fastest first
    recommendation: Recommendation
    failed: list[FailedTrial] = field(default_factory=list)
    unfinished: list[FailedTrial] = field(default_factory=list)  # pending / running
    notes: list[str] = field(default_factory=list)
    config: StudyConfig | None = None  # the study's config, as stored (set by analyze_store)
    metric: str = "eval_loss"  # the quality measure of retained improvement, fronts and recommendation
    zero_shot_accuracy: float | None = None  # the base model's accuracy on the trials' accuracy examples
    zero_shot_accuracy_n: int | None = None  # how many examples that accuracy is over
    max_forgetting: float | None = None  # nats/token: analysis.max_forgetting, the recommendation's forgetting cap
    order: list[str] = field(default_factory=list)  # strategy names breaking cost ties (the study config's order)

    forgetting_info: dict | None = None  # meta "forgetting" less its sequences: source, base_loss, tokens, key
    least_forgetting: str | None = None  # the sentence naming the placement that forgets least among those that keep
    choice_cost: dict[str, float] = field(default_factory=dict)  # strategy -> s spent once per study choosing its
    #                                                               placement: the probe (auto), SVDs (kappa), EVA (eva)
    probe: object | None = None  # probe.ProbeScores of the study's latest probe (set by analyze_store), or None
    verdict: ProbeVerdict | None = None  # auto vs random draws vs the reference (set by analyze_store)
    racing: object | None = None  # analysis.racing.Racing: what racing did, or would have done (set by analyze_store)
    tuning: object | None = None  # analysis.tuning.Tuning: the learning-rate search (set by analyze_store), or None
    lr_comparison: object | None = None  # analysis.tuning.LrComparison: the answer at the baseline's rate, or None

    @property
    def has_accuracy(self) -> bool:
        return any(s.accuracy is not None for s in self.strategies)

    @property
    def has_forgetting(self) -> bool:
        return any(s.forgetting is not None for s in self.strategies if s.stopped is None)

    @property
    def zero_shot(self) -> float | None:
        """The base model's value of the analysis metric."""
        return self.zero_shot_accuracy if self.metric == "accuracy" else self.zero_shot_loss

    def get(self, strategy: str) -> StrategyStats | None:
        return next((s for s in self.strategies if s.strategy == strategy), None)

    @property
    def min_seeds(self) -> int:
        return min((len(s.seeds) for s in self.strategies), default=0)
