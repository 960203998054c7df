"""The recommendation: the cheapest strategy that keeps the threshold's share of the baseline's improvement.

Usage::

    rec = recommend(rows, baseline="all_linear", zero_shot=2.9, threshold=0.95)   # rows: in analyze's order
    rec = recommend_for(a)         # with a StudyAnalysis's own settings: what analyze and racing's checks call
    rec.decided, rec.strategy, rec.text, rec.evidence, rec.cost

Cost is the trainable parameter count, in tiers (``cost_tiers``): from the smallest count up, a tier holds every
count at most (1 + tol) / (1 - tol) times its smallest (tol = ``placement.resolve.BUDGET_TOLERANCE``, 5%: two counts
that could both be within the tolerance of one budget, so at most 10.5% apart), so the strategies of a budget-matched
study are one cost and budget matching's rounding never makes one cheaper. Within a tier rows keep the order given
(``analyze`` gives the study config's), and the walk below takes the baseline first. Train time orders nothing: it
changes from run to run, so a rerun of the same study could otherwise recommend another strategy.

Tiers are walked cheapest first; the first tier holding a strategy whose retained-improvement interval
(``core.stats``) lies wholly at or above the threshold gives the choice:

* the baseline, when it is in that tier and meets it, unless equally cheap strategies that also meet the threshold
  are reliably better than it (the paired delta in the metric wholly on the good side of 0): then the one of those
  that improves most ("at the same cost, X is better"), since at one cost the better placement is the answer;
* else the tier's first strategy (in that order) that meets it.

No choice is made when a strategy of a cheaper tier cannot be ruled in or out (its interval straddles the
threshold, or it has < 2 paired seeds): then the text says why. An equally cheap strategy never blocks the choice.
"""

from __future__ import annotations

import math

from loraplace.analysis.findings import Recommendation, StrategyStats, StudyAnalysis
from loraplace.analysis.text import accuracy_text, delta_text, interval_text, pct, retained_text
from loraplace.core.metrics import QUALITY
from loraplace.placement.resolve import BUDGET_TOLERANCE

TIER = (1 + BUDGET_TOLERANCE) / (1 - BUDGET_TOLERANCE)  # the widest ratio of two counts within tol of one budget


def cost_rule() -> str:
    """What "cheaper" means, in one sentence (the report shows it under the recommendation; methods says it)."""
    return (f"Cheaper means fewer trainable parameters beyond budget matching's {BUDGET_TOLERANCE:.0%} tolerance "
            f"(counts up to {TIER - 1:.1%} above the smallest of their group, both within {BUDGET_TOLERANCE:.0%} of "
            "one budget, are one cost); among equal costs the baseline is preferred unless an equally cheap strategy "
            "is reliably better than it (its paired delta wholly on the better side of 0), then the study's strategy "
            "order decides, never train time.")


def _count(s: StrategyStats) -> float:
    return s.mean("trainable_params")


def cost_tiers(rows: list[StrategyStats]) -> list[list[StrategyStats]]:
    """``rows`` grouped by cost, cheapest tier first (module doc); within a tier rows keep their given order. A row
    without a trainable count is a tier of its own, after the others."""
    counted = sorted((s for s in rows if math.isfinite(_count(s))), key=_count)
    tiers: list[list[StrategyStats]] = []
    floor = math.nan
    for s in counted:
        if not tiers or _count(s) > floor * TIER:
            tiers.append([])
            floor = _count(s)
        tiers[-1].append(s)
    given = {id(s): i for i, s in enumerate(rows)}
    return [sorted(t, key=lambda s: given[id(s)]) for t in tiers] + [[s] for s in rows if not math.isfinite(_count(s))]


def _evidence(s: StrategyStats, verdict: str, metric: str = "eval_loss") -> str:
    parts = [f"{s.strategy}: {s.mean('trainable_params'):,.0f} trainable params"]
    if "trainable_pct" in s.metrics:
        parts[0] += f" ({s.mean('trainable_pct'):.3g}% of base)"
    if s.stopped is not None:
        return "; ".join(parts) + f"; {s.stopped['reason']} -> {verdict}"
    parts.append(f"eval loss {interval_text(s.eval_loss)}")
    if s.accuracy is not None:
        parts.append(f"accuracy {accuracy_text(s.accuracy, s.wilson(), s.mean('accuracy_n'))}")
    if s.retained is not None:
        parts.append(f"retained improvement ({QUALITY[metric].label}) {retained_text(s.retained)}")
    if s.paired is not None:
        parts.append(delta_text(s.paired, "loss"))
    if s.paired_accuracy is not None:
        parts.append(delta_text(s.paired_accuracy, "accuracy", "{:+.1f}", 100, " pp"))
    if s.forgetting is not None:
        parts.append(f"forgetting {interval_text(s.forgetting)} nats/token")
    return "; ".join(parts) + f" -> {verdict}"


