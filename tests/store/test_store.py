"""The results database: trial life cycle, crash safety, exports, and all-or-nothing directories."""

from __future__ import annotations

import csv
import io
import json
import datetime as dt
import os
import sqlite3
import subprocess
import sys
import time

import pytest
from toys import FIRST_SCHEMA

from loraplace.core.files import atomic_dir
from loraplace.store import claims
from loraplace.store.claims import HOST, Heartbeat
from loraplace.store.results import export_csv, export_json
from loraplace.store.db import Store, StoreError


def test_trial_life_cycle_and_exports(tmp_path):
    with Store.open(tmp_path) as store:
        store.add_pending("t1", "all_linear", 0, {"lr": 1e-3})
        store.add_pending("t2", "mlp_only", 0, {"lr": 1e-3})
        store.add_pending("t1", "all_linear", 0, {"lr": 9.9})  # already registered: kept as it was
        assert [t.status for t in store.trials()] == ["pending", "pending"]
        assert store.get("t1").config == {"lr": 1e-3}
        claims.claim(store, "t1")
        store.mark_done("t1", {"eval_loss": 2.5, "trainable_params": 10}, [(1, 3.0), (2, 2.7)], {"modules": {}}, {"torch": "x"}, "adapters/a")
        claims.claim(store, "t2")
        store.mark_failed("t2", "TrialError: non-finite train loss\nsecond line dropped")
        t1, t2 = store.get("t1"), store.get("t2")
        assert (t1.status, t1.metrics["eval_loss"], t1.curve, t1.adapter_path) == ("done", 2.5, [[1, 3.0], [2, 2.7]], "adapters/a")
        assert t1.started_at and t1.finished_at
        assert (t2.status, t2.error) == ("failed", "TrialError: non-finite train loss")
        assert [t.trial_id for t in store.trials(status="done")] == ["t1"]
        rows = list(csv.DictReader(io.StringIO(export_csv(store.trials()))))
        assert [(r["strategy"], r["status"], r["eval_loss"]) for r in rows] == [("all_linear", "done", "2.5"), ("mlp_only", "failed", "")]
        dumped = json.loads(export_json(store.trials()))
        assert dumped[0]["metrics"]["trainable_params"] == 10 and dumped[1]["error"].startswith("TrialError")


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()  # reaped: the pid names no process now
    return proc.pid


def _set_owner(directory, trial_id, pid, host, heartbeat_at):
    conn = sqlite3.connect(directory / "study.db")
    with conn:
        conn.execute("UPDATE trials SET owner_pid=?, owner_host=?, heartbeat_at=? WHERE trial_id=?",
                     (pid, host, heartbeat_at, trial_id))
    conn.close()


def test_interrupted_trials_go_back_to_pending_and_meta_round_trips(tmp_path):
    with Store.open(tmp_path) as store:
        store.add_pending("t", "s", 1, {})
        store.add_pending("live", "s", 2, {})
        claims.claim(store, "t")
        assert claims.claim(store, "live")
        store.put_meta("zero_shot", {"eval_loss": 4.2})
        store.put_meta("zero_shot", {"eval_loss": 4.3})
        beat = store.get("t").heartbeat_at
    _set_owner(tmp_path, "t", _dead_pid(), HOST, beat)  # its process was killed
    with Store.open(tmp_path, create=False) as store:  # a new process after a crash
        assert store.get("t").status == "running"
        assert claims.reset_interrupted(store) == 1  # the dead process's trial only: this (live) one keeps "live"
        assert store.get("live").status == "running"
        assert store.get("t").status == "pending" and store.get_meta("zero_shot") == {"eval_loss": 4.3}
        assert store.get_meta("missing", "default") == "default"
    conn = sqlite3.connect(tmp_path / "study.db")
    assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"


def test_bad_directories_are_store_errors(tmp_path):
    with pytest.raises(StoreError, match="no study database"):
        Store.open(tmp_path / "nothing", create=False)
    with pytest.raises(StoreError, match="run `loraplace study out="):  # the documented form, not --out
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


