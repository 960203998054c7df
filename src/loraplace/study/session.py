"""A running study: what its phases share (config, store, workspace, tracker, environment) and how a set of trials
is run through claims, rungs and the executor until none is left.

Usage::

    with Session.open(cfg) as s:                       # store, workspace (model, data), tracker, heartbeat
        s.add(tasks)                                   # registered as the study's trials (pending unless stored)
        s.run(tasks, race)                             # claimed, raced at their rungs, run, every outcome stored

Several processes may run one study directory: each claims a trial before running it (``store.claims``), a
rung is decided once, by whichever process finds every racing trial there (``study.race``), and a process with
nothing to claim waits while others hold what a rung waits for.
"""

from __future__ import annotations

import contextlib
import logging
import os
import platform
import subprocess
import sys
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch

from loraplace import __version__
from loraplace.core.config import StudyConfig
from loraplace.core.text import lr_text
from loraplace.store import claims
from loraplace.store.db import PAUSED, RUNNING, STOPPED, TUNE, Store, TrialRecord
from loraplace.study.executor import run_tasks
from loraplace.study.plan import TrialTask, rung_spec, segment
from loraplace.study.race import Race, decide_ready, restart
from loraplace.study.workspace import Workspace
from loraplace.train.memory import frozen_heap

log = logging.getLogger("loraplace")

WAIT_S = 2.0  # how often a process with nothing to claim looks again while others hold what a rung waits for
DIVERGED = "TrialError: non-finite"  # how a diverged trial's error starts (train.trial.Trial.finite)


def environment(device: str) -> dict:
    """Package versions, platform, device and git commit, stored with every trial."""
    import peft
    import transformers

    env = {
        "loraplace": __version__,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "peft": peft.__version__,
        "platform": platform.platform(),
        "device": device,
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
    }
    if device.startswith("cuda"):
        env["gpu"] = torch.cuda.get_device_name(torch.device(device))
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=Path(__file__).parent, capture_output=True, text=True, timeout=5
        )
        if commit.returncode == 0:
            env["git_commit"] = commit.stdout.strip()
    except (OSError, subprocess.SubprocessError):
        pass
    return env


