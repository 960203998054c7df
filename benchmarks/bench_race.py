"""Benchmark: a full study and the same study raced, one after the other: cost, recommendations, and how well the
rungs predicted the end.

Usage::

    python benchmarks/bench_race.py --name default --out studies/bench-race            # the default study
    python benchmarks/bench_race.py --name budget --config examples/budget.yaml --out studies/bench-race
    python benchmarks/bench_race.py --name gsm8k --out studies/bench-race -- data.source=../shared/data/gsm8k/train.jsonl \\
        data.eval_source=../shared/data/gsm8k/test.jsonl data.eval_limit=64 data.limit=512 data.max_length=256

Runs ``loraplace study`` (in this process) with the given config and overrides into OUT/NAME-full, then again
with ``race.at`` (default 0.25,0.5) into OUT/NAME-raced, and prints (and with ``--json`` writes): each one's
total training time (the trials' train_time_s, stopped trials included) and optimizer steps, wall time, the
recommendation of each, whether every survivor's final eval loss equals the full study's, and from the full
study's rung evaluations, per rung: Kendall's tau of the strategies' ranking against the final one, the
recommendation computed there, and each strategy's retained improvement at the rung against at the end (the
catch-up the racing rule's ``race.slack`` must allow for). Run it alone on a quiet machine: timings are the
point, and other processes distort them 2-10x.
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from pathlib import Path

from loraplace.analysis.from_store import analyze_store
from loraplace.core.config import StudyConfig
from loraplace.core.stats import retained_ratios
from loraplace.study import race
from loraplace.study.run import run_study
from loraplace.store.db import DONE, Store


def _run(config: str | None, overrides: list[str]) -> tuple[StudyConfig, float]:
    cfg = StudyConfig.load(config, overrides=overrides)
    t0 = time.perf_counter()
    run_study(cfg)
    return cfg, time.perf_counter() - t0


def _summary(out: str) -> dict:
    with Store.open(out, create=False) as store:
        a = analyze_store(store)
        trials = store.current_trials()
        decisions = [d.to_dict() for d in race.decisions(store)]
    return {
        "train_time_s": sum(float(t.metrics.get("train_time_s", 0)) for t in trials),
        "eval_time_s": sum(float(t.metrics.get("eval_time_s", 0)) for t in trials),
        "optimizer_steps": sum(int(t.step or t.metrics.get("steps", 0)) for t in trials),
        "recommendation": a.recommendation.strategy if a.recommendation.decided else None,
        "recommendation_text": a.recommendation.text,
        "stopped": sorted({t.strategy for t in trials if t.status == "stopped"}),
        "final_eval_loss": {f"{t.strategy}/{t.seed}": t.metrics["eval_loss"] for t in trials if t.status == DONE},
        "racing": a.racing.lines if a.racing is not None else [],
        "decisions": decisions,
    }


def _rungs(out: str) -> list[dict]:
    """Per recorded rung of a full study: tau, the rung's recommendation, and every strategy's retained improvement
    at the rung and at the end (mean over seeds)."""
    with Store.open(out, create=False) as store:
        a = analyze_store(store)
        trials = store.current_trials()
    cfg, zero, metric = a.config, a.zero_shot, a.metric
    higher = metric == "accuracy"
    total = max(int(t.metrics["steps"]) for t in trials if t.status == DONE)
    final = {}
    for t in trials:
        if t.status == DONE:
            final.setdefault(t.strategy, {})[int(t.seed)] = float(t.metrics[metric])
    rows = []
    for c in (a.racing.checks if a.racing is not None else []):
        at = {}
        for t in trials:
            ev = dict(t.evals).get(c.step)
            if ev is not None and metric in ev:
                at.setdefault(t.strategy, {})[int(t.seed)] = float(ev[metric])
        retained = {}
        for s in final:
            if s == cfg.baseline or s not in at:
                continue
            r_at = retained_ratios(at[s], at[cfg.baseline], zero, higher)
            r_end = retained_ratios(final[s], final[cfg.baseline], zero, higher)
            if r_at and r_end:
                m_at, m_end = sum(r_at.values()) / len(r_at), sum(r_end.values()) / len(r_end)
                retained[s] = {"at_rung": m_at, "at_end": m_end, "catch_up": m_end - m_at}
        rows.append({"step": c.step, "fraction": c.fraction, "of_steps": total, "kendall_tau": c.tau,
                     "recommended_at_rung": c.recommended, "would_stop": c.would_stop, "retained": retained})
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--name", required=True, help="label of this study (directory names, the JSON)")
    p.add_argument("--config", default=None, help="study YAML (default: the defaults)")
    p.add_argument("--out", default="studies/bench-race", help="parent directory of the two studies")
    p.add_argument("--race", default="0.25,0.5", help="race.at of the raced study")
    p.add_argument("--json", default=None, help="write the results here")
    p.add_argument("--reuse-full", action="store_true",
                   help="keep OUT/NAME-full as it is (a finished full study: racing settings change no trial of it) and "
                        "race into a fresh OUT/NAME-raced; the full study's wall_s is then null")
    p.add_argument("overrides", nargs="*", help="key=value overrides for both studies")
    args = p.parse_args()
    full_out, raced_out = f"{args.out}/{args.name}-full", f"{args.out}/{args.name}-raced"
    if args.reuse_full:
        shutil.rmtree(raced_out, ignore_errors=True)
        full_wall = None
    else:
        _, full_wall = _run(args.config, [*args.overrides, f"out={full_out}"])
    _, raced_wall = _run(args.config, [*args.overrides, f"out={raced_out}", f"race.at=[{args.race}]"])
    full, raced = _summary(full_out), _summary(raced_out)
    same = all(raced["final_eval_loss"][k] == v for k, v in full["final_eval_loss"].items() if k in raced["final_eval_loss"])
    result = {
        "name": args.name, "config": args.config, "overrides": args.overrides, "race_at": args.race,
        "full": {**full, "wall_s": full_wall}, "raced": {**raced, "wall_s": raced_wall},
        "train_time_ratio": raced["train_time_s"] / full["train_time_s"],
        "steps_ratio": raced["optimizer_steps"] / full["optimizer_steps"],
        "same_recommendation": full["recommendation_text"] == raced["recommendation_text"],
        "survivors_identical": same, "rungs": _rungs(full_out),
    }
    print(json.dumps(result, indent=2))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
