"""The results database of a study: one SQLite file (WAL mode) in the study directory.

Usage::

    store = Store.open("studies/default")        # creates studies/default/study.db
    store.add_pending(trial_id, strategy="all_linear", seed=0, config={...})
    if store.claim(trial_id):                    # False: another process holds it (or it is done)
        ...                                      # a Heartbeat thread keeps the claim alive meanwhile
    store.mark_done(trial_id, metrics={...}, curve=[(1, 2.3), ...], placement={...}, env={...})
    for t in store.trials(): print(t.strategy, t.seed, t.status, t.metrics.get("eval_loss"))

Schema of table ``trials`` (one row per trial, keyed by a hash of its resolved config):

================  =========================================================================
trial_id          hex hash of the resolved trial config (see ``study.trial_id``)
strategy          strategy name
seed              integer seed
status            ``pending`` | ``running`` | ``done`` | ``failed``
error             one-line reason when failed, else NULL
config_json       the resolved trial config (train/eval settings, strategy definition)
placement_json    {"modules": {full_name: {"rank", "alpha", "role", "block"}}, ...}
metrics_json      flat {name: number}; names and units documented in ``metrics.METRICS``
curve_json        [[step, train_loss], ...]
env_json          package versions, device, git commit
adapter_path      relative path of the saved PEFT adapter inside the study dir, or NULL
created_at ...    ISO-8601 UTC timestamps (created, started, finished)
owner_pid         pid of the process that claimed the trial (kept after it finishes), or NULL
owner_host        host name of that process, or NULL
heartbeat_at      ISO-8601 UTC time the owner last said it is alive, or NULL
================  =========================================================================

Several processes (on one machine or on several sharing the directory) may run one study: a
process *claims* a pending trial in one ``BEGIN IMMEDIATE`` transaction, and others skip it. A
``running`` claim whose owner is gone (no heartbeat for ``CLAIM_TIMEOUT_S``, or a dead pid on
this host) may be claimed again.

Table ``meta`` holds study-wide key/JSON-value pairs (``study_config``, ``zero_shot``, ...).
Table ``probe_scores`` holds the probe's per-module scores (``probe_key, seed, block, role, module,
criterion, score``; see probe.py and docs/results.md).
Every write is one transaction: a crash never leaves a half-written row.
"""

from __future__ import annotations

import contextlib
import csv
import datetime as _dt
import io
import json
import os
import shutil
import socket
import sqlite3
import tempfile
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from .core import LoraplaceError

DB_NAME = "study.db"
STATUSES = ("pending", "running", "done", "failed")
CLAIM_TIMEOUT_S = 120.0  # a running trial whose owner has not beaten for this long may be claimed again
HEARTBEAT_S = 15.0  # how often a process refreshes the claims it holds
LOCK_WAIT_S = 30.0  # how long any one statement waits for another process's lock before failing
_CLAIM_COLUMNS = (("owner_pid", "INTEGER"), ("owner_host", "TEXT"), ("heartbeat_at", "TEXT"))  # added in 0.1 (migrated)

