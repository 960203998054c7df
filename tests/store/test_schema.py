"""The schema's write transaction, and stores from before column ``step`` brought up to date (racing on from them)."""

from __future__ import annotations

import json
import sqlite3

import pytest

from loraplace.core.config import StudyConfig
from loraplace.store.db import Store, StoreError
from loraplace.store.schema import transaction
from loraplace.study import race


def _columns(path) -> set[str]:
    conn = sqlite3.connect(path)
    try:
        return {row[1] for row in conn.execute("PRAGMA table_info(trials)")}
    finally:
        conn.close()


def test_a_transaction_commits_rolls_back_and_holds_the_write_lock(tmp_path):
    with Store.open(tmp_path) as store:
        with transaction(store.conn) as conn:
            conn.execute("INSERT INTO meta(key, value_json) VALUES('kept', '1')")
            other = sqlite3.connect(tmp_path / "study.db", timeout=0, isolation_level=None)
            with pytest.raises(sqlite3.OperationalError, match="locked"):  # another writer must wait for it
                other.execute("BEGIN IMMEDIATE")
            other.close()
        for stop in (RuntimeError("a failure"), KeyboardInterrupt()):
            with pytest.raises(type(stop)):
                with transaction(store.conn) as conn:
                    conn.execute("INSERT INTO meta(key, value_json) VALUES('lost', '1')")
                    raise stop
        assert store.get_meta("kept") == 1 and store.get_meta("lost") is None
        assert not store.conn.in_transaction
        store.put_meta("after", 2)  # the connection is usable again, in autocommit
    with Store.open(tmp_path, create=False) as store:
        assert store.get_meta("after") == 2


_BEFORE_STEP = """
    CREATE TABLE trials (trial_id TEXT PRIMARY KEY, strategy TEXT NOT NULL, seed INTEGER NOT NULL,
        status TEXT NOT NULL CHECK (status IN ('pending', 'running', 'done', 'failed', 'paused', 'stopped')),
        error TEXT, config_json TEXT NOT NULL, placement_json TEXT NOT NULL DEFAULT '{}',
        metrics_json TEXT NOT NULL DEFAULT '{}', curve_json TEXT NOT NULL DEFAULT '[]',
        env_json TEXT NOT NULL DEFAULT '{}', adapter_path TEXT, created_at TEXT NOT NULL, started_at TEXT,
        finished_at TEXT, owner_pid INTEGER, owner_host TEXT, heartbeat_at TEXT,
        evals_json TEXT NOT NULL DEFAULT '[]', checkpoint_path TEXT);
    CREATE TABLE meta (key TEXT PRIMARY KEY, value_json TEXT NOT NULL);
"""


def _old_study(path, metrics) -> None:
    """A study.db as written before column ``step``: four done trials (2 strategies x 2 seeds) of 4 steps each,
    evaluated at step 2; ``metrics(strategy, seed)`` -> the trial's metrics."""
    conn = sqlite3.connect(path / "study.db")
    conn.executescript(_BEFORE_STEP)
    for strategy, losses in (("all_linear", (2.0, 2.1)), ("mlp_only", (2.05, 2.12))):
        for seed, loss in enumerate(losses):
            conn.execute("INSERT INTO trials(trial_id, strategy, seed, status, config_json, metrics_json, evals_json,"
                         " created_at) VALUES(?, ?, ?, 'done', '{}', ?, ?, '2026-01-01T00:00:00+00:00')",
                         (f"{strategy}-{seed}", strategy, seed, json.dumps(metrics(strategy, seed)),
                          json.dumps([[2, {"eval_loss": loss + 0.3}]])))
    conn.commit()
    conn.close()


def test_done_trials_from_before_the_step_column_get_their_steps_and_a_rerun_races_on(tmp_path):
    _old_study(tmp_path, lambda strategy, seed: {"eval_loss": 2.0, "steps": 4})
    cfg = StudyConfig.from_dict({"strategies": ["all_linear", "mlp_only"], "seeds": [0, 1], "race": {"at": [0.5]}})
    with Store.open(tmp_path, create=False) as store:
        assert {t.trial_id: t.step for t in store.trials()} == dict.fromkeys(
            ["all_linear-0", "all_linear-1", "mlp_only-0", "mlp_only-1"], 4)
        made = race.decide_ready(store, race.study_race(cfg, [t.trial_id for t in store.current_trials()], 3.0),
                                 total=4)  # without steps: no trial "reached" the rung
        assert [d.step for d in made] == race.rung_steps(cfg.race.at, 4) == [2]
        assert set(made[0].retained) | set(made[0].stopped) | set(made[0].kept) == {"all_linear", "mlp_only"}


def test_a_store_already_given_the_column_without_steps_is_filled_too(tmp_path):
    """A store an earlier version migrated (column added, left NULL) is filled on the next open."""
    _old_study(tmp_path, lambda strategy, seed: {"eval_loss": 2.0, "steps": 4 + seed})
    conn = sqlite3.connect(tmp_path / "study.db")
    conn.execute("ALTER TABLE trials ADD COLUMN step INTEGER")
    conn.execute("ALTER TABLE trials ADD COLUMN measured_json TEXT NOT NULL DEFAULT '{}'")
    conn.commit()
    conn.close()
    with Store.open(tmp_path, create=False) as store:
        assert {t.trial_id: t.step for t in store.trials()} == {
            "all_linear-0": 4, "all_linear-1": 5, "mlp_only-0": 4, "mlp_only-1": 5}


def test_a_done_trial_without_steps_to_take_its_step_from_is_refused_in_one_line(tmp_path):
    _old_study(tmp_path, lambda strategy, seed: {"eval_loss": 2.0} if strategy == "mlp_only" else {"steps": 4})
    before = _columns(tmp_path / "study.db")
    with pytest.raises(StoreError, match=r"^cannot use study directory .*: trial mlp_only-0 finished before trials "
                                         r"had a step, and its metrics have no steps") as e:
        Store.open(tmp_path, create=False)
    assert "\n" not in str(e.value)
    assert _columns(tmp_path / "study.db") == before and "step" not in before  # rolled back: the file is as it was


def test_a_trial_this_version_stored_without_steps_opens_as_it_is(tmp_path):
    """Only a trial from before the column is refused: one stored since without steps (by hand, by a tool) keeps
    its NULL step."""
    with Store.open(tmp_path) as store:
        store.add_pending("t", "all_linear", 0, {})
        store.mark_done("t", {"eval_loss": 1.0}, [], {}, {})
    with Store.open(tmp_path, create=False) as store:
        assert store.get("t").step is None
