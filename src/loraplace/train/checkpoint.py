"""A trial's resumable checkpoint: everything it needs to continue exactly, in this process or another.

Usage::

    save(trial, path)                              # a directory: adapters, AdamW, RNG, step, records, variant state
    trial = restore(path, setup, placement)        # ready to advance from where it stopped
    save(trial, snap, optimizer=False)             # a snapshot (tune.reuse): the trial as it was at this step ...
    trial = replayed(snap, setup, placement)       # ... read back as another trial's training, to evaluate
    replay(trial, later_snap)                      # ... and moved on to a later snapshot of the same training

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
TRAINED = ("tokens", "slots", "train_time", "fused", "prefix_blocks")  # what a replay takes: the training's records


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


def save(trial: Trial, path: str | Path, optimizer: bool = True) -> Path:
    """Write a resumable checkpoint of ``trial`` into directory ``path`` (all or nothing); ``optimizer=False``: a
    snapshot, without AdamW's state (a third of the size), that can be evaluated (``replayed``) but not trained on."""
    state = state_dict(trial)
    if not optimizer:
        state["optimizer"] = None
    with atomic_dir(path) as tmp:
        torch.save(state, Path(tmp) / CHECKPOINT_FILE)
    return Path(path)


def _load(path: str | Path, setup: Setup, placement: Placement) -> dict:
    file = Path(path) / CHECKPOINT_FILE
    try:
        state = torch.load(file, map_location="cpu", weights_only=True)
    except (OSError, RuntimeError, EOFError) as e:
        raise TrialError(f"checkpoint {file} cannot be read ({type(e).__name__})") from None
    if state.get("version") != CHECKPOINT_VERSION:
        raise TrialError(f"checkpoint {file} is of version {state.get('version')}, not {CHECKPOINT_VERSION}")
    if state["modules"] != dict(placement.modules) or state["total"] != setup.total_steps:
        raise TrialError(f"checkpoint {file} belongs to another placement or run length")
    return state


def replayed(path: str | Path, setup: Setup, placement: Placement) -> Trial:
    """The training saved in snapshot ``path`` as a trial of its own (``tune.reuse``: a final trial whose training a
    tuning trial did): its tensors, step, curve and training records, none of the evaluations of the trial that
    saved it. It can be evaluated and finished, not trained on."""
    trial = restore(path, setup, placement)  # a snapshot: restored as ``Trial.replayed``
    trial.evals, trial.eval, trial.eval_time = [], None, 0.0
    return trial


def replay(trial: Trial, path: str | Path, setup: Setup) -> None:
    """Move a ``replayed`` trial to the later snapshot ``path`` of the same training: its tensors (in place, so a PEFT
    wrapping of them sees the change), step, curve, training records and variant state; its evaluations stay."""
    if not trial.replayed:
        raise TrialError(f"trial {trial.placement.strategy} seed {trial.seed}: a replay of a trial that trains")
    state = _load(path, setup, trial.placement)
    if state["seed"] != trial.seed or set(state["params"]) != set(trial.params):
        raise TrialError(f"snapshot {path} belongs to another trial")
    with torch.no_grad():
        for name, p in trial.params.items():
            p.copy_(state["params"][name].to(p.device))
    peak = trial.peak
    _take(trial, state, TRAINED, setup, path)
    trial.peak = max(peak, state["peak"])


def _take(trial: Trial, state: dict, records: tuple[str, ...], setup: Setup, path) -> None:
    """A saved state's position (step, RNG, curve), the ``records`` named, and the variant's state, into ``trial``."""
    trial.step, trial.rng = state["step"], state["rng"]
    trial.curve = [tuple(x) for x in state["curve"]]
    trial.tail = [tuple(x) for x in state["tail"]]
    for key in records:
        setattr(trial, key, state[key])
    try:
        trial.variant_state = trial.variant.load_state(state, setup.device)
    except LookupError as e:
        raise TrialError(f"checkpoint {Path(path) / CHECKPOINT_FILE} of a {trial.variant.label} trial lacks "
                         f"{e.args[0]}") from None


def restore(path: str | Path, setup: Setup, placement: Placement) -> Trial:
    """The trial saved at ``path``, ready to advance from where it stopped. TrialError when the checkpoint cannot be
    read or belongs to another placement or run length."""
    state = _load(path, setup, placement)
    params = {n: torch.nn.Parameter(t.to(setup.device)) for n, t in state["params"].items()}
    trial = Trial(placement, state["seed"], state["total"], params, state["scales"], state["rng"], setup.train)
    if state["optimizer"] is None:  # a snapshot
        trial.replayed = True
    else:
        trial.opt.load_state_dict(state["optimizer"])
    trial.evals = [(int(s), dict(e)) for s, e in state["evals"]]
    _take(trial, state, RECORDS, setup, path)
    return trial
