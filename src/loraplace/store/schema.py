"""The study database's schema: trial statuses, the tables, switching to WAL, write transactions, and bringing an
older file up to date.

Usage::

    conn = sqlite3.connect(path, isolation_level=None); use_wal(conn); conn.executescript(SCHEMA); migrate(conn)
    with transaction(conn):             # BEGIN IMMEDIATE ... COMMIT, or ROLLBACK on any exception
        ...

Schema of table ``trials`` (one row per trial, keyed by a hash of its resolved config; docs/results.md
documents every column):

================  =========================================================================
trial_id          hex hash of the resolved trial config (see ``study.plan.trial_id``)
strategy          strategy name
seed              integer seed
status            one of ``STATUSES``
error             one-line reason when failed, else NULL
config_json       the resolved trial config (train/eval settings, strategy definition)
placement_json    {"modules": {full_name: {"rank", "alpha", "role", "block"}}, ...}
metrics_json      flat {name: number}; names and units documented in ``core.metrics.METRICS``
curve_json        [[step, train_loss], ...]
env_json          package versions, device, git commit
adapter_path      relative path of the saved PEFT adapter inside the study dir, or NULL
created_at ...    ISO-8601 UTC timestamps (created, started, finished)
owner_pid         pid of the process that claimed the trial (kept after it finishes), or NULL
owner_host        host name of that process, or NULL
heartbeat_at      ISO-8601 UTC time the owner last said it is alive, or NULL
evals_json        [[step, {"eval_loss": ..., ...}], ...]: the rung evaluations (``race.record``, ``race.at``)
checkpoint_path   relative path of the trial's resumable checkpoint (racing, between rungs), or NULL
step              optimizer steps the trial has done (its checkpoint's step while paused), or NULL
measured_json     {"forgetting": key}: what the trial's study-level measurements were made on
================  =========================================================================

Table ``meta`` holds study-wide key/JSON-value pairs; table ``probe_scores`` the probe's per-module scores.
``store.db`` reads and writes them.
"""

from __future__ import annotations

import json
import sqlite3
import time
from contextlib import contextmanager

from loraplace.core.errors import LoraplaceError

PENDING, RUNNING, DONE, FAILED, PAUSED, STOPPED = "pending", "running", "done", "failed", "paused", "stopped"
# A trial's life: pending -> running -> done | failed; with racing, running -> paused at a rung (checkpointed,
# waiting for the rung's decision) -> pending (it goes on) | stopped (it cannot become the study's answer).
STATUSES = (PENDING, RUNNING, DONE, FAILED, PAUSED, STOPPED)
UNFINISHED = (PENDING, RUNNING, PAUSED)
LOCK_WAIT_S = 30.0  # how long any one statement waits for another process's lock before failing
# Columns added after the first release, in the order they were added: an older study.db gets them on open.
_ADDED_COLUMNS = (("owner_pid", "INTEGER"), ("owner_host", "TEXT"), ("heartbeat_at", "TEXT"),
                  ("evals_json", "TEXT NOT NULL DEFAULT '[]'"), ("checkpoint_path", "TEXT"), ("step", "INTEGER"),
                  ("measured_json", "TEXT NOT NULL DEFAULT '{}'"))

_TRIALS = f"""
CREATE TABLE IF NOT EXISTS trials (
    trial_id TEXT PRIMARY KEY,
    strategy TEXT NOT NULL,
    seed INTEGER NOT NULL,
    status TEXT NOT NULL CHECK (status IN ({", ".join(f"'{s}'" for s in STATUSES)})),
    error TEXT,
    config_json TEXT NOT NULL,
    placement_json TEXT NOT NULL DEFAULT '{{}}',
    metrics_json TEXT NOT NULL DEFAULT '{{}}',
    curve_json TEXT NOT NULL DEFAULT '[]',
    env_json TEXT NOT NULL DEFAULT '{{}}',
    adapter_path TEXT,
    created_at TEXT NOT NULL,
    started_at TEXT,
    finished_at TEXT,
    owner_pid INTEGER,
    owner_host TEXT,
    heartbeat_at TEXT,
    evals_json TEXT NOT NULL DEFAULT '[]',
    checkpoint_path TEXT,
    step INTEGER,
    measured_json TEXT NOT NULL DEFAULT '{{}}'
);
"""
SCHEMA = _TRIALS + """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value_json TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS probe_scores (
    probe_key TEXT NOT NULL,
    seed INTEGER NOT NULL,
    block INTEGER NOT NULL,
    role TEXT NOT NULL,
    module TEXT NOT NULL,
    criterion TEXT NOT NULL,
    score REAL NOT NULL,
    PRIMARY KEY (probe_key, seed, module, criterion)
);
"""
UPSERT_META = "INSERT INTO meta(key, value_json) VALUES(?, ?) ON CONFLICT(key) DO UPDATE SET value_json=excluded.value_json"


