"""The learning-rate search: each strategy at every rate of ``tune.lr`` on a selection split, its rate chosen there.

Usage::

    tasks = plan_tuning(cfg, placements)          # one TrialTask per strategy, rate and tuning seed (phase "tune")
    d = halve(values, spec, step=8, fraction=0.25) # a tuning rung: the clearly worse rates of each strategy stop
    choices = choose(cfg, trials)                  # strategy -> Choice: its rate, the grid's selection losses

A tuning trial is a trial like any other (claimed, checkpointed at rungs, resumable, on either engine and
executor, tracked), with two differences that make it one: it trains on the training data less the selection
split (``tune.selection`` examples of the training data, the last ones of its seeded shuffle) and is evaluated on
that split, never on the eval set; and its learning rate is a grid point. Its config says ``"phase": "tune"`` and
names the selection split, so its id differs from every final trial's.

Successive halving (``tune.at``): at each tuning rung, within each strategy, the rates still in the search are
ranked by their mean selection loss over the tuning seeds at that rung, and only the best ``ceil(tune.keep x n)``
(at least ``tune.min_keep``) go on; a rate whose trial diverged (non-finite loss) is out of the search, not a
failure of the study. Every surviving rate trains to the end of the whole run's schedule, so its final selection
loss is the one it gets in an exhaustive search (``tune.at: []``). The chosen rate of a strategy is the one with
the lowest mean final selection loss over the tuning seeds; with ``analysis.max_forgetting``, among the rates
whose tuning trials forget no more than that on average. The final trials then train at the chosen rate and are
evaluated on the eval set. With ``tune.reuse`` (the default) they train on the search's data, so a tuning trial
whose seed is a study seed already did its final trial's training: it keeps snapshots at that trial's rungs and end,
and the final trial is read from them and evaluated (``replays``), not trained again; the tuning trial itself is
never evaluated on the eval set. Without it they train on the whole training set, exactly as an untuned study at
that ``train.lr`` would train them (the same trial ids).
"""

from __future__ import annotations

import math
import shutil
from dataclasses import dataclass, field, replace
from pathlib import Path

from loraplace.core.metrics import QUALITY
from loraplace.core.text import lr_text
from loraplace.store import keys
from loraplace.store.db import DONE, FAILED, STOPPED, TUNE
from loraplace.study.plan import CHECKPOINTS, SNAPSHOTS, TrialTask, final_steps, trial_config, trial_id
from loraplace.study.race import Race


def rate_key(lr: float) -> str:
    """A rate as a JSON key: 0.0005 -> '0.0005', 0.0015 -> '0.0015' (six significant digits: exact for a grid)."""
    return f"{float(lr):.6g}"


GRID_FACTORS = (0.4, 1, 3, 8, 20)  # a five-point grid around a rate: 5e-4 -> 2e-4, 5e-4, 1.5e-3, 4e-3, 1e-2


def suggested_grid(lr: float) -> list[float]:
    """Five rates around ``lr`` (mostly above: a shared default rate was below every strategy's optimum on the
    built-in data), 2 significant digits."""
    return [float(f"{lr * f:.2g}") for f in GRID_FACTORS]


# -- a tuning rung: successive halving within each strategy --------------------------------------
@dataclass
class Halving:
    """What one tuning rung decided: per strategy, the rates that go on and the ones that stop, with the numbers."""

    step: int
    fraction: float
    stopped: dict[str, dict[str, str]] = field(default_factory=dict)  # strategy -> {rate: why}
    kept: dict[str, dict[str, str]] = field(default_factory=dict)  # strategy -> {rate: why}
    values: dict[str, dict[str, float]] = field(default_factory=dict)  # strategy -> {rate: mean selection loss}

    def to_dict(self) -> dict:
        return {"step": self.step, "fraction": self.fraction, "stopped": self.stopped, "kept": self.kept,
                "values": self.values}

    @classmethod
    def from_dict(cls, d: dict) -> "Halving":
        return cls(int(d["step"]), float(d["fraction"]), dict(d.get("stopped", {})), dict(d.get("kept", {})),
                   dict(d.get("values", {})))

    def stops(self, strategy: str, lr: float) -> bool:
        return rate_key(lr) in self.stopped.get(strategy, {})

    def reason(self, trial) -> str | None:
        """Why this rung stops ``trial`` (a tuning trial's ``store.db.TrialRecord``), or None."""
        return None if trial.lr is None else self.stopped.get(trial.strategy, {}).get(rate_key(trial.lr))


