"""What racing did in a raced study, and what it would have done in a full one (from the rung evaluations).

Usage::

    r = racing(a, trials, decisions)     # a: StudyAnalysis; trials: the study's TrialRecords; its race decisions
    r.lines                              # sentences for the report and the terminal

A full study evaluates every trial at ``race.record`` rungs: at each, the ranking of the strategies (mean over
seeds) is compared with the final one (Kendall's tau), the recommendation is computed as if the rung were the
end, and the racing rule (``study.race.decide``, with the study's settings) is replayed rung after rung; racing
would have been safe when the final recommendation without the strategies it would have stopped is the one the
full study gives. Every recommendation here is ``decision.recommend_for`` with the analysis's own settings
(threshold, metric, analysis.max_forgetting, ...), the function the study's own recommendation comes from.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

from loraplace.analysis.decision import recommend_for
from loraplace.analysis.findings import StudyAnalysis
from loraplace.analysis.study import reanalyze
from loraplace.analysis.text import pct
from loraplace.core.metrics import QUALITY
from loraplace.core.stats import kendall_tau
from loraplace.study.race import Decision, decide, rung_steps
from loraplace.store.db import DONE, STOPPED, TrialRecord


@dataclass
class RungCheck:
    """At one recorded rung of a full study: how the rung predicted the end."""

    step: int
    fraction: float
    tau: float  # Kendall's tau between the strategies' mean values at the rung and at the end
    recommended: str | None  # the recommendation computed on the rung's values (None: undecided)
    would_stop: list[str]  # what the racing rule would have stopped here (after the earlier rungs' stops)


@dataclass
class Racing:
    raced: bool
    lines: list[str] = field(default_factory=list)
    checks: list[RungCheck] = field(default_factory=list)
    safe: bool | None = None  # a full study: would racing (at its recorded rungs) have kept the recommendation
    steps_run: int = 0  # optimizer steps the study's trials ran
    steps_full: int = 0  # what they would have run without racing


def _values(trials: list[TrialRecord], metric: str, step: int | None) -> dict[str, dict[int, float]]:
    """strategy -> {seed: value of ``metric``} at rung ``step`` (None: the end, done trials only)."""
    out: dict[str, dict[int, float]] = {}
    for t in trials:
        v = (t.metrics.get(metric) if t.status == DONE else None) if step is None else dict(t.evals).get(step, {}).get(metric)
        if v is not None:
            out.setdefault(t.strategy, {})[int(t.seed)] = float(v)
    return out


def _mean(d: dict[int, float]) -> float:
    return sum(d.values()) / len(d)


def racing(a: StudyAnalysis, trials: list[TrialRecord], decisions: list[Decision]) -> Racing | None:
    """The racing section of a study analysis ``a``, or None when the study has no rung evaluations to speak of."""
    cfg = a.config
    if cfg is None:
        return None
    metric, label = a.metric, QUALITY[a.metric].label
    total = max((int(t.metrics.get("steps", 0)) for t in trials if t.status == DONE), default=0)
    if decisions or any(t.status == STOPPED for t in trials):
        return _raced(a, trials, decisions, total)
    if not total or not any(t.evals for t in trials):
        return None
    final = _values(trials, metric, None)
    r = Racing(False)
    stopped: set[str] = set()
    zero = a.zero_shot
    for step in rung_steps(cfg.race.record, total):
        fraction = step / total
        at = _values(trials, metric, step)
        common = sorted(s for s in final if s in at)
        tau = kendall_tau([_mean(at[s]) for s in common], [_mean(final[s]) for s in common])
        rec = _recommendation_at(a, trials, step)
        d = decide({s: v for s, v in at.items() if s not in stopped}, cfg.baseline, zero, a.threshold, cfg.race,
                   fraction, step, metric)
        stopped |= set(d.stopped)
        r.checks.append(RungCheck(step, fraction, tau, rec, sorted(d.stopped)))
    final_rec = a.recommendation.strategy if a.recommendation.decided else None
    r.safe = _recommendation_without(a, stopped) == (a.recommendation.decided, final_rec)
    parts = []
    for c in r.checks:
        rec = c.recommended or "no decision"
        stop = ", ".join(c.would_stop) or "nothing"
        parts.append(f"at step {c.step} ({pct(c.fraction)} of the steps) the ranking by {label} agreed with the final "
                     f"one at Kendall's tau {c.tau:.2f}, the recommendation computed there was {rec}, and racing "
                     f"would have stopped {stop}")
    verdict = ("safe: the recommendation without what it stops is the full study's"
               if r.safe else "not safe: what it stops changes the recommendation")
    r.lines.append(f"Would racing have been safe ({', '.join(map(str, cfg.race.record))} of the steps, "
                   f"race.slack={cfg.race.slack}, race.confidence={cfg.race.confidence})? " + "; ".join(parts)
                   + f". {verdict[0].upper() + verdict[1:]}.")
    return r


def _raced(a: StudyAnalysis, trials: list[TrialRecord], decisions: list[Decision], total: int) -> Racing:
    r = Racing(True)
    steps = {t.trial_id: int(t.step or t.metrics.get("steps", 0)) for t in trials}
    r.steps_run = sum(steps.values())
    r.steps_full = total * len(trials) if total else 0
    for d in decisions:
        if d.stopped:
            for name, why in d.stopped.items():
                rungs = "; ".join(f"seed {t.seed}: " + ", ".join(f"step {s}: {k} {v:.4f}" for s, ev in t.evals
                                                                  for k, v in ev.items() if k == a.metric)
                                  for t in trials if t.strategy == name)
                r.lines.append(f"Stopped {name} at step {d.step} ({pct(d.fraction)} of the steps): {why}. "
                               f"Its rung evaluations: {rungs}.")
        else:
            r.lines.append(f"At step {d.step} ({pct(d.fraction)} of the steps) racing stopped nothing.")
    if r.steps_full:
        r.lines.append(f"Racing ran {r.steps_run:,} of the {r.steps_full:,} optimizer steps a full study runs "
                       f"({pct(1 - r.steps_run / r.steps_full)} saved); the survivors' numbers are the ones a full "
                       "study gives them.")
    return r


def _recommendation_at(a: StudyAnalysis, trials: list[TrialRecord], step: int) -> str | None:
    """The recommendation computed as if the study ended at rung ``step`` (the rung's values as final)."""
    at = []
    for t in trials:
        ev = dict(t.evals).get(step)
        if t.status == DONE and ev is not None:
            at.append(replace(t, metrics={**t.metrics, **ev}))
    if not at:
        return None
    b = reanalyze(a, at)
    return b.recommendation.strategy if b.recommendation.decided else None


def _recommendation_without(a: StudyAnalysis, stopped: set[str]) -> tuple[bool, str | None]:
    """The final recommendation when ``stopped`` strategies count as falling short (they were stopped)."""
    rows = [replace(s, stopped={"step": 0, "reason": "would have been stopped"}) if s.strategy in stopped else s
            for s in a.strategies]
    rec = recommend_for(a, rows)
    return rec.decided, rec.strategy if rec.decided else None
