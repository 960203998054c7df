"""Statistics over a study's trials: intervals across seeds, paired deltas, Pareto fronts, a choice.

Usage::

    from loraplace.analysis import analyze
    a = analyze(store.trials(), baseline="all_linear", zero_shot_loss=2.9, threshold=0.95)
    a.recommendation.text          # one paragraph; a.recommendation.evidence: the numbers behind it
    analyze(trials, "all_linear", 2.9, metric="accuracy", zero_shot_accuracy=0.12)   # decide on accuracy

Pure functions over ``store.TrialRecord`` lists; no disk I/O. ``analyze_store(store)`` is the thin
adapter that reads an open ``Store`` (trials, the typed study config and the ``zero_shot`` meta) for the CLI
and the report. Only ``done`` trials count; failed and unfinished ones are listed in
``StudyAnalysis.failed`` / ``.unfinished``.

Definitions (all intervals are two-sided 95% Student-t intervals across seeds):

* ``Interval``: mean +- t(0.975, n-1) * sd / sqrt(n), sd with ddof=1. With n = 1 no interval
  exists: ``lo``/``hi`` are None and the text says "n=1, no interval".
* Paired comparison: for each seed run by both the strategy and the baseline,
  d_i = loss(strategy, seed i) - loss(baseline, seed i); interval of the d_i as above, p-value of
  the paired t-test (H0: mean d = 0). Significant means the interval excludes 0 (equivalently p < 0.05).
* The quality metric (``metric``, the study's ``analysis.metric``): ``eval_loss`` (lower is better,
  the default) or ``accuracy`` (higher is better). It decides retained improvement, the Pareto
  fronts and the recommendation; deltas and intervals are reported for both when trials carry both.
* Retained improvement per paired seed: (metric_strategy - zero_shot) / (metric_baseline - zero_shot),
  i.e. (zero_shot - loss_s) / (zero_shot - loss_b) for loss and (acc_s - acc_zero) / (acc_b - acc_zero)
  for accuracy; its mean and interval across seeds. 1.0 = keeps all of the baseline's gain over the
  base model.
* Pareto fronts over (trainable_params, quality) and (train_time_s, quality), means across seeds,
  cheaper and better on both axes (accuracy enters negated).
* Wilson interval: an accuracy from n examples (``accuracy_n``) with one seed has no t-interval; its
  95% Wilson score interval says how far the number could move with other examples of the task.
* Recommendation: walk strategies from cheapest (fewest trainable params) up; the first whose
  retained-improvement interval lies wholly at or above the threshold is chosen, unless a cheaper
  one cannot be ruled in or out (its interval straddles the threshold, or it has < 2 paired seeds):
  then no choice is made and the text says why.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from scipy import stats

from .config import METRIC_CHOICES, ConfigError, StudyConfig
from .metrics import numeric
from .placement import PlacementRecord
from .store import TrialRecord

CONFIDENCE = 0.95  # two-sided level of every interval
HIGHER_IS_BETTER = {"eval_loss": False, "accuracy": True}
LABELS = {"eval_loss": "eval loss", "accuracy": "accuracy"}


@dataclass(frozen=True)
class Interval:
    """Mean across n values and its 95% t-interval (None when n < 2: no interval exists)."""

    mean: float
    n: int
    sd: float | None = None
    lo: float | None = None
    hi: float | None = None

    @property
    def half(self) -> float | None:
        return None if self.lo is None else (self.hi - self.lo) / 2

    def excludes(self, value: float) -> bool | None:
        """True/False when an interval exists, None otherwise."""
        return None if self.lo is None else not (self.lo <= value <= self.hi)

    def text(self, fmt: str = "{:.4f}", scale: float = 1.0) -> str:
        """'1.2345 ± 0.0123' or '1.2345 (n=1, no interval)'."""
        m = fmt.format(self.mean * scale)
        if self.lo is None:
            return f"{m} (n={self.n}, no interval)"
        return f"{m} ± {fmt.format(self.half * scale)}"


def t_interval(values: list[float]) -> Interval:
    """Mean and 95% t-interval of the values; raises ValueError on an empty list."""
    vals = [float(v) for v in values]
    n = len(vals)
    if n == 0:
        raise ValueError("t_interval of no values")
    mean = sum(vals) / n
    if n == 1:
        return Interval(mean, 1)
    sd = math.sqrt(sum((v - mean) ** 2 for v in vals) / (n - 1))
    half = float(stats.t.ppf(0.5 + CONFIDENCE / 2, n - 1)) * sd / math.sqrt(n)
    return Interval(mean, n, sd, mean - half, mean + half)


def wilson_interval(p: float, n: int, confidence: float = CONFIDENCE) -> tuple[float, float]:
    """Wilson score interval of a proportion p observed on n trials (e.g. an accuracy on n examples).

    centre = (p + z^2/2n) / (1 + z^2/n), half = z / (1 + z^2/n) * sqrt(p(1-p)/n + z^2/4n^2),
    z the normal quantile; unlike p +- z*sqrt(p(1-p)/n) it stays inside [0, 1] and is not empty at
    p = 0 or 1."""
    if n <= 0:
        raise ValueError("wilson_interval needs n >= 1")
    z = float(stats.norm.ppf(0.5 + confidence / 2))
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z / denom * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    return max(0.0, centre - half), min(1.0, centre + half)


@dataclass(frozen=True)
class Paired:
    """Strategy minus baseline over seeds run by both (eval loss: positive = worse; accuracy: positive = better)."""

    diff: Interval
    p_value: float | None  # paired t-test; None with < 2 pairs or zero spread
    seeds: tuple[int, ...]

    @property
    def significant(self) -> bool | None:
        return self.diff.excludes(0.0)


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

    @property
    def eval_loss(self) -> Interval:
        return self.metrics["eval_loss"]

    @property
    def accuracy(self) -> Interval | None:
        return self.metrics.get("accuracy")

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

    @property
    def has_accuracy(self) -> bool:
        return any(s.accuracy is not None for s in self.strategies)

    @property
    def zero_shot(self) -> float | None:
        """The base model's value of the analysis metric."""
        return self.zero_shot_accuracy if self.metric == "accuracy" else self.zero_shot_loss
    probe: object | None = None  # probe.ProbeScores of the study's latest probe (set by analyze_store), or None
    verdict: "ProbeVerdict | None" = None  # auto vs random draws vs the reference (set by analyze_store)

    def get(self, strategy: str) -> StrategyStats | None:
        return next((s for s in self.strategies if s.strategy == strategy), None)

    @property
    def min_seeds(self) -> int:
        return min((len(s.seeds) for s in self.strategies), default=0)


