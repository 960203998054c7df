"""What every trial of a study shares inside one process: the model, its anatomy, the data, the accuracy examples.

Usage::

    ws = Workspace.build(cfg)            # loads the model and the data once per process (or Ray worker)
    ws.setup                             # train.trial.Setup: what the engines read
    ws.placement(task)                   # a TrialTask's placement on this model
    ws.accuracy(ws.model)                # {"accuracy", "accuracy_n"} of the base model on the fixed examples

Where and how trials run is ``study.executor``'s business; what they run on is this module's.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, replace
from functools import cached_property

import torch

from loraplace.core.config import StudyConfig
from loraplace.data.answers import accuracy_examples
from loraplace.data.sources import selection_split, train_eval_examples
from loraplace.data.tokenize import TokenizedSet, encode_prompt, tokenize
from loraplace.model.anatomy import Anatomy, analyze
from loraplace.model.loading import ModelError, load
from loraplace.model.quantize import is_quantized
from loraplace.placement.resolve import Placement, resolve
from loraplace.core.names import EVA
from loraplace.placement.strategy import PlacementError
from loraplace.store.db import TUNE
from loraplace.study.plan import TrialTask, eva_placement, fixed_placement, study_strategy
from loraplace.study.tune import selection_size
from loraplace.train.generate import answer_accuracy
from loraplace.train.guard import weights_fingerprint
from loraplace.train.memory import pick_device
from loraplace.train.trial import Setup

log = logging.getLogger("loraplace")


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
    forgetting: object | None = None  # measure.forgetting.ForgettingSet, set by the study once it has one
    eva: object | None = None  # measure.eva.EvaInit of strategy eva, set by the study (or read back) before trials
    prefix_cache_bytes: int | None = None  # cap on the frozen-prefix cache (None: a share of free memory; 0: none)
    named: bool = False  # the model was loaded from cfg.model (not handed in): its name says which weights these are
    tune_train_set: TokenizedSet | None = None  # tune.lr: what tuning trials train on (the training data less ...
    selection_set: TokenizedSet | None = None  # ... the selection split, which they are evaluated on)

    @classmethod
    def build(cls, cfg: StudyConfig, model_and_tokenizer=None) -> "Workspace":
        device = pick_device(cfg.train.device)  # a device this torch lacks is a one-line error, before loading
        if cfg.train.threads:
            torch.set_num_threads(cfg.train.threads)
        model, tok = model_and_tokenizer or load(cfg.model, dtype=getattr(torch, cfg.train.dtype), device=device,
                                                     quantize=cfg.quantize)
        if model_and_tokenizer is not None and is_quantized(model) != (cfg.quantize is not None):
            # the store files every result under cfg.quantize: a handed-in model must be what it says
            raise ModelError(f"quantize={cfg.quantize} but the model handed in is "
                             f"{'a bitsandbytes-quantized' if is_quantized(model) else 'a float'} model; load it with "
                             "model.loading.load(..., quantize=cfg.quantize) or let the study load it")
        train_ex, eval_ex = train_eval_examples(cfg.data)
        ws = cls(cfg, model, tok, analyze(model), tokenize(train_ex, tok, cfg.data), tokenize(eval_ex, tok, cfg.data),
                 eval_ex, device, named=model_and_tokenizer is None)
        if cfg.tune.active:  # the learning-rate search's split of the training data (never the eval set)
            tune_ex, selection = selection_split(train_ex, selection_size(cfg.tune, len(train_ex)))
            ws.tune_train_set, ws.selection_set = tokenize(tune_ex, tok, cfg.data), tokenize(selection, tok, cfg.data)
        return ws

    @cached_property
    def base_fingerprint(self) -> float:
        """The base weights' checksum (``train.guard``) when first asked for, before any trial: every piece of work
        must leave the base at this value."""
        return weights_fingerprint(self.model)

    @cached_property
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

    @property
    def setup(self) -> Setup:
        """What the engines read; its accuracy callback is None when accuracy is off or no example has an
        answer, so both engines score the same."""
        return Setup(self.model, self.train_set, self.eval_set, self.cfg.train, self.cfg.eval,
                     self.tokenizer.pad_token_id, self.device, self.accuracy if self.accuracy_examples else None,
                     self.forgetting, self.prefix_cache_bytes,
                     inits={"eva": self.eva.weights} if self.eva is not None else {},
                     rung_eval_set=self.eval_set.head(self.cfg.race.eval_limit))

    def setup_for(self, task: TrialTask) -> Setup:
        """The Setup a task trains and is evaluated on: a tuning trial on the training data less the selection split,
        evaluated on the selection split (no accuracy); a final trial of a study with ``tune.reuse`` (its config says
        ``train_data``) on the same data as the tuning trials, evaluated on the eval set; every trial at its own peak
        learning rate (``task.lr``)."""
        setup = self.setup
        if (task.phase == TUNE or "train_data" in task.config) and self.tune_train_set is None:
            raise PlacementError(f"a {task.phase} trial on the search's data in a study without tune.lr: this process "
                                 "has no selection split")
        if task.phase == TUNE:
            setup = replace(setup, train_set=self.tune_train_set, eval_set=self.selection_set, accuracy=None,
                            rung_eval_set=self.selection_set.head(self.cfg.tune.eval_limit))  # halving ranks on this
        elif "train_data" in task.config:
            setup = replace(setup, train_set=self.tune_train_set)
        return setup if task.lr is None else replace(setup, train=replace(setup.train, lr=float(task.lr)))

    def placement(self, task: TrialTask) -> Placement:
        """The task's placement on this model, at the ranks the driver resolved."""
        t = self.cfg.train
        if task.strategy == EVA:
            if self.eva is None:
                raise PlacementError("strategy eva: this process has no EVA result (the study computes it first)")
            return eva_placement(self.cfg, self.anatomy, self.eva)
        strategy = study_strategy(self.cfg, task.strategy)
        allocation = task.config.get("allocation")
        if allocation is not None:  # allocated while training (AdaLoRA): its start and the count the driver matched
            return fixed_placement(self.cfg, self.anatomy, strategy, allocation.get("target"))
        return resolve(strategy, self.anatomy, rank=t.rank, alpha=t.alpha, alpha_per_rank=t.alpha_per_rank, ranks=task.ranks)