@dataclass
class Session:
    """What a study's phases share while it runs in this process."""

    cfg: StudyConfig
    store: Store
    ws: Workspace
    tracker: object | None  # study.tracking's tracker, or None
    heartbeat: claims.Heartbeat
    env: dict
    zero: dict = field(default_factory=dict)  # meta zero_shot: the base model's loss (and accuracy) on the eval set
    tasks: list[TrialTask] = field(default_factory=list)  # every trial of the study so far, in the order planned
    tuning: list[TrialTask] = field(default_factory=list)  # the search's trials (tune.reuse: final trials read theirs)
    _heap: contextlib.AbstractContextManager | None = field(default=None, repr=False)  # train.memory.frozen_heap

    @classmethod
    def open(cls, cfg: StudyConfig, model_and_tokenizer=None, tracker=None) -> "Session":
        store = Store.open(cfg.out)
        ws = Workspace.build(cfg, model_and_tokenizer)
        return cls(cfg, store, ws, tracker, claims.Heartbeat(cfg.out), environment(ws.device))

    def __enter__(self) -> "Session":
        self.heartbeat.__enter__()
        self._heap = frozen_heap()  # the loaded model's objects out of the collection after every trial
        self._heap.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        try:
            claims.release(self.store, self.heartbeat.held)  # stopped early (an error, Ctrl-C): the next run takes them
        finally:
            self.heartbeat.__exit__(*exc)
            if self._heap is not None:
                self._heap.__exit__(None, None, None)
            if self.tracker is not None:
                self.tracker.close()
            self.store.close()

    @property
    def ids(self) -> list[str]:
        return [t.trial_id for t in self.tasks]

    def records(self) -> list[TrialRecord]:
        return [self.store.get(t.trial_id) for t in self.tasks]

    def add(self, tasks: list[TrialTask], retry_diverged: bool = True) -> list[TrialTask]:
        """Make ``tasks`` trials of the study (the stored config lists them; a stored trial keeps its row); their
        failed trials are tried again (``retry_diverged=False``: not those whose loss went non-finite, which would
        diverge again); those whose process is gone go back to pending. Returns the tasks new to this session."""
        new = [t for t in tasks if t.trial_id not in set(self.ids)]
        self.tasks += new
        self.store.put_study_config(self.cfg, self.ids)
        for t in new:
            self.store.add_pending(t.trial_id, t.strategy, t.seed, t.config)
        retry = [t.trial_id for t in new]
        if not retry_diverged:
            retry = [i for i in retry if not ((rec := self.store.get(i)).error or "").startswith(DIVERGED)]
        claims.requeue_failed(self.store, retry)
        claims.reset_interrupted(self.store)  # only trials whose process is gone; another live process keeps its own
        return new

    # -- running a set of trials --------------------------------------------------------------------------
    def run(self, planned: list[TrialTask], race: Race | None = None) -> None:
        """Run every unfinished trial of ``planned`` (one phase's trials) to its end, deciding ``race``'s rungs as
        its trials reach them; each outcome is stored (and tracked) as it comes."""
        if not planned:
            return
        store, cfg = self.store, self.cfg
        total = self.ws.setup_for(planned[0]).total_steps
        if race is not None:
            restart(store, race)
        # Passes until nothing is left to claim: a trial whose process died while this one ran (or was skipped
        # because it was held then) is picked up by the next pass; in a raced phase, a pass ends at a rung, the
        # rung is decided, and the survivors go on from their checkpoints.
        while True:
            if race is not None:
                for d in decide_ready(store, race, total):
                    _say(race, d)
            todo = [(p, rec) for p in planned if claims.claimable(rec := store.get(p.trial_id))]
            if not todo:
                if any(store.get(p.trial_id).status in (RUNNING, PAUSED) for p in planned):
                    time.sleep(WAIT_S)  # another process holds a trial this rung (or the rest) waits for
                    continue
                break
            tasks = [replace(segment(t, _resume_step(rec), total, rung_spec(cfg, t)), desc=f"[{i}/{len(todo)}] {_label(t)}")
                     for i, (t, rec) in enumerate(todo, start=1)]
            ran = 0
            for outcome in run_tasks(cfg, self.ws, tasks, on_start=self._claim):
                ran += 1
                self._record(outcome)
                self.heartbeat.discard(outcome.task.trial_id)
                if self.tracker is not None and outcome.paused is None:  # tracking mirrors the store's outcomes
                    self.tracker.log_trial(store.get(outcome.task.trial_id))
            if not ran:
                break
        if self.tracker is not None:
            for p in planned:  # stopped trials: their outcome is the race's decision
                rec = store.get(p.trial_id)
                if rec.status == STOPPED:
                    self.tracker.log_trial(rec)

    def _claim(self, tid: str) -> bool:
        """Other processes on this directory skip what this one claims."""
        if not claims.claim(self.store, tid):
            log.info("trial %s is done or held by another process; skipping it", tid)
            return False
        self.heartbeat.add(tid)
        return True

    def _record(self, outcome) -> None:
        """Store one outcome: done, failed, or paused at a rung (racing)."""
        task, store = outcome.task, self.store
        if outcome.error is not None:
            store.mark_failed(task.trial_id, outcome.error, env=self.env)
            (log.warning if task.phase == TUNE else log.error)("%s failed: %s", task.desc, outcome.error)
            return
        what = "selection loss" if task.phase == TUNE else "eval loss"
        if outcome.paused is not None:
            pause = outcome.paused
            rel = str(Path(task.checkpoint_dir).relative_to(self.cfg.out))
            store.mark_paused(task.trial_id, pause.step, pause.evals, rel, pause.curve, pause.metrics, pause.placement)
            ev = dict(pause.evals).get(pause.step, {})
            print(f"{task.desc}: at step {pause.step} of its run, {what} {ev.get('eval_loss', float('nan')):.4f}; "
                  "waiting for the rung's decision", file=sys.stderr)
            return
        result = outcome.result
        rel = str(result.adapter_dir.relative_to(self.cfg.out)) if result.adapter_dir else None
        store.mark_done(task.trial_id, result.metrics, result.curve, result.placement, self.env, rel, result.evals,
                        result.measured)
        m = result.metrics
        zero = "" if task.phase == TUNE else f" (zero-shot {self.zero['eval_loss']:.4f})"
        trained = " (trained by its tuning trial)" if task.replay else ""
        print(f"{task.desc}: {what} {m['eval_loss']:.4f}{zero}, {m['trainable_params']:,} trainable, "
              f"{m['train_time_s']:.0f} s{trained}", file=sys.stderr)


def _label(t: TrialTask) -> str:
    return f"tune {t.strategy} lr {lr_text(t.lr)} seed {t.seed}" if t.phase == TUNE else f"{t.strategy} seed {t.seed}"


def _resume_step(rec: TrialRecord) -> int:
    """Where a claimed trial's work starts, as the store knows it (the worker checks its checkpoint)."""
    return int(rec.step) if rec.checkpoint_path and rec.step else 0


def _say(race: Race, d) -> None:
    """One line per decided rung on stderr; the reasons in the log."""
    stops = d.stopped  # strategy -> why (the study's race), or strategy -> {rate: why} (the search's halving)
    named = [f"{s} lr {lr_text(float(r))}" for s, by in stops.items() for r in by] if race.meta != "race" else list(stops)
    what = "tune" if race.meta != "race" else "race"
    print(f"{what}: at step {d.step} ({100 * d.fraction:.0f}% of the steps) stopped {', '.join(named) or 'none'}",
          file=sys.stderr)
    for name, why in stops.items():
        for rate, reason in (why.items() if isinstance(why, dict) else [(None, why)]):
            log.info("%s: %s%s %s", what, name, "" if rate is None else f" lr {lr_text(float(rate))}", reason)
