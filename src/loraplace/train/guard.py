"""The shared base model stays as it was: the guard every engine and the probe run under.

Usage::

    with base_unchanged(model, "trial 3f2a..."):   # raises BaseWeightsChanged afterwards if a weight moved
    with base_unchanged(model, "trial 3f2a...", expected=ws.base_fingerprint):   # against the base as first read
        ...
"""

from __future__ import annotations

import contextlib

import torch


class BaseWeightsChanged(Exception):
    """A trial altered the shared base model: a bug, never recorded as a trial failure (study.executor.RECORDED)."""


def weights_fingerprint(model: torch.nn.Module) -> float:
    """A cheap checksum of every base weight (sum of |w| in float64), to prove runs leave it pristine; a
    bitsandbytes base's scales too (``quant_state``), which live beside its quantized weights, not in them."""
    with torch.no_grad():
        tensors = list(model.parameters()) + list(_quant_scales(model))
        return float(sum(_abs_sum(t.detach()) for t in tensors))


def _abs_sum(t: torch.Tensor) -> torch.Tensor:
    """sum |t| in float64. A float tensor's as an L1 norm accumulated in float64 (no float64 copy of the
    weights: half the time of ``t.double().abs().sum()`` for SmolLM2-135M, 0.14 s against 0.28 s on 2 cores,
    and the same value there); a quantized weight's bytes (uint8) through a float64 copy, as before."""
    if t.is_floating_point():
        return torch.linalg.vector_norm(t, 1, dtype=torch.float64)
    return t.double().abs().sum()


def _quant_scales(model: torch.nn.Module):
    """The scale tensors of a bitsandbytes base: a 4-bit weight's absmax (and with double quantization its
    second-level absmax and offset); an 8-bit layer's row scales (SCB, on the weight until the first forward
    moves it to the layer's state)."""
    for mod in model.modules():
        weight = getattr(mod, "weight", None)
        qs = getattr(weight, "quant_state", None)
        if qs is not None:
            yield qs.absmax
            if getattr(qs, "nested", False):
                yield qs.state2.absmax
                yield qs.offset
        scb = getattr(getattr(mod, "state", None), "SCB", None)
        scb = scb if scb is not None else getattr(weight, "SCB", None)
        if isinstance(scb, torch.Tensor):
            yield scb


@contextlib.contextmanager
def base_unchanged(model: torch.nn.Module, what: str, expected: float | None = None):
    """Around anything that wraps the shared base (a trial, a fused group, a probe seed): afterwards, even
    when it failed, the base weights must be the ones it started with, else BaseWeightsChanged. ``expected``:
    the base's fingerprint as its owner took it once (``study.workspace.Workspace.base_fingerprint``), so each
    piece of work reads the weights once instead of twice."""
    before = weights_fingerprint(model) if expected is None else expected
    try:
        yield
    finally:
        if weights_fingerprint(model) != before:
            raise BaseWeightsChanged(f"base weights changed during {what}: refusing to continue")