def rung_examples(spec, n_selection: int | None) -> int | None:
    """How many selection examples a tuning rung scores when ``tune.eval_limit`` cuts the split short; None when
    the rungs score all of it. ``n_selection`` None: the split's size is not known yet (``plan``), the limit as set."""
    limit = spec.eval_limit
    return limit if limit is not None and (n_selection is None or limit < n_selection) else None


def rule_text(spec, n_selection: int | None = None) -> str:
    """How the search stopped rates (``core.config.TuneSpec``), in words."""
    if not spec.at:
        return "every rate trained to the end (an exhaustive grid)"
    at = ", ".join(f"{100 * f:.0f}%" for f in sorted(spec.at))
    n = rung_examples(spec, n_selection)
    on = f", ranked on the first {n} examples of the selection split" if n else ""
    return (f"at {at} of the steps only the best {100 * spec.keep:.0f}% of a strategy's remaining rates (at least "
            f"{spec.min_keep}) go on (successive halving{on})")


def survivors(n: int, keep: float, min_keep: int) -> int:
    """How many of ``n`` rates go on at a rung: ceil(keep x n), at least ``min_keep`` (and at most n)."""
    return min(n, max(min_keep, math.ceil(keep * n - 1e-9)))


def halve(values: dict[str, dict[float, dict[int, float]]], keep: float, min_keep: int, step: int,
          fraction: float, metric: str = "eval_loss") -> Halving:
    """The decision at a tuning rung. ``values``: strategy -> rate -> {tuning seed: selection value at the rung}
    for the rates still in the search. A rate missing a seed (its trial failed) is out already."""
    d = Halving(step, fraction)
    sign = -1.0 if QUALITY[metric].higher_is_better else 1.0
    label = "loss" if metric == "eval_loss" else QUALITY[metric].label  # on the selection split
    for name in sorted(values):
        rates = values[name]
        seeds = set.intersection(*(set(v) for v in rates.values())) if rates else set()
        means = {lr: sum(v[s] for s in seeds) / len(seeds) for lr, v in rates.items() if seeds}
        order = sorted(means, key=lambda lr: (sign * means[lr], lr))
        n_keep = survivors(len(order), keep, min_keep)
        d.values[name] = {rate_key(lr): means[lr] for lr in order}
        best = order[0] if order else None
        for i, lr in enumerate(order):
            numbers = (f"selection {label} {means[lr]:.4f} at step {step} ({100 * fraction:.0f}% of the steps), "
                       f"rank {i + 1} of {len(order)}")
            if i < n_keep:
                d.kept.setdefault(name, {})[rate_key(lr)] = numbers
            else:
                d.stopped.setdefault(name, {})[rate_key(lr)] = (
                    f"{numbers}; only the best {n_keep} go on (best: lr {lr_text(best)}, {means[best]:.4f})")
    return d


