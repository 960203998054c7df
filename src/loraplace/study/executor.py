"""Where trials run (in this process, one by one or fused in groups, or on Ray workers) and what a failure is.

Usage::

    ws = Workspace.build(cfg)                                   # model, anatomy, data, once per process
    for outcome in run_tasks(cfg, ws, tasks):                   # local or Ray, by cfg.executor
        ...                                                     # the caller (study.run) stores each Outcome

A ``TrialTask`` is plain data (strategy, seed, resolved ranks), so it travels to a Ray actor,
which builds its own ``Workspace`` once and runs task after task. Only the driver writes the
study database; adapters are written by whoever trains them, into the study directory (on
several machines that directory must be on a shared file system). Every run of the shared base is
guarded (``train.guard.base_unchanged``): a trial that changed it stops the study instead of being
recorded as a failure.
"""

from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import torch

from loraplace.core.config import ConfigError, StudyConfig
from loraplace.core.errors import first_line
from loraplace.study.plan import TrialTask, rung_spec, segment
from loraplace.study.tune import snapshot_dir
from loraplace.study.workspace import Workspace
from loraplace.train import checkpoint, fused, segments, sequential
from loraplace.train.guard import base_unchanged
from loraplace.train.memory import frozen_heap, release_memory
from loraplace.train.result import TrialResult
from loraplace.train.trial import TrialError

log = logging.getLogger("loraplace")

RECORDED = (TrialError, RuntimeError, ValueError)  # failures a trial records; the study goes on


@dataclass
class Pause:
    """A racing trial at a rung: checkpointed, waiting for the rung's decision."""

    step: int
    evals: list  # (step, figures) of its rung evaluations so far
    curve: list
    metrics: dict  # its figures so far (``Trial.progress``)
    placement: dict  # its placement record, as a finished trial stores it


@dataclass
class Outcome:
    """How a piece of work on a trial ended: finished (``result``), failed (``error``) or paused at a rung."""

    task: TrialTask
    result: TrialResult | None = None
    error: str | None = None
    paused: Pause | None = None


def failure(e: BaseException) -> str:
    """How a failed trial's error is stored: 'ExceptionType: message'."""
    return f"{type(e).__name__}: {e}"


def run_tasks(
    cfg: StudyConfig, ws: Workspace, tasks: list[TrialTask], on_start=lambda trial_id: None
) -> Iterator[Outcome]:
    """Run tasks with the study's executor, yielding each outcome as it finishes; ``on_start(trial_id)``
    is called as each task starts (or is handed to a Ray worker), and a task for which it returns
    False (claimed by another process) is skipped."""
    if cfg.executor == "ray":
        if tasks:
            yield from _run_ray(cfg, tasks, on_start)
        return
    why = {t.trial_id: _unfusable(ws, t) for t in tasks}  # its variant's reason, or routed experts among its targets
    alone = [t for t in tasks if why[t.trial_id]]
    together = [t for t in tasks if t not in alone]
    size = _group_size(ws, together) if len(together) > 1 else 1
    if size > 1:  # train.fuse: groups of trials in one pass over the base, same results (train.fused)
        for reason in sorted({why[t.trial_id] for t in alone}):
            names = sorted({t.strategy for t in alone if why[t.trial_id] == reason})
            log.info("train.fuse: %s run one after the other: %s", ", ".join(names), reason)
        for group in plan_groups(together, size):
            group = [task for task in group if on_start(task.trial_id) is not False]  # skip others' claims
            if group:
                yield from run_group(ws, group)
        tasks = alone
    for task in tasks:
        if on_start(task.trial_id) is False:
            continue
        yield run_one(ws, task)


def plan_groups(tasks: list[TrialTask], size: int) -> list[list[TrialTask]]:
    """Fused groups: the same piece of work (from the same step to the same step), then seed by seed
    (``train.fused.plan_groups``)."""
    pieces: dict[tuple, list[TrialTask]] = {}
    for t in tasks:  # a group shares its data: trials of one phase (the search trains on less)
        pieces.setdefault((t.phase, t.start, t.until), []).append(t)
    return [g for key in sorted(pieces, key=lambda k: (k[0], k[1], k[2] or 0)) for g in fused.plan_groups(pieces[key], size)]


def _unfusable(ws: Workspace, task: TrialTask) -> str | None:
    if task.replay:
        return "read from their tuning trials' snapshots (tune.reuse), not trained"
    try:
        return fused.unfusable(ws.placement(task))
    except RECORDED:  # it fails on its own when run
        return None


def _group_size(ws: Workspace, tasks: list[TrialTask]) -> int:
    placements = []
    for task in tasks:
        try:
            placements.append(ws.placement(task))
        except RECORDED:  # it fails on its own when run
            pass
    return fused.group_size(ws.cfg.train, ws.model, ws.device, placements, max(ws.train_set.lengths, default=0))