# -- building blocks ------------------------------------------------------------------------------
def paired_comparison(strategy: dict[int, float], baseline: dict[int, float]) -> Paired | None:
    """Paired stats of strategy - baseline over common seeds ({seed: loss} each); None if none shared."""
    seeds = tuple(sorted(set(strategy) & set(baseline)))
    if not seeds:
        return None
    diffs = [strategy[s] - baseline[s] for s in seeds]
    iv = t_interval(diffs)
    p = None
    if iv.n >= 2 and iv.sd and iv.sd > 0:
        p = float(stats.ttest_rel([strategy[s] for s in seeds], [baseline[s] for s in seeds]).pvalue)
    return Paired(iv, p, seeds)


def retained_improvement(strategy: dict[int, float], baseline: dict[int, float], zero_shot: float,
                         higher_is_better: bool = False) -> Interval | None:
    """Per common seed (strategy - zero_shot) / (baseline - zero_shot), then its t-interval.

    For a loss that is (zero_shot - loss_s) / (zero_shot - loss_b); for accuracy (higher_is_better)
    (acc_s - acc_zero) / (acc_b - acc_zero). None when no seed is shared or the baseline did not
    improve on zero-shot in some seed (the ratio is then undefined or sign-flipped)."""
    sign = 1.0 if higher_is_better else -1.0
    seeds = sorted(set(strategy) & set(baseline))
    if not seeds or any(sign * (baseline[s] - zero_shot) <= 0 for s in seeds):
        return None
    return t_interval([(strategy[s] - zero_shot) / (baseline[s] - zero_shot) for s in seeds])


def pareto_front(points: dict[str, tuple[float, float]]) -> list[str]:
    """Names of the non-dominated points (lower is better on both coordinates), by x then y.

    A point is dominated when another is <= on both coordinates and < on at least one. NaN
    coordinates never enter the front."""
    ok = {k: v for k, v in points.items() if not (math.isnan(v[0]) or math.isnan(v[1]))}
    front = [
        k
        for k, (x, y) in ok.items()
        if not any(x2 <= x and y2 <= y and (x2 < x or y2 < y) for k2, (x2, y2) in ok.items() if k2 != k)
    ]
    return sorted(front, key=lambda k: (ok[k][0], ok[k][1], k))


