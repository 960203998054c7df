"""Running trials to a step on either engine, evaluating at rungs on the way: the piece of work a study hands out.

Usage::

    trials = [begin(setup, placement, seed, saved=None)]            # step 0, or restored from a checkpoint
    run_to(setup, trials, until=15, evals_at=(8, 15), fused=False)  # train to step 15, evaluate at 8 and 15
    trial.evals                                                     # [(8, {...}), (15, {...})]
    run_to(setup, trials, 30, keep_at=(30,), keep=save_snapshot)    # also hand each trial to keep() at step 30
    run_to(setup, [replayed], 30, (8, 15), replay=read_snapshot)    # a trial read at 8, 15, 30, never trained

A rung evaluation is the study's evaluation at that step (``Trial.evals``): the eval loss, and the accuracy
too when ``rung_accuracy`` (a study deciding on accuracy). Evaluating changes nothing the trial computes next
(no dropout, no random draws), so a trial evaluated at rungs trains exactly as one that is not.
"""

from __future__ import annotations

import time
from dataclasses import replace

from loraplace.placement.resolve import Placement
from loraplace.train import checkpoint
from loraplace.train import fused as F
from loraplace.train import sequential as S
from loraplace.train.trial import Setup, Trial, TrialError


def begin(setup: Setup, placement: Placement, seed: int, saved=None) -> Trial:
    """A trial at step 0 (``saved`` None) or where its checkpoint in directory ``saved`` left it, ready for either
    engine."""
    trial = Trial.start(setup, placement, seed) if saved is None else checkpoint.restore(saved, setup, placement)
    S.prepare(setup, trial)  # the sequential engine's frozen-prefix cache, decided on the bare base
    return trial


def run_to(setup: Setup, trials: list[Trial], until: int, evals_at=(), fused: bool = False, rung_accuracy: bool = False,
           desc: str = "train", keep_at=(), keep=None, replay=None) -> None:
    """Advance ``trials`` to step ``until`` (fused: together; else one after the other), evaluating each live
    trial at every step of ``evals_at`` it passes (recorded in ``Trial.evals``). A failed trial stops where it
    failed (``Trial.error``). ``keep(trial)`` is called as a trial reaches a step of ``keep_at`` (its snapshots);
    with ``replay(trial, step)``, the ``checkpoint.replayed`` trials are not trained but moved to each step by it."""
    targets = sorted({s for s in (*evals_at, *keep_at) if s <= until} | {until})
    if replay is not None:
        for trial in trials:
            for target in (s for s in targets if s >= trial.step):
                if target != trial.step:
                    replay(trial, target)
                if target in evals_at:
                    _evaluate(setup, [trial], False, rung_accuracy)
        return
    replayed = [t for t in trials if t.replayed]
    if replayed:
        raise TrialError(f"trial {replayed[0].placement.strategy} seed {replayed[0].seed} was read from a snapshot "
                         "without its optimizer state: it cannot be trained on")
    if fused:
        cache = "new"
        for target in targets:
            live = [t for t in trials if t.error is None]
            if not live:
                return
            cache = F.advance(setup, trials, target - min(t.step for t in live), desc, cache=cache)
            reached = [t for t in trials if t.step == target and t.error is None]
            if target in evals_at:
                _evaluate(setup, reached, True, rung_accuracy)
            if target in keep_at and keep is not None:
                for t in reached:
                    keep(t)
        return
    for trial in trials:
        for target in targets:
            S.advance(setup, [trial], target - trial.step, desc)
            if trial.error is not None:
                break
            if target in evals_at:
                _evaluate(setup, [trial], False, rung_accuracy)
            if target in keep_at and keep is not None and trial.step == target:
                keep(trial)


def _evaluate(setup: Setup, trials: list[Trial], fused: bool, accuracy: bool) -> None:
    """A rung's evaluation: on ``setup.rung_eval_set`` where the study limits it (``race.eval_limit``)."""
    rung = setup if setup.rung_eval_set is None else replace(setup, eval_set=setup.rung_eval_set)
    (F.evaluate if fused else S.evaluate)(rung, trials)
    for t in trials:
        ev = {k: v for k, v in t.eval.items() if k != "step"}
        if accuracy and setup.accuracy is not None:
            t0 = time.perf_counter()
            with t.attached(setup) as peft_model:
                ev.update(setup.accuracy(peft_model))
            t.eval_time += time.perf_counter() - t0
        t.evals.append((t.step, ev))