def run_one(ws: Workspace, task: TrialTask) -> Outcome:
    """One trial's piece of work on the sequential engine; a recorded failure becomes its one-line error text."""
    try:
        with base_unchanged(ws.model, f"trial {task.trial_id}", expected=ws.base_fingerprint):
            try:
                return _run(ws, [task], fuse=False)[0]
            finally:
                release_memory(ws.device)  # the trial's adapter, optimizer state and activations go first
    except RECORDED as e:
        return Outcome(task, error=failure(e))


def run_group(ws: Workspace, tasks: list[TrialTask]) -> list[Outcome]:
    """Outcomes of a group of tasks (the same piece of work each), fused on ``ws``'s model.

    Out of CUDA memory: the group is split in halves and each half run again (a single trial
    runs on the sequential engine), so no trial is lost. A placement that cannot be built fails on
    its own, as on the sequential engine.
    """
    if len(tasks) == 1:
        return [run_one(ws, tasks[0])]
    try:
        for t in tasks:
            ws.placement(t)
    except RECORDED:
        return [o for t in tasks for o in run_group(ws, [t])]
    try:
        with base_unchanged(ws.model, f"a fused group ({tasks[0].trial_id}...)", expected=ws.base_fingerprint):
            try:
                return _run(ws, tasks, fuse=True)
            finally:
                release_memory(ws.device)
    except torch.cuda.OutOfMemoryError:
        half = len(tasks) // 2
        log.warning("fused group of %d ran out of CUDA memory; running it as groups of %d and %d",
                    len(tasks), half, len(tasks) - half)
        return run_group(ws, tasks[:half]) + run_group(ws, tasks[half:])


def _checkpoint(task: TrialTask) -> Path | None:
    """The task's checkpoint directory when it holds a checkpoint (a racing trial past a rung), else None."""
    if task.checkpoint_dir and (Path(task.checkpoint_dir) / checkpoint.CHECKPOINT_FILE).is_file():
        return Path(task.checkpoint_dir)
    return None


def _run(ws: Workspace, tasks: list[TrialTask], fuse: bool) -> list[Outcome]:
    """The piece of work of ``tasks`` (one task unless ``fuse``): from their start (a checkpoint or step 0) to
    their ``until`` step, evaluating at ``evals_at`` on the way; then checkpointed and paused (a racing rung)
    or evaluated and finished (the end: accuracy, the saved adapter)."""
    setup = ws.setup_for(tasks[0])  # what the group shares (a group is of one phase); each trial keeps its own rate
    total = setup.total_steps
    if tasks[0].replay:  # its tuning trial did its training (tune.reuse): read back, evaluated, never trained
        return [_replay(ws, tasks[0])]
    trials = [segments.begin(ws.setup_for(t), ws.placement(t), t.seed, _checkpoint(t)) for t in tasks]
    # where each piece really starts is its checkpoint's step (another process may have moved it on since the
    # driver looked): the piece of work follows from there
    tasks = [segment(t, trial.step, total, rung_spec(ws.cfg, t)) if t.checkpoint_dir else t
             for t, trial in zip(tasks, trials)]
    if fuse and len({(t.start, t.until) for t in tasks}) > 1:
        return [o for t in tasks for o in _run(ws, [t], fuse=False)]
    until = tasks[0].until or total
    desc = tasks[0].desc or "train"
    if fuse:
        desc = f"{desc.split(']')[0]}] fused x{len(tasks)}" if tasks[0].desc else f"fused x{len(tasks)}"
    rung_accuracy = ws.cfg.analysis.metric == "accuracy"
    with contextlib.ExitStack() as attached:
        if not fuse:  # one PEFT wrapping for the whole piece: advancing, evaluating, finishing re-enter it
            attached.enter_context(trials[0].attached(setup))
        keep = {id(trial): task for task, trial in zip(tasks, trials) if task.snapshots}  # tune.reuse: snapshots
        segments.run_to(setup, trials, until, tasks[0].evals_at, fused=fuse, rung_accuracy=rung_accuracy, desc=desc,
                        keep_at=tuple(sorted({s for t in tasks for s in t.snapshots_at})),
                        keep=lambda trial: _snapshot(trial, keep.get(id(trial))))
        ending = [t for t in trials if t.error is None and t.step >= total]
        if ending:
            (fused.evaluate if fuse else sequential.evaluate)(setup, ending)
        out = []
        for task, trial in zip(tasks, trials):
            try:
                if trial.error is not None:
                    raise TrialError(trial.error)
                if trial.step < total:  # a racing rung: checkpoint, then wait for the rung's decision
                    checkpoint.save(trial, task.checkpoint_dir)
                    out.append(Outcome(task, paused=Pause(trial.step, list(trial.evals), list(trial.curve),
                                                          trial.progress(), trial.record(setup).to_dict())))
                else:
                    out.append(Outcome(task, result=trial.finish(setup, task.adapter_dir)))
            except RECORDED as e:
                out.append(Outcome(task, error=failure(e)))
    return out


