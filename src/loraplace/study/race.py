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

from loraplace.core.identity import digest
from loraplace.core.metrics import QUALITY
from loraplace.core.stats import retained_ratios, upper_bound
from loraplace.store.db import DONE, FAILED, PAUSED, PENDING, STOPPED, UPSERT_META, now


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
def race_key(cfg, trial_ids) -> str:
    """What a study's decisions depend on: its trials, racing settings and recommendation settings."""
    return digest({"trials": sorted(trial_ids), "race": {k: getattr(cfg.race, k) for k in ("at", "confidence", "slack")},
                   "threshold": cfg.threshold, "metric": cfg.analysis.metric, "baseline": cfg.baseline})


def decisions(store) -> list[Decision]:
    """The study's racing decisions so far, rung by rung (none for a study that does not race)."""
    meta = store.get_meta("race") or {}
    return [Decision.from_dict(d) for d in meta.get("decisions", [])]


def decide_ready(store, cfg, total: int, zero_shot: float | None) -> list[Decision]:
    """Decide every racing rung that every trial still racing has reached and that is not decided yet, each in
    one transaction (so of several processes exactly one decides it): the stopped strategies' trials become
    ``stopped`` (their checkpoints removed unless ``race.keep_checkpoints``), the paused survivors ``pending``.
    Returns the decisions made now."""
    made = []
    fractions = {rung_steps([f], total)[0]: f for f in cfg.race.at if rung_steps([f], total)}
    for step in rung_steps(cfg.race.at, total):
        conn = store.conn
        conn.execute("BEGIN IMMEDIATE")
        try:
            d = _decide_rung(store, cfg, step, fractions[step], zero_shot)
            conn.execute("COMMIT")
        except BaseException:
            conn.execute("ROLLBACK")
            raise
        if d is None:
            break  # later rungs wait for this one
        if d is not True:
            made.append(d)
            _remove_checkpoints(store, cfg, d)
    return made


def _decide_rung(store, cfg, step: int, fraction: float, zero_shot: float | None):
    """Inside a write transaction: True when rung ``step`` is decided already, None when some trial still racing
    has not reached it, else the Decision (applied to the trials and kept in meta ``race``)."""
    key = race_key(cfg, store.trial_ids())
    meta = store.get_meta("race") or {}
    if meta.get("key") != key:
        meta = {"key": key, "decisions": []}
    if any(int(d["step"]) == step for d in meta["decisions"]):
        return True
    racing = [t for t in store.current_trials() if t.status not in (FAILED, STOPPED)]
    if not racing or any((t.step or 0) < step for t in racing):
        return None  # some trial has not reached the rung yet
    # a trial already past the rung without an evaluation there (the rungs changed since it ran) is left out
    at = {t.trial_id: dict(t.evals).get(step) for t in racing if dict(t.evals).get(step) is not None}
    values: dict[str, dict[int, float]] = {}
    for t in racing:
        if cfg.analysis.metric in at.get(t.trial_id, {}):
            values.setdefault(t.strategy, {})[int(t.seed)] = float(at[t.trial_id][cfg.analysis.metric])
    d = decide(values, cfg.baseline, zero_shot, cfg.threshold, cfg.race, fraction, step, cfg.analysis.metric)
    for t in racing:
        if t.strategy in d.stopped and t.status != DONE:  # a trial finished earlier (another run) keeps its result
            store.conn.execute("UPDATE trials SET status=?, error=?, finished_at=? WHERE trial_id=?",
                               (STOPPED, f"stopped at step {step}: {d.stopped[t.strategy]}", now(), t.trial_id))
        elif t.status == PAUSED and t.step == step:
            store.conn.execute("UPDATE trials SET status=? WHERE trial_id=?", (PENDING, t.trial_id))
    meta["decisions"].append(d.to_dict())
    store.conn.execute(UPSERT_META, ("race", json.dumps(meta, sort_keys=True)))
    return d


def _remove_checkpoints(store, cfg, d: Decision) -> None:
    if cfg.race.keep_checkpoints:
        return
    for t in store.current_trials():
        if t.strategy in d.stopped and t.checkpoint_path:
            shutil.rmtree(store.directory / t.checkpoint_path, ignore_errors=True)