def _verdict(s: StrategyStats, baseline: str, threshold: float, metric: str,
             max_forgetting: float | None) -> tuple[str, bool | None]:
    """(what the evidence line says, whether s meets the threshold: True, False, or None = cannot tell)."""
    t, r = pct(threshold), s.retained
    too_much = max_forgetting is not None and s.forgetting is not None and s.forgetting.mean > max_forgetting
    if s.strategy == baseline and too_much:
        return (f"the reference, left out: it forgets {s.forgetting.mean:.4f} nats/token, more than "
                f"analysis.max_forgetting={max_forgetting}"), False
    if s.strategy == baseline:
        return "the reference (retained 100% by definition)", True
    if s.stopped is not None:
        return f"stopped by racing at step {s.stopped['step']}, so it falls short", False
    if too_much:
        return (f"left out: it forgets {s.forgetting.mean:.4f} nats/token, more than "
                f"analysis.max_forgetting={max_forgetting}"), False
    if r is None:
        why = "no accuracy" if metric == "accuracy" and s.accuracy is None else "no seed shared with the baseline"
        return f"no retained improvement ({why})", None
    if r.lo is None:
        return f"undecidable: {r.n} paired seed, no interval", None
    if r.lo >= threshold:
        return f"meets the {t} threshold (whole interval above it)", True
    if r.hi < threshold:
        return f"falls short of {t} (whole interval below it)", False
    return f"undecidable: interval straddles {t}", None


def _paired(s: StrategyStats, metric: str):
    return s.paired_accuracy if metric == "accuracy" else s.paired


def _gain(s: StrategyStats, metric: str) -> float | None:
    """How much better than the baseline s reliably is in ``metric`` (mean paired delta, signed so that more is
    better), or None unless the whole interval of the delta is on the good side of 0."""
    p = _paired(s, metric)
    if p is None or p.diff.lo is None:
        return None
    sign = 1.0 if QUALITY[metric].higher_is_better else -1.0
    good = p.diff.lo > 0 if sign > 0 else p.diff.hi < 0
    return sign * p.diff.mean if good else None


def _names(rows: list[StrategyStats]) -> str:
    return ", ".join(s.strategy for s in rows)


def recommend(
    rows: list[StrategyStats], baseline: str, zero_shot: float | None, threshold: float, metric: str = "eval_loss",
    max_forgetting: float | None = None,
) -> Recommendation:
    """The cheapest strategy whose retained improvement (in ``metric``) is confidently >= threshold
    (see module doc); zero_shot is the base model's value of ``metric``; with ``max_forgetting`` (nats/token)
    a strategy whose mean forgetting is above it is not recommended.

    rows: as ``analysis.study.analyze`` orders them; within a cost tier that order breaks ties."""
    t, cost = pct(threshold), cost_rule()
    base = next((s for s in rows if s.strategy == baseline), None)
    if base is None:
        return Recommendation(False, None, f"Cannot recommend: the baseline {baseline!r} has no finished trial, so no "
                              "strategy can be compared with it.", cost=cost)
    if zero_shot is None:
        what = "accuracy" if metric == "accuracy" else "loss"
        return Recommendation(False, None, f"Cannot recommend: the zero-shot {what} of the base model is unknown, so "
                              "retained improvement cannot be computed.", cost=cost)
    q = base.metrics.get(metric)
    if metric == "accuracy":
        if q is None:
            return Recommendation(False, None, f"Cannot recommend: the baseline {baseline!r} has no accuracy, so no "
                                  "strategy can be compared with it on accuracy.", cost=cost)
        gain = q.mean - zero_shot
        ev_base = (f"baseline {baseline}: accuracy {accuracy_text(base.accuracy, base.wilson(), base.mean('accuracy_n'))} vs zero-shot {pct(zero_shot)} "
                   f"(gain {100 * gain:+.1f} points)")
        unreliable = gain <= 0 or (q.lo is not None and q.lo <= zero_shot)
    else:
        gain = zero_shot - q.mean
        ev_base = (f"baseline {baseline}: eval loss {interval_text(q)} vs zero-shot {zero_shot:.4f} "
                   f"(gain {gain:.4f} nats/token)")
        unreliable = gain <= 0 or (q.hi is not None and q.hi >= zero_shot)
    if unreliable:
        return Recommendation(False, None, f"Cannot recommend: the baseline {baseline!r} is not reliably better "
                              f"than the base model (its {QUALITY[metric].label.replace(' ', '-')} interval reaches the "
                              f"zero-shot {'accuracy' if metric == 'accuracy' else 'loss'}), so the share "
                              "of its gain a cheaper placement keeps is meaningless.", [ev_base], cost=cost)

    evidence = [ev_base]
    blockers: list[StrategyStats] = []  # undecided strategies of cheaper tiers than the choice's
    chosen = tentative = None
    tier: list[StrategyStats] = []
    meeting: list[StrategyStats] = []
    cheaper = False  # whether a tier cheaper than the choice's exists
    for i, tier in enumerate(cost_tiers(rows)):
        tier = sorted(tier, key=lambda s: s.strategy != baseline)  # stable: the baseline first, then the given order
        meeting, undecided = [], []
        for s in tier:
            verdict, meets = _verdict(s, baseline, threshold, metric, max_forgetting)
            evidence.append(_evidence(s, verdict, metric))
            if tentative is None and (s.strategy == baseline or (s.retained is not None and s.retained.mean >= threshold)):
                tentative = s.strategy
            if meets is None:
                undecided.append(s)
            elif meets:
                meeting.append(s)
        if meeting:
            chosen, cheaper = meeting[0], i > 0
            break
        blockers += undecided

    better = []  # equally cheap strategies that meet the threshold and are reliably better than the baseline
    if chosen is base:
        better = sorted((s for s in meeting[1:] if _gain(s, metric) is not None),
                        key=lambda s: -_gain(s, metric))  # stable: equal gains keep the tier's order
        chosen = better[0] if better else base

    if not blockers and chosen is None:
        return Recommendation(False, None, f"Cannot recommend: no strategy keeps at least {t} of {baseline}'s "
                              f"improvement within analysis.max_forgetting={max_forgetting} nats/token of forgetting.",
                              evidence, cost=cost)
    if not blockers:
        text = _decided_text(chosen, base, tier, meeting, better, cheaper, t, metric)
        return Recommendation(True, chosen.strategy, text, evidence, cost=cost)

    names = _names(blockers)
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
                          tentative=tentative, cost=cost)


