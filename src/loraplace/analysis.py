"""Statistics over a study's trials: intervals across seeds, paired deltas, Pareto fronts, a choice.

Usage::

    from loraplace.analysis import analyze
    a = analyze(store.trials(), baseline="all_linear", zero_shot_loss=2.9, threshold=0.95)
    a.recommendation.text          # one paragraph; a.recommendation.evidence: the numbers behind it

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
* Retained improvement per paired seed: (zero_shot - loss_strategy) / (zero_shot - loss_baseline);
  its mean and interval across seeds. 1.0 = keeps all of the baseline's gain over the base model.
* Pareto fronts over (trainable_params, eval_loss) and (train_time_s, eval_loss), means across
  seeds, lower is better on both axes.
* Recommendation: walk strategies from cheapest (fewest trainable params) up; the first whose
  retained-improvement interval lies wholly at or above the threshold is chosen, unless a cheaper
  one cannot be ruled in or out (its interval straddles the threshold, or it has < 2 paired seeds):
  then no choice is made and the text says why.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from scipy import stats

from .config import StudyConfig
from .placement import PlacementRecord
from .store import TrialRecord

CONFIDENCE = 0.95  # two-sided level of every interval


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


@dataclass(frozen=True)
class Paired:
    """Strategy minus baseline eval loss over seeds run by both (positive = strategy is worse)."""

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
    paired: Paired | None = None  # None for the baseline itself or with no common seeds
    retained: Interval | None = None  # None without zero-shot loss, baseline or common seeds

    @property
    def eval_loss(self) -> Interval:
        return self.metrics["eval_loss"]

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
    pareto_params: list[str]  # frontier over (trainable_params, eval_loss), cheapest first
    pareto_time: list[str]  # frontier over (train_time_s, eval_loss), fastest first
    recommendation: Recommendation
    failed: list[FailedTrial] = field(default_factory=list)
    unfinished: list[FailedTrial] = field(default_factory=list)  # pending / running
    notes: list[str] = field(default_factory=list)
    config: StudyConfig | None = None  # the study's config, as stored (set by analyze_store)
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


def retained_improvement(strategy: dict[int, float], baseline: dict[int, float], zero_shot: float) -> Interval | None:
    """Per common seed (zero_shot - strategy) / (zero_shot - baseline), then its t-interval.

    None when no seed is shared or the baseline did not improve on zero-shot in some seed (the
    ratio is then undefined or sign-flipped)."""
    seeds = sorted(set(strategy) & set(baseline))
    if not seeds or any(zero_shot - baseline[s] <= 0 for s in seeds):
        return None
    return t_interval([(zero_shot - strategy[s]) / (zero_shot - baseline[s]) for s in seeds])


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


def _numeric(metrics: dict) -> dict[str, float]:
    return {
        k: float(v)
        for k, v in metrics.items()
        if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(float(v))
    }


# -- the whole study ------------------------------------------------------------------------------
def analyze(
    trials: list[TrialRecord],
    baseline: str,
    zero_shot_loss: float | None = None,
    threshold: float = 0.95,
    order: list[str] | None = None,
) -> StudyAnalysis:
    """Statistics, fronts and recommendation for a study's trials.

    zero_shot_loss: the base model's eval loss (nats/token); None falls back to the
    ``zero_shot_loss`` metric the done trials carry, if any. order: strategy names, used only to
    break ties in the cheapest-first ordering (e.g. the study config's order).
    """
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
    losses = {s: {seed: float(t.metrics["eval_loss"]) for seed, t in ts.items()} for s, ts in by_strategy.items()}
    base_losses = losses.get(baseline, {})

    rows: list[StrategyStats] = []
    for name, ts in by_strategy.items():
        per_metric: dict[str, list[float]] = {}
        for seed in sorted(ts):
            for k, v in _numeric(ts[seed].metrics).items():
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
        if zero_shot_loss is not None and base_losses:
            st.retained = retained_improvement(losses[name], base_losses, zero_shot_loss)
        rows.append(st)
    single = sorted(s.strategy for s in rows if len(s.seeds) == 1)
    if single:
        notes.append(f"One finished seed, so no interval exists for: {', '.join(single)}.")
    for name in sorted({f.strategy for f in failed} - set(by_strategy)):
        notes.append(f"{name}: no trial finished (all failed); it is left out of the comparison.")

    rank = {n: i for i, n in enumerate(order or [])}
    rows.sort(key=lambda s: (s.mean("trainable_params"), s.mean("train_time_s"),
                             rank.get(s.strategy, len(rank)), s.strategy))
    front_p = pareto_front({s.strategy: (s.mean("trainable_params"), s.eval_loss.mean) for s in rows})
    front_t = pareto_front({s.strategy: (s.mean("train_time_s"), s.eval_loss.mean) for s in rows})
    rec = recommend(rows, baseline, zero_shot_loss, threshold)
    return StudyAnalysis(baseline, threshold, zero_shot_loss, rows, front_p, front_t, rec, failed, unfinished, notes)


def analyze_store(store, threshold: float | None = None) -> StudyAnalysis:
    """``analyze`` over an open ``store.Store``; threshold None = the study config's.

    Only the trials of the study's latest config count: a directory reused with other settings
    keeps its older trials in the database, but they are never mixed into the statistics.
    """
    cfg = store.study_config() or StudyConfig()  # a store without a config (never run): the defaults
    zero = store.get_meta("zero_shot")
    trials = store.trials()
    current = store.trial_ids()
    if current:
        trials = [t for t in trials if t.trial_id in set(current)]
    a = analyze(trials, cfg.baseline, zero.get("eval_loss") if isinstance(zero, dict) else None,
                cfg.threshold if threshold is None else float(threshold), order=cfg.strategies)
    a.config = cfg
    from .probe import load as load_probe  # torch-free

    a.probe = load_probe(store)
    a.verdict = probe_verdict(trials, a.zero_shot_loss, reference="all_linear" if a.get("all_linear") else cfg.baseline,
                              probe=a.probe, criterion=cfg.auto.score)
    return a


# -- probe verdict: does the probe's choice (auto) beat random module sets at the same budget? ------
@dataclass
class ProbeVerdict:
    """auto against the mean of the random draws (paired by seed) and against the reference's improvement."""

    randoms: list[str]  # the random:K strategies with done trials
    vs_random: Paired | None  # auto minus the mean of the random draws, per seed where all ran (negative = auto better)
    retained_auto: Interval | None  # share of the reference's improvement over zero-shot that auto keeps
    retained_random: Interval | None  # the same for the per-seed mean loss of the random draws
    reference: str  # all_linear when the study has it, else the baseline
    text: str  # the verdict in one paragraph, whatever it is
    evidence: list[str] = field(default_factory=list)
    probe_time_s: float | None = None  # wall time of the probe seeds
    probe_share: float | None = None  # probe time / (probe time + train and eval time of the study's done trials)


def _losses(trials: list[TrialRecord], name: str) -> dict[int, float]:
    return {int(t.seed): float(t.metrics["eval_loss"]) for t in trials
            if t.strategy == name and t.status == "done" and "eval_loss" in t.metrics}


def probe_verdict(trials: list[TrialRecord], zero_shot: float | None, reference: str = "all_linear", probe=None,
                  criterion: str = "lora_drop") -> ProbeVerdict | None:
    """The verdict on ``auto`` (None when the study has no done auto trial). Random draws are averaged per seed
    over the draws that finished that seed (all of them required); intervals as everywhere (95% t across seeds)."""
    auto = _losses(trials, "auto")
    if not auto:
        return None
    randoms = sorted({t.strategy for t in trials if t.strategy.startswith("random:") and _losses(trials, t.strategy)})
    per_draw = {r: _losses(trials, r) for r in randoms}
    rand_mean = {s: sum(per_draw[r][s] for r in randoms) / len(randoms)
                 for s in set.intersection(*(set(v) for v in per_draw.values()))} if randoms else {}
    ref = _losses(trials, reference)
    vs = paired_comparison(auto, rand_mean) if rand_mean else None
    ret_a = retained_improvement(auto, ref, zero_shot) if zero_shot is not None and ref else None
    ret_r = retained_improvement(rand_mean, ref, zero_shot) if zero_shot is not None and ref and rand_mean else None
    evidence = []
    if vs is None:
        text = ("No verdict on auto against random placement: the study has no finished random:K draw at auto's "
                "budget for a seed auto ran (add random:0, random:1, random:2 to the strategies).")
    else:
        d = vs.diff
        n_draws = f"{len(randoms)} random draw{'s' if len(randoms) != 1 else ''}"
        ci = f"Δ loss (auto − mean of {n_draws}) {d.mean:+.4f}"
        if d.lo is None:
            text = (f"Undecided: auto vs {n_draws} at equal budget has one paired seed ({ci}, no interval); run at "
                    "least 3 seeds.")
        else:
            ci += f" [95% CI {d.lo:+.4f}, {d.hi:+.4f}] over {d.n} seeds"
            if d.hi < 0:
                text = f"auto beats random placement at equal budget: {ci}."
            elif d.lo > 0:
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
        evidence.append(f"retained improvement of auto not available (no zero-shot loss or {reference} did not improve "
                        "on it in every seed)")
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
    return ProbeVerdict(randoms, vs, ret_a, ret_r, reference, text, evidence, probe_time, share)


# -- recommendation -------------------------------------------------------------------------------
def _pct(x: float) -> str:
    return f"{100 * x:.1f}%"


def _retained_text(iv: Interval) -> str:
    if iv.lo is None:
        return f"{_pct(iv.mean)} (n={iv.n}, no interval)"
    return f"{_pct(iv.mean)} [95% CI {_pct(iv.lo)}, {_pct(iv.hi)}]"


def _evidence(s: StrategyStats, verdict: str) -> str:
    parts = [f"{s.strategy}: {s.mean('trainable_params'):,.0f} trainable params"]
    if "trainable_pct" in s.metrics:
        parts[0] += f" ({s.mean('trainable_pct'):.3g}% of base)"
    parts.append(f"eval loss {s.eval_loss.text()}")
    if s.retained is not None:
        parts.append(f"retained improvement {_retained_text(s.retained)}")
    if s.paired is not None:
        d = s.paired.diff
        p = f", p={s.paired.p_value:.3g}" if s.paired.p_value is not None else ""
        ci = f" [95% CI {d.lo:+.4f}, {d.hi:+.4f}]" if d.lo is not None else " (one pair, no interval)"
        parts.append(f"Δ loss vs baseline {d.mean:+.4f}{ci}{p}")
    return "; ".join(parts) + f" -> {verdict}"


def recommend(
    rows: list[StrategyStats], baseline: str, zero_shot: float | None, threshold: float
) -> Recommendation:
    """The cheapest strategy whose retained improvement is confidently >= threshold (see module doc).

    rows must be ordered cheapest first."""
    t = _pct(threshold)
    base = next((s for s in rows if s.strategy == baseline), None)
    if base is None:
        return Recommendation(False, None, f"Cannot recommend: the baseline {baseline!r} has no finished trial, so no "
                              "strategy can be compared with it.")
    if zero_shot is None:
        return Recommendation(False, None, "Cannot recommend: the zero-shot loss of the base model is unknown, so "
                              "retained improvement cannot be computed.")
    gain = zero_shot - base.eval_loss.mean
    ev_base = (f"baseline {baseline}: eval loss {base.eval_loss.text()} vs zero-shot {zero_shot:.4f} "
               f"(gain {gain:.4f} nats/token)")
    if gain <= 0 or (base.eval_loss.hi is not None and base.eval_loss.hi >= zero_shot):
        return Recommendation(False, None, f"Cannot recommend: the baseline {baseline!r} is not reliably better "
                              "than the base model (its eval-loss interval reaches the zero-shot loss), so the share "
                              "of its gain a cheaper placement keeps is meaningless.", [ev_base])

    evidence = [ev_base]
    blockers: list[StrategyStats] = []
    chosen = tentative = None
    for s in rows:
        r = s.retained
        if s.strategy == baseline:
            verdict, meets = "the reference (retained 100% by definition)", True
        elif r is None:
            verdict, meets = "no retained improvement (no seed shared with the baseline)", None
        elif r.lo is None:
            verdict, meets = f"undecidable: {r.n} paired seed, no interval", None
        elif r.lo >= threshold:
            verdict, meets = f"meets the {t} threshold (whole interval above it)", True
        elif r.hi < threshold:
            verdict, meets = f"falls short of {t} (whole interval below it)", False
        else:
            verdict, meets = f"undecidable: interval straddles {t}", None
        evidence.append(_evidence(s, verdict))
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
                    f"improvement is at least {t} with 95% confidence ({_retained_text(chosen.retained)}).")
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
