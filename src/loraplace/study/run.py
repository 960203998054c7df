"""A study from start to end: its phases, in order.

Usage::

    cfg = StudyConfig.load("study.yaml", overrides=["seeds=[0,1,2]"])
    records = run_study(cfg)         # resumable: rerunning skips trials already done

Every trial of a study shares the model, data, split and training settings; a strategy changes only the placement
(its ranks where the study is budget-matched) and, in a study with ``tune.lr``, its peak learning rate, chosen for
it on held-out training data. Each phase lives in ``study.phases``; what they share while running is a
``study.session.Session``.
"""

from __future__ import annotations

from loraplace.core.config import ConfigError, StudyConfig
from loraplace.store.db import TrialRecord
from loraplace.study import phases
from loraplace.study.session import Session
from loraplace.train.memory import pick_device


def run_study(cfg: StudyConfig, model_and_tokenizer=None) -> list[TrialRecord]:
    """Run every unfinished trial of the study; returns all its trial records (the search's, then the study's)."""
    if cfg.baseline not in cfg.strategies:  # deltas and retained improvement would have no reference
        raise ConfigError(f"baseline: {cfg.baseline!r} is not among strategies {cfg.strategies}; "
                          f"add it to strategies or set baseline= to one of them")
    pick_device(cfg.train.device)  # a device this torch lacks is a one-line error before anything is written
    tracker = None
    if cfg.track:  # before anything loads or is written: a missing package is a one-line error at once
        from loraplace.study.tracking import open_tracker  # MLflow / W&B load only when asked for

        tracker = open_tracker(cfg)
    with Session.open(cfg, model_and_tokenizer, tracker) as s:
        placements = phases.place(s)  # 1. every strategy on this model (probe, condition numbers, EVA first)
        phases.measure_base(s)  # 2. the base model: zero-shot loss, the forgetting set
        rates = phases.tune(s, placements)  # 3. each strategy's learning rate, on a selection split
        phases.train(s, placements, rates)  # 4. the study's trials, raced
        phases.compare(s, placements, rates)  # 5. every strategy at the baseline's rate
        phases.finish(s)  # 6. forgetting measured again where its set changed; checkpoints removed
        return s.records()
