"""The frozen-prefix cache in the sequential engine (the fused engine's cases are in train/test_fused.py)."""

from __future__ import annotations

import math

import pytest
from toys import SPEC, assert_same_adapter, close, deep, prefix_runs, run, steps_with_new_examples, toy_set, toy_workspace

from loraplace.core.config import TrainSpec
from loraplace.model.anatomy import analyze
from loraplace.placement.resolve import resolve
from loraplace.placement.strategy import Strategy
from loraplace.train.prefix import lowest_block
from loraplace.train.result import TrialResult


def _trial(model, placement, ts, spec, adapter_dir, cap):
    """One trial through the executor (``run_one``) with the frozen-prefix cache capped at ``cap`` bytes."""
    [out] = run(toy_workspace(model, ts, spec, prefix_cache_bytes=cap), [placement], [1], [adapter_dir])
    return out


@pytest.mark.parametrize("arch,checkpointing", [("llama", False), ("bloom", False), ("llama", True)])
def test_sequential_trial_computes_the_prefix_once_with_the_same_numbers(tmp_path, arch, checkpointing):
    model = deep(arch)
    anat = analyze(model)
    p = resolve(Strategy("top_half", "all", "last:50%"), anat, rank=4, alpha=8)
    assert lowest_block([p]) == 2
    ts, spec = toy_set(21), TrainSpec(**SPEC, gradient_checkpointing=checkpointing)
    ref = _trial(model, p, ts, spec, tmp_path / "ref", cap=0)  # recomputes blocks 0-1 every step
    runs = prefix_runs(model, anat)
    got = _trial(model, p, ts, spec, tmp_path / "cached", cap=None)
    misses, last = steps_with_new_examples(ts, spec, [1])
    assert len(runs) == misses and last <= math.ceil(len(ts) / spec.batch_size) < 12  # epoch 1 only
    assert isinstance(got, TrialResult) and ref.metrics["prefix_cached_blocks"] == 0
    assert got.metrics["prefix_cached_blocks"] == 2
    assert len(ref.curve) == len(got.curve) == 12
    assert all(close(a, b) for (_, a), (_, b) in zip(ref.curve, got.curve)), (ref.curve, got.curve)
    assert close(got.metrics["eval_loss"], ref.metrics["eval_loss"]) and ref.metrics["eval_loss"] < ref.curve[0][1]
    assert_same_adapter(ref.adapter_dir, got.adapter_dir)


def test_lora_dropout_is_not_the_base_models_randomness():
    """LoRA dropout draws its masks in the adapted blocks, above the prefix: the prefix is still cached."""
    model = deep("llama")
    anat = analyze(model)
    p = resolve(Strategy("top_half", "all", "last:50%"), anat, rank=4, alpha=8)
    got = _trial(model, p, toy_set(21), TrainSpec(**{**SPEC, "dropout": 0.1}), None, cap=None)
    assert got.metrics["prefix_cached_blocks"] == 2


def test_block_zero_adapted_or_one_pass_means_no_cache():
    model = deep("llama")
    anat = analyze(model)
    ts = toy_set(21)
    runs = prefix_runs(model, anat)
    every = resolve(Strategy("all", "all"), anat, rank=4, alpha=8)
    assert _trial(model, every, ts, TrainSpec(**SPEC), None, cap=None).metrics["prefix_cached_blocks"] == 0
    assert len(runs) == 12
    top = resolve(Strategy("top_half", "all", "last:50%"), anat, rank=4, alpha=8)
    one_pass = TrainSpec(**{**SPEC, "steps": 6})  # 21 examples, batch 4: 6 steps are one epoch
    assert _trial(model, top, ts, one_pass, None, cap=None).metrics["prefix_cached_blocks"] == 0
    assert len(runs) == 18
