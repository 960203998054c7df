"""The sequential engine: one trial at a time, its adapters on the base through PEFT's own LoRA layers.

Usage::

    result = run_trial(setup, placement, seed=0, adapter_dir=Path("adapters/x"))   # start to finish
    # or in pieces (what racing does):
    trial = start(setup, placement, seed=0)
    advance(setup, [trial], 10); evaluate(setup, [trial]); trial.save(path)

A step is a plain PyTorch step over the PEFT-wrapped base: the loss on target positions only
(``train.loss``), backward, then ``Trial.update`` (clipping, the schedule's learning rate, AdamW).
A trial whose loss goes non-finite is marked failed (``Trial.error``) and advances no further.
"""

from __future__ import annotations

import time
from pathlib import Path

import torch
from tqdm.auto import tqdm

from loraplace.placement.resolve import Placement
from loraplace.train import loss as L
from loraplace.train import memory as M
from loraplace.train.prefix import PrefixCache, lowest_block, prefix_cache
from loraplace.train.trial import Setup, Trial, TrialError, TrialResult


def start(setup: Setup, placement: Placement, seed: int) -> Trial:
    """A new trial at step 0, with this engine's frozen-prefix cache decided (``prepare``)."""
    trial = Trial.start(setup, placement, seed)
    prepare(setup, trial)
    return trial


def prepare(setup: Setup, trial: Trial) -> None:
    """Decide, on the bare base (its own dropout is what matters, not LoRA's), whether the blocks below the
    trial's lowest adapter are computed once per example and reused (``train.prefix``); a restored trial
    builds its cache anew."""
    if trial.prefix_checked or trial.is_attached:
        return
    trial.prefix = prefix_cache(setup.model, trial.placement.anatomy, lowest_block([trial.placement]), setup.train_set,
                                setup.train, trial.total, setup.device, setup.prefix_cache_bytes)
    trial.prefix_checked = True


def advance(setup: Setup, trials: list[Trial], steps: int, desc: str = "train") -> None:
    """Train each trial ``steps`` more optimizer steps (fewer where its run ends), one after the other."""
    for trial in trials:
        n = min(steps, trial.total - trial.step)
        if n <= 0 or trial.error is not None:
            continue
        prepare(setup, trial)
        M.reset_peak_memory(setup.device)
        with trial.attached(setup) as peft_model, M.activation_checkpointing(setup.model, setup.train.gradient_checkpointing):
            _steps(setup, trial, peft_model, n, desc)
        trial.peak = max(trial.peak, M.peak_memory_bytes(setup.device))


def _steps(setup: Setup, trial: Trial, peft_model, n: int, desc: str) -> None:
    peft_model.train()
    cache = trial.prefix
    bar = tqdm(total=n, desc=desc, unit="step", leave=False, dynamic_ncols=True, disable=None)
    t0 = time.perf_counter()
    try:
        with trial.rng_active(setup.device):
            for _ in range(n):
                batch = trial.batch(setup, index=cache is not None)
                with PrefixCache.around(cache, [batch], batch["input_ids"].shape):
                    nll, count = L.target_nll(peft_model, batch)
                loss = nll / max(count, 1)  # token-weighted mean over this batch's targets
                if not torch.isfinite(loss):
                    trial.fail(f"non-finite train loss ({loss.item()}) at step {trial.step + 1}")
                    return
                (loss + trial.penalty()).backward()  # the curve keeps the NLL; AdaLoRA adds its penalty
                trial.update(setup, loss.item(), nll.item(), count, batch)
                bar.set_postfix(loss=f"{trial.curve[-1][1]:.3f}")
                bar.update(1)
    finally:
        trial.train_time += time.perf_counter() - t0
        trial.prefix_blocks = max(trial.prefix_blocks, PrefixCache.blocks_reused(cache))
        bar.close()


def evaluate(setup: Setup, trials: list[Trial]) -> None:
    """Each trial's token-weighted eval loss at its current step (``Trial.eval``)."""
    for trial in trials:
        if trial.error is not None:
            continue
        M.reset_peak_memory(setup.device)
        with trial.attached(setup) as peft_model:
            t0 = time.perf_counter()
            ev = L.evaluate(peft_model, setup.eval_set, setup.eval.batch_size, setup.pad_id, setup.device)
            trial.eval_time += time.perf_counter() - t0
        trial.eval = {**ev, "step": trial.step}
        trial.peak = max(trial.peak, M.peak_memory_bytes(setup.device))


def run_trial(setup: Setup, placement: Placement, seed: int, adapter_dir: str | Path | None = None,
              desc: str = "train") -> TrialResult:
    """A whole trial: start, advance to the end, evaluate, finish (accuracy, saved adapter); the base is
    unwrapped again whatever happens. Raises TrialError when the trial fails."""
    trial = start(setup, placement, seed)
    with trial.attached(setup):  # one PEFT wrapping for every phase
        advance(setup, [trial], trial.total, desc)
        if trial.error is not None:
            raise TrialError(trial.error)
        evaluate(setup, [trial])
        return trial.finish(setup, adapter_dir)