def mean_curve(curves: list[list]) -> list[tuple[float, float]]:
    """Mean train loss per step over the curves ([[step, loss], ...] each) that logged that step."""
    by_step: dict[float, list[float]] = {}
    for curve in curves:
        for point in curve:
            if len(point) >= 2 and point[1] is not None and math.isfinite(float(point[1])):
                by_step.setdefault(float(point[0]), []).append(float(point[1]))
    return [(s, sum(v) / len(v)) for s, v in sorted(by_step.items())]


# -- the whole study ------------------------------------------------------------------------------
def analyze(
    trials: list[TrialRecord],
    baseline: str,
    zero_shot_loss: float | None = None,
    threshold: float = 0.95,
    order: list[str] | None = None,
    metric: str = "eval_loss",
    zero_shot_accuracy: float | None = None,
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
    done = [t for t in trials if t.status == "done" and "eval_loss" in t.metrics]
    failed = [FailedTrial(t.strategy, t.seed, t.status, t.error or "") for t in trials if t.status == "failed"]
    unfinished = [FailedTrial(t.strategy, t.seed, t.status, "") for t in trials if t.status in ("pending", "running")]
    notes: list[str] = []
    odd = [t for t in trials if t.status == "done" and "eval_loss" not in t.metrics]
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
            st.retained = retained_improvement(quality[name], base_quality, zero_quality, HIGHER_IS_BETTER[metric])
        rows.append(st)
    single = sorted(s.strategy for s in rows if len(s.seeds) == 1)
    if single:
        notes.append(f"One finished seed, so no interval exists for: {', '.join(single)}.")
    for name in sorted({f.strategy for f in failed} - set(by_strategy)):
        notes.append(f"{name}: no trial finished (all failed); it is left out of the comparison.")

    rank = {n: i for i, n in enumerate(order or [])}
    rows.sort(key=lambda s: (s.mean("trainable_params"), s.mean("train_time_s"),
                             rank.get(s.strategy, len(rank)), s.strategy))
    sign = -1.0 if HIGHER_IS_BETTER[metric] else 1.0  # the fronts minimise, so accuracy enters negated
    front_p = pareto_front({s.strategy: (s.mean("trainable_params"), sign * s.mean(metric)) for s in rows})
    front_t = pareto_front({s.strategy: (s.mean("train_time_s"), sign * s.mean(metric)) for s in rows})
    rec = recommend(rows, baseline, zero_quality, threshold, metric)
    return StudyAnalysis(baseline, threshold, zero_shot_loss, rows, front_p, front_t, rec, failed, unfinished, notes,
                         metric=metric, zero_shot_accuracy=zero_shot_accuracy)


def analyze_store(store, threshold: float | None = None, metric: str | None = None) -> StudyAnalysis:
    """``analyze`` over an open ``store.Store``; threshold None = the study config's, metric None = the study
    config's ``analysis.metric``.

    Only the trials of the study's latest config count: a directory reused with other settings
    keeps its older trials in the database, but they are never mixed into the statistics.
    """
    cfg = store.study_config() or StudyConfig()  # a store without a config (never run): the defaults
    zero = store.get_meta("zero_shot")
    trials = store.trials()
    current = store.trial_ids()
    if current:
        trials = [t for t in trials if t.trial_id in set(current)]
    zero = zero if isinstance(zero, dict) else {}
    zero_acc, stale = zero.get("accuracy"), None
    ns = {int(t.metrics["accuracy_n"]) for t in trials if t.status == "done" and "accuracy_n" in t.metrics}
    if zero_acc is not None and ns and zero.get("accuracy_n") not in ns:
        stale = (f"The stored zero-shot accuracy is over {zero.get('accuracy_n')} examples but the trials' over "
                 f"{', '.join(map(str, sorted(ns)))}; it is not used (rerun `loraplace study` to measure it again).")
        zero_acc = None
    a = analyze(trials, cfg.baseline, zero.get("eval_loss"), cfg.threshold if threshold is None else float(threshold),
                order=cfg.strategies, metric=cfg.analysis.metric if metric is None else metric,
                zero_shot_accuracy=zero_acc)
    a.config = cfg
    a.zero_shot_accuracy_n = zero.get("accuracy_n") if zero_acc is not None else None
    if stale:
        a.notes.append(stale)
    from .probe import load as load_probe  # torch-free

    a.probe = load_probe(store)
    a.verdict = probe_verdict(trials, a.zero_shot, reference="all_linear" if a.get("all_linear") else cfg.baseline,
                              probe=a.probe, criterion=cfg.auto.score, metric=a.metric)
    return a


# -- probe verdict: does the probe's choice (auto) beat random module sets at the same budget? ------
@dataclass
class ProbeVerdict:
    """auto against the mean of the random draws (paired by seed) and against the reference's improvement."""

    randoms: list[str]  # the random:K strategies with done trials
    vs_random: Paired | None  # auto minus the mean of the random draws, per seed where all ran (in ``metric``)
    retained_auto: Interval | None  # share of the reference's improvement over zero-shot that auto keeps
    retained_random: Interval | None  # the same for the per-seed mean loss of the random draws
    reference: str  # all_linear when the study has it, else the baseline
    text: str  # the verdict in one paragraph, whatever it is
    evidence: list[str] = field(default_factory=list)
    probe_time_s: float | None = None  # wall time of the probe seeds
    probe_share: float | None = None  # probe time / (probe time + train and eval time of the study's done trials)
    metric: str = "eval_loss"  # eval_loss (lower is better) or accuracy (higher is better)


def _per_seed(trials: list[TrialRecord], name: str, metric: str) -> dict[int, float]:
    return {int(t.seed): float(t.metrics[metric]) for t in trials
            if t.strategy == name and t.status == "done" and metric in t.metrics}


def probe_verdict(trials: list[TrialRecord], zero_shot: float | None, reference: str = "all_linear", probe=None,
                  criterion: str = "lora_drop", metric: str = "eval_loss") -> ProbeVerdict | None:
    """The verdict on ``auto`` (None when the study has no done auto trial), on ``metric`` (eval_loss: lower is
    better; accuracy: higher is better; ``zero_shot`` is the base model's value of it). Random draws are averaged
    per seed (seeds where every draw finished); intervals as everywhere (95% t across seeds)."""
    higher = metric == "accuracy"
    label = "accuracy" if higher else "loss"

    auto = _per_seed(trials, "auto", metric)
    if not auto:
        return None
    randoms = sorted({t.strategy for t in trials if t.strategy.startswith("random:") and _per_seed(trials, t.strategy, metric)})
    per_draw = {r: _per_seed(trials, r, metric) for r in randoms}
    rand_mean = {s: sum(per_draw[r][s] for r in randoms) / len(randoms)
                 for s in set.intersection(*(set(v) for v in per_draw.values()))} if randoms else {}
    ref = _per_seed(trials, reference, metric)
    vs = paired_comparison(auto, rand_mean) if rand_mean else None
    ret_a = retained_improvement(auto, ref, zero_shot, higher) if zero_shot is not None and ref else None
    ret_r = retained_improvement(rand_mean, ref, zero_shot, higher) if zero_shot is not None and ref and rand_mean else None
    evidence = []
    if vs is None:
        text = ("No verdict on auto against random placement: the study has no finished random:K draw at auto's "
                "budget for a seed auto ran (add random:0, random:1, random:2 to the strategies).")
    else:
        d = vs.diff
        n_draws = f"{len(randoms)} random draw{'s' if len(randoms) != 1 else ''}"
        ci = f"Δ {label} (auto − mean of {n_draws}) {d.mean:+.4f}"
        if d.lo is None:
            text = (f"Undecided: auto vs {n_draws} at equal budget has one paired seed ({ci}, no interval); run at "
                    "least 3 seeds.")
        else:
            ci += f" [95% CI {d.lo:+.4f}, {d.hi:+.4f}] over {d.n} seeds"
            if (d.lo > 0) if higher else (d.hi < 0):
                text = f"auto beats random placement at equal budget: {ci}."
            elif (d.hi < 0) if higher else (d.lo > 0):
                text = f"auto does worse than random placement at equal budget: {ci}."
            else:
                text = f"auto does not beat random placement at equal budget: the interval includes 0 ({ci})."
        evidence.append(ci)
    if ret_a is not None:
        line = f"auto retains {_retained_text(ret_a)} of {reference}'s improvement over the base model"
        if ret_r is not None:
            line += f"; the random draws (mean per seed) retain {_retained_text(ret_r)}"
        text += " " + line + "."
        evidence.append(line)
    elif ref:
        evidence.append(f"retained improvement of auto not available (no zero-shot {label} or {reference} did not "
                        "improve on it in every seed)")
    probe_time = share = None
    if probe is not None:
        probe_time = probe.time_s
        trial_time = sum(float(t.metrics.get("train_time_s", 0)) + float(t.metrics.get("eval_time_s", 0))
                         for t in trials if t.status == "done")
        share = probe_time / (probe_time + trial_time) if probe_time + trial_time > 0 else None
        cost = f"probe: {len(probe.seeds)} seed(s), {probe_time:.0f} s"
        if share is not None:
            cost += f" = {100 * share:.1f}% of the study's time (probe + trials' train and eval time)"
        evidence.append(cost)
        for c in probe.criteria:
            evidence.append(("auto.score = " if c == criterion else "") + probe.summary(c))
    return ProbeVerdict(randoms, vs, ret_a, ret_r, reference, text, evidence, probe_time, share, metric)


# -- recommendation -------------------------------------------------------------------------------
def _pct(x: float) -> str:
    return f"{100 * x:.1f}%"


def _retained_text(iv: Interval) -> str:
    if iv.lo is None:
        return f"{_pct(iv.mean)} (n={iv.n}, no interval)"
    return f"{_pct(iv.mean)} [95% CI {_pct(iv.lo)}, {_pct(iv.hi)}]"


def accuracy_text(s: StrategyStats) -> str | None:
    """'42.0% ± 3.1%' across seeds; with one seed '42.0% (95% Wilson 29.3-55.9%, n=50 examples)'."""
    acc = s.accuracy
    if acc is None:
        return None
    w = s.wilson()
    if w is not None:
        return f"{_pct(acc.mean)} (one seed; 95% Wilson {100 * w[0]:.1f}-{_pct(w[1])}, n={s.mean('accuracy_n'):.0f} examples)"
    return acc.text("{:.1f}%", 100) if acc.lo is not None else f"{_pct(acc.mean)} (n={acc.n}, no interval)"


def _delta_text(pr: Paired, what: str, fmt: str = "{:+.4f}", scale: float = 1.0, unit: str = "") -> str:
    d = pr.diff
    p = f", p={pr.p_value:.3g}" if pr.p_value is not None else ""
    ci = (f" [95% CI {fmt.format(d.lo * scale)}, {fmt.format(d.hi * scale)}{unit}]" if d.lo is not None
          else " (one pair, no interval)")
    return f"Δ {what} vs baseline {fmt.format(d.mean * scale)}{unit}{ci}{p}"


def _evidence(s: StrategyStats, verdict: str, metric: str = "eval_loss") -> str:
    parts = [f"{s.strategy}: {s.mean('trainable_params'):,.0f} trainable params"]
    if "trainable_pct" in s.metrics:
        parts[0] += f" ({s.mean('trainable_pct'):.3g}% of base)"
    parts.append(f"eval loss {s.eval_loss.text()}")
    if s.accuracy is not None:
        parts.append(f"accuracy {accuracy_text(s)}")
    if s.retained is not None:
        parts.append(f"retained improvement ({LABELS[metric]}) {_retained_text(s.retained)}")
    if s.paired is not None:
        parts.append(_delta_text(s.paired, "loss"))
    if s.paired_accuracy is not None:
        parts.append(_delta_text(s.paired_accuracy, "accuracy", "{:+.1f}", 100, " pp"))
    return "; ".join(parts) + f" -> {verdict}"


def recommend(
    rows: list[StrategyStats], baseline: str, zero_shot: float | None, threshold: float, metric: str = "eval_loss"
) -> Recommendation:
    """The cheapest strategy whose retained improvement (in ``metric``) is confidently >= threshold
    (see module doc); zero_shot is the base model's value of ``metric``.

    rows must be ordered cheapest first."""
    t = _pct(threshold)
    base = next((s for s in rows if s.strategy == baseline), None)
    if base is None:
        return Recommendation(False, None, f"Cannot recommend: the baseline {baseline!r} has no finished trial, so no "
                              "strategy can be compared with it.")
    if zero_shot is None:
        what = "accuracy" if metric == "accuracy" else "loss"
        return Recommendation(False, None, f"Cannot recommend: the zero-shot {what} of the base model is unknown, so "
                              "retained improvement cannot be computed.")
    q = base.metrics.get(metric)
    if metric == "accuracy":
        if q is None:
            return Recommendation(False, None, f"Cannot recommend: the baseline {baseline!r} has no accuracy, so no "
                                  "strategy can be compared with it on accuracy.")
        gain = q.mean - zero_shot
        ev_base = (f"baseline {baseline}: accuracy {accuracy_text(base)} vs zero-shot {_pct(zero_shot)} "
                   f"(gain {100 * gain:+.1f} points)")
        unreliable = gain <= 0 or (q.lo is not None and q.lo <= zero_shot)
    else:
        gain = zero_shot - q.mean
        ev_base = (f"baseline {baseline}: eval loss {q.text()} vs zero-shot {zero_shot:.4f} "
                   f"(gain {gain:.4f} nats/token)")
        unreliable = gain <= 0 or (q.hi is not None and q.hi >= zero_shot)
    if unreliable:
        return Recommendation(False, None, f"Cannot recommend: the baseline {baseline!r} is not reliably better "
                              f"than the base model (its {LABELS[metric].replace(' ', '-')} interval reaches the "
                              f"zero-shot {'accuracy' if metric == 'accuracy' else 'loss'}), so the share "
                              "of its gain a cheaper placement keeps is meaningless.", [ev_base])

    evidence = [ev_base]
    blockers: list[StrategyStats] = []
    chosen = tentative = None
    for s in rows:
        r = s.retained
        if s.strategy == baseline:
            verdict, meets = "the reference (retained 100% by definition)", True
        elif r is None:
            why = "no accuracy" if metric == "accuracy" and s.accuracy is None else "no seed shared with the baseline"
            verdict, meets = f"no retained improvement ({why})", None
        elif r.lo is None:
            verdict, meets = f"undecidable: {r.n} paired seed, no interval", None
        elif r.lo >= threshold:
            verdict, meets = f"meets the {t} threshold (whole interval above it)", True
        elif r.hi < threshold:
            verdict, meets = f"falls short of {t} (whole interval below it)", False
        else:
            verdict, meets = f"undecidable: interval straddles {t}", None
        evidence.append(_evidence(s, verdict, metric))
        if tentative is None and (s.strategy == baseline or (r is not None and r.mean >= threshold)):
            tentative = s.strategy
        if meets is None:
            blockers.append(s)
        elif meets:
            chosen = s
            break

    if not blockers:
        if chosen.strategy == baseline:
            text = (f"Use {baseline} (the baseline): no cheaper strategy keeps at least {t} of its improvement over "
                    "the base model.")
        else:
            text = (f"Use {chosen.strategy}: it is the cheapest strategy ({chosen.mean('trainable_params'):,.0f} "
                    f"trainable params vs {base.mean('trainable_params'):,.0f} for {baseline}) whose retained "
                    f"improvement in {LABELS[metric]} is at least {t} with 95% confidence "
                    f"({_retained_text(chosen.retained)}).")
        return Recommendation(True, chosen.strategy, text, evidence)

    names = ", ".join(b.strategy for b in blockers)
    if all(b.retained is not None and b.retained.lo is None for b in blockers):
        why = (f"with one paired seed ({names}) no interval exists, so the data cannot support a choice; "
               "run at least 3 seeds")
    else:
        why = (f"the cheaper {names} cannot be ruled in or out: retained-improvement intervals straddle {t} "
               "or are missing; more seeds would narrow them")
    text = f"Cannot decide: {why}."
    if chosen is not None and chosen.strategy == baseline:
        text += f" The baseline {baseline} remains the safe choice."
    elif chosen is not None:
        text += f" {chosen.strategy} is the cheapest strategy known to meet the threshold."
    if tentative is not None and tentative != (chosen.strategy if chosen else None):
        text += f" On point estimates alone (not evidence) {tentative} would be the pick."
    return Recommendation(False, None, text, evidence, fallback=chosen.strategy if chosen else None,
                          tentative=tentative)
