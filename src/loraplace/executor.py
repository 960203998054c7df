"""Where trials run: in this process (one by one, or fused in groups), or on Ray workers.

Usage::

    ws = Workspace.build(cfg)                       # workspace.py: model, anatomy, data, once per process
    for task, result, error in run_tasks(cfg, ws, tasks):   # local or Ray, by cfg.executor
        ...                                         # the caller (study.py) stores each outcome

A ``TrialTask`` is plain data (strategy, seed, resolved ranks), so it travels to a Ray actor,
which builds its own ``Workspace`` once and runs task after task. Only the driver writes the
study database; adapters are written by whoever trains them, into the study directory (on
several machines that directory must be on a shared file system).
"""

from __future__ import annotations

import logging
from typing import Iterator

from .config import StudyConfig
from .trial import TrialError, TrialResult
from .workspace import TrialTask, Workspace

log = logging.getLogger("loraplace")


Outcome = tuple[TrialTask, TrialResult | None, str | None]  # (task, result, error) with one of the two set

RECORDED = (TrialError, RuntimeError, ValueError)  # failures a trial records; the study goes on


def run_tasks(
    cfg: StudyConfig, ws: Workspace, tasks: list[TrialTask], on_start=lambda trial_id: None
) -> Iterator[Outcome]:
    """Run tasks with the study's executor, yielding each outcome as it finishes; ``on_start(trial_id)``
    is called as each task starts (or is handed to a Ray worker), and a task for which it returns
    False (claimed by another process) is skipped."""
    if cfg.executor == "ray" and tasks:
        yield from _run_ray(cfg, tasks, on_start)
        return
    if cfg.executor == "local" and len(tasks) > 1:
        from . import fused

        size = fused.group_size(cfg, ws.model, ws.device, len(tasks), max(ws.train_set.lengths, default=0))
        if size > 1:  # train.fuse: groups of trials in one pass over the base, same results (fused.py)
            for group in fused.plan_groups(tasks, size):
                group = [task for task in group if on_start(task.trial_id) is not False]  # skip others' claims
                if group:
                    yield from fused.run_group(ws, group)
            return
    for task in tasks if cfg.executor == "local" else ():
        if on_start(task.trial_id) is False:
            continue
        yield run_one(ws, task)


def run_one(ws: Workspace, task: TrialTask) -> Outcome:
    """One trial on the sequential engine; a recorded failure becomes its one-line error text."""
    try:
        return task, ws.run(task), None
    except RECORDED as e:
        return task, None, failure(e)


def failure(e: BaseException) -> str:
    """How a failed trial's error is stored: 'ExceptionType: message'."""
    return f"{type(e).__name__}: {e}"


# -- Ray ---------------------------------------------------------------------------------------
def _run_ray(cfg: StudyConfig, tasks: list[TrialTask], on_start) -> Iterator[Outcome]:
    """One actor per free slot, each with its own Workspace; tasks are handed out as actors free up."""
    try:
        import ray
    except ImportError:
        raise RuntimeError("executor=ray needs Ray: pip install 'ray>=2.40' (or the [ray] extra)") from None
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
                result, error = ray.get(done)
            except (ray.exceptions.RayActorError, ray.exceptions.WorkerCrashedError) as e:
                # The worker process died (killed, out of memory, node lost): a new worker takes over.
                actors.remove(actor)
                actor = Actor.remote(cfg.to_dict())
                actors.append(actor)
                attempts[task.trial_id] = attempts.get(task.trial_id, 0) + 1
                reason = f"worker died: {str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__}"
                if attempts[task.trial_id] <= cfg.max_retries:
                    log.warning("%s: %s; retrying (%d of %d)", task.desc, reason, attempts[task.trial_id], cfg.max_retries)
                    hand_out(actor, task)
                    continue
                result, error = None, f"WorkerDied: {reason} ({cfg.max_retries} retries)"
            hand_out(actor)
            yield task, result, error
    finally:
        for actor in actors:
            ray.kill(actor)


class _RayWorker:
    """A Ray actor: builds the Workspace on its first task (model and data once per worker)."""

    def __init__(self, cfg: dict):
        self.cfg = StudyConfig.from_dict(cfg)
        self.ws = None

    def run(self, task: TrialTask):
        if self.ws is None:
            self.ws = Workspace.build(self.cfg)
        _, result, error = run_one(self.ws, task)
        return result, error