def _decided_text(chosen: StrategyStats, base: StrategyStats, tier: list[StrategyStats], meeting: list[StrategyStats],
                  better: list[StrategyStats], cheaper: bool, t: str, metric: str) -> str:
    """The sentence of a decided recommendation (module doc: the baseline, one better at its cost, or the cheapest)."""
    b, label = base.strategy, QUALITY[metric].label
    also = [s for s in meeting if s is not chosen and s is not base]  # equally cheap, also meeting the threshold
    if chosen is base:
        text = (f"Use {b} (the baseline): no cheaper strategy keeps at least {t} of its improvement over the base "
                "model." if cheaper else f"Use {b} (the baseline): no strategy is cheaper.")
        mates = [s for s in tier if s is not base]
        if mates:
            text += f" None of the equally cheap {_names(mates)} is reliably better in {label}"
            text += f" ({_names(also)} also keep{'s' if len(also) == 1 else ''} at least {t})." if also else "."
        return text
    if better and chosen is better[0]:
        p = _paired(chosen, metric)
        delta = (delta_text(p, "accuracy", "{:+.1f}", 100, " pp") if metric == "accuracy" else delta_text(p, "loss"))
        text = (f"Use {chosen.strategy}: at the same cost as the baseline {b} ({chosen.mean('trainable_params'):,.0f} vs "
                f"{base.mean('trainable_params'):,.0f} trainable params), {chosen.strategy} is better: {delta}; it "
                f"keeps {retained_text(chosen.retained)} of {b}'s improvement in {label}.")
        if cheaper:
            text += f" No cheaper strategy keeps at least {t} of it."
        if len(better) > 1:
            text += f" {_names(better[1:])} {'is' if len(better) == 2 else 'are'} also reliably better, by less."
        return text
    text = (f"Use {chosen.strategy}: it is the cheapest strategy ({chosen.mean('trainable_params'):,.0f} "
            f"trainable params vs {base.mean('trainable_params'):,.0f} for {b}) whose retained "
            f"improvement in {label} is at least {t} with 95% confidence ({retained_text(chosen.retained)}).")
    if also:
        text += (f" {_names(also)} cost{'s' if len(also) == 1 else ''} the same and also keep{'s' if len(also) == 1 else ''}"
                 f" at least {t}; the study's strategy order breaks the tie.")
    return text


def recommend_for(a: StudyAnalysis, rows: list[StrategyStats] | None = None) -> Recommendation:
    """The recommendation over ``rows`` (default: a's strategies) with the settings ``a`` was analysed with: its
    baseline, zero-shot value of the metric, threshold, metric and analysis.max_forgetting. ``analyze`` and racing's
    checks both call it, so a check can never use other settings than the real recommendation."""
    return recommend(a.strategies if rows is None else rows, a.baseline, a.zero_shot, a.threshold, a.metric,
                     a.max_forgetting)