class StoreError(LoraplaceError, RuntimeError):
    """The study directory or its database cannot be used."""


@contextmanager
def transaction(conn: sqlite3.Connection):
    """One write transaction on an autocommit connection (``isolation_level=None``): ``BEGIN IMMEDIATE`` takes the
    write lock at once, so what is read inside cannot change before it is written (another process waits, up to
    ``LOCK_WAIT_S``); COMMIT at the end, ROLLBACK on any exception (KeyboardInterrupt too), which goes on up."""
    conn.execute("BEGIN IMMEDIATE")
    try:
        yield conn
        conn.execute("COMMIT")
    except BaseException:
        conn.execute("ROLLBACK")
        raise


def use_wal(conn: sqlite3.Connection, wait_s: float = LOCK_WAIT_S) -> None:
    """Switch the file to WAL (it stays so). SQLite answers "database is locked" at once, without
    its busy handler, when another process opens or switches the same new file at that moment,
    so several `loraplace study` processes started together retry here instead of failing."""
    deadline = time.monotonic() + wait_s
    delay = 0.005
    while True:
        try:
            conn.execute("PRAGMA journal_mode=WAL")
            return
        except sqlite3.OperationalError as e:
            if "locked" not in str(e) and "busy" not in str(e) or time.monotonic() > deadline:
                raise
            time.sleep(delay)
            delay = min(delay * 2, 0.2)


def migrate(conn: sqlite3.Connection) -> None:
    """Bring a study.db made by an earlier version up to this schema: add the columns added since, rebuild the
    table where its status CHECK lacks a status (SQLite cannot alter a CHECK), and give each done trial that
    finished before column ``step`` existed its metrics' ``steps`` as its step (racing waits for every trial to
    reach a rung's step); a StoreError when such a trial's metrics have none. Checked again inside one write
    transaction, so two processes opening the same old file do not both migrate it."""
    if not _outdated(conn):
        return
    with transaction(conn):
        if not _outdated(conn):
            return
        have = _columns(conn)
        sql = conn.execute("SELECT sql FROM sqlite_master WHERE type='table' AND name='trials'").fetchone()[0]
        if any(f"'{s}'" not in sql for s in STATUSES):
            conn.execute("ALTER TABLE trials RENAME TO trials_old")
            conn.execute(_TRIALS)
            keep = [c for c in _columns(conn) if c in have]
            conn.execute(f"INSERT INTO trials ({', '.join(keep)}) SELECT {', '.join(keep)} FROM trials_old")
            conn.execute("DROP TABLE trials_old")
        else:
            for name, kind in _ADDED_COLUMNS:
                if name not in have:
                    conn.execute(f"ALTER TABLE trials ADD COLUMN {name} {kind}")
        _fill_steps(conn, every="step" not in have)


# Done trials without a step: those of a store from before the column (or migrated by a version that added it
# without filling it in). Trials this version finishes get their metrics' steps from mark_done.
_DONE_WITHOUT_STEP = f"SELECT trial_id, metrics_json FROM trials WHERE status='{DONE}' AND step IS NULL"


def _fill_steps(conn: sqlite3.Connection, every: bool) -> None:
    """Inside the migration's transaction: ``step`` of each done trial that lacks it, from its metrics' ``steps``
    (the optimizer steps it did); ``every``: the column is new, so every such trial must have them."""
    for trial_id, metrics in conn.execute(_DONE_WITHOUT_STEP).fetchall():
        steps = json.loads(metrics or "{}").get("steps")
        if isinstance(steps, float) and steps.is_integer():
            steps = int(steps)
        if isinstance(steps, int) and not isinstance(steps, bool) and steps >= 0:
            conn.execute("UPDATE trials SET step=? WHERE trial_id=?", (steps, trial_id))
        elif every:
            raise StoreError(f"trial {trial_id} finished before trials had a step, and its metrics have no steps to "
                             f"take it from (steps: {steps!r}); run the study again in a new directory")


def _outdated(conn: sqlite3.Connection) -> bool:
    sql = conn.execute("SELECT sql FROM sqlite_master WHERE type='table' AND name='trials'").fetchone()[0]
    if any(c not in _columns(conn) for c, _ in _ADDED_COLUMNS) or any(f"'{s}'" not in sql for s in STATUSES):
        return True
    # a done trial without a step whose metrics name its steps (a trial stored without steps leaves nothing to fill)
    return conn.execute(_DONE_WITHOUT_STEP + " AND metrics_json LIKE '%\"steps\"%' LIMIT 1").fetchone() is not None


def _columns(conn: sqlite3.Connection) -> set[str]:
    return {row[1] for row in conn.execute("PRAGMA table_info(trials)")}
