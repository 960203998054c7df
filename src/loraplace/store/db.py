"""The results database of a study: one SQLite file (WAL mode) in the study directory.

Usage::

    store = Store.open("studies/default")        # creates studies/default/study.db
    store.add_pending(trial_id, strategy="all_linear", seed=0, config={...})
    store.mark_done(trial_id, metrics={...}, curve=[(1, 2.3), ...], placement={...}, env={...})
    for t in store.current_trials(): print(t.strategy, t.seed, t.status, t.metrics.get("eval_loss"))

The schema (one row per trial in table ``trials``, keyed by a hash of its resolved config; docs/results.md
documents every column) is ``store.schema``; which process runs which trial (claims, heartbeats) is
``store.claims``; the CSV and JSON exports are ``store.results``. Table ``meta`` holds study-wide key/JSON-value pairs (``study_config``, ``zero_shot``,
...). Table ``probe_scores`` holds the probe's per-module scores (``probe_key, seed, block, role, module,
criterion, score``; see measure/probe.py and docs/results.md). Every write is one transaction: a crash
never leaves a half-written row.
"""

from __future__ import annotations

import datetime as _dt
import json
import sqlite3
from dataclasses import dataclass, field
from pathlib import Path

from loraplace.core.files import write_text_atomic
from loraplace.store.schema import (  # noqa: F401  (the statuses and StoreError: the store's vocabulary, from here)
    DONE, FAILED, LOCK_WAIT_S, PAUSED, PENDING, RUNNING, SCHEMA, STATUSES, STOPPED, UNFINISHED, UPSERT_META, StoreError,
    migrate, transaction, use_wal)

DB_NAME = "study.db"
TUNE, FINAL = "tune", "final"  # a trial's phase: the learning-rate search (study.tune) or the study's answer


@dataclass
class TrialRecord:
    """One row of table ``trials``, its JSON columns parsed."""

    trial_id: str
    strategy: str
    seed: int
    status: str
    error: str | None = None
    config: dict = field(default_factory=dict)
    placement: dict = field(default_factory=dict)
    metrics: dict = field(default_factory=dict)
    curve: list = field(default_factory=list)
    env: dict = field(default_factory=dict)
    adapter_path: str | None = None
    created_at: str | None = None
    started_at: str | None = None
    finished_at: str | None = None
    owner_pid: int | None = None
    owner_host: str | None = None
    heartbeat_at: str | None = None
    evals: list = field(default_factory=list)  # [[step, {metric: value}], ...]: the rung evaluations
    checkpoint_path: str | None = None
    step: int | None = None
    measured: dict = field(default_factory=dict)  # {"forgetting": key of the set it was measured on}

    @property
    def phase(self) -> str:
        """``tune`` for a trial of the learning-rate search (its config says so), else ``final``: every trial of an
        untuned study, and every trial stored before the search existed."""
        return TUNE if self.config.get("phase") == TUNE else FINAL

    @property
    def lr(self) -> float | None:
        """The peak learning rate the trial trains at (its config's ``train.lr``); None when it does not say."""
        lr = (self.config.get("train") or {}).get("lr")
        return None if lr is None else float(lr)

    @property
    def owner(self) -> str:
        """``pid@host`` of the process that claimed the trial, or "" when none did."""
        return f"{self.owner_pid}@{self.owner_host}" if self.owner_pid is not None else ""

    def heartbeat_age_s(self, now: _dt.datetime | None = None) -> float | None:
        if not self.heartbeat_at:
            return None
        now = now or _dt.datetime.now(_dt.timezone.utc)
        return (now - _dt.datetime.fromisoformat(self.heartbeat_at)).total_seconds()


def now() -> str:
    """The current UTC time as the store writes it (ISO-8601, seconds)."""
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


