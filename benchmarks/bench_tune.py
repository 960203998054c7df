"""Would a halving rule have chosen what the whole grid chose? Replay rules on an exhaustive search's rung values.

Usage::

    loraplace study examples/budget.yaml 'tune.lr=[2e-4,5e-4,1.5e-3,4e-3,1e-2]' 'tune.seeds=[0,1]' 'tune.at=[]' \
        'tune.record=[0.25,0.5,0.75]' out=studies/budget_grid          # every rate to the end, rungs recorded
    python benchmarks/bench_tune.py studies/budget_grid [more study dirs]  # a Markdown table per study and a summary
    python benchmarks/bench_tune.py --first-rung studies/budget studies/variants  # halved studies: see below

An exhaustive search (``tune.at: []``) trains every rate of every strategy to the end and evaluates each tuning
trial on the selection split at the ``tune.record`` rungs. Every rule ``tune.at`` (a subset of the recorded
rungs) x ``tune.keep`` x ``tune.min_keep`` is replayed on those values with ``study.tune.halve`` (the function a
study runs), for the tuning seeds the study used and for its first seed alone; the rate a rule keeps to the end
with the lowest final selection loss is its choice. For each rule: in how many strategies it chose the exhaustive
grid's rate (over the same seeds), its neighbour on the grid, or another; and what it trains (``search_length``,
in trial lengths per strategy and seed). Reads the store only (torch-free).

``--first-rung`` reads studies searched with halving (any ``tune.at``): where did each strategy's chosen rate
rank at the first rung (mean selection loss over the tuning seeds)? A chosen rate ranked third there is one a
first rung keeping only two rates would have stopped.
"""

from __future__ import annotations

import argparse
import itertools
from dataclasses import replace

from loraplace.core.config import TuneSpec
from loraplace.core.text import lr_text
from loraplace.store.db import DONE, TUNE, Store
from loraplace.study.race import rung_steps
from loraplace.study.tune import halve, search_length

KEEPS = (0.34, 0.5, 0.67)
MIN_KEEPS = (1, 2, 3)


def load(study_dir: str):
    """strategy -> rate -> seed -> ({rung step: selection loss}, final selection loss); the grid; total steps."""
    with Store.open(study_dir, create=False) as store:
        cfg, meta = store.study_config(), store.get_meta("tune")
        trials = [t for t in store.current_trials() if t.phase == TUNE and t.status == DONE]
    if not meta or cfg.tune.at:
        raise SystemExit(f"{study_dir}: not an exhaustive tuned study (tune.at must be [])")
    data: dict = {}
    for t in trials:
        data.setdefault(t.strategy, {}).setdefault(t.lr, {})[int(t.seed)] = (
            {int(s): float(ev["eval_loss"]) for s, ev in t.evals}, float(t.metrics["eval_loss"]))
    return data, [float(x) for x in meta["grid"]], int(meta["total_steps"]), cfg


def choose(rates: dict, seeds: list[int], at: list[float], keep: float, min_keep: int, total: int) -> float | None:
    """The rate a rule ends with: halving at ``at`` on the rung values, then the lowest mean final loss."""
    alive = {lr: by for lr, by in rates.items() if all(s in by for s in seeds)}
    for f in sorted(at):
        (step,) = rung_steps([f], total)
        values = {"s": {lr: {s: by[s][0][step] for s in seeds} for lr, by in alive.items()}}
        d = halve(values, keep, min_keep, step, f)
        alive = {lr: by for lr, by in alive.items() if not d.stops("s", lr)}
    if not alive:
        return None
    return min(alive, key=lambda lr: (sum(alive[lr][s][1] for s in seeds) / len(seeds), lr))


def verdict(chosen: float | None, best: float | None, grid: list[float]) -> str:
    if chosen is None or best is None:
        return "none"
    if chosen == best:
        return "same"
    return "neighbour" if abs(grid.index(chosen) - grid.index(best)) == 1 else "other"


def first_rung(study_dir: str) -> list[tuple[str, float, int, list[float]]]:
    """(strategy, chosen rate, its rank at the first rung (1 = best), the rates by their first-rung loss) for each
    strategy with a chosen rate, in a study searched with halving."""
    with Store.open(study_dir, create=False) as store:
        cfg, meta = store.study_config(), store.get_meta("tune")
        trials = [t for t in store.current_trials() if t.phase == TUNE]
    if not meta or not cfg.tune.at:
        raise SystemExit(f"{study_dir}: not a tuned study searched with halving (tune.at is empty)")
    (step,) = rung_steps([min(cfg.tune.at)], int(meta["total_steps"]))
    at: dict = {}
    for t in trials:
        value = dict((int(s), ev) for s, ev in t.evals).get(step, {}).get("eval_loss")
        if value is not None:
            at.setdefault(t.strategy, {}).setdefault(float(t.lr), []).append(float(value))
    out = []
    for name, rates in sorted(at.items()):
        chosen = (meta["choices"].get(name) or {}).get("lr")
        if chosen is None:
            continue
        order = sorted(rates, key=lambda lr: sum(rates[lr]) / len(rates[lr]))
        out.append((name, float(chosen), order.index(float(chosen)) + 1, order))
    return out


