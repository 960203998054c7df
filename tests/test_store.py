"""The results database: trial life cycle, crash safety, exports, and all-or-nothing directories."""

from __future__ import annotations

import csv
import io
import json
import os
import sqlite3

import pytest

from loraplace.store import Store, StoreError, atomic_dir


def test_trial_life_cycle_and_exports(tmp_path):
    with Store.open(tmp_path) as store:
        store.add_pending("t1", "all_linear", 0, {"lr": 1e-3})
        store.add_pending("t2", "mlp_only", 0, {"lr": 1e-3})
        store.add_pending("t1", "all_linear", 0, {"lr": 9.9})  # already registered: kept as it was
        assert [t.status for t in store.trials()] == ["pending", "pending"]
        assert store.get("t1").config == {"lr": 1e-3}
        store.mark_running("t1")
        store.mark_done("t1", {"eval_loss": 2.5, "trainable_params": 10}, [(1, 3.0), (2, 2.7)], {"modules": {}}, {"torch": "x"}, "adapters/a")
        store.mark_running("t2")
        store.mark_failed("t2", "TrialError: non-finite train loss\nsecond line dropped")
        t1, t2 = store.get("t1"), store.get("t2")
        assert (t1.status, t1.metrics["eval_loss"], t1.curve, t1.adapter_path) == ("done", 2.5, [[1, 3.0], [2, 2.7]], "adapters/a")
        assert t1.started_at and t1.finished_at
        assert (t2.status, t2.error) == ("failed", "TrialError: non-finite train loss")
        assert [t.trial_id for t in store.trials(status="done")] == ["t1"]
        rows = list(csv.DictReader(io.StringIO(store.export_csv())))
        assert [(r["strategy"], r["status"], r["eval_loss"]) for r in rows] == [("all_linear", "done", "2.5"), ("mlp_only", "failed", "")]
        dumped = json.loads(store.export_json())
        assert dumped[0]["metrics"]["trainable_params"] == 10 and dumped[1]["error"].startswith("TrialError")


def test_interrupted_trials_go_back_to_pending_and_meta_round_trips(tmp_path):
    with Store.open(tmp_path) as store:
        store.add_pending("t", "s", 1, {})
        store.mark_running("t")
        store.put_meta("zero_shot", {"eval_loss": 4.2})
        store.put_meta("zero_shot", {"eval_loss": 4.3})
    with Store.open(tmp_path, create=False) as store:  # a new process after a crash
        assert store.get("t").status == "running"
        assert store.reset_interrupted() == 1
        assert store.get("t").status == "pending" and store.get_meta("zero_shot") == {"eval_loss": 4.3}
        assert store.get_meta("missing", "default") == "default"
    conn = sqlite3.connect(tmp_path / "study.db")
    assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"


def test_bad_directories_are_store_errors(tmp_path):
    with pytest.raises(StoreError, match="no study database"):
        Store.open(tmp_path / "nothing", create=False)
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(StoreError, match="cannot use study directory"):
        Store.open(blocker / "study")


def test_atomic_dir_is_all_or_nothing_and_readable(tmp_path):
    target = tmp_path / "adapters" / "a"
    with atomic_dir(target) as tmp:
        (tmp / "w.bin").write_bytes(b"12")
    assert (target / "w.bin").read_bytes() == b"12"
    umask = os.umask(0)
    os.umask(umask)
    assert (target.stat().st_mode & 0o777) == 0o777 & ~umask  # not mkdtemp's 0700
    with pytest.raises(RuntimeError):
        with atomic_dir(target) as tmp:
            (tmp / "w.bin").write_bytes(b"half")
            raise RuntimeError("crash while saving")
    assert (target / "w.bin").read_bytes() == b"12"  # the old content survives
    assert [p.name for p in target.parent.iterdir()] == ["a"]  # no temporary left behind
