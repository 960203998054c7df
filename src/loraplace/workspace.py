"""What every trial of a study shares inside one process: the model, its anatomy, the data, the accuracy examples.

Usage::

    ws = Workspace.build(cfg)            # loads the model and the data once per process (or Ray worker)
    result = ws.run(TrialTask(...))      # one trial on the shared base; the base is checked pristine after it
    ws.accuracy(ws.model)                # {"accuracy", "accuracy_n"} of the base model on the fixed examples

A ``TrialTask`` is plain data (strategy, seed, resolved ranks), so it travels to Ray workers; where trials
run is ``executor.py``'s business, what they run on is this module's.
"""

from __future__ import annotations

import gc
import logging
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .anatomy import Anatomy, analyze
from .answers import accuracy_examples, answer_accuracy
from .config import StudyConfig
from .data import TokenizedSet, encode_prompt, tokenize, train_eval_examples
from .models import load
from .placement import Placement, get_strategy, resolve
from .trial import TrialResult, run_trial

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


def free_memory(device: str) -> None:
    """Collect what a finished trial (or group) left behind; on CUDA also hand cached blocks back."""
    gc.collect()
    if str(device).startswith("cuda"):
        torch.cuda.empty_cache()


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

    def accuracy_fn(self):
        """The accuracy callback of a trial (``accuracy`` on the fixed examples), or None when accuracy is off
        or no example has an answer; shared by the sequential and the fused engine so both score the same."""
        return self.accuracy if self.accuracy_examples else None

    def run(self, task: TrialTask) -> TrialResult:
        """One trial; raises TrialError (recorded by the caller) or, if the base changed, RuntimeError."""
        cfg, before = self.cfg, weights_fingerprint(self.model)
        try:
            return run_trial(
                self.model, self.placement(task), self.train_set, self.eval_set, cfg.train, cfg.eval, seed=task.seed,
                pad_id=self.tokenizer.pad_token_id, device=self.device,
                adapter_dir=Path(task.adapter_dir) if task.adapter_dir else None,
                accuracy_fn=self.accuracy_fn(), desc=task.desc,
            )
        finally:
            free_memory(self.device)  # the trial's adapter, optimizer state and activations go before the next one
            if weights_fingerprint(self.model) != before:
                raise BaseWeightsChanged(f"base weights changed during trial {task.trial_id}: refusing to continue")
