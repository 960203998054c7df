"""The phases of a study, in the order ``study.run.run_study`` runs them.

Usage::

    placements = place(s)               # probe / condition numbers / EVA where a strategy needs them; every strategy resolved
    measure_base(s)                     # the base model on the eval set (zero-shot) and the forgetting set
    rates = tune(s, placements)         # the learning-rate search: strategy -> its rate ({} without tune.lr)
    train(s, placements, rates)         # the study's trials, each strategy at its rate, raced at race.at (tune.reuse:
                                        # those the search already trained are read from its snapshots)
    compare(s, placements, rates)       # every strategy at the baseline's rate (tune.compare)
    finish(s)                           # forgetting measured again where its set changed; checkpoints removed

``s`` is a ``study.session.Session``. Each phase stores what it measured (meta keys, trials) before the next
starts, so a rerun of the study reuses every finished piece.
"""

from __future__ import annotations

import logging
import shutil
from dataclasses import replace
from pathlib import Path

from loraplace.core.names import EVA, KAPPA
from loraplace.core.text import lr_text
from loraplace.measure import forgetting
from loraplace.measure.kappa import kappa_order_of
from loraplace.measure.zero_shot import zero_shot
from loraplace.placement.resolve import Placement
from loraplace.store.db import DONE, FAILED, RUNNING, STOPPED, TUNE
from loraplace.study import tune as T
from loraplace.study.plan import (auto_scores, fixed_budget, needs_probe, plan_trials, resolve_placements, search_data,
                                  selected_budget)
from loraplace.study.race import study_race
from loraplace.study.session import Session

log = logging.getLogger("loraplace")


def place(s: Session) -> dict[str, Placement]:
    """Every strategy of the study on this model, with what choosing it needs first: the probe's scores (``auto``),
    the weights' condition numbers (``kappa``), EVA's ranks and A matrices (``eva``); every strategy error surfaces
    here, before any training. Also stores the study's config, anatomy and data sizes."""
    cfg, ws, store = s.cfg, s.ws, s.store
    anat = ws.anatomy
    scores = None
    if needs_probe(cfg):  # auto's module set comes from the probe: run it (or reuse it) before placing
        from loraplace.measure.probe import ensure_probe

        selected_budget(cfg, anat)  # a missing budget fails before minutes of probing
        scores = auto_scores(cfg, ensure_probe(cfg, ws, store))
    kappa = kappa_order_of(cfg, ws, store) if KAPPA in cfg.strategies else None
    if EVA in cfg.strategies:  # its ranks come from the data: resolved (or read back) before planning
        from loraplace.measure.eva import eva_init

        ws.eva = eva_init(cfg, ws, store, fixed_budget(cfg, anat))
    placements = resolve_placements(cfg, anat, scores, kappa, ws.eva)
    store.write_file("config.yaml", cfg.to_yaml())  # rerun with: loraplace study OUT/config.yaml
    store.put_meta("anatomy", {"model_type": anat.model_type, "n_blocks": anat.n_blocks, "base_params": anat.base_params,
                               "roles": list(anat.roles_present())})
    train_set, eval_set = ws.train_set, ws.eval_set
    store.put_meta("data", {"source": cfg.data.source, "eval_source": cfg.data.eval_source,
                            "train_examples": len(train_set.input_ids), "eval_examples": len(eval_set.input_ids),
                            "eval_tokens": eval_set.n_target_tokens, "dropped": train_set.dropped + eval_set.dropped,
                            "selection_examples": len(ws.selection_set.input_ids) if ws.selection_set else 0})
    return placements


def measure_base(s: Session) -> None:
    """The base model's loss (and accuracy) on the eval set, and the forgetting set every trial is scored on: once
    per study, kept under keys of what they depend on."""
    s.zero = zero_shot(s.cfg, s.ws, s.store)
    s.ws.forgetting = forgetting.forgetting_set(s.cfg, s.ws, s.store)


def tune(s: Session, placements: dict[str, Placement]) -> dict[str, float]:
    """The learning-rate search (``study.tune``): every strategy at each rate of ``tune.lr`` on the training data
    less the selection split, halved at ``tune.at``; returns each strategy's rate (the best on the selection split),
    leaving out a strategy for which no rate finished. {} without ``tune.lr``: every strategy at ``train.lr``."""
    cfg, ws = s.cfg, s.ws
    if not cfg.tune.active:
        return {}
    total = search_steps(ws)
    tasks = T.plan_tuning(cfg, placements, len(ws.selection_set.input_ids), total)
    s.add(tasks, retry_diverged=False)  # a rate that diverged would diverge again
    log.info("tune: %d tuning trials (%d rates x %d strategies x %d tuning seed(s)) on %d training examples, chosen "
             "on %d held out", len(tasks), len(cfg.tune.grid()), len(placements), len(cfg.tune.seeds),
             len(ws.tune_train_set.input_ids), len(ws.selection_set.input_ids))
    s.run(tasks, T.tuning_race(cfg, [t.trial_id for t in tasks]))
    trials = [s.store.get(t.trial_id) for t in tasks]  # each done, stopped or failed (s.run waits for others')
    chosen = T.choices(cfg, trials)
    s.store.put_meta("tune", T.summary(cfg, len(ws.selection_set.input_ids), total, chosen))
    rates = {name: c.lr for name, c in chosen.items() if c.lr is not None}
    at_baseline = {(n, rates[cfg.baseline]) for n in rates} if cfg.tune.compare and cfg.baseline in rates else set()
    T.drop_snapshots(tasks, set(rates.items()) | at_baseline)  # the ones no final trial reads
    s.tuning = tasks
    for c in chosen.values():
        if c.lr is None:
            log.warning("tune: no rate of the grid finished for %s; it gets no final trials", c.strategy)
        else:
            log.info("tune: %s trains at lr %s (selection loss %.4f)", c.strategy, lr_text(c.lr), c.losses[T.rate_key(c.lr)])
        if c.edge_text():
            log.warning("tune: %s", c.edge_text())
    return rates


