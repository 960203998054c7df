"""Where trials run: in this process, or on Ray workers when one machine is not enough.

Usage::

    ws = Workspace.build(cfg)                       # model, anatomy, data: once per process
    for task, result, error in run_tasks(cfg, ws, tasks):   # local or Ray, by cfg.executor
        ...                                         # the caller (study.py) stores each outcome

A ``TrialTask`` is plain data (strategy, seed, resolved ranks), so it travels to a Ray actor,
which builds its own ``Workspace`` once and runs task after task. Only the driver writes the
study database; adapters are written by whoever trains them, into the study directory (on
several machines that directory must be on a shared file system).
"""

from __future__ import annotations

import gc
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import torch

from .anatomy import Anatomy, analyze
from .config import StudyConfig
from .data import TokenizedSet, tokenize, train_eval_examples
from .models import load
from .placement import Placement, get_strategy, resolve
from .answers import accuracy_examples, answer_accuracy
from .data import encode_prompt
from .trial import TrialError, TrialResult, run_trial

log = logging.getLogger("loraplace")


class BaseWeightsChanged(Exception):
    """A trial altered the shared base model: a bug, never recorded as a trial failure (not in RECORDED)."""


@dataclass(frozen=True)
class TrialTask:
    trial_id: str  # hash of config
    strategy: str
    seed: int
    ranks: dict[str, int]  # full module name -> rank, as resolved (and budget-matched) by the driver
    adapter_dir: str | None  # where the trained adapter goes; None: not saved
    config: dict = field(default_factory=dict)  # the resolved trial config that trial_id hashes
    desc: str = ""  # progress label, e.g. "[2/12] mlp_only seed 0"


def pick_device(name: str) -> str:
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return name


def weights_fingerprint(model: torch.nn.Module) -> float:
    """A cheap checksum of every base weight (sum of |w| in float64), to prove trials leave it pristine."""
    with torch.no_grad():
        return float(sum(p.detach().double().abs().sum() for p in model.parameters()))


@dataclass
class Workspace:
    """What every trial of a study shares inside one process: built once, reused by each trial."""

    cfg: StudyConfig
    model: torch.nn.Module
    tokenizer: object
    anatomy: Anatomy
    train_set: TokenizedSet
    eval_set: TokenizedSet
    eval_examples: list
    device: str

    @classmethod
    def build(cls, cfg: StudyConfig, model_and_tokenizer=None) -> "Workspace":
        device = pick_device(cfg.train.device)
        if cfg.train.threads:
            torch.set_num_threads(cfg.train.threads)
        model, tok = model_and_tokenizer or load(cfg.model, dtype=getattr(torch, cfg.train.dtype), device=device)
        train_ex, eval_ex = train_eval_examples(cfg.data)
        return cls(cfg, model, tok, analyze(model), tokenize(train_ex, tok, cfg.data), tokenize(eval_ex, tok, cfg.data),
                   eval_ex, device)

    @property
    def accuracy_examples(self) -> list:
        """The fixed examples accuracy is measured on (none unless eval.accuracy is on)."""
        if not self.cfg.eval.accuracy:
            return []
        return accuracy_examples(self.eval_examples, self.cfg.eval.accuracy_limit)

    def accuracy(self, model) -> dict:
        """{"accuracy", "accuracy_n"} of ``model`` (the base or an adapted one) on ``accuracy_examples``."""
        scored = self.accuracy_examples
        prompts = [encode_prompt(e, self.tokenizer, self.cfg.data) for e in scored]
        return answer_accuracy(model, self.tokenizer, prompts, [e.answer for e in scored], self.cfg.eval, self.device)

    def placement(self, task: TrialTask) -> Placement:
        t = self.cfg.train
        strategy = get_strategy(task.strategy, self.cfg.define)
        return resolve(strategy, self.anatomy, rank=t.rank, alpha=t.alpha, alpha_per_rank=t.alpha_per_rank, ranks=task.ranks)

    def run(self, task: TrialTask, zero_shot_loss: float | None) -> TrialResult:
        """One trial; raises TrialError (recorded by the caller) or, if the base changed, RuntimeError."""
        cfg, before = self.cfg, weights_fingerprint(self.model)
        accuracy_fn = self.accuracy if self.accuracy_examples else None
        try:
            return run_trial(
                self.model, self.placement(task), self.train_set, self.eval_set, cfg.train, cfg.eval, seed=task.seed,
                pad_id=self.tokenizer.pad_token_id, device=self.device,
                adapter_dir=Path(task.adapter_dir) if task.adapter_dir else None,
                zero_shot_loss=zero_shot_loss, accuracy_fn=accuracy_fn, desc=task.desc,
            )
        finally:
            gc.collect()  # the trial's adapter, optimizer state and activations go before the next one
            if self.device.startswith("cuda"):
                torch.cuda.empty_cache()
            if weights_fingerprint(self.model) != before:
                raise BaseWeightsChanged(f"base weights changed during trial {task.trial_id}: refusing to continue")


Outcome = tuple[TrialTask, TrialResult | None, str | None]  # (task, result, error) with one of the two set

RECORDED = (TrialError, RuntimeError, ValueError)  # failures a trial records; the study goes on


def run_tasks(
    cfg: StudyConfig, ws: Workspace, tasks: list[TrialTask], zero_shot_loss: float | None, on_start=lambda trial_id: None
) -> Iterator[Outcome]:
    """Run tasks with the study's executor, yielding each outcome as it finishes; ``on_start(trial_id)``
    is called as each task starts (or is handed to a Ray worker)."""
    if cfg.executor == "ray" and tasks:
        yield from _run_ray(cfg, tasks, zero_shot_loss, on_start)
        return
    for task in tasks if cfg.executor == "local" else ():
        on_start(task.trial_id)
        try:
            yield task, ws.run(task, zero_shot_loss), None
        except RECORDED as e:
            yield task, None, f"{type(e).__name__}: {e}"


# -- Ray ---------------------------------------------------------------------------------------
def _run_ray(cfg: StudyConfig, tasks: list[TrialTask], zero_shot_loss: float | None, on_start) -> Iterator[Outcome]:
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
    pending, queue = {}, list(tasks)

    def hand_out(actor) -> None:
        if queue:
            task = queue.pop(0)
            on_start(task.trial_id)
            pending[actor.run.remote(task, zero_shot_loss)] = (actor, task)

    for actor in actors:
        hand_out(actor)
    try:
        while pending:
            (done,), _ = ray.wait(list(pending), num_returns=1)
            actor, task = pending.pop(done)
            result, error = ray.get(done)
            hand_out(actor)
            yield task, result, error
    finally:
        for actor in actors:
            ray.kill(actor)


class _RayWorker:
    """A Ray actor: builds the Workspace on its first task (model and data once per worker)."""

    def __init__(self, cfg: dict):
        self.cfg = StudyConfig.from_dict({k: v for k, v in cfg.items() if k != "trial_ids"})
        self.ws = None

    def run(self, task: TrialTask, zero_shot_loss: float | None):
        if self.ws is None:
            self.ws = Workspace.build(self.cfg)
        try:
            return self.ws.run(task, zero_shot_loss), None
        except RECORDED as e:
            return None, f"{type(e).__name__}: {e}"