def test_a_trial_is_claimed_by_one_process_and_dead_claims_are_taken_over(tmp_path):
    a, b = Store.open(tmp_path), Store.open(tmp_path)  # two connections, as two processes have
    a.add_pending("t", "s", 0, {})
    assert claims.claim(a, "t") and not claims.claim(b, "t")  # the second one skips it
    t = b.get("t")
    assert (t.status, t.owner, claims.claim_is_dead(t)) == ("running", f"{os.getpid()}@{HOST}", False)
    assert 0 <= t.heartbeat_age_s() < 60
    a.mark_done("t", {"eval_loss": 1.0}, [], {}, {})
    assert not claims.claim(a, "t") and not claims.claim(b, "t") and b.get("t").status == "done"  # done stays done
    assert not claims.claim(a, "no-such-trial")

    b.add_pending("dead", "s", 1, {})
    assert claims.claim(b, "dead")
    _set_owner(tmp_path, "dead", _dead_pid(), HOST, b.get("dead").heartbeat_at)
    assert claims.claim(a, "dead") and a.get("dead").owner_pid == os.getpid()  # same host, pid gone: taken over

    a.add_pending("far", "s", 2, {})
    assert claims.claim(a, "far")
    fresh = dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")
    _set_owner(tmp_path, "far", 4242, "another-host", fresh)  # another machine's pid cannot be checked
    assert not claims.claim(b, "far") and claims.reset_interrupted(b) == 0
    old = (dt.datetime.now(dt.timezone.utc) - dt.timedelta(seconds=300)).isoformat(timespec="seconds")
    _set_owner(tmp_path, "far", 4242, "another-host", old)  # silent for 5 minutes: gone
    assert claims.claim_is_dead(b.get("far")) and not claims.claim_is_dead(b.get("far"), timeout_s=600)
    assert claims.claim(b, "far") and b.get("far").owner_host == HOST

    assert claims.release(b, ["far"]) == 1 and b.get("far").status == "pending"
    b.mark_failed("far", "boom")
    assert claims.requeue_failed(b, ["far", "t"]) == 1 and b.get("far").status == "pending" and b.get("t").status == "done"
    a.close()
    b.close()


def test_heartbeat_thread_refreshes_held_claims(tmp_path):
    with Store.open(tmp_path) as store:
        store.add_pending("t", "s", 0, {})
        claims.claim(store, "t")
        old = (dt.datetime.now(dt.timezone.utc) - dt.timedelta(seconds=300)).isoformat(timespec="seconds")
        _set_owner(tmp_path, "t", os.getpid(), HOST, old)
        with Heartbeat(tmp_path, interval_s=0.05) as hb:
            hb.add("t")
            deadline = time.monotonic() + 10
            while store.get("t").heartbeat_at == old and time.monotonic() < deadline:
                time.sleep(0.05)
        assert store.get("t").heartbeat_age_s() < 60


def test_a_database_from_before_claims_opens_and_migrates(tmp_path):
    conn = sqlite3.connect(tmp_path / "study.db")
    conn.executescript(FIRST_SCHEMA + """
        INSERT INTO trials(trial_id, strategy, seed, status, config_json, metrics_json, created_at)
            VALUES ('old', 'all_linear', 0, 'done', '{}', '{"eval_loss": 2.0, "steps": 30}', '2025-01-01T00:00:00+00:00');
        INSERT INTO trials(trial_id, strategy, seed, status, config_json, created_at)
            VALUES ('crashed', 'mlp_only', 0, 'running', '{}', '2025-01-01T00:00:00+00:00');
    """)
    conn.close()
    with Store.open(tmp_path, create=False) as store:
        old = store.get("old")
        assert (old.status, old.metrics, old.owner) == ("done", {"eval_loss": 2.0, "steps": 30}, "")
        assert old.step == 30  # the step racing counts it at: its metrics' steps
        assert claims.claim_is_dead(store.get("crashed"))  # running without an owner: left by an old version
        assert claims.claim(store, "crashed") and store.get("crashed").owner_pid == os.getpid()
    with Store.open(tmp_path, create=False) as store:  # opening again does not migrate twice
        assert store.get("crashed").status == "running"


def _open_after(barrier, directory, errors) -> None:
    barrier.wait()  # all processes open the new file at the same moment
    try:
        Store.open(directory).close()
    except StoreError as e:
        errors.put(str(e))


@pytest.mark.slow
def test_processes_opening_a_new_study_at_once_all_succeed(tmp_path):
    # SQLite refuses a switch to WAL at once ("database is locked", no busy wait) while another
    # process opens the same new file; before the retry about one round in three failed.
    import multiprocessing

    ctx = multiprocessing.get_context("fork")
    errors = ctx.Queue()
    for i in range(25):
        barrier = ctx.Barrier(4)
        procs = [ctx.Process(target=_open_after, args=(barrier, tmp_path / f"s{i}", errors)) for _ in range(4)]
        for p in procs:
            p.start()
        for p in procs:
            p.join(60)
        assert [p.exitcode for p in procs] == [0] * 4
        assert errors.empty(), errors.get()


def test_a_probe_seed_is_stored_all_or_nothing(tmp_path):
    """put_probe replaces a seed's rows and info in one transaction: a failure halfway keeps the earlier ones."""
    with Store.open(tmp_path) as store:
        store.put_probe("k", 0, [(0, "attn.q", "m.q", "lora_drop", 1.5)], {"time_s": 1.0})
        with pytest.raises(ValueError):  # the second row's block is no integer: after the old rows were deleted
            store.put_probe("k", 0, [(0, "attn.q", "m.q", "lora_drop", 2.5), ("x", "attn.k", "m.k", "lora_drop", 1.0)],
                            {"time_s": 2.0})
        assert store.probe_rows("k") == [(0, 0, "attn.q", "m.q", "lora_drop", 1.5)]
        assert store.get_meta("probe:k") == {"seeds": {"0": {"time_s": 1.0}}}