def search_steps(ws) -> int:
    """The optimizer steps of a trial on the search's data (``train.epochs`` counts passes over it)."""
    return replace(ws.setup, train_set=ws.tune_train_set).total_steps


def finals(s: Session, placements: dict[str, Placement], rates: dict[str, float], races: bool = True):
    """The final trials of ``placements`` at ``rates`` (train.lr untuned): on the search's data with ``tune.reuse``,
    where each one a tuning trial already trained is read from its snapshots (``tune.replays``; only tuning trials
    planned to keep snapshots, ``tune.reuses``, have any)."""
    cfg, ws = s.cfg, s.ws
    search = search_data(cfg, len(ws.selection_set.input_ids)) if ws.selection_set is not None else None
    tasks = plan_trials(cfg, placements, rates or None, search)
    if not races:
        tasks = [replace(t, checkpoint_dir=None, races=False) for t in tasks]
    return T.replays(tasks, s.tuning)


def train(s: Session, placements: dict[str, Placement], rates: dict[str, float]) -> None:
    """The study's trials: every strategy and seed, at the strategy's rate (``rates``; train.lr untuned), raced at
    ``race.at``. In a tuned study a strategy with no rate is left out."""
    cfg = s.cfg
    if cfg.tune.active:
        placements = {n: p for n, p in placements.items() if n in rates}
    tasks = finals(s, placements, rates)
    s.add(tasks)
    replayed = sum(bool(t.replay) for t in tasks)
    if replayed:
        log.info("tune.reuse: %d of %d trials were trained by the search (the tuning seed at the chosen rate): read "
                 "from its snapshots and evaluated, not trained again", replayed, len(tasks))
    done = sum(s.store.get(t.trial_id).status == DONE for t in tasks)
    if done:
        log.info("%d of %d trials already done; running the other %d", done, len(tasks), len(tasks) - done)
    zero = s.zero.get("accuracy") if cfg.analysis.metric == "accuracy" else s.zero.get("eval_loss")
    s.run(tasks, study_race(cfg, [t.trial_id for t in tasks], zero))


def compare(s: Session, placements: dict[str, Placement], rates: dict[str, float]) -> None:
    """``tune.compare``: every other strategy trained (its study seeds, not raced) at the baseline's chosen rate, as
    a study with one shared rate would train it, for the report's "Does the learning rate change the answer?"."""
    cfg = s.cfg
    if not (cfg.tune.active and cfg.tune.compare) or cfg.baseline not in rates:
        return
    at = rates[cfg.baseline]
    tasks = [t for t in finals(s, placements, {n: at for n in placements}, races=False) if t.trial_id not in set(s.ids)]
    if tasks:
        log.info("tune.compare: %d trials of the other strategies at the baseline's rate %s", len(tasks), lr_text(at))
    s.add(tasks)
    s.run(tasks)


def finish(s: Session) -> None:
    """Forgetting measured again (from saved adapters) for finished trials scored on another set; checkpoints of
    finished and stopped trials removed unless ``race.keep_checkpoints``."""
    for tid in forgetting.backfill(s.cfg, s.ws, s.store, s.ws.forgetting):  # finished under other settings
        if s.tracker is not None:
            s.tracker.remeasured(s.store.get(tid))
    if not s.cfg.race.keep_checkpoints:
        for t in s.tasks:
            rec = s.store.get(t.trial_id)
            if rec.status in (DONE, STOPPED) and t.checkpoint_dir and Path(t.checkpoint_dir).exists():
                shutil.rmtree(t.checkpoint_dir, ignore_errors=True)
        if all(s.store.get(t.trial_id).status in (DONE, FAILED) for t in s.tasks if t.phase != TUNE):
            T.drop_snapshots(s.tuning, set())  # every final trial that could read them is done
    elsewhere = sum(s.store.get(t.trial_id).status == RUNNING for t in s.tasks)
    if elsewhere:
        log.info("%d trial(s) still running in other processes (see `loraplace status %s`)", elsewhere, s.cfg.out)