# -- the choice -------------------------------------------------------------------------------------
@dataclass
class Choice:
    """A strategy's learning rate, chosen on the selection split, and what it was chosen from."""

    strategy: str
    lr: float | None  # None: no rate of the grid finished (every one diverged or was left out)
    losses: dict[str, float]  # rate -> mean final selection value over the tuning seeds (finished rates)
    spread: dict[str, float | None]  # rate -> sd across tuning seeds (None with one seed)
    forgetting: dict[str, float]  # rate -> mean forgetting of its tuning trials (where measured)
    stopped: dict[str, str]  # rate -> why the search stopped it (at a rung)
    failed: dict[str, str]  # rate -> the error of its failed tuning trial (e.g. a non-finite loss)
    excluded: dict[str, str] = field(default_factory=dict)  # rate -> why max_forgetting left it out
    edge: str | None = None  # "lowest" / "highest": the chosen rate is at that edge of the grid

    def to_dict(self) -> dict:
        return {"strategy": self.strategy, "lr": self.lr, "losses": self.losses, "spread": self.spread,
                "forgetting": self.forgetting, "stopped": self.stopped, "failed": self.failed,
                "excluded": self.excluded, "edge": self.edge}

    @classmethod
    def from_dict(cls, d: dict) -> "Choice":
        return cls(d["strategy"], d.get("lr"), dict(d.get("losses", {})), dict(d.get("spread", {})),
                   dict(d.get("forgetting", {})), dict(d.get("stopped", {})), dict(d.get("failed", {})),
                   dict(d.get("excluded", {})), d.get("edge"))

    def edge_text(self) -> str | None:
        """One line when the chosen rate is at an edge of the grid, else None."""
        if self.edge is None or self.lr is None:
            return None
        beyond = "lower" if self.edge == "lowest" else "higher"
        return (f"{self.strategy}: its best rate {lr_text(self.lr)} is the {self.edge} of the grid; the optimum may "
                f"lie at a {beyond} rate (extend tune.lr)")


def choose(strategy: str, grid: list[float], done: dict[float, dict[int, dict]], stopped: dict[float, str],
           failed: dict[float, str], max_forgetting: float | None = None, metric: str = "eval_loss") -> Choice:
    """A strategy's rate. ``done``: rate -> {tuning seed: final metrics of its finished tuning trial}; only rates
    with every tuning seed finished compete (``stopped`` and ``failed``: rate -> why not)."""
    sign = -1.0 if QUALITY[metric].higher_is_better else 1.0
    seeds = set.intersection(*(set(v) for v in done.values())) if done else set()
    losses, spread, forgets = {}, {}, {}
    for lr, by_seed in done.items():
        vals = [float(by_seed[s][metric]) for s in sorted(seeds) if metric in by_seed[s]]
        if not vals or not all(math.isfinite(v) for v in vals):
            continue
        mean = sum(vals) / len(vals)
        losses[lr] = mean
        spread[lr] = (math.sqrt(sum((v - mean) ** 2 for v in vals) / (len(vals) - 1)) if len(vals) > 1 else None)
        f = [float(by_seed[s]["forgetting"]) for s in sorted(seeds) if "forgetting" in by_seed[s]]
        if len(f) == len(vals):
            forgets[lr] = sum(f) / len(f)
    excluded = {}
    if max_forgetting is not None:
        excluded = {rate_key(lr): f"forgets {forgets[lr]:.4f} nats/token, more than analysis.max_forgetting="
                                  f"{max_forgetting}" for lr in losses if forgets.get(lr, 0.0) > max_forgetting}
    pool = [lr for lr in losses if rate_key(lr) not in excluded] or list(losses)
    lr = min(pool, key=lambda r: (sign * losses[r], r)) if pool else None
    edge = None
    if lr is not None and len(grid) > 1:
        edge = "lowest" if lr == min(grid) else "highest" if lr == max(grid) else None
    return Choice(strategy, lr, {rate_key(r): v for r, v in sorted(losses.items())},
                  {rate_key(r): v for r, v in sorted(spread.items())}, {rate_key(r): v for r, v in sorted(forgets.items())},
                  {rate_key(r): why for r, why in sorted(stopped.items())},
                  {rate_key(r): why for r, why in sorted(failed.items())}, excluded, edge)


# -- the plan -----------------------------------------------------------------------------------
def selection_size(spec, n_train: int) -> int:
    """Examples of the training data that make the selection split (``tune.selection``: a count, or a fraction
    < 1 of ``n_train``), leaving at least one to train on."""
    value = spec.selection
    n = round(value * n_train) if value < 1 else int(value)
    return max(1, min(n, n_train - 1))