class Store:
    """A study's SQLite database. Open with :meth:`open`; safe to reopen after a crash."""

    def __init__(self, directory: Path, conn: sqlite3.Connection):
        self.directory = directory
        self.conn = conn  # autocommit (isolation_level None): each write below is its own transaction

    @classmethod
    def open(cls, directory: str | Path, create: bool = True) -> "Store":
        directory = Path(directory)
        db = directory / DB_NAME
        if not create and not db.exists():
            raise StoreError(f"no study database at {db} (run `loraplace study out={directory}` first)")
        try:
            directory.mkdir(parents=True, exist_ok=True)
            conn = sqlite3.connect(db, timeout=LOCK_WAIT_S, isolation_level=None)
            use_wal(conn)
            conn.execute("PRAGMA synchronous=NORMAL")
            conn.executescript(SCHEMA)
            migrate(conn)
        except (OSError, sqlite3.Error, StoreError) as e:
            raise StoreError(f"cannot use study directory {directory}: {e}") from None
        return cls(directory, conn)

    def close(self) -> None:
        self.conn.close()

    def __enter__(self) -> "Store":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    @property
    def db_path(self) -> Path:
        return self.directory / DB_NAME

    # -- writes: each one statement (autocommit: its own transaction) or one ``transaction`` -----------
    def _exec(self, sql: str, args: tuple = ()) -> sqlite3.Cursor:
        return self.conn.execute(sql, args)

    def put_meta(self, key: str, value) -> None:
        self._exec(UPSERT_META, (key, json.dumps(value, sort_keys=True)))

    def write_file(self, name: str, text: str) -> Path:
        """Write a text file into the study directory atomically (write a temp file, then rename)."""
        return write_text_atomic(self.directory / name, text)

    def put_study_config(self, cfg, trial_ids: list[str]) -> None:
        """The study's typed config (``core.config.StudyConfig``) and the ids of the trials it plans."""
        with transaction(self.conn):  # both or neither
            for key, value in (("study_config", cfg.to_dict()), ("trial_ids", list(trial_ids))):
                self.conn.execute(UPSERT_META, (key, json.dumps(value, sort_keys=True)))

    def study_config(self):
        """The stored study config as a typed ``StudyConfig``, or None before the first ``study`` run."""
        from loraplace.core.config import ConfigError, StudyConfig

        raw = self.get_meta("study_config")
        if not raw:
            return None
        raw = {k: v for k, v in raw.items() if k != "trial_ids"}  # older stores kept the ids inside the config
        try:
            return StudyConfig.from_dict(raw)
        except ConfigError as e:
            raise StoreError(f"{self.directory}: the stored study config is not valid for this loraplace ({e})") from None

    def trial_ids(self) -> list[str]:
        """Ids of the trials the latest study config plans (older trials in the directory are not among them)."""
        ids = self.get_meta("trial_ids")
        if ids is None:  # stores written before trial_ids had a key of its own
            ids = (self.get_meta("study_config") or {}).get("trial_ids", [])
        return list(ids)

    def get_meta(self, key: str, default=None):
        row = self.conn.execute("SELECT value_json FROM meta WHERE key=?", (key,)).fetchone()
        return json.loads(row[0]) if row else default

    def add_pending(self, trial_id: str, strategy: str, seed: int, config: dict) -> None:
        """Register a trial; a trial that already exists keeps its row (and status)."""
        self._exec(
            "INSERT OR IGNORE INTO trials(trial_id, strategy, seed, status, config_json, created_at) VALUES(?,?,?,?,?,?)",
            (trial_id, strategy, int(seed), PENDING, json.dumps(config, sort_keys=True), now()),
        )

    def mark_done(
        self,
        trial_id: str,
        metrics: dict,
        curve: list,
        placement,  # a placement.record.PlacementRecord (or its dict)
        env: dict,
        adapter_path: str | None = None,
        evals: list | None = None,
        measured: dict | None = None,
    ) -> None:
        """A finished trial: its metrics, curve, placement, environment, adapter and rung evaluations."""
        self._exec(
            "UPDATE trials SET status=?, error=NULL, metrics_json=?, curve_json=?, placement_json=?, env_json=?,"
            " adapter_path=?, evals_json=?, checkpoint_path=NULL, step=?, measured_json=?, finished_at=?"
            " WHERE trial_id=?",
            (
                DONE,
                json.dumps(metrics, sort_keys=True),
                json.dumps([list(p) for p in curve]),
                json.dumps(placement.to_dict() if hasattr(placement, "to_dict") else placement, sort_keys=True),
                json.dumps(env, sort_keys=True),
                adapter_path,
                _evals_json(evals),
                metrics.get("steps"),
                json.dumps(measured or {}, sort_keys=True),
                now(),
                trial_id,
            ),
        )

    def update_metrics(self, trial_id: str, metrics: dict, measured: dict) -> None:
        """Add or replace some of a finished trial's metrics (a measurement made after it finished), in one
        transaction: the rest of its row is kept."""
        with transaction(self.conn) as conn:
            row = conn.execute("SELECT metrics_json, measured_json FROM trials WHERE trial_id=?", (trial_id,)).fetchone()
            m, w = {**json.loads(row[0]), **metrics}, {**json.loads(row[1] or "{}"), **measured}
            conn.execute("UPDATE trials SET metrics_json=?, measured_json=? WHERE trial_id=?",
                         (json.dumps(m, sort_keys=True), json.dumps(w, sort_keys=True), trial_id))

    def mark_paused(self, trial_id: str, step: int, evals: list, checkpoint_path: str, curve: list,
                    metrics: dict, placement: dict) -> None:
        """A racing trial at a rung: checkpointed at ``step`` and waiting for the rung's decision; ``metrics`` are
        its figures so far (time, tokens, the rung's evaluation)."""
        self._exec(
            "UPDATE trials SET status=?, error=NULL, step=?, evals_json=?, checkpoint_path=?, curve_json=?,"
            " metrics_json=?, placement_json=? WHERE trial_id=?",
            (PAUSED, int(step), _evals_json(evals), checkpoint_path, json.dumps([list(p) for p in curve]),
             json.dumps(metrics, sort_keys=True), json.dumps(placement, sort_keys=True), trial_id),
        )

    def mark_failed(self, trial_id: str, reason: str, curve: list | None = None, env: dict | None = None) -> None:
        self._exec(
            "UPDATE trials SET status=?, error=?, curve_json=?, env_json=?, finished_at=? WHERE trial_id=?",
            (
                FAILED,
                reason.strip().splitlines()[0] if reason.strip() else "unknown error",
                json.dumps([list(p) for p in (curve or [])]),
                json.dumps(env or {}, sort_keys=True),
                now(),
                trial_id,
            ),
        )

    def put_probe(self, probe_key: str, seed: int, rows: list[tuple[int, str, str, str, float]], info: dict) -> None:
        """One probe seed's scores, rows (block, role, module, criterion, score), and its ``info`` (settings,
        time) under meta ``probe:<probe_key>`` -> {"seeds": {seed: info}}: all in one transaction."""
        with transaction(self.conn):
            self.conn.execute("DELETE FROM probe_scores WHERE probe_key=? AND seed=?", (probe_key, int(seed)))
            self.conn.executemany(
                "INSERT INTO probe_scores(probe_key, seed, block, role, module, criterion, score) VALUES(?,?,?,?,?,?,?)",
                [(probe_key, int(seed), int(b), r, m, c, float(v)) for b, r, m, c, v in rows])
            meta = self.get_meta(f"probe:{probe_key}", {"seeds": {}})
            meta["seeds"][str(int(seed))] = info
            self.conn.execute(UPSERT_META, (f"probe:{probe_key}", json.dumps(meta, sort_keys=True)))

    def probe_rows(self, probe_key: str) -> list[tuple[int, int, str, str, str, float]]:
        """Rows (seed, block, role, module, criterion, score) of one probe, by seed, block, module, criterion."""
        return [tuple(r) for r in self.conn.execute(
            "SELECT seed, block, role, module, criterion, score FROM probe_scores WHERE probe_key=? "
            "ORDER BY seed, block, module, criterion", (probe_key,))]

    # -- reads ---------------------------------------------------------------------------------
    def trials(self, status: str | None = None, strategy: str | None = None) -> list[TrialRecord]:
        """Every trial the database holds (of every config run in the directory), oldest first."""
        sql, args = "SELECT * FROM trials", []
        where = []
        if status is not None:
            where.append("status=?")
            args.append(status)
        if strategy is not None:
            where.append("strategy=?")
            args.append(strategy)
        if where:
            sql += " WHERE " + " AND ".join(where)
        sql += " ORDER BY created_at, rowid"
        cur = self.conn.execute(sql, args)
        cols = [c[0] for c in cur.description]
        return [_record(dict(zip(cols, row))) for row in cur.fetchall()]

    def current_trials(self) -> list[TrialRecord]:
        """The trials of the study's latest config (what the report and export count); every trial when the
        store has no list of planned ids."""
        current = set(self.trial_ids())
        return [t for t in self.trials() if not current or t.trial_id in current]

    def get(self, trial_id: str) -> TrialRecord | None:
        cur = self.conn.execute("SELECT * FROM trials WHERE trial_id=?", (trial_id,))
        row = cur.fetchone()
        return _record(dict(zip([c[0] for c in cur.description], row))) if row else None


def _record(row: dict) -> TrialRecord:
    return TrialRecord(
        trial_id=row["trial_id"],
        strategy=row["strategy"],
        seed=row["seed"],
        status=row["status"],
        error=row["error"],
        config=json.loads(row["config_json"]),
        placement=json.loads(row["placement_json"]),
        metrics=json.loads(row["metrics_json"]),
        curve=json.loads(row["curve_json"]),
        env=json.loads(row["env_json"]),
        adapter_path=row["adapter_path"],
        created_at=row["created_at"],
        started_at=row["started_at"],
        finished_at=row["finished_at"],
        owner_pid=row.get("owner_pid"),
        owner_host=row.get("owner_host"),
        heartbeat_at=row.get("heartbeat_at"),
        evals=json.loads(row.get("evals_json") or "[]"),
        checkpoint_path=row.get("checkpoint_path"),
        step=row.get("step"),
        measured=json.loads(row.get("measured_json") or "{}"),
    )


def _evals_json(evals) -> str:
    return json.dumps([[int(step), dict(ev)] for step, ev in (evals or [])], sort_keys=True)


