"""A study's trials -> per-strategy statistics, Pareto fronts and the recommendation.

Usage::

    a = analyze(store.trials(), baseline="all_linear", zero_shot_loss=2.9, threshold=0.95)
    a = analyze_store(store)           # the same from an open Store: its latest config's trials and zero-shot
    a.get("mlp_only").retained, a.recommendation.text

Pure functions over ``store.db.TrialRecord`` lists; no disk I/O beyond ``analyze_store`` reading an open
``Store``. Only ``done`` trials count; failed and unfinished ones are listed in ``StudyAnalysis.failed`` /
``.unfinished``. The quality metric (``metric``, the study's ``analysis.metric``) is ``eval_loss`` (lower is
better) or ``accuracy`` (higher is better): it decides retained improvement, the Pareto fronts and the
recommendation (``analysis.decision``); deltas and intervals are reported for both when trials carry both.
Pareto fronts are over (trainable_params, quality) and (train_time_s, quality), means across seeds.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace

from loraplace.analysis.decision import Recommendation, recommend
from loraplace.analysis.text import delta_text, interval_text, pct
from loraplace.core.stats import (Interval, Paired, mean_curve, paired_comparison, pareto_front,
                                      retained_improvement, t_interval, wilson_interval)
from loraplace.analysis.verdict import ProbeVerdict, probe_verdict
from loraplace.core.config import ConfigError, StudyConfig
from loraplace.core.metrics import METRIC_CHOICES, QUALITY, numeric
from loraplace.core.names import AUTO, EVA, KAPPA, is_auto
from loraplace.placement.record import PlacementRecord
from loraplace.measure.probe_scores import load as load_probe
from loraplace.store.db import DONE, FAILED, STOPPED, UNFINISHED, TrialRecord


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
class StudyAnalysis:
    baseline: str
    threshold: float
    zero_shot_loss: float | None
    strategies: list[StrategyStats]  # ordered cheapest first (trainable params, train time, name)
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

    forgetting_info: dict | None = None  # meta "forgetting" less its sequences: source, base_loss, tokens, key
    least_forgetting: str | None = None  # the sentence naming the placement that forgets least among those that keep
    choice_cost: dict[str, float] = field(default_factory=dict)  # strategy -> s spent once per study choosing its
    #                                                               placement: the probe (auto), SVDs (kappa), EVA (eva)

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
    probe: object | None = None  # probe.ProbeScores of the study's latest probe (set by analyze_store), or None
    verdict: "ProbeVerdict | None" = None  # auto vs random draws vs the reference (set by analyze_store)
    racing: object | None = None  # analysis.racing.Racing: what racing did, or would have done (set by analyze_store)

    def get(self, strategy: str) -> StrategyStats | None:
        return next((s for s in self.strategies if s.strategy == strategy), None)

    @property
    def min_seeds(self) -> int:
        return min((len(s.seeds) for s in self.strategies), default=0)


# -- the whole study ------------------------------------------------------------------------------
def choice_cost(strategies: list[str], probe, store) -> dict[str, float]:
    """Seconds each data-driven strategy's placement cost once per study, from the store: the probe's seeds for
    ``auto`` (every auto strategy shares them), the condition numbers for ``kappa``, every EVA run for ``eva``."""
    out = {}
    for name in strategies:
        if is_auto(name) and probe is not None:
            out[name] = probe.time_s
        elif name in (KAPPA, EVA) and (meta := store.get_meta(name)):
            out[name] = float(meta.get("time_s", 0.0))
    return out


def analyze(
    trials: list[TrialRecord],
    baseline: str,
    zero_shot_loss: float | None = None,
    threshold: float = 0.95,
    order: list[str] | None = None,
    metric: str = "eval_loss",
    zero_shot_accuracy: float | None = None,
    max_forgetting: float | None = None,
) -> StudyAnalysis:
    """Statistics, fronts and recommendation for a study's trials.

    zero_shot_loss: the base model's eval loss (nats/token); None falls back to the
    ``zero_shot_loss`` metric that trials of older stores carry, if any. order: strategy names, used only to
    break ties in the cheapest-first ordering (e.g. the study config's order). metric: eval_loss
    or accuracy, the quality measure of retained improvement, fronts and recommendation;
    zero_shot_accuracy: the base model's accuracy on the same examples. Raises config.ConfigError
    when metric=accuracy and no finished trial has an accuracy.
    """
    if metric not in METRIC_CHOICES:
        raise ConfigError(f"analysis.metric: {metric!r} is not one of {', '.join(METRIC_CHOICES)}")
    done = [t for t in trials if t.status == DONE and "eval_loss" in t.metrics]
    failed = [FailedTrial(t.strategy, t.seed, t.status, t.error or "") for t in trials if t.status == FAILED]
    unfinished = [FailedTrial(t.strategy, t.seed, t.status, "") for t in trials if t.status in UNFINISHED]
    notes: list[str] = []
    odd = [t for t in trials if t.status == DONE and "eval_loss" not in t.metrics]
    if odd:
        notes.append(f"{len(odd)} done trial(s) have no eval_loss and are ignored.")
    if zero_shot_loss is None:
        zs = {round(float(t.metrics["zero_shot_loss"]), 9) for t in done if "zero_shot_loss" in t.metrics}
        zero_shot_loss = next(iter(zs)) if len(zs) == 1 else None
        if len(zs) > 1:
            notes.append("Trials disagree on zero_shot_loss; retained improvement not computed.")

    by_strategy: dict[str, dict[int, TrialRecord]] = {}
    for t in done:  # later trials of the same (strategy, seed) replace earlier ones
        by_strategy.setdefault(t.strategy, {})[int(t.seed)] = t
    if metric == "accuracy" and done and not any("accuracy" in t.metrics for t in done):
        raise ConfigError("analysis.metric=accuracy: no finished trial of this study has an accuracy "
                          "(measure it with eval.accuracy=true on question/answer data)")

    losses = {s: {seed: float(t.metrics["eval_loss"]) for seed, t in ts.items()} for s, ts in by_strategy.items()}
    accs = {s: {seed: float(t.metrics["accuracy"]) for seed, t in ts.items() if "accuracy" in t.metrics}
            for s, ts in by_strategy.items()}
    forgets = {s: {seed: float(t.metrics["forgetting"]) for seed, t in ts.items() if "forgetting" in t.metrics}
               for s, ts in by_strategy.items()}
    base_losses, base_accs = losses.get(baseline, {}), accs.get(baseline, {})
    quality = accs if metric == "accuracy" else losses
    base_quality = quality.get(baseline, {})
    zero_quality = zero_shot_accuracy if metric == "accuracy" else zero_shot_loss

    rows: list[StrategyStats] = []
    for name, ts in by_strategy.items():
        per_metric: dict[str, list[float]] = {}
        for seed in sorted(ts):
            for k, v in numeric(ts[seed].metrics).items():
                per_metric.setdefault(k, []).append(v)
        st = StrategyStats(
            strategy=name,
            seeds=sorted(ts),
            metrics={k: t_interval(v) for k, v in per_metric.items()},
            curve=mean_curve([ts[s].curve for s in sorted(ts)]),
            placement=PlacementRecord.from_dict(ts[min(ts)].placement) if ts[min(ts)].placement.get("modules") else None,
            n_failed=sum(1 for f in failed if f.strategy == name),
        )
        if name != baseline and base_losses:
            st.paired = paired_comparison(losses[name], base_losses)
        if name != baseline and base_accs and accs[name]:
            st.paired_accuracy = paired_comparison(accs[name], base_accs)
        if zero_quality is not None and base_quality and quality[name]:
            st.retained = retained_improvement(quality[name], base_quality, zero_quality, QUALITY[metric].higher_is_better)
        if name != baseline and forgets.get(baseline) and forgets.get(name):
            st.paired_forgetting = paired_comparison(forgets[name], forgets[baseline])
        rows.append(st)
    single = sorted(s.strategy for s in rows if len(s.seeds) == 1)
    if single:
        notes.append(f"One finished seed, so no interval exists for: {', '.join(single)}.")
    for name in sorted({f.strategy for f in failed} - set(by_strategy)):
        notes.append(f"{name}: no trial finished (all failed); it is left out of the comparison.")

    rows += _stopped(trials, set(by_strategy))
    rank = {n: i for i, n in enumerate(order or [])}
    rows.sort(key=lambda s: (s.mean("trainable_params"), s.mean("train_time_s"),
                             rank.get(s.strategy, len(rank)), s.strategy))
    sign = -1.0 if QUALITY[metric].higher_is_better else 1.0  # the fronts minimise, so accuracy enters negated
    finished = [s for s in rows if s.stopped is None]  # a stopped strategy's numbers are a rung's, not final
    front_p = pareto_front({s.strategy: (s.mean("trainable_params"), sign * s.mean(metric)) for s in finished})
    front_t = pareto_front({s.strategy: (s.mean("train_time_s"), sign * s.mean(metric)) for s in finished})
    rec = recommend(rows, baseline, zero_quality, threshold, metric, max_forgetting)
    a = StudyAnalysis(baseline, threshold, zero_shot_loss, rows, front_p, front_t, rec, failed, unfinished, notes,
                      metric=metric, zero_shot_accuracy=zero_shot_accuracy)
    a.least_forgetting = least_forgetting(a)
    return a


def least_forgetting(a: StudyAnalysis) -> str | None:
    """The sentence naming the placement that forgets least among those that keep the threshold's share of the
    baseline's improvement (its whole retained-improvement interval at or above it; the baseline keeps all of it)."""
    keep = [s for s in a.strategies if s.stopped is None and s.forgetting is not None
            and (s.strategy == a.baseline or (s.retained is not None and s.retained.lo is not None
                                              and s.retained.lo >= a.threshold))]
    if not keep:
        return None
    best = min(keep, key=lambda s: s.forgetting.mean)
    others = [s for s in keep if s is not best]
    text = (f"Of the strategies that keep at least {pct(a.threshold)} of {a.baseline}'s improvement "
            f"({', '.join(s.strategy for s in keep)}), {best.strategy} forgets least: {interval_text(best.forgetting)} "
            "nats/token")
    if best.strategy != a.baseline and best.paired_forgetting is not None:
        text += f" ({delta_text(best.paired_forgetting, 'forgetting')})"
    if not others:
        text += "; it is the only one"
    return text + "."


def _stopped(trials: list[TrialRecord], finished: set[str]) -> list[StrategyStats]:
    """A row per strategy that racing stopped (and that has no finished trial): its figures at the rung where it
    stopped (``Trial.progress``), the step and the reason."""
    by: dict[str, list[TrialRecord]] = {}
    for t in trials:
        if t.status == STOPPED and t.strategy not in finished:
            by.setdefault(t.strategy, []).append(t)
    rows = []
    for name, ts in by.items():
        ts = sorted(ts, key=lambda t: t.seed)
        per_metric: dict[str, list[float]] = {}
        for t in ts:
            for k, v in numeric(t.metrics).items():
                per_metric.setdefault(k, []).append(v)
        rows.append(StrategyStats(
            strategy=name, seeds=[int(t.seed) for t in ts], metrics={k: t_interval(v) for k, v in per_metric.items()},
            curve=mean_curve([t.curve for t in ts]),
            placement=PlacementRecord.from_dict(ts[0].placement) if ts[0].placement.get("modules") else None,
            stopped={"step": min(int(t.step or 0) for t in ts), "reason": ts[0].error or "stopped by racing"}))
    return rows


def analyze_store(store, threshold: float | None = None, metric: str | None = None) -> StudyAnalysis:
    """``analyze`` over an open ``store.db.Store``; threshold None = the study config's, metric None = the study
    config's ``analysis.metric``.

    Only the trials of the study's latest config count: a directory reused with other settings
    keeps its older trials in the database, but they are never mixed into the statistics.
    """
    cfg = store.study_config() or StudyConfig()  # a store without a config (never run): the defaults
    zero = store.get_meta("zero_shot")
    trials = store.current_trials()
    zero = zero if isinstance(zero, dict) else {}
    zero_acc, stale = zero.get("accuracy"), None
    ns = {int(t.metrics["accuracy_n"]) for t in trials if t.status == DONE and "accuracy_n" in t.metrics}
    if zero_acc is not None and ns and zero.get("accuracy_n") not in ns:
        stale = (f"The stored zero-shot accuracy is over {zero.get('accuracy_n')} examples but the trials' over "
                 f"{', '.join(map(str, sorted(ns)))}; it is not used (rerun `loraplace study` to measure it again).")
        zero_acc = None
    forgetting = store.get_meta("forgetting")
    if forgetting:  # forgetting measured on another set (other settings) is not comparable: left out
        trials = [t if t.measured.get("forgetting") == forgetting["key"] else
                  replace(t, metrics={k: v for k, v in t.metrics.items() if not k.startswith("forgetting")})
                  for t in trials]
    a = analyze(trials, cfg.baseline, zero.get("eval_loss"), cfg.threshold if threshold is None else float(threshold),
                order=cfg.strategies, metric=cfg.analysis.metric if metric is None else metric,
                zero_shot_accuracy=zero_acc, max_forgetting=cfg.analysis.max_forgetting)
    if forgetting:
        a.forgetting_info = {k: v for k, v in forgetting.items() if k != "sequences"}
    a.config = cfg
    a.zero_shot_accuracy_n = zero.get("accuracy_n") if zero_acc is not None else None
    if stale:
        a.notes.append(stale)
    a.probe = load_probe(store)
    a.choice_cost = choice_cost(cfg.strategies, a.probe, store)
    from loraplace.analysis.racing import racing  # it builds rung analyses with analyze itself
    from loraplace.study.race import decisions

    a.racing = racing(a, trials, decisions(store))
    autos = sorted((n for n in cfg.strategies if is_auto(n)), key=lambda n: n != AUTO)  # auto itself first
    name = autos[0] if autos else AUTO
    a.verdict = probe_verdict(trials, a.zero_shot, reference="all_linear" if a.get("all_linear") else cfg.baseline,
                              probe=a.probe, criterion=cfg.auto.settings(name)[1], metric=a.metric, name=name)
    return a
