"""Racing: stop, at a rung, the strategies that on the evidence across seeds cannot become the study's answer.

Usage::

    steps = rung_steps([0.25, 0.5], total=30)                  # [8, 15]: optimizer steps of the rungs
    d = decide(rung_values, baseline="all_linear", zero_shot=2.9, threshold=0.95, spec=cfg.race, fraction=0.25)
    d.stopped                                                  # strategy -> the reason, with its numbers

The study's answer is the cheapest strategy whose retained improvement over the base model
(``core.stats.retained_ratios``: (zero-shot - metric) / (zero-shot - baseline's metric), paired by
seed) clears ``threshold`` with its whole interval. A strategy is stopped at a rung only when, at that rung,
the one-sided upper ``race.confidence`` bound of its retained improvement across seeds (Student t over the
paired seeds) is below ``threshold - allowance(race.slack, fraction)``, the allowance being
``race.slack * (1 - fraction)**2``: the bound is then far below what a recommendation needs, with room left for
the catch-up that training's remaining share could bring (a strategy that learns more slowly at first, e.g. a
low-rank or top-block one, gains on the baseline later). The allowance falls with the square of the remaining
share because the measured catch-up does (BENCHMARKS.md#racing: up to 16 points from a quarter of the steps,
6 from half, as the curves flatten under the decaying learning rate). Never
stopped: the baseline; a strategy with fewer than 2 seeds paired with the baseline (one seed's noise is not
evidence); any strategy while the baseline has not improved on the base model in every seed at the rung
(retained improvement is then undefined). The learning-rate schedule is the whole run's, so a survivor's
numbers are the ones it gets in a study without racing. Torch-free.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass, field
from typing import Callable

from loraplace.core.metrics import QUALITY
from loraplace.core.stats import retained_ratios, upper_bound
from loraplace.store import keys
from loraplace.store.claims import requeue
from loraplace.store.db import DONE, FAILED, PAUSED, PENDING, STOPPED, UPSERT_META, now
from loraplace.store.schema import transaction


def rung_steps(fractions: list[float], total: int) -> list[int]:
    """The optimizer steps at which rungs fall: round(fraction x total), at least 1, below ``total``, each once."""
    steps = sorted({min(total - 1, max(1, round(f * total))) for f in fractions})
    return [s for s in steps if 0 < s < total]


@dataclass
class Decision:
    """What racing decided at one rung, and the numbers behind it, per strategy."""

    step: int
    fraction: float
    bar: float  # the retained improvement a strategy's upper bound had to reach to go on
    stopped: dict[str, str] = field(default_factory=dict)  # strategy -> why (one line, with the numbers)
    kept: dict[str, str] = field(default_factory=dict)  # strategy -> why it goes on
    retained: dict[str, dict] = field(default_factory=dict)  # strategy -> {"mean", "upper", "n"} at the rung

    def reason(self, trial) -> str | None:
        """Why this decision stops ``trial`` (a ``store.db.TrialRecord``): its strategy's reason, or None."""
        return self.stopped.get(trial.strategy)

    def to_dict(self) -> dict:
        return {"step": self.step, "fraction": self.fraction, "bar": self.bar, "stopped": dict(self.stopped),
                "kept": dict(self.kept), "retained": dict(self.retained)}

    @classmethod
    def from_dict(cls, d: dict) -> "Decision":
        return cls(int(d["step"]), float(d["fraction"]), float(d["bar"]), dict(d.get("stopped", {})),
                   dict(d.get("kept", {})), dict(d.get("retained", {})))


def allowance(slack: float, fraction: float) -> float:
    """The catch-up allowed for at a rung ``fraction`` of the way through training, as retained improvement
    (a share of the baseline's): ``slack`` scaled by the square of the remaining share of the steps."""
    return slack * (1.0 - fraction) ** 2


def decide(values: dict[str, dict[int, float]], baseline: str, zero_shot: float | None, threshold: float, spec,
           fraction: float, step: int, metric: str = "eval_loss") -> Decision:
    """The decision at one rung. ``values``: strategy -> {seed: the rung's value of ``metric``} for the strategies
    still racing (the baseline among them); ``spec``: the study's ``RaceSpec``; ``zero_shot``: the base model's
    value of ``metric``."""
    bar = threshold - allowance(spec.slack, fraction)
    d = Decision(step, fraction, bar)
    label = QUALITY[metric].label
    base = values.get(baseline, {})
    for name in sorted(values):
        if name == baseline:
            d.kept[name] = "the baseline is never stopped"
            continue
        seeds = sorted(set(values[name]) & set(base))
        if len(seeds) < 2:
            d.kept[name] = f"{len(seeds)} seed(s) paired with {baseline}: one seed's noise is no evidence"
            continue
        if zero_shot is None:
            d.kept[name] = "no zero-shot value: retained improvement is undefined"
            continue
        ratios = retained_ratios({s: values[name][s] for s in seeds}, {s: base[s] for s in seeds}, zero_shot,
                                 QUALITY[metric].higher_is_better)
        if ratios is None:
            d.kept[name] = f"{baseline} has not improved on the base model's {label} in every seed at this rung"
            continue
        mean, upper = sum(ratios.values()) / len(ratios), upper_bound(list(ratios.values()), spec.confidence)
        d.retained[name] = {"mean": mean, "upper": upper, "n": len(seeds)}
        numbers = (f"retained improvement in {label} at step {step} ({100 * fraction:.0f}% of the steps) "
                   f"{100 * mean:.1f}%, upper {100 * spec.confidence:.0f}% bound {100 * upper:.1f}% over "
                   f"{len(seeds)} seeds")
        if upper < bar:
            d.stopped[name] = (f"{numbers} < {100 * bar:.1f}% (threshold {100 * threshold:.0f}% less a catch-up "
                               f"allowance of {100 * (threshold - bar):.1f} points)")
        else:
            d.kept[name] = f"{numbers} >= {100 * bar:.1f}%"
    return d


