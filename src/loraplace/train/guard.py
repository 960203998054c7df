"""The shared base model stays as it was: the guard every engine and the probe run under.

Usage::

    with base_unchanged(model, "trial 3f2a..."):   # raises BaseWeightsChanged afterwards if a weight moved
        ...
"""

from __future__ import annotations

import contextlib

import torch


class BaseWeightsChanged(Exception):
    """A trial altered the shared base model: a bug, never recorded as a trial failure (study.executor.RECORDED)."""


def weights_fingerprint(model: torch.nn.Module) -> float:
    """A cheap checksum of every base weight (sum of |w| in float64), to prove runs leave it pristine."""
    with torch.no_grad():
        return float(sum(p.detach().double().abs().sum() for p in model.parameters()))


@contextlib.contextmanager
def base_unchanged(model: torch.nn.Module, what: str):
    """Around anything that wraps the shared base (a trial, a fused group, a probe seed): afterwards, even
    when it failed, the base weights must be the ones it started with, else BaseWeightsChanged."""
    before = weights_fingerprint(model)
    try:
        yield
    finally:
        if weights_fingerprint(model) != before:
            raise BaseWeightsChanged(f"base weights changed during {what}: refusing to continue")