_SCHEMA = """
CREATE TABLE IF NOT EXISTS trials (
    trial_id TEXT PRIMARY KEY,
    strategy TEXT NOT NULL,
    seed INTEGER NOT NULL,
    status TEXT NOT NULL CHECK (status IN ('pending', 'running', 'done', 'failed')),
    error TEXT,
    config_json TEXT NOT NULL,
    placement_json TEXT NOT NULL DEFAULT '{}',
    metrics_json TEXT NOT NULL DEFAULT '{}',
    curve_json TEXT NOT NULL DEFAULT '[]',
    env_json TEXT NOT NULL DEFAULT '{}',
    adapter_path TEXT,
    created_at TEXT NOT NULL,
    started_at TEXT,
    finished_at TEXT,
    owner_pid INTEGER,
    owner_host TEXT,
    heartbeat_at TEXT
);
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


class StoreError(LoraplaceError, RuntimeError):
    """The study directory or its database cannot be used."""


@dataclass
class TrialRecord:
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

    @property
    def owner(self) -> str:
        """``pid@host`` of the process that claimed the trial, or "" when none did."""
        return f"{self.owner_pid}@{self.owner_host}" if self.owner_pid is not None else ""

    def heartbeat_age_s(self, now: _dt.datetime | None = None) -> float | None:
        if not self.heartbeat_at:
            return None
        now = now or _dt.datetime.now(_dt.timezone.utc)
        return (now - _dt.datetime.fromisoformat(self.heartbeat_at)).total_seconds()

    def claim_is_dead(self, timeout_s: float = CLAIM_TIMEOUT_S) -> bool:
        """A ``running`` trial whose owner is gone: silent for ``timeout_s``, a dead pid on this
        host, or no owner at all (left by a version without claims)."""
        if self.status != "running":
            return False
        if self.owner_pid is None or self.heartbeat_at is None:
            return True
        if self.owner_host == HOST and not _pid_alive(self.owner_pid):
            return True
        return self.heartbeat_age_s() > timeout_s


HOST = socket.gethostname()


def _pid_alive(pid: int) -> bool:
    import psutil

    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


class Store:
    """A study's SQLite database. Open with :meth:`open`; safe to reopen after a crash."""

    def __init__(self, directory: Path, conn: sqlite3.Connection):
        self.directory = directory
        self._conn = conn

    @classmethod
    def open(cls, directory: str | Path, create: bool = True) -> "Store":
        directory = Path(directory)
        db = directory / DB_NAME
        if not create and not db.exists():
            raise StoreError(f"no study database at {db} (run `loraplace study out={directory}` first)")
        try:
            directory.mkdir(parents=True, exist_ok=True)
            conn = sqlite3.connect(db, timeout=LOCK_WAIT_S, isolation_level=None)
            _use_wal(conn)
            conn.execute("PRAGMA synchronous=NORMAL")
            conn.executescript(_SCHEMA)
            _migrate(conn)
        except (OSError, sqlite3.Error) as e:
            raise StoreError(f"cannot use study directory {directory}: {e}") from None
        return cls(directory, conn)

    def close(self) -> None:
        self._conn.close()

    def __enter__(self) -> "Store":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- writes: each one statement, hence one transaction ------------------------------------
    def _exec(self, sql: str, args: tuple = ()) -> None:
        with self._conn:
            self._conn.execute(sql, args)

    def put_meta(self, key: str, value) -> None:
        self._exec(
            "INSERT INTO meta(key, value_json) VALUES(?, ?) ON CONFLICT(key) DO UPDATE SET value_json=excluded.value_json",
            (key, json.dumps(value, sort_keys=True)),
        )

    def write_file(self, name: str, text: str) -> Path:
        """Write a text file into the study directory atomically (write a temp file, then rename)."""
        path = self.directory / name
        tmp = path.with_name(f".{name}.tmp")
        tmp.write_text(text)
        tmp.replace(path)
        return path

    def put_study_config(self, cfg, trial_ids: list[str]) -> None:
        """The study's typed config (``config.StudyConfig``) and the ids of the trials it plans."""
        with self._conn:  # both or neither
            for key, value in (("study_config", cfg.to_dict()), ("trial_ids", list(trial_ids))):
                self._conn.execute("INSERT INTO meta(key, value_json) VALUES(?, ?) ON CONFLICT(key) DO UPDATE SET "
                                   "value_json=excluded.value_json", (key, json.dumps(value, sort_keys=True)))

    def study_config(self):
        """The stored study config as a typed ``StudyConfig``, or None before the first ``study`` run."""
        from .config import ConfigError, StudyConfig

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
        row = self._conn.execute("SELECT value_json FROM meta WHERE key=?", (key,)).fetchone()
        return json.loads(row[0]) if row else default

    def add_pending(self, trial_id: str, strategy: str, seed: int, config: dict) -> None:
        """Register a trial; a trial that already exists keeps its row (and status)."""
        self._exec(
            "INSERT OR IGNORE INTO trials(trial_id, strategy, seed, status, config_json, created_at) VALUES(?,?,?,?,?,?)",
            (trial_id, strategy, int(seed), "pending", json.dumps(config, sort_keys=True), _now()),
        )

    def mark_running(self, trial_id: str) -> None:
        """Set a trial running, owned by this process, whatever its state (see :meth:`claim`)."""
        now = _now()
        self._exec(
            "UPDATE trials SET status='running', error=NULL, started_at=?, finished_at=NULL, owner_pid=?, owner_host=?,"
            " heartbeat_at=? WHERE trial_id=?",
            (now, os.getpid(), HOST, now, trial_id),
        )

    def claim(self, trial_id: str, timeout_s: float = CLAIM_TIMEOUT_S) -> bool:
        """Take a trial for this process if it is ``pending`` or its owner is gone; one transaction
        (``BEGIN IMMEDIATE``), so of several processes exactly one gets it. False: leave it alone."""
        conn = self._conn
        conn.execute("BEGIN IMMEDIATE")
        try:
            cur = conn.execute("SELECT * FROM trials WHERE trial_id=?", (trial_id,))
            row = cur.fetchone()
            rec = _record(dict(zip([c[0] for c in cur.description], row))) if row else None
            ok = rec is not None and (rec.status == "pending" or rec.claim_is_dead(timeout_s))
            if ok:
                now = _now()
                conn.execute(
                    "UPDATE trials SET status='running', error=NULL, started_at=?, finished_at=NULL, owner_pid=?,"
                    " owner_host=?, heartbeat_at=? WHERE trial_id=?",
                    (now, os.getpid(), HOST, now, trial_id),
                )
            conn.execute("COMMIT")
            return ok
        except BaseException:
            conn.execute("ROLLBACK")
            raise

    def heartbeat(self, trial_ids) -> None:
        """This process is alive and still running these trials."""
        self._update_ids("SET heartbeat_at=? WHERE status='running' AND owner_pid=? AND owner_host=?",
                         (_now(), os.getpid(), HOST), trial_ids)

    def release(self, trial_ids) -> int:
        """Give trials this process still holds back to ``pending`` (it is stopping early)."""
        return self._update_ids("SET status='pending', started_at=NULL WHERE status='running' AND owner_pid=?"
                                " AND owner_host=?", (os.getpid(), HOST), trial_ids)

    def requeue_failed(self, trial_ids) -> int:
        """Failed trials go back to ``pending`` to be tried again; returns how many."""
        return self._update_ids("SET status='pending' WHERE status='failed'", (), trial_ids)

    def _update_ids(self, set_where: str, args: tuple, trial_ids) -> int:
        """``UPDATE trials <set_where> AND trial_id IN (trial_ids)`` in one transaction; rows changed."""
        ids = list(trial_ids)
        if not ids:
            return 0
        with self._conn:
            cur = self._conn.execute(f"UPDATE trials {set_where} AND trial_id IN ({','.join('?' * len(ids))})",
                                     (*args, *ids))
        return cur.rowcount

    def mark_done(
        self,
        trial_id: str,
        metrics: dict,
        curve: list,
        placement,  # a placement.PlacementRecord (or its dict)
        env: dict,
        adapter_path: str | None = None,
    ) -> None:
        self._exec(
            "UPDATE trials SET status='done', error=NULL, metrics_json=?, curve_json=?, placement_json=?, env_json=?,"
            " adapter_path=?, finished_at=? WHERE trial_id=?",
            (
                json.dumps(metrics, sort_keys=True),
                json.dumps([list(p) for p in curve]),
                json.dumps(placement.to_dict() if hasattr(placement, "to_dict") else placement, sort_keys=True),
                json.dumps(env, sort_keys=True),
                adapter_path,
                _now(),
                trial_id,
            ),
        )

    def mark_failed(self, trial_id: str, reason: str, curve: list | None = None, env: dict | None = None) -> None:
        self._exec(
            "UPDATE trials SET status='failed', error=?, curve_json=?, env_json=?, finished_at=? WHERE trial_id=?",
            (
                reason.strip().splitlines()[0] if reason.strip() else "unknown error",
                json.dumps([list(p) for p in (curve or [])]),
                json.dumps(env or {}, sort_keys=True),
                _now(),
                trial_id,
            ),
        )

    def reset_interrupted(self, timeout_s: float = CLAIM_TIMEOUT_S) -> int:
        """Trials left ``running`` by a process that is gone (see ``TrialRecord.claim_is_dead``) go
        back to ``pending``; a live process's trials are left alone. Returns how many."""
        n = 0
        self._conn.execute("BEGIN IMMEDIATE")
        try:
            for t in self.trials(status="running"):
                if t.claim_is_dead(timeout_s):
                    self._conn.execute("UPDATE trials SET status='pending', started_at=NULL WHERE trial_id=?", (t.trial_id,))
                    n += 1
            self._conn.execute("COMMIT")
        except BaseException:
            self._conn.execute("ROLLBACK")
            raise
        return n

    def put_probe(self, probe_key: str, seed: int, rows: list[tuple[int, str, str, str, float]], info: dict) -> None:
        """One probe seed's scores, rows (block, role, module, criterion, score), and its ``info`` (settings,
        time) under meta ``probe:<probe_key>`` -> {"seeds": {seed: info}}: all in one transaction."""
        with self._conn:
            self._conn.execute("DELETE FROM probe_scores WHERE probe_key=? AND seed=?", (probe_key, int(seed)))
            self._conn.executemany(
                "INSERT INTO probe_scores(probe_key, seed, block, role, module, criterion, score) VALUES(?,?,?,?,?,?,?)",
                [(probe_key, int(seed), int(b), r, m, c, float(v)) for b, r, m, c, v in rows])
            meta = self.get_meta(f"probe:{probe_key}", {"seeds": {}})
            meta["seeds"][str(int(seed))] = info
            self._conn.execute("INSERT INTO meta(key, value_json) VALUES(?, ?) ON CONFLICT(key) DO UPDATE SET "
                               "value_json=excluded.value_json", (f"probe:{probe_key}", json.dumps(meta, sort_keys=True)))

    def probe_rows(self, probe_key: str) -> list[tuple[int, int, str, str, str, float]]:
        """Rows (seed, block, role, module, criterion, score) of one probe, by seed, block, module, criterion."""
        return [tuple(r) for r in self._conn.execute(
            "SELECT seed, block, role, module, criterion, score FROM probe_scores WHERE probe_key=? "
            "ORDER BY seed, block, module, criterion", (probe_key,))]

    # -- reads ---------------------------------------------------------------------------------
    def trials(self, status: str | None = None, strategy: str | None = None) -> list[TrialRecord]:
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
        cur = self._conn.execute(sql, args)
        cols = [c[0] for c in cur.description]
        return [_record(dict(zip(cols, row))) for row in cur.fetchall()]

    def get(self, trial_id: str) -> TrialRecord | None:
        cur = self._conn.execute("SELECT * FROM trials WHERE trial_id=?", (trial_id,))
        row = cur.fetchone()
        return _record(dict(zip([c[0] for c in cur.description], row))) if row else None

    # -- export --------------------------------------------------------------------------------
    def to_rows(self) -> list[dict]:
        """One flat dict per trial: identity columns then ``metrics`` flattened."""
        rows = []
        for t in self.trials():
            row = {
                "trial_id": t.trial_id,
                "strategy": t.strategy,
                "seed": t.seed,
                "status": t.status,
                "error": t.error or "",
            }
            row.update(t.metrics)
            rows.append(row)
        return rows

    def export_json(self) -> str:
        return json.dumps([asdict(t) for t in self.trials()], indent=2, sort_keys=True)

    def export_csv(self) -> str:
        rows = self.to_rows()
        cols: list[str] = []
        for r in rows:
            cols += [k for k in r if k not in cols]
        buf = io.StringIO()
        w = csv.DictWriter(buf, fieldnames=cols, lineterminator="\n")
        w.writeheader()
        w.writerows(rows)
        return buf.getvalue()