# -- in a study: deciding each racing rung once, when every trial still racing has reached it -------------
@dataclass
class Race:
    """A set of trials racing under one rule: the study's trials under ``race.at`` (``study_race``), or the
    learning-rate search's under ``tune.at`` (``study.tune``). ``decide(racing, step, fraction)`` gives the
    decision at a rung from the trials still racing (``store.db.TrialRecord``s paused there); a decision has
    ``reason(trial)`` (why that trial stops, or None) and ``to_dict()``."""

    meta: str  # the meta key its decisions are kept under
    key: str  # what its decisions depend on: other settings (or trials) race anew
    ids: frozenset[str]  # its trials
    at: list[float]  # its racing rungs, fractions of a trial's steps
    decide: Callable
    keep_checkpoints: bool = False


def race_key(cfg, trial_ids) -> str:
    """What a study's decisions depend on (``store.keys.KINDS["race"]``): its trials, racing settings and
    recommendation settings."""
    return keys.key("race", cfg, trials=sorted(trial_ids))


def study_race(cfg, trial_ids, zero_shot: float | None) -> Race:
    """The study's own race: its (final) trials stop by strategy when they cannot become the answer (``decide``)."""
    metric = cfg.analysis.metric

    def at_rung(racing, step: int, fraction: float) -> Decision:
        values: dict[str, dict[int, float]] = {}
        for t in racing:
            ev = dict(t.evals).get(step)  # a trial past the rung without an evaluation there (other rungs) is left out
            if ev is not None and metric in ev:
                values.setdefault(t.strategy, {})[int(t.seed)] = float(ev[metric])
        return decide(values, cfg.baseline, zero_shot, cfg.threshold, cfg.race, fraction, step, metric)

    return Race("race", race_key(cfg, trial_ids), frozenset(trial_ids), list(cfg.race.at), at_rung,
                cfg.race.keep_checkpoints)


def decisions(store) -> list[Decision]:
    """The study's racing decisions so far, rung by rung (none for a study that does not race)."""
    return [Decision.from_dict(d) for d in (store.get_meta("race") or {}).get("decisions", [])]


def decide_ready(store, race: Race, total: int) -> list:
    """Decide every racing rung of ``race`` that every trial still racing has reached and that is not decided yet,
    each in one transaction (so of several processes exactly one decides it): the trials a decision stops become
    ``stopped`` (their checkpoints removed unless ``keep_checkpoints``), the paused survivors ``pending``.
    Returns the decisions made now."""
    made = []
    fractions = {rung_steps([f], total)[0]: f for f in race.at if rung_steps([f], total)}
    for step in rung_steps(race.at, total):
        with transaction(store.conn):
            d = _decide_rung(store, race, step, fractions[step])
        if d is None:
            break  # later rungs wait for this one
        if d is not True:
            made.append(d)
            _remove_checkpoints(store, race, d)
    return made


def restart(store, race: Race) -> None:
    """A race run again with other settings (or other trials) races anew: its trials stopped or paused under the
    old decisions go back to pending, from their checkpoints where those are kept."""
    meta = store.get_meta(race.meta)
    if not meta or meta.get("key") == race.key:
        return
    requeue(store, [t.trial_id for t in _trials(store, race) if t.status in (STOPPED, PAUSED)])
    store.put_meta(race.meta, {"key": race.key, "decisions": []})


def _trials(store, race: Race):
    return [t for t in store.trials() if t.trial_id in race.ids]


def _decide_rung(store, race: Race, step: int, fraction: float):
    """Inside a write transaction: True when rung ``step`` is decided already, None when some trial still racing
    has not reached it, else the decision (applied to the trials and kept in meta ``race.meta``)."""
    meta = store.get_meta(race.meta) or {}
    if meta.get("key") != race.key:
        meta = {"key": race.key, "decisions": []}
    if any(int(d["step"]) == step for d in meta["decisions"]):
        return True
    racing = [t for t in _trials(store, race) if t.status not in (FAILED, STOPPED)]
    if not racing or any((t.step or 0) < step for t in racing):
        return None  # some trial has not reached the rung yet
    d = race.decide(racing, step, fraction)
    for t in racing:
        why = d.reason(t)
        if why and t.status != DONE:  # a trial finished earlier (another run) keeps its result
            store.conn.execute("UPDATE trials SET status=?, error=?, finished_at=? WHERE trial_id=?",
                               (STOPPED, f"stopped at step {step}: {why}", now(), t.trial_id))
        elif t.status == PAUSED and t.step == step:
            store.conn.execute("UPDATE trials SET status=? WHERE trial_id=?", (PENDING, t.trial_id))
    meta["decisions"].append(d.to_dict())
    store.conn.execute(UPSERT_META, (race.meta, json.dumps(meta, sort_keys=True)))
    return d


def _remove_checkpoints(store, race: Race, d) -> None:
    if race.keep_checkpoints:
        return
    for t in _trials(store, race):
        if t.status == STOPPED and d.reason(t) and t.checkpoint_path:
            shutil.rmtree(store.directory / t.checkpoint_path, ignore_errors=True)
