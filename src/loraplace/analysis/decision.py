"""The recommendation: the cheapest strategy that keeps the threshold's share of the baseline's improvement.

Usage::

    rec = recommend(rows, baseline="all_linear", zero_shot=2.9, threshold=0.95)   # rows: cheapest first
    rec.decided, rec.strategy, rec.text, rec.evidence

Walk strategies from cheapest (fewest trainable params) up; the first whose retained-improvement
interval (``core.stats``) lies wholly at or above the threshold is chosen, unless a cheaper one
cannot be ruled in or out (its interval straddles the threshold, or it has < 2 paired seeds): then no
choice is made and the text says why.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from loraplace.analysis.text import accuracy_text, delta_text, interval_text, pct, retained_text
from loraplace.core.metrics import QUALITY

if TYPE_CHECKING:
    from loraplace.analysis.study import StrategyStats


@dataclass
class Recommendation:
    decided: bool
    strategy: str | None  # the choice, when decided
    text: str  # plain statement of the choice or of why none can be made
    evidence: list[str] = field(default_factory=list)  # the numbers behind it, one line each
    fallback: str | None = None  # cheapest strategy known to meet the threshold, when undecided
    tentative: str | None = None  # point-estimate pick when there are no intervals (not evidence)


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


def recommend(
    rows: list[StrategyStats], baseline: str, zero_shot: float | None, threshold: float, metric: str = "eval_loss",
    max_forgetting: float | None = None,
) -> Recommendation:
    """The cheapest strategy whose retained improvement (in ``metric``) is confidently >= threshold
    (see module doc); zero_shot is the base model's value of ``metric``; with ``max_forgetting`` (nats/token)
    a strategy whose mean forgetting is above it is not recommended.

    rows must be ordered cheapest first."""
    t = pct(threshold)
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
                              "of its gain a cheaper placement keeps is meaningless.", [ev_base])

    evidence = [ev_base]
    blockers: list[StrategyStats] = []
    chosen = tentative = None
    for s in rows:
        r = s.retained
        too_much = max_forgetting is not None and s.forgetting is not None and s.forgetting.mean > max_forgetting
        if s.strategy == baseline and too_much:
            verdict, meets = (f"the reference, left out: it forgets {s.forgetting.mean:.4f} nats/token, more than "
                              f"analysis.max_forgetting={max_forgetting}"), False
        elif s.strategy == baseline:
            verdict, meets = "the reference (retained 100% by definition)", True
        elif s.stopped is not None:
            verdict, meets = f"stopped by racing at step {s.stopped['step']}, so it falls short", False
        elif too_much:
            verdict, meets = (f"left out: it forgets {s.forgetting.mean:.4f} nats/token, more than "
                              f"analysis.max_forgetting={max_forgetting}"), False
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

    if not blockers and chosen is None:
        return Recommendation(False, None, f"Cannot recommend: no strategy keeps at least {t} of {baseline}'s "
                              f"improvement within analysis.max_forgetting={max_forgetting} nats/token of forgetting.",
                              evidence)
    if not blockers:
        if chosen.strategy == baseline:
            text = (f"Use {baseline} (the baseline): no cheaper strategy keeps at least {t} of its improvement over "
                    "the base model.")
        else:
            text = (f"Use {chosen.strategy}: it is the cheapest strategy ({chosen.mean('trainable_params'):,.0f} "
                    f"trainable params vs {base.mean('trainable_params'):,.0f} for {baseline}) whose retained "
                    f"improvement in {QUALITY[metric].label} is at least {t} with 95% confidence "
                    f"({retained_text(chosen.retained)}).")
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
