"""What a trial records: its metrics (finished, or so far at a rung) and its TrialResult.

Usage::

    figures(trial, ev)                          # a paused trial's metrics: its training so far, its latest evaluation
    result(trial, setup, ev, saved)             # a finished trial's TrialResult (Trial.finish calls it)

Every metric is named as ``core.metrics.METRICS`` names it and built here once, so a paused trial's figures and a
finished trial's metrics cannot disagree: a finished trial adds what only a whole run has (its adapter's size,
throughput, the frozen prefix it reused, its fused group's figures, its variant's own method time).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from loraplace.core.metrics import train_flops
from loraplace.placement.record import PlacementRecord


@dataclass
class TrialResult:
    metrics: dict
    curve: list[tuple[int, float]]  # (step, token-weighted train loss of that step's batch)
    placement: PlacementRecord  # what was trained, as stored and exported
    adapter_dir: Path | None = None
    notes: list[str] = field(default_factory=list)
    evals: list[tuple[int, dict]] = field(default_factory=list)  # (step, figures) at the rungs before the end
    measured: dict = field(default_factory=dict)  # {"forgetting": key of the set it was measured on}


def train_stats(curve: list, tail: list[tuple[float, int]], tokens: int, slots: int) -> dict:
    """A training run's metrics: tail holds (summed NLL, target count) per step; tokens / slots: real and
    padded token slots fed to the model."""
    last = tail[-max(1, len(tail) // 10):]
    return {
        "steps": len(curve),
        "train_tokens": tokens,
        "padding_frac": 1.0 - tokens / max(slots, 1),
        "train_loss_final": sum(s for s, _ in last) / max(1, sum(n for _, n in last)),
    }


def adapter_bytes(path: str | Path) -> int:
    """Bytes of a saved PEFT adapter: its weights and config (adapter_*), not the README PEFT adds."""
    path = Path(path)
    return sum(f.stat().st_size for f in path.iterdir() if f.name.startswith("adapter_"))


def figures(trial, ev: dict, finished: bool = False, saved: Path | None = None) -> dict:
    """The metrics of ``trial`` (a ``train.trial.Trial``) at its current step, its evaluation figures ``ev`` first.
    ``finished``: also the whole run's (``saved``: its adapter directory, None when not saved: the size is then
    the placement's estimate). Times in s, memory in bytes."""
    p = trial.trained
    stats = train_stats(trial.curve, trial.tail, trial.tokens, trial.slots) if trial.curve or finished else {"steps": 0}
    m = {**ev, **stats, "trainable_params": p.trainable_params, "base_params": p.anatomy.base_params,
         "trainable_pct": p.trainable_pct, "n_modules": len(p.modules), "train_time_s": trial.train_time,
         "eval_time_s": trial.eval_time, "peak_mem_bytes": trial.peak,
         "train_flops": train_flops(p.anatomy.base_params, p.trainable_params, trial.tokens)}
    if not finished:
        return m
    m.update(prefix_cached_blocks=trial.prefix_blocks, adapter_bytes=adapter_bytes(saved) if saved else p.adapter_bytes(),
             tokens_per_s=trial.tokens / trial.train_time if trial.train_time > 0 else 0.0)
    if trial.fused:  # its group: size, padding of the stacked batches, the group's whole training wall time
        m.update(fused_trials=trial.fused["size"], fused_padding_frac=1.0 - trial.fused["real"] / max(trial.fused["slots"], 1),
                 group_train_time_s=trial.fused["time"])
    method = trial.variant.method_time(trial.variant_state)
    if method is not None:
        m["method_time_s"] = method
    return m


def result(trial, setup, ev: dict, saved: Path | None) -> TrialResult:
    """The finished ``trial``'s TrialResult: its metrics (``figures``), curve, rung evaluations, what it trained."""
    out = TrialResult(metrics=figures(trial, ev, finished=True, saved=saved), curve=trial.curve,
                      placement=trial.record(setup), adapter_dir=saved, evals=list(trial.evals))
    if setup.forgetting is not None:
        out.measured = {"forgetting": setup.forgetting.key}
    return out
