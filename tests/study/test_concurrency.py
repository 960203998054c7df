"""Several `loraplace study` processes on one directory: every trial runs exactly once between
them, and a trial of a process killed mid-trial is finished by another one."""

from __future__ import annotations

import os
import re
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest
import tiny_models

import loraplace
from loraplace.store.db import Store

STRATEGIES = ["all_linear", "attention_only", "mlp_only"]
SEEDS = [0, 1]
FINISHED = re.compile(r"\] (\S+) seed (\d+): eval loss")  # the line a process prints per trial it ran

pytestmark = pytest.mark.slow  # several `loraplace study` processes on one directory (tens of seconds)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return tiny_models.save("llama", tmp_path_factory.mktemp("tiny-llama"))


def _start(model_dir: str, out: Path, *overrides: str) -> subprocess.Popen:
    # About half a second per trial on one thread, so the processes overlap.
    argv = [sys.executable, "-m", "loraplace", "study", f"model={model_dir}", f"out={out}",
            f"strategies=[{','.join(STRATEGIES)}]", f"seeds={SEEDS}", "data.limit=60", "data.eval_size=12",
            "data.max_length=96", "train.steps=80", "train.batch_size=4", "train.rank=4", "train.threads=1", *overrides]
    src = str(Path(loraplace.__file__).resolve().parents[1])  # this checkout's package, not another install
    env = {**os.environ, "PYTHONPATH": src + os.pathsep + os.environ.get("PYTHONPATH", "")}
    return subprocess.Popen(argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _finished(stderr: str) -> list[tuple[str, int]]:
    return [(m.group(1), int(m.group(2))) for m in FINISHED.finditer(stderr)]


def _check_all_done_once(out: Path, ran: list[tuple[str, int]]) -> list:
    with Store.open(out, create=False) as store:
        trials = store.trials()
    assert sorted((t.strategy, t.seed) for t in trials) == sorted((s, n) for s in STRATEGIES for n in SEEDS)
    assert all(t.status == "done" for t in trials), [(t.strategy, t.seed, t.status, t.error) for t in trials]
    assert sorted(ran) == sorted((t.strategy, t.seed) for t in trials)  # each trial run exactly once in all
    return trials


def test_three_processes_share_one_study(model_dir, tmp_path):
    out = tmp_path / "study"
    procs = [_start(model_dir, out) for _ in range(3)]
    results = [p.communicate(timeout=300) for p in procs]
    assert [p.returncode for p in procs] == [0, 0, 0], [err[-2000:] for _, err in results]
    ran = {p.pid: _finished(err) for p, (_, err) in zip(procs, results)}
    trials = _check_all_done_once(out, [t for r in ran.values() for t in r])
    for t in trials:  # the store names the process that printed the trial
        assert (t.strategy, t.seed) in ran[t.owner_pid]


def _running_owned_by(out: Path, pid: int) -> str | None:
    try:
        conn = sqlite3.connect(out / "study.db", timeout=5)
        try:
            row = conn.execute("SELECT trial_id FROM trials WHERE status='running' AND owner_pid=?", (pid,)).fetchone()
        finally:
            conn.close()
    except sqlite3.OperationalError:  # not created yet, or no owner column yet
        return None
    return row[0] if row else None


def test_a_killed_processes_trial_is_finished_by_the_other(model_dir, tmp_path):
    out = tmp_path / "study"
    victim, survivor = _start(model_dir, out), _start(model_dir, out)
    deadline = time.monotonic() + 120
    while (held := _running_owned_by(out, victim.pid)) is None:
        assert victim.poll() is None and time.monotonic() < deadline, "the victim never claimed a trial"
        time.sleep(0.05)
    victim.send_signal(signal.SIGKILL)  # mid-trial: no chance to give the claim back
    _, victim_err = victim.communicate(timeout=60)
    _, err = survivor.communicate(timeout=300)
    assert survivor.returncode == 0, err[-2000:]
    trials = _check_all_done_once(out, _finished(victim_err) + _finished(err))
    taken_over = next(t for t in trials if t.trial_id == held)
    assert taken_over.owner_pid == survivor.pid  # the survivor reclaimed and finished it


PAUSED_AT = re.compile(r"\] (\S+) seed (\d+): at step (\d+) of its run")  # a raced trial's piece to a rung


def test_two_processes_race_one_study_and_decide_each_rung_once(model_dir, tmp_path):
    """Raced: every trial's pieces of work run once between the processes (to the rung, then on for the
    survivors), each rung is decided once, and a survivor's numbers are the ones a one-process race gives."""
    from loraplace.core.config import StudyConfig
    from loraplace.study import race
    from loraplace.study.run import run_study

    out = tmp_path / "study"
    procs = [_start(model_dir, out, "race.at=[0.5]", "train.steps=40") for _ in range(2)]
    results = [p.communicate(timeout=600) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], [err[-2000:] for _, err in results]
    errs = "".join(err for _, err in results)
    paused = sorted((m.group(1), int(m.group(2))) for m in PAUSED_AT.finditer(errs))
    finished = sorted(_finished(errs))
    assert paused == sorted((s, n) for s in STRATEGIES for n in SEEDS)  # every trial trained to the rung once
    assert errs.count("race: at step 20") == 1  # the rung was decided by one process, once
    with Store.open(out, create=False) as store:
        trials = store.trials()
        decisions = [d.to_dict() for d in race.decisions(store)]
    assert sorted((t.strategy, t.seed) for t in trials if t.status == "done") == finished  # survivors once each
    assert all(t.status in ("done", "stopped") for t in trials)
    # the same race in one process: the same decisions, the same survivors' numbers
    cfg = StudyConfig.load(overrides=[f"model={model_dir}", f"out={tmp_path / 'one'}", f"strategies=[{','.join(STRATEGIES)}]",
                                      f"seeds={SEEDS}", "data.limit=60", "data.eval_size=12", "data.max_length=96",
                                      "train.steps=40", "train.batch_size=4", "train.rank=4", "train.threads=1",
                                      "race.at=[0.5]"])
    one = {r.trial_id: r for r in run_study(cfg)}
    with Store.open(tmp_path / "one", create=False) as store:
        assert [d.to_dict() for d in race.decisions(store)] == decisions
    for t in trials:
        assert one[t.trial_id].status == t.status
        if t.status == "done":
            assert one[t.trial_id].curve == t.curve and one[t.trial_id].metrics["eval_loss"] == t.metrics["eval_loss"]
