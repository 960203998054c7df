"""Which process runs which trial: claims, heartbeats, and what happens when a process dies.

Usage::

    with Heartbeat(store.directory) as hb:
        if claim(store, trial_id):              # False: another process holds it (or it is done)
            hb.add(trial_id)                    # refreshed every HEARTBEAT_S while it runs
            ...
    release(store, hb.held)                     # stopping early: give back what is still held

Several processes (on one machine or on several sharing the directory) may run one study: a
process *claims* a pending trial in one write transaction (``store.schema.transaction``), and others skip it. A
``running`` claim whose owner is gone (no heartbeat for ``CLAIM_TIMEOUT_S``, or a dead pid on
this host) may be claimed again.
"""

from __future__ import annotations

import os
import socket
import sqlite3
import threading
from pathlib import Path

from loraplace.store.db import FAILED, PENDING, RUNNING, Store, TrialRecord, now
from loraplace.store.schema import transaction

CLAIM_TIMEOUT_S = 120.0  # a running trial whose owner has not beaten for this long may be claimed again
HEARTBEAT_S = 15.0  # how often a process refreshes the claims it holds
HOST = socket.gethostname()


def _pid_alive(pid: int) -> bool:
    import psutil

    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def claim_is_dead(t: TrialRecord, timeout_s: float = CLAIM_TIMEOUT_S) -> bool:
    """A ``running`` trial whose owner is gone: silent for ``timeout_s``, a dead pid on this host, or no
    owner at all (left by a version without claims)."""
    if t.status != RUNNING:
        return False
    if t.owner_pid is None or t.heartbeat_at is None:
        return True
    if t.owner_host == HOST and not _pid_alive(t.owner_pid):
        return True
    return t.heartbeat_age_s() > timeout_s


def claimable(t: TrialRecord | None) -> bool:
    """Pending, or running for a process that is gone."""
    return t is not None and (t.status == PENDING or claim_is_dead(t))


def claim(store: Store, trial_id: str, timeout_s: float = CLAIM_TIMEOUT_S) -> bool:
    """Take a trial for this process if it is ``pending`` or its owner is gone; one write transaction, so of
    several processes exactly one gets it. False: leave it alone."""
    with transaction(store.conn) as conn:
        rec = store.get(trial_id)
        ok = rec is not None and (rec.status == PENDING or claim_is_dead(rec, timeout_s))
        if ok:
            stamp = now()
            conn.execute(
                "UPDATE trials SET status=?, error=NULL, started_at=?, finished_at=NULL, owner_pid=?,"
                " owner_host=?, heartbeat_at=? WHERE trial_id=?",
                (RUNNING, stamp, os.getpid(), HOST, stamp, trial_id),
            )
    return ok


def heartbeat(store: Store, trial_ids) -> None:
    """This process is alive and still running these trials."""
    _update_ids(store, "SET heartbeat_at=? WHERE status=? AND owner_pid=? AND owner_host=?",
                (now(), RUNNING, os.getpid(), HOST), trial_ids)


def release(store: Store, trial_ids) -> int:
    """Give trials this process still holds back to ``pending`` (it is stopping early)."""
    return _update_ids(store, "SET status=?, started_at=NULL WHERE status=? AND owner_pid=? AND owner_host=?",
                       (PENDING, RUNNING, os.getpid(), HOST), trial_ids)


def requeue_failed(store: Store, trial_ids) -> int:
    """Failed trials go back to ``pending`` to be tried again; returns how many."""
    return _update_ids(store, "SET status=? WHERE status=?", (PENDING, FAILED), trial_ids)


def reset_interrupted(store: Store, timeout_s: float = CLAIM_TIMEOUT_S) -> int:
    """Trials left ``running`` by a process that is gone (``claim_is_dead``) go back to ``pending``; a live
    process's trials are left alone. Returns how many."""
    n = 0
    with transaction(store.conn) as conn:
        for t in store.trials(status=RUNNING):
            if claim_is_dead(t, timeout_s):
                conn.execute("UPDATE trials SET status=?, started_at=NULL WHERE trial_id=?", (PENDING, t.trial_id))
                n += 1
    return n


def _update_ids(store: Store, set_where: str, args: tuple, trial_ids) -> int:
    """``UPDATE trials <set_where> AND trial_id IN (trial_ids)`` in one transaction; rows changed."""
    ids = list(trial_ids)
    if not ids:
        return 0
    cur = store.conn.execute(f"UPDATE trials {set_where} AND trial_id IN ({','.join('?' * len(ids))})", (*args, *ids))
    return cur.rowcount


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
                    heartbeat(store, ids)
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


def requeue(store: Store, trial_ids) -> int:
    """Trials back to ``pending`` whatever their state (a race restarted); returns how many."""
    return _update_ids(store, "SET status=?, error=NULL WHERE 1=1", (PENDING,), trial_ids)
