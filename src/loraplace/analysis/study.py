"""A study's trials -> per-strategy statistics, Pareto fronts and the recommendation: pure functions.

Usage::

    a = analyze(store.trials(), baseline="all_linear", zero_shot_loss=2.9, threshold=0.95)
    a.get("mlp_only").retained, a.recommendation.text
    b = reanalyze(a, other_trials)     # the same settings over other trials (racing's rung checks)

Pure functions over ``store.db.TrialRecord`` lists, no disk I/O (``analysis.from_store.analyze_store`` reads an
open ``Store`` and adds what it holds). Only ``done`` trials count; failed and unfinished ones are listed in
``StudyAnalysis.failed`` / ``.unfinished``. The quality metric (``metric``, the study's ``analysis.metric``) is
``eval_loss`` (lower is better) or ``accuracy`` (higher is better): it decides retained improvement, the Pareto
fronts and the recommendation (``analysis.decision``); deltas and intervals are reported for both when trials carry
both. Strategies are ordered cheapest first by cost tier (``decision.cost_tiers``), within a tier in the order
given. Pareto fronts are over (trainable_params, quality) and (train_time_s, quality), means across seeds.
"""

from __future__ import annotations

from loraplace.analysis.decision import cost_tiers, recommend_for
from loraplace.analysis.findings import FailedTrial, Recommendation, StrategyStats, StudyAnalysis
from loraplace.analysis.text import delta_text, interval_text, pct
from loraplace.core.config import ConfigError
from loraplace.core.metrics import METRIC_CHOICES, QUALITY, numeric
from loraplace.core.stats import mean_curve, paired_comparison, pareto_front, retained_improvement, t_interval
from loraplace.placement.record import PlacementRecord
from loraplace.store.db import DONE, FAILED, STOPPED, UNFINISHED, TrialRecord


# -- the whole study ------------------------------------------------------------------------------
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
    break ties of cost (e.g. the study config's order; ``decision.cost_tiers``). metric: eval_loss
    or accuracy, the quality measure of retained improvement, fronts and recommendation;
    zero_shot_accuracy: the base model's accuracy on the same examples; max_forgetting (nats/token): the
    recommendation leaves out strategies forgetting more. Raises config.ConfigError when metric=accuracy and no
    finished trial has an accuracy.
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
            lr=ts[min(ts)].lr,
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
    rows.sort(key=lambda s: (rank.get(s.strategy, len(rank)), s.strategy))  # the order ties of cost keep
    rows = [s for tier in cost_tiers(rows) for s in tier]
    sign = -1.0 if QUALITY[metric].higher_is_better else 1.0  # the fronts minimise, so accuracy enters negated
    finished = [s for s in rows if s.stopped is None]  # a stopped strategy's numbers are a rung's, not final
    front_p = pareto_front({s.strategy: (s.mean("trainable_params"), sign * s.mean(metric)) for s in finished})
    front_t = pareto_front({s.strategy: (s.mean("train_time_s"), sign * s.mean(metric)) for s in finished})
    a = StudyAnalysis(baseline, threshold, zero_shot_loss, rows, front_p, front_t, Recommendation(False, None, ""),
                      failed, unfinished, notes, metric=metric, zero_shot_accuracy=zero_shot_accuracy,
                      max_forgetting=max_forgetting, order=list(order or []))
    a.recommendation = recommend_for(a)  # from a's own settings, as racing's checks compute it
    a.least_forgetting = least_forgetting(a)
    return a


def reanalyze(a: StudyAnalysis, trials: list[TrialRecord]) -> StudyAnalysis:
    """``analyze`` of ``trials`` with the settings ``a`` was analysed with (baseline, zero-shot values, threshold,
    order, metric, max_forgetting): e.g. a rung's values as if the study ended there."""
    return analyze(trials, a.baseline, a.zero_shot_loss, a.threshold, order=a.order, metric=a.metric,
                   zero_shot_accuracy=a.zero_shot_accuracy, max_forgetting=a.max_forgetting)


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
            stopped={"step": min(int(t.step or 0) for t in ts), "reason": ts[0].error or "stopped by racing"},
            lr=ts[0].lr))
    return rows
