"""A trial's resumable checkpoint: everything it needs to continue exactly, in this process or another.

Usage::

    save(trial, path)                              # a directory: adapters, AdamW, RNG, step, records, variant state
    trial = restore(path, setup, placement)        # ready to advance from where it stopped

The learning rate follows the whole run's schedule and the data position is the step, so a restored trial computes
exactly what it would have computed in one go. A variant's own state (AdaLoRA's allocator, PiSSA's initial A and B)
is written and read by the variant (``Variant.state_dict`` / ``load_state``).
"""

from __future__ import annotations

from pathlib import Path

import torch

from loraplace.core.files import atomic_dir
from loraplace.placement.resolve import Placement
from loraplace.train.trial import Setup, Trial, TrialError

CHECKPOINT_FILE = "trial.pt"  # inside a trial's checkpoint directory
CHECKPOINT_VERSION = 1
RECORDS = ("tokens", "slots", "train_time", "eval_time", "peak", "eval", "error", "fused", "prefix_blocks")  # as they are


def state_dict(trial: Trial) -> dict:
    """Everything ``restore`` needs to continue exactly: tensors, AdamW, RNG, step and records."""
    return {
        "version": CHECKPOINT_VERSION, "seed": trial.seed, "total": trial.total, "step": trial.step,
        "modules": dict(trial.placement.modules), "scales": dict(trial.scales),
        "params": {n: p.detach().cpu() for n, p in trial.params.items()},
        "optimizer": trial.opt.state_dict(), "rng": trial.rng,
        "curve": list(trial.curve), "tail": list(trial.tail), "evals": [[s, dict(e)] for s, e in trial.evals],
        **{key: getattr(trial, key) for key in RECORDS},
        **trial.variant.state_dict(trial.variant_state),
    }


def save(trial: Trial, path: str | Path) -> Path:
    """Write a resumable checkpoint of ``trial`` into directory ``path`` (all or nothing)."""
    with atomic_dir(path) as tmp:
        torch.save(state_dict(trial), Path(tmp) / CHECKPOINT_FILE)
    return Path(path)


def restore(path: str | Path, setup: Setup, placement: Placement) -> Trial:
    """The trial saved at ``path``, ready to advance from where it stopped. TrialError when the checkpoint cannot be
    read or belongs to another placement or run length."""
    file = Path(path) / CHECKPOINT_FILE
    try:
        state = torch.load(file, map_location="cpu", weights_only=True)
    except (OSError, RuntimeError, EOFError) as e:
        raise TrialError(f"checkpoint {file} cannot be read ({type(e).__name__})") from None
    if state.get("version") != CHECKPOINT_VERSION:
        raise TrialError(f"checkpoint {file} is of version {state.get('version')}, not {CHECKPOINT_VERSION}")
    if state["modules"] != dict(placement.modules) or state["total"] != setup.total_steps:
        raise TrialError(f"checkpoint {file} belongs to another placement or run length")
    params = {n: torch.nn.Parameter(t.to(setup.device)) for n, t in state["params"].items()}
    trial = Trial(placement, state["seed"], state["total"], params, state["scales"], state["rng"], setup.train)
    trial.opt.load_state_dict(state["optimizer"])
    trial.step, trial.rng = state["step"], state["rng"]
    trial.curve = [tuple(x) for x in state["curve"]]
    trial.tail = [tuple(x) for x in state["tail"]]
    trial.evals = [(int(s), dict(e)) for s, e in state["evals"]]
    for key in RECORDS:
        setattr(trial, key, state[key])
    try:
        trial.variant_state = trial.variant.load_state(state, setup.device)
    except LookupError as e:
        raise TrialError(f"checkpoint {file} of a {trial.variant.label} trial lacks {e.args[0]}") from None
    return trial
