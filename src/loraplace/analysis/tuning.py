"""What the learning-rate search found: each strategy's selection loss over the grid, its chosen rate, and whether
the rate changes the study's answer.

Usage::

    finals = final_trials(trials, meta)          # the trials the study's answer rests on (each at its chosen rate)
    t = summarize(trials, meta, cfg)             # None for an untuned study
    t.curves["mlp_only"], t.lines                # per rate: selection loss over the tuning seeds; report sentences

``meta`` is the study's meta ``tune`` (``study.tune``): the grid, the tuning seeds, the selection split's size,
every tuning rung's decision and every strategy's choice. Torch-free.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from loraplace.analysis.findings import Recommendation, StudyAnalysis
from loraplace.core.metrics import QUALITY
from loraplace.core.stats import Interval, t_interval
from loraplace.store.db import DONE, FAILED, FINAL, STOPPED, TUNE, TrialRecord
from loraplace.core.text import lr_text
from loraplace.study.tune import Choice, Halving, rate_key, suggested_grid


@dataclass
class RatePoint:
    """One strategy at one rate of the grid: its selection value over the tuning seeds, or how it ended."""

    lr: float
    value: Interval | None  # final selection value (mean and interval over tuning seeds); None unless finished
    status: str  # done | stopped (by halving: ``rung`` holds its last rung value) | failed | pending
    rung: tuple[int, float] | None = None  # (step, mean value) where halving stopped it
    forgetting: float | None = None  # mean forgetting of its tuning trials (nats/token)
    error: str = ""


@dataclass
class Tuning:
    grid: list[float]
    seeds: list[int]
    selection: int  # examples in the selection split
    rule: str  # how rates were stopped, in words
    curves: dict[str, list[RatePoint]]  # strategy -> one point per rate, in grid order
    choices: dict[str, Choice]
    halvings: list[Halving] = field(default_factory=list)
    steps_run: int = 0  # optimizer steps the tuning trials ran
    steps_full: int = 0  # what an exhaustive grid runs
    lines: list[str] = field(default_factory=list)

    def chosen(self, strategy: str) -> float | None:
        c = self.choices.get(strategy)
        return None if c is None else c.lr

    @property
    def edges(self) -> list[str]:
        return [t for c in self.choices.values() if (t := c.edge_text())]


def final_trials(trials: list[TrialRecord], meta: dict | None) -> list[TrialRecord]:
    """The trials a study's answer rests on: final-phase trials, and in a tuned study only each strategy's trials at
    its chosen rate (the others: tuning trials, and final trials at the baseline's rate for the comparison)."""
    finals = [t for t in trials if t.phase == FINAL]
    chosen = {s: c.get("lr") for s, c in ((meta or {}).get("choices") or {}).items()}
    if not chosen:
        return finals
    return [t for t in finals if t.strategy not in chosen or _same(t.lr, chosen[t.strategy])]


def trials_at(trials: list[TrialRecord], lr: float) -> list[TrialRecord]:
    """Final-phase trials trained at peak rate ``lr`` (the comparison at the baseline's rate)."""
    return [t for t in trials if t.phase == FINAL and _same(t.lr, lr)]


def _same(a: float | None, b: float | None) -> bool:
    return a is not None and b is not None and rate_key(a) == rate_key(b)


def summarize(trials: list[TrialRecord], meta: dict | None, metric: str = "eval_loss") -> Tuning | None:
    """The search's summary from the study's tuning trials and meta ``tune`` (None when the study did not tune)."""
    if not meta or not meta.get("grid"):
        return None
    grid = [float(x) for x in meta["grid"]]
    halvings = [Halving.from_dict(d) for d in meta.get("decisions", [])]
    choices = {s: Choice.from_dict(c) for s, c in (meta.get("choices") or {}).items()}
    tune = [t for t in trials if t.phase == TUNE]
    curves: dict[str, list[RatePoint]] = {}
    for name in dict.fromkeys(t.strategy for t in tune):
        points = []
        for lr in grid:
            ts = [t for t in tune if t.strategy == name and _same(t.lr, lr)]
            points.append(_point(lr, ts, metric))
        curves[name] = points
    total = int(meta.get("total_steps") or 0)
    t = Tuning(grid, [int(s) for s in meta.get("seeds", [])], int(meta.get("selection", 0)), str(meta.get("rule", "")),
               curves, choices, halvings)
    t.steps_full = total * len(tune)
    t.steps_run = sum(int(x.step or x.metrics.get("steps", 0) or 0) for x in tune)
    t.lines = _lines(t, metric)
    return t


def _point(lr: float, ts: list[TrialRecord], metric: str) -> RatePoint:
    if not ts:
        return RatePoint(lr, None, "pending")
    failed = [t for t in ts if t.status == FAILED]
    if failed:
        return RatePoint(lr, None, "failed", error=failed[0].error or "")
    stopped = [t for t in ts if t.status == STOPPED]
    if stopped:
        step = min(int(t.step or 0) for t in stopped)
        vals = [dict(t.evals).get(step, {}).get(metric) for t in stopped]
        vals = [float(v) for v in vals if v is not None]
        return RatePoint(lr, None, "stopped", rung=(step, sum(vals) / len(vals)) if vals else None)
    if all(t.status == DONE and metric in t.metrics for t in ts):
        forget = [float(t.metrics["forgetting"]) for t in ts if "forgetting" in t.metrics]
        return RatePoint(lr, t_interval([float(t.metrics[metric]) for t in ts]), "done",
                         forgetting=sum(forget) / len(forget) if len(forget) == len(ts) else None)
    return RatePoint(lr, None, "pending")


def _lines(t: Tuning, metric: str) -> list[str]:
    label = QUALITY[metric].label
    out = [f"Learning rate: each strategy was trained at {len(t.grid)} peak rates "
           f"({', '.join(lr_text(x) for x in t.grid)}) on the training data less a selection split of {t.selection} "
           f"examples, with tuning seed(s) {', '.join(map(str, t.seeds))}, and its rate is the one with the lowest "
           f"mean selection {'loss' if metric == 'eval_loss' else label} at the end of training; {t.rule}. The eval set "
           "was not used to choose."]
    chosen = [f"{s} {lr_text(c.lr)}" for s, c in t.choices.items() if c.lr is not None]
    if chosen:
        out.append("Chosen rates: " + ", ".join(chosen) + ".")
    none = [s for s, c in t.choices.items() if c.lr is None]
    if none:
        out.append(f"No rate of the grid finished for {', '.join(none)} (every tuning trial diverged or was left out); "
                   "it has no final trials.")
    failed = [f"{name} lr {lr_text(p.lr)}" for name, points in t.curves.items() for p in points if p.status == "failed"]
    if failed:
        out.append(f"Failed tuning trials (out of the search; a non-finite loss is a rate that diverged): "
                   f"{', '.join(failed)}.")
    out += [e + "." for e in t.edges]
    if t.steps_full:
        out.append(f"The search ran {t.steps_run:,} of the {t.steps_full:,} optimizer steps an exhaustive grid runs "
                   f"({100 * (1 - t.steps_run / t.steps_full):.0f}% saved by halving).")
    return out


# -- does the learning rate change the answer? ---------------------------------------------------
@dataclass
class LrComparison:
    """The study's answer at each strategy's own rate beside the answer every strategy gets at the baseline's."""

    lr: float  # the baseline's chosen rate
    own: Recommendation
    shared: Recommendation | None  # None when no trial was trained at that rate for the comparison
    missing: list[str]  # strategies without a finished trial at the baseline's rate
    flips: bool | None  # whether the verdict differs (None: not measured)
    lines: list[str] = field(default_factory=list)


def _verdict(r: Recommendation) -> str:
    return r.strategy if r.decided and r.strategy else "no decision"


def _ranking(a: StudyAnalysis) -> str:
    label = QUALITY[a.metric]
    rows = [s for s in a.strategies if s.stopped is None and a.metric in s.metrics]
    rows.sort(key=lambda s: s.mean(a.metric), reverse=label.higher_is_better)
    return " < ".join(s.strategy for s in rows) if not label.higher_is_better else " > ".join(s.strategy for s in rows)


def compare(a: StudyAnalysis, at_rate: StudyAnalysis | None, lr: float, strategies: list[str]) -> LrComparison:
    """``a``: the study at each strategy's chosen rate; ``at_rate``: the same analysis over the final trials every
    strategy trained at the baseline's chosen rate ``lr`` (None when there are none)."""
    own = a.recommendation
    if at_rate is None:
        c = LrComparison(lr, own, None, list(strategies), None)
        c.lines = [f"Does the learning rate change the answer? Not measured: no strategy other than the baseline "
                   f"was trained at the baseline's chosen rate ({lr_text(lr)}); `tune.compare=true` trains them."]
        return c
    have = {s.strategy for s in at_rate.strategies if s.stopped is None}
    missing = [s for s in strategies if s not in have]
    if all(s.lr is not None and rate_key(s.lr) == rate_key(lr) for s in a.strategies):
        c = LrComparison(lr, own, at_rate.recommendation, missing, False)
        c.lines = [f"Does the learning rate change the answer? Every strategy chose the baseline's rate ({lr_text(lr)}), "
                   "so a study with that one shared rate gives this answer."]
        return c
    c = LrComparison(lr, own, at_rate.recommendation, missing, _verdict(own) != _verdict(at_rate.recommendation))
    head = (f"Does the learning rate change the answer? At each strategy's own rate: {own.text} With every strategy "
            f"at the baseline's chosen rate ({lr_text(lr)}), as a study with one shared rate would train them: "
            f"{at_rate.recommendation.text}")
    # with missing strategies (tune.compare=false), only those that happen to have trials there were compared
    scope = (f", among the {len(strategies) - len(missing)} of {len(strategies)} strategies trained there "
             "(`tune.compare=true` trains the rest)" if missing else "")
    verdict = ("The verdict flips: the shared rate favours another answer than each strategy's own rate"
               if c.flips else "The verdict holds: the answer is the same at the shared rate") + scope + "."
    c.lines = [head, verdict,
               f"Ranking by {QUALITY[a.metric].label} at their own rates: {_ranking(a)}; at {lr_text(lr)}: "
               f"{_ranking(at_rate)}."]
    if missing:
        c.lines.append(f"Missing at {lr_text(lr)} (no finished trial): {', '.join(missing)}.")
    return c


def untuned_note(lr: float, out: str) -> str:
    """What the recommendation of an untuned study adds: the rate was shared, and the command that tunes it."""
    grid = ",".join(lr_text(x) for x in suggested_grid(lr))
    return (f" Every strategy trained at one shared learning rate (train.lr={lr_text(lr)}), not tuned per strategy, so a "
            f"placement that wants another rate is judged at this one; `loraplace study {out}/config.yaml "
            f"'tune.lr=[{grid}]'` gives each strategy its own rate, chosen on held-out training data.")