def _snapshot(trial, task: TrialTask | None) -> None:
    """A tuning trial's state at one of its final trial's steps, kept for that trial to read (``tune.replays``)."""
    if task is not None and trial.step in task.snapshots_at:  # a fused group keeps the union of its tasks' steps
        checkpoint.save(trial, snapshot_dir(task.snapshots, trial.step), optimizer=False)


def _replay(ws: Workspace, task: TrialTask) -> Outcome:
    """A final trial read from its tuning trial's snapshots (``tune.reuse``): evaluated at its rungs and end on the
    eval set and finished (forgetting, accuracy, its adapter) as if it had trained; its record names the tuning trial
    (``measured["trained_as"]``)."""
    setup = ws.setup_for(task)
    trial = checkpoint.replayed(snapshot_dir(task.replay, task.snapshots_at[0]), setup, ws.placement(task))
    with trial.attached(setup):
        segments.run_to(setup, [trial], task.until or setup.total_steps, task.evals_at,
                        rung_accuracy=ws.cfg.analysis.metric == "accuracy",
                        replay=lambda t, step: checkpoint.replay(t, snapshot_dir(task.replay, step), setup))
        sequential.evaluate(setup, [trial])
        try:
            result = trial.finish(setup, task.adapter_dir)
        except RECORDED as e:
            return Outcome(task, error=failure(e))
    result.measured["trained_as"] = task.replay_of
    return Outcome(task, result=result)


# -- Ray ---------------------------------------------------------------------------------------
def _run_ray(cfg: StudyConfig, tasks: list[TrialTask], on_start) -> Iterator[Outcome]:
    """One actor per free slot, each with its own Workspace; tasks are handed out as actors free up."""
    try:
        import ray
    except ImportError:
        raise ConfigError("executor=ray needs Ray: pip install 'ray>=2.40' (or the [ray] extra)") from None
    if not ray.is_initialized():
        ray.init(address=cfg.ray_address, include_dashboard=False, log_to_driver=False, ignore_reinit_error=True)
    slots = int(ray.available_resources().get("CPU", 1) // cfg.cpus_per_trial) or 1
    if cfg.gpus_per_trial:
        slots = min(slots, int(ray.available_resources().get("GPU", 0) // cfg.gpus_per_trial) or 1)
    Actor = ray.remote(num_cpus=cfg.cpus_per_trial, num_gpus=cfg.gpus_per_trial)(_RayWorker)
    actors = [Actor.remote(cfg.to_dict()) for _ in range(min(slots, len(tasks)))]
    log.info("ray: %d worker(s), %s CPU(s) each", len(actors), cfg.cpus_per_trial)
    pending, queue, attempts = {}, list(tasks), {}

    def hand_out(actor, task=None) -> None:
        if task is not None:  # a retry: already claimed by this process
            pending[actor.run.remote(task)] = (actor, task)
            return
        while queue:
            task = queue.pop(0)
            if on_start(task.trial_id) is not False:
                pending[actor.run.remote(task)] = (actor, task)
                return

    for actor in actors:
        hand_out(actor)
    try:
        while pending:
            (done,), _ = ray.wait(list(pending), num_returns=1)
            actor, task = pending.pop(done)
            try:
                result = ray.get(done)
            except (ray.exceptions.RayActorError, ray.exceptions.WorkerCrashedError) as e:
                # The worker process died (killed, out of memory, node lost): a new worker takes over.
                actors.remove(actor)
                actor = Actor.remote(cfg.to_dict())
                actors.append(actor)
                attempts[task.trial_id] = attempts.get(task.trial_id, 0) + 1
                reason = f"worker died: {first_line(e, limit=None)}"
                if attempts[task.trial_id] <= cfg.max_retries:
                    log.warning("%s: %s; retrying (%d of %d)", task.desc, reason, attempts[task.trial_id], cfg.max_retries)
                    hand_out(actor, task)
                    continue
                outcome = Outcome(task, error=f"WorkerDied: {reason} ({cfg.max_retries} retries)")
            else:
                outcome = result
            hand_out(actor)
            yield outcome
    finally:
        for actor in actors:
            ray.kill(actor)


class _RayWorker:
    """A Ray actor: builds the Workspace on its first task (model and data once per worker)."""

    def __init__(self, cfg: dict):
        self.cfg = StudyConfig.from_dict(cfg)
        self.ws = None
        self.heap = None

    def run(self, task: TrialTask):
        if self.ws is None:
            from loraplace.measure.forgetting import load
            from loraplace.store.db import Store

            self.ws = Workspace.build(self.cfg)
            self.heap = frozen_heap()  # this worker's model objects out of every collection, for its whole life
            self.heap.__enter__()
            with Store.open(self.cfg.out, create=False) as store:  # the driver built it before any trial started
                self.ws.forgetting = load(self.cfg, self.ws, store)
                if "eva" in self.cfg.strategies:
                    from loraplace.measure import eva

                    self.ws.eva = eva.load(store)
        return run_one(self.ws, task)
