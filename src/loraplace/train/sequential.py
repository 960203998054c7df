"""The sequential engine: one trial at a time, its adapters on the base through PEFT's own layers.

Usage::

    trial = start(setup, placement, seed=0)       # a study goes through train.segments (study.executor)
    advance(setup, [trial], 10); evaluate(setup, [trial]); checkpoint.save(trial, path)

A step is a plain PyTorch step over the PEFT-wrapped base: the loss on target positions only
(``train.loss``) plus the variant's penalty, backward, then ``Trial.update`` (clipping, the schedule's learning
rate, AdamW, the variant's own step). A trial whose loss goes non-finite is marked failed (``Trial.error``) and
advances no further.
"""

from __future__ import annotations

import time

from loraplace.placement.resolve import Placement
from loraplace.train import loss as L
from loraplace.train import memory as M
from loraplace.train.prefix import PrefixCache, lowest_block, prefix_cache
from loraplace.train.progress import step_bar
from loraplace.train.trial import Setup, Trial


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
        with M.peak_into([trial], setup.device), trial.attached(setup) as peft_model, \
                M.activation_checkpointing(setup.model, setup.train.gradient_checkpointing):
            _steps(setup, trial, peft_model, n, desc)


def _steps(setup: Setup, trial: Trial, peft_model, n: int, desc: str) -> None:
    peft_model.train()
    cache = trial.prefix
    vocab = L.vocab_size(peft_model)
    with step_bar(n, desc) as bar:
        t0 = time.perf_counter()
        try:
            with trial.rng_active(setup.device):
                for _ in range(n):
                    batch = trial.batch(setup, index=cache is not None)
                    count = int(L.targets_per_row(batch["labels"]).sum())  # the batch's target tokens
                    groups = L.row_groups(batch, vocab)  # one unless its head logits would pass L.HEAD_BYTES
                    nll = 0.0
                    for i, group in enumerate(groups):
                        with PrefixCache.around(cache, [group], group["input_ids"].shape):
                            part, _ = L.target_nll(peft_model, group)
                        loss = part / max(count, 1)  # its share of the token-weighted mean over the batch's targets
                        if not trial.finite(loss):
                            return
                        if i == len(groups) - 1:  # the curve keeps the NLL; the variant may add its penalty, once
                            loss = loss + trial.penalty()
                        loss.backward()  # gradients accumulate over the groups
                        nll = nll + part.detach()
                    loss = nll / max(count, 1)  # one group: the very tensors of an unsplit step
                    trial.update(setup, loss.item(), nll.item(), count, batch)
                    if trial.error is not None:  # its variant failed it
                        return
                    bar.set_postfix(loss=f"{trial.curve[-1][1]:.3f}")
                    bar.update(1)
        finally:
            trial.train_time += time.perf_counter() - t0
            trial.prefix_blocks = max(trial.prefix_blocks, PrefixCache.blocks_reused(cache))


def evaluate(setup: Setup, trials: list[Trial]) -> None:
    """Each trial's token-weighted eval loss at its current step (``Trial.eval``)."""
    for trial in trials:
        if trial.error is not None:
            continue
        with M.peak_into([trial], setup.device), trial.attached(setup) as peft_model:
            t0 = time.perf_counter()
            ev = L.evaluate(peft_model, setup.eval_set, setup.eval.batch_size, setup.pad_id, setup.device)
            trial.eval_time += time.perf_counter() - t0
        trial.eval = {**ev, "step": trial.step}