@contextlib.contextmanager
def atomic_dir(target: str | Path):
    """Yield a temporary sibling of ``target`` to fill; on success it replaces ``target`` in one
    rename, so a crash never leaves a half-written adapter or model cache behind."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}-"))
    try:
        yield tmp
        umask = os.umask(0)
        os.umask(umask)
        for root, dirs, files in os.walk(tmp):  # mkdtemp makes 0700; give the usual modes
            for d in dirs:
                os.chmod(os.path.join(root, d), 0o777 & ~umask)
            for f in files:
                os.chmod(os.path.join(root, f), 0o666 & ~umask)
        os.chmod(tmp, 0o777 & ~umask)
        if target.exists():
            shutil.rmtree(target)
        os.replace(tmp, target)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


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
    )


def _use_wal(conn: sqlite3.Connection, wait_s: float = LOCK_WAIT_S) -> None:
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


def _migrate(conn: sqlite3.Connection) -> None:
    """Add the claim columns to a study.db made before they existed (checked inside one write
    transaction, so two processes opening the same old file do not both add them)."""
    if all(c in _columns(conn) for c, _ in _CLAIM_COLUMNS):
        return
    conn.execute("BEGIN IMMEDIATE")
    try:
        have = _columns(conn)
        for name, kind in _CLAIM_COLUMNS:
            if name not in have:
                conn.execute(f"ALTER TABLE trials ADD COLUMN {name} {kind}")
        conn.execute("COMMIT")
    except BaseException:
        conn.execute("ROLLBACK")
        raise


def _columns(conn: sqlite3.Connection) -> set[str]:
    return {row[1] for row in conn.execute("PRAGMA table_info(trials)")}


class Heartbeat:
    """A daemon thread that refreshes this process's claims every ``interval_s`` (its own
    connection: SQLite connections stay in their thread).

    Usage: ``with Heartbeat(store.directory) as hb: hb.add(tid); ...; hb.discard(tid)``
    """

    def __init__(self, directory: str | Path, interval_s: float = HEARTBEAT_S):
        self.directory, self.interval_s = Path(directory), interval_s
        self.held: set[str] = set()
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="loraplace-heartbeat", daemon=True)

    def add(self, trial_id: str) -> None:
        with self._lock:
            self.held.add(trial_id)

    def discard(self, trial_id: str) -> None:
        with self._lock:
            self.held.discard(trial_id)

    def _loop(self) -> None:
        store = Store.open(self.directory, create=False)
        try:
            while not self._stop.wait(self.interval_s):
                with self._lock:
                    ids = list(self.held)
                try:
                    store.heartbeat(ids)
                except sqlite3.Error:  # a busy or briefly unreachable database: try again next beat
                    pass
        finally:
            store.close()

    def __enter__(self) -> "Heartbeat":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