def main_first_rung(studies: list[str]) -> None:
    print("| study | strategies | chosen rate ranked 1st / 2nd / 3rd or lower at the first rung | ranked 3rd or lower |")
    print("|---|---:|---|---|")
    total = [0, 0, 0]
    for study in studies:
        rows = first_rung(study)
        counts = [sum(r[2] == 1 for r in rows), sum(r[2] == 2 for r in rows), sum(r[2] >= 3 for r in rows)]
        total = [a + b for a, b in zip(total, counts)]
        low = "; ".join(f"{n} {lr_text(lr)} (order {', '.join(lr_text(x) for x in order)})"
                        for n, lr, rank, order in rows if rank >= 3)
        print(f"| {study} | {len(rows)} | {' / '.join(map(str, counts))} | {low or '-'} |")
    print(f"| all | {sum(total)} | {' / '.join(map(str, total))} | |")


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("studies", nargs="+")
    ap.add_argument("--first-rung", action="store_true",
                    help="halved studies: where each chosen rate ranked at the first rung")
    args = ap.parse_args(argv)
    if args.first_rung:
        main_first_rung(args.studies)
        return
    totals: dict[tuple, dict] = {}
    for study in args.studies:
        data, grid, total, cfg = load(study)
        recorded = sorted(cfg.tune.record)
        rules = [list(c) for n in range(0, len(recorded) + 1) for c in itertools.combinations(recorded, n)]
        print(f"\n## {study}: {len(data)} strategies, grid {', '.join(lr_text(x) for x in grid)}, {total} steps, "
              f"tuning seeds {cfg.tune.seeds}\n")
        for seeds in ([cfg.tune.seeds] + ([cfg.tune.seeds[:1]] if len(cfg.tune.seeds) > 1 else [])):
            best = {name: choose(rates, seeds, [], 1.0, 1, total) for name, rates in data.items()}
            print(f"Exhaustive choice over seeds {seeds}: " + ", ".join(f"{n} {lr_text(b)}" for n, b in best.items()))
            if seeds != cfg.tune.seeds:
                both = {name: choose(rates, cfg.tune.seeds, [], 1.0, 1, total) for name, rates in data.items()}
                agree = [verdict(best[n], both[n], grid) for n in data]
                print(f"  seed {seeds[0]} alone against seeds {cfg.tune.seeds}: " +
                      ", ".join(f"{v} {agree.count(v)}" for v in ("same", "neighbour", "other")))
            print("\n| tune.at | keep | min_keep | trains (trial lengths) | same | neighbour | other |")
            print("|---|---:|---:|---:|---:|---:|---:|")
            for at, keep, mk in itertools.product(rules, KEEPS, MIN_KEEPS):
                if not at and (keep, mk) != (KEEPS[0], MIN_KEEPS[0]):
                    continue
                spec = replace(TuneSpec(lr=grid), at=at, keep=keep, min_keep=mk)
                got = [verdict(choose(rates, seeds, at, keep, mk, total), best[n], grid) for n, rates in data.items()]
                row = totals.setdefault((len(seeds) > 1, tuple(at), keep, mk), {"same": 0, "neighbour": 0, "other": 0,
                                                                               "none": 0, "n": 0})
                for v in got:
                    row[v] += 1
                row["n"] += len(got)
                row["length"] = search_length(spec, len(grid))
                print(f"| {at or '[] (exhaustive)'} | {keep if at else '-'} | {mk if at else '-'} | "
                      f"{search_length(spec, len(grid)):.2f} | {got.count('same')} | {got.count('neighbour')} | "
                      f"{got.count('other')} |")
            print()
    print("\n## Every study together: rules that never chose beyond a neighbour, cheapest first\n")
    print("| seeds | tune.at | keep | min_keep | trains | same | neighbour | of |")
    print("|---|---|---:|---:|---:|---:|---:|---:|")
    ok = [(k, v) for k, v in totals.items() if v["other"] == 0 and v["none"] == 0]
    for (multi, at, keep, mk), v in sorted(ok, key=lambda kv: (not kv[0][0], kv[1]["length"], -kv[1]["same"])):
        print(f"| {'all' if multi else 'first'} | {list(at) or '[]'} | {keep if at else '-'} | {mk if at else '-'} | "
              f"{v['length']:.2f} | {v['same']} | {v['neighbour']} | {v['n']} |")


if __name__ == "__main__":
    main()