def plan_tuning(cfg, placements: dict, n_selection: int, total: int | None = None) -> list[TrialTask]:
    """One tuning trial per tuning seed, rate and strategy (seed-major, then rate, then the study's strategy order):
    a ``study.plan.TrialTask`` of phase ``tune`` whose config is the final trial's at that rate plus the phase and
    the selection split, so no tuning trial shares an id with a final one. Tuning trials save no adapter. With
    ``tune.reuse`` (and ``total``, the steps of a trial), a tuning trial whose seed is a study seed keeps snapshots
    at its final trial's rungs and end (``replays``); not in a study that races (``race.at``), where a final trial
    pauses at rungs and must carry on training from there."""
    snap = total is not None and reuses(cfg.tune, bool(cfg.race.at))
    out = []
    for seed in cfg.tune.seeds:
        for lr in cfg.tune.grid():
            for name, p in placements.items():
                selection = {"examples": n_selection, "of": "the training data, last of its shuffle"}
                if rung_examples(cfg.tune, n_selection):  # its rungs score fewer: other rung numbers, another id
                    selection["rungs_on"] = cfg.tune.eval_limit
                config = {**trial_config(cfg, name, p, seed, lr), "phase": TUNE, "selection": selection}
                tid = trial_id(config)
                label = f"tune-{name}-lr{rate_key(lr)}-s{seed}-{tid[:8]}"
                checkpoint_dir = str(Path(cfg.out) / CHECKPOINTS / label) if cfg.tune.at else None
                task = TrialTask(tid, name, seed, p.modules, None, config, checkpoint_dir=checkpoint_dir, phase=TUNE,
                                 lr=float(lr))
                if snap and seed in cfg.seeds:
                    task = replace(task, snapshots=str(Path(cfg.out) / SNAPSHOTS / label),
                                   snapshots_at=final_steps(cfg, total))
                out.append(task)
    return out


def reuses(spec, races: bool) -> bool:
    """Whether the search's tuning trials of study seeds do their final trials' training (``tune.reuse``, in a study
    that does not race)."""
    return spec.reuse and not races


def replays(finals: list[TrialTask], tuning: list[TrialTask]) -> list[TrialTask]:
    """``finals`` (trials on the search's data, ``tune.reuse``), each one whose tuning trial (same strategy, rate and
    seed) kept a snapshot at every step the final trial is evaluated at set to be read from them (``replay``)
    instead of trained: the same computation (a restored trial computes exactly what it would have in one go, and
    evaluating changes nothing it trains), so the same trial."""
    kept = {(t.strategy, t.lr, t.seed): t for t in tuning if t.snapshots}
    out = []
    for f in finals:
        t = kept.get((f.strategy, f.lr, f.seed))
        if t is not None and all(snapshot_dir(t.snapshots, step).is_dir() for step in t.snapshots_at):
            f = replace(f, replay=t.snapshots, replay_of=t.trial_id, snapshots_at=t.snapshots_at)
        out.append(f)
    return out


def snapshot_dir(directory: str | Path, step: int) -> Path:
    """Where a tuning trial keeps its snapshot at ``step`` (written whole or not at: ``train.checkpoint.save``)."""
    return Path(directory) / f"step-{step}"


def drop_snapshots(tuning: list[TrialTask], keep: set[tuple[str, float]]) -> None:
    """Remove the snapshots of every tuning trial whose (strategy, rate) is not in ``keep`` (no final trial will
    read them)."""
    for t in tuning:
        if t.snapshots and (t.strategy, t.lr) not in keep:
            shutil.rmtree(t.snapshots, ignore_errors=True)


def search_length(spec, n_rates: int) -> float:
    """Optimizer steps one strategy's search runs per tuning seed, in whole-trial lengths: every rate to the first
    tuning rung, then only the survivors of each rung (``survivors``) on to the next and to the end; an exhaustive
    grid (``tune.at: []``) runs ``n_rates``."""
    length, alive, at = 0.0, n_rates, 0.0
    for f in sorted(spec.at):
        length += alive * (f - at)
        alive, at = survivors(alive, spec.keep, spec.min_keep), f
    return length + alive * (1.0 - at)


