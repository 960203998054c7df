"""A study's trials as flat rows: the CSV and JSON that ``loraplace status --csv/--json`` print.

Usage::

    print(export_csv(store.trials()))     # one row per trial: identity columns, then every metric
    print(export_json(store.trials()))    # every stored field of every trial (docs/results.md)
    record = placement_for(store.current_trials(), "top_half")   # what `loraplace export` writes out
"""

from __future__ import annotations

import csv
import io
import json
from collections import Counter
from dataclasses import asdict, replace

from loraplace.placement.export import ExportError
from loraplace.placement.record import PlacementRecord
from loraplace.store.db import DONE, TrialRecord


def to_rows(trials: list[TrialRecord]) -> list[dict]:
    """One flat dict per trial: identity columns then ``metrics`` flattened."""
    rows = []
    for t in trials:
        row = {"trial_id": t.trial_id, "strategy": t.strategy, "seed": t.seed, "phase": t.phase,
               "lr": "" if t.lr is None else t.lr, "status": t.status, "error": t.error or "",
               "step": "" if t.step is None else t.step}
        row.update(t.metrics)
        rows.append(row)
    return rows


def export_json(trials: list[TrialRecord]) -> str:
    return json.dumps([{**asdict(t), "phase": t.phase, "lr": t.lr} for t in trials], indent=2, sort_keys=True)


def export_csv(trials: list[TrialRecord]) -> str:
    rows = to_rows(trials)
    cols: list[str] = []
    for r in rows:
        cols += [k for k in r if k not in cols]
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=cols, lineterminator="\n")
    w.writeheader()
    w.writerows(rows)
    return buf.getvalue()


def placement_for(trials, strategy: str) -> PlacementRecord:
    """The placement of ``strategy``'s first finished trial among ``trials`` (``store.db.TrialRecord``s: pass
    ``Store.current_trials()``, the trials of the study's latest config, as the report counts them)."""
    done = [t for t in trials if t.status == DONE and t.placement.get("modules")]
    valid = sorted({t.strategy for t in done})
    for t in done:
        if t.strategy == strategy:
            record = PlacementRecord.from_dict(t.placement)
            if record.dropout is None:  # stored before records carried it: the trial config has it
                dropout = (t.config.get("train") or {}).get("dropout")
                record = replace(record, dropout=None if dropout is None else float(dropout))
            return record
    others = [t for t in trials if t.strategy == strategy]
    if others:
        states = Counter(t.status for t in others)
        have = ", ".join(f"{n} {s}" for s, n in sorted(states.items()))
        raise ExportError(f"strategy {strategy!r} has no finished trial with a placement ({have}); "
                          f"exportable: {', '.join(valid) or 'none'}")
    raise ExportError(f"no strategy {strategy!r} in this study; exportable: {', '.join(valid) or 'none'}")