@dataclass(frozen=True)
class Cost:
    """What a tuned study trains, in whole-trial lengths (a trial's optimizer steps = 1), before it runs."""

    tuning_trials: int  # strategies x rates x tuning seeds
    tuning: float  # what the search trains (successive halving)
    exhaustive: float  # what the whole grid would train
    final: float  # the study's trials (strategies x seeds)
    compare: float  # at most: every other strategy at the baseline's rate (none when it chooses the same)
    replayed: float = 0.0  # final trials the search trains (tune.reuse: its tuning seeds that are study seeds)

    @property
    def ratio(self) -> float:
        """The tuned study against the untuned one (the same strategies and seeds at train.lr), at most."""
        return (self.tuning + self.final - self.replayed + self.compare) / self.final


def cost(spec, n_strategies: int, seeds: list[int], races: bool = False) -> Cost:
    """``search_length`` over a study: the search, the final trials (less those the search trains: ``replays``;
    none in a study that races) and the comparison at the baseline's rate."""
    n, n_seeds = len(spec.grid()), len(seeds)
    per = search_length(spec, n) * len(spec.seeds)
    shared = len(set(spec.seeds) & set(seeds)) if reuses(spec, races) else 0
    return Cost(n_strategies * n * len(spec.seeds), n_strategies * per, float(n_strategies * n * len(spec.seeds)),
                float(n_strategies * n_seeds), float((n_strategies - 1) * n_seeds) if spec.compare else 0.0,
                float(n_strategies * shared))


# -- in a study -----------------------------------------------------------------------------------
SELECTION_METRIC = "eval_loss"  # a tuning trial's evaluation is its loss on the selection split


def tuning_race(cfg, ids) -> Race:
    """The search's halving as a ``study.race.Race`` over tuning trials ``ids``: at each ``tune.at`` rung, the
    decision ``halve`` makes from their selection losses there (meta ``tune_race``)."""

    def at_rung(racing, step: int, fraction: float) -> Halving:
        values: dict[str, dict[float, dict[int, float]]] = {}
        for t in racing:
            ev = dict(t.evals).get(step)
            if ev is not None and SELECTION_METRIC in ev and t.lr is not None:
                values.setdefault(t.strategy, {}).setdefault(t.lr, {})[int(t.seed)] = float(ev[SELECTION_METRIC])
        return halve(values, cfg.tune.keep, cfg.tune.min_keep, step, fraction, SELECTION_METRIC)

    return Race("tune_race", keys.key("tune_race", cfg, trials=sorted(ids)), frozenset(ids), list(cfg.tune.at),
                at_rung, cfg.race.keep_checkpoints)


def halvings(store) -> list[Halving]:
    """The search's halving decisions so far, rung by rung."""
    return [Halving.from_dict(d) for d in (store.get_meta("tune_race") or {}).get("decisions", [])]


def choices(cfg, trials) -> dict[str, Choice]:
    """Every strategy's ``Choice`` from its finished tuning trials (``store.db.TrialRecord``s of the search)."""
    grid = cfg.tune.grid()
    out = {}
    for name in cfg.strategies:
        done, stopped, failed = {}, {}, {}
        for t in trials:
            if t.strategy != name or t.lr is None:
                continue
            if t.status == DONE and SELECTION_METRIC in t.metrics:
                done.setdefault(t.lr, {})[int(t.seed)] = t.metrics
            elif t.status == STOPPED:
                stopped[t.lr] = t.error or "stopped by halving"
            elif t.status == FAILED:
                failed[t.lr] = t.error or "failed"
        done = {lr: by_seed for lr, by_seed in done.items() if lr not in stopped and lr not in failed
                and set(by_seed) >= set(cfg.tune.seeds)}
        out[name] = choose(name, grid, done, stopped, failed, cfg.analysis.max_forgetting, SELECTION_METRIC)
    return out


def summary(cfg, n_selection: int, total: int, chosen: dict[str, Choice]) -> dict:
    """Meta ``tune``: what the search was and what it chose (``analysis.tuning`` reads it)."""
    return {"grid": cfg.tune.grid(), "seeds": list(cfg.tune.seeds), "selection": n_selection, "total_steps": total,
            "rule": rule_text(cfg.tune, n_selection), "choices": {s: c.to_dict() for s, c in chosen.items()}}
