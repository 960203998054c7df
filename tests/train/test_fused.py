"""Fused trials give the sequential engine's numbers: per-step losses, eval losses, saved adapters, failures."""

from __future__ import annotations

import math

import pytest
import tiny_models
import torch

from toys import (SPEC, assert_same_adapter, close, deep, gpt2_without_dropout, prefix_runs, run,
                  steps_with_new_examples, toy_set, toy_workspace, upper)

from loraplace.core.config import ConfigError, StudyConfig, TrainSpec
from loraplace.model.anatomy import analyze
from loraplace.placement.resolve import Placement, resolve
from loraplace.placement.strategy import Strategy
from loraplace.train import fused
from loraplace.train.result import TrialResult


def _model(arch):
    return gpt2_without_dropout() if arch == "gpt2" else tiny_models.build(arch)


def _strategies():
    return [
        (Strategy("all_linear", "all"), 0),
        (Strategy("attention_only", "attn"), 1),
        (Strategy("block1", "all", "1"), 0),  # a block subset: block 0 carries nothing
        (Strategy("ranks", "all", rank={"attn": 2, "mlp": 6}), 2),  # per-module ranks
    ]


def _sequential(model, placements, seeds, ts, spec, dirs=None) -> list:
    """Each trial alone through the executor (``run_one``), recomputing the frozen prefix every step."""
    return run(toy_workspace(model, ts, spec, prefix_cache_bytes=0), placements, seeds, dirs)


def _fused(model, placements, seeds, ts, spec, dirs=None, **setup_fields) -> list:
    """The trials as one fused group through the executor (``run_group``)."""
    return run(toy_workspace(model, ts, spec, **setup_fields), placements, seeds, dirs, fuse=True)


def _same_curve(s: TrialResult, f: TrialResult, rel: float | None = None) -> bool:
    """The same steps, each loss within ``rel`` (toys.REL by default): an empty or short curve never passes."""
    return (len(f.curve) == len(s.curve) > 0 and [st for st, _ in f.curve] == [st for st, _ in s.curve]
            and all(close(lf, ls) if rel is None else math.isclose(lf, ls, rel_tol=rel)
                    for (_, ls), (_, lf) in zip(s.curve, f.curve)))


@pytest.mark.slow
@pytest.mark.parametrize("arch,dropout", [("llama", 0.0), ("llama", 0.1), ("gpt2", 0.0), ("qwen2", 0.0)])
def test_fused_group_equals_sequential_trials(tmp_path, arch, dropout):
    model = _model(arch)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    anat = analyze(model)
    placements = [resolve(s, anat, rank=4, alpha=8) for s, _ in _strategies()]
    seeds = [seed for _, seed in _strategies()]
    assert len({tuple(p.modules.items()) for p in placements}) == 4
    ts = toy_set(21)
    spec = TrainSpec(**SPEC, dropout=dropout)
    seq = _sequential(model, placements, seeds, ts, spec, [tmp_path / f"seq{i}" for i in range(4)])
    got = _fused(model, placements, seeds, ts, spec, [tmp_path / f"fused{i}" for i in range(4)])
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # base pristine
    assert all(p.grad is None for p in model.parameters())  # the frozen base got no gradients
    assert len(seq) == len(got) == 4
    for i, (s, f) in enumerate(zip(seq, got)):
        assert isinstance(s, TrialResult) and isinstance(f, TrialResult), (s, f)
        assert [st for st, _ in f.curve] == [st for st, _ in s.curve] == list(range(1, 13))
        assert _same_curve(s, f), (i, s.curve, f.curve)
        assert [st for st, _ in f.evals] == [st for st, _ in s.evals] == [3, 6]  # the rungs every study records
        assert all(close(ef["eval_loss"], es["eval_loss"]) for (_, es), (_, ef) in zip(s.evals, f.evals)), i
        assert close(f.metrics["eval_loss"], s.metrics["eval_loss"]), i
        assert s.metrics["eval_loss"] < s.curve[0][1]  # it trained: the comparison is not of untouched adapters
        for k in ("steps", "train_tokens", "padding_frac", "trainable_params", "n_modules", "adapter_bytes", "eval_tokens"):
            assert f.metrics[k] == s.metrics[k], k
        assert f.placement == s.placement
        assert f.metrics["fused_trials"] == 4 and 0 < f.metrics["fused_padding_frac"] < 1  # mixed seeds pad
        assert f.metrics["prefix_cached_blocks"] == 0  # all_linear adapts block 0: no frozen prefix to cache
        assert_same_adapter(s.adapter_dir, f.adapter_dir)


def _float64_runs(tmp_path, build_model, pick) -> list[TrialResult]:
    """Sequential and fused runs of pick(anatomy) -> (placements, seeds) in float64, checked equal to 1e-10."""
    torch.set_default_dtype(torch.float64)
    try:
        model = build_model().double()
        placements, seeds = pick(analyze(model))
        ts, spec = toy_set(21), TrainSpec(**SPEC)
        seq = _sequential(model, placements, seeds, ts, spec, [tmp_path / f"seq{i}" for i in range(4)])
        got = _fused(model, placements, seeds, ts, spec, [tmp_path / f"fused{i}" for i in range(4)])
    finally:
        torch.set_default_dtype(torch.float32)
    assert len(seq) == len(got) == len(placements)
    for s, f in zip(seq, got):
        assert _same_curve(s, f, rel=1e-10)
        assert math.isclose(f.metrics["eval_loss"], s.metrics["eval_loss"], rel_tol=1e-10)
        assert_same_adapter(s.adapter_dir, f.adapter_dir, rel=1e-10)
    return got


@pytest.mark.slow
def test_fused_equals_sequential_to_float64_precision(tmp_path):
    """In float64 rounding cannot hide a difference: the fused math is the sequential math."""
    def pick(anat):
        return [resolve(s, anat, rank=4, alpha=8) for s, _ in _strategies()], [seed for _, seed in _strategies()]
    _float64_runs(tmp_path, lambda: tiny_models.build("llama"), pick)


def test_same_seed_group_adds_no_padding(tmp_path):
    model = tiny_models.build("llama")
    anat = analyze(model)
    placements = [resolve(Strategy(n, r), anat, rank=4, alpha=8) for n, r in [("a", "all"), ("b", "attn"), ("c", "mlp")]]
    ts = toy_set(21)
    spec = TrainSpec(**SPEC)
    got = _fused(model, placements, [3, 3, 3], ts, spec)
    assert len(got) == 3 and all(r.metrics["fused_padding_frac"] == pytest.approx(r.metrics["padding_frac"]) for r in got)


@pytest.mark.slow
def test_a_diverging_trial_leaves_the_group_and_the_others_finish_identically(tmp_path):
    model = tiny_models.build("llama")
    anat = analyze(model)
    good = [resolve(s, anat, rank=4, alpha=8) for s, _ in _strategies()[:3]]
    seeds = [0, 1, 0, 1]
    # an infinite LoRA scale: inf * (B = 0) makes its outputs NaN at step 1 (finite huge scales do
    # not fail on these models: RMSNorm turns overflowing residuals into zeros, AdamW inf gradients)
    bad_src = resolve(Strategy("blowup", "mlp"), anat, rank=4, alpha=8)
    bad = Placement(bad_src.strategy, bad_src.modules, {n: math.inf for n in bad_src.modules}, anat)
    placements = [good[0], bad, good[1], good[2]]
    ts = toy_set(21)
    spec = TrainSpec(**SPEC)
    seq = _sequential(model, placements, seeds, ts, spec)
    assert seq[1] == "TrialError: non-finite train loss (nan) at step 1"  # as the study stores it
    got = _fused(model, placements, seeds, ts, spec)
    assert got[1] == seq[1]
    for i in (0, 2, 3):
        assert len(got[i].curve) == 12 and _same_curve(seq[i], got[i]), i
        assert close(got[i].metrics["eval_loss"], seq[i].metrics["eval_loss"])


def _study_cfg(tmp_path, out, fuse):
    return StudyConfig.from_dict({
        "out": str(tmp_path / out),
        "strategies": ["all_linear", "attention_only", "top_half"],
        "seeds": [0, 1],
        "data": {"limit": 60, "eval_size": 12, "max_length": 96},
        "train": {"steps": 4, "batch_size": 4, "rank": 4, "alpha": 8, "lr": 1e-2, "fuse": fuse},
        "eval": {"batch_size": 8},
    })


@pytest.mark.slow
def test_study_with_fuse_stores_the_numbers_of_the_sequential_study(tmp_path):
    from loraplace.study import run as S

    off = S.run_study(_study_cfg(tmp_path, "off", "off"), (tiny_models.build("llama"), tiny_models.tokenizer()))
    on = S.run_study(_study_cfg(tmp_path, "on", 4), (tiny_models.build("llama"), tiny_models.tokenizer()))
    assert [r.trial_id for r in on] == [r.trial_id for r in off]  # fuse is not part of a trial's identity
    assert all(r.status == "done" for r in on + off)
    assert sorted(r.metrics["fused_trials"] for r in on) == [2, 2, 4, 4, 4, 4]  # seed 0's three + one of seed 1, then two
    for a, b in zip(off, on):
        assert "fused_trials" not in a.metrics
        assert close(b.metrics["eval_loss"], a.metrics["eval_loss"]), (a.strategy, a.seed)
        assert _same_curve(a, b)
        assert_same_adapter(tmp_path / "off" / a.adapter_path, tmp_path / "on" / b.adapter_path)


def _placements(model, n: int):
    anat = analyze(model)
    return [resolve(Strategy(f"s{i}", "all"), anat, rank=4, alpha=8) for i in range(n)]


def test_auto_is_sequential_on_cpu_and_models_with_dropout_are_not_fused(tmp_path):
    model = tiny_models.build("llama")

    def size(fuse, n, m=model):
        return fused.group_size(_study_cfg(tmp_path, "a", fuse).train, m, "cpu", _placements(m, n), 96)

    assert size("auto", 12) == 1 and size(4, 12) == 4 and size(4, 3) == 3 and size("off", 12) == 1
    gpt2 = tiny_models.build("gpt2")  # default dropouts 0.1: their masks would come from one stream
    assert "dropout" in fused.fusable(gpt2, TrainSpec())
    assert size(4, 12, gpt2) == 1
    assert "checkpointing" in fused.fusable(model, TrainSpec(dropout=0.1, gradient_checkpointing=True))
    assert fused.fusable(model, TrainSpec(dropout=0.1)) is None


def test_plan_groups_keeps_seeds_together():
    from loraplace.study.plan import TrialTask

    tasks = [TrialTask(f"{s}{n}", n, s, {}, None) for s in (0, 1, 2) for n in "abc"]
    groups = fused.plan_groups(tasks, 3)
    assert [[t.trial_id for t in g] for g in groups] == [["0a", "0b", "0c"], ["1a", "1b", "1c"], ["2a", "2b", "2c"]]
    assert [len(g) for g in fused.plan_groups(tasks, 4)] == [4, 4, 1]


@pytest.mark.parametrize("value,expected", [("auto", "auto"), ("off", 1), (False, 1), (4, 4), ("4", 4), (1, 1)])
def test_fuse_setting_parses(value, expected):
    assert TrainSpec(fuse=value).fuse_trials() == expected
    cfg = StudyConfig.load(overrides=[f"train.fuse={'off' if value is False else value}"])
    assert cfg.train.fuse_trials() == expected


@pytest.mark.parametrize("value", ["0", "many", "-2", "true"])
def test_bad_fuse_setting_is_a_config_error(value):
    with pytest.raises(ConfigError, match="train.fuse"):
        StudyConfig.load(overrides=[f"train.fuse={value}"])


@pytest.mark.slow
def test_out_of_memory_splits_the_group_and_loses_no_trial(tmp_path, monkeypatch):
    """The CUDA fallback, exercised on CPU: a group 'too big' for memory runs as smaller groups."""
    from loraplace.study import run as S

    real = fused.advance
    sizes = []

    def tight(shared, trials, *a, **kw):
        sizes.append(len(trials))
        if len(trials) > 2:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory (simulated)")
        return real(shared, trials, *a, **kw)

    monkeypatch.setattr(fused, "advance", tight)
    cfg = _study_cfg(tmp_path, "oom", 3)
    cfg.seeds = [0]
    records = S.run_study(cfg, (tiny_models.build("llama"), tiny_models.tokenizer()))
    assert sizes[0] == 3 and set(sizes[1:]) == {2}  # 3 -> 1 (the sequential engine) + 2 (advanced rung by rung)
    assert [r.status for r in records] == ["done"] * 3
    assert sorted(r.metrics.get("fused_trials", 1) for r in records) == [1, 2, 2]


def test_auto_on_cuda_sizes_groups_from_free_memory(tmp_path, monkeypatch):
    """auto's CUDA branch, exercised on CPU with a stated amount of free memory: as many trials as the memory
    estimate of one trial's training (model.estimate) fits in 80% of it."""
    from loraplace.model.estimate import estimate

    model = tiny_models.build("llama")
    spec = _study_cfg(tmp_path, "a", "auto").train
    placements = _placements(model, 12)
    per_trial = estimate(placements[0], spec.batch_size, 96, spec.dtype).training_bytes
    for free, expected in [(64 * 2**30, 12), (int(4.5 * per_trial / 0.8), 4), (2**10, 1)]:
        monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None, free=free: (free, 80 * 2**30))
        assert fused.group_size(spec, model, "cuda", placements, 96) == expected, free


@pytest.mark.slow
def test_fused_trials_score_accuracy_like_sequential_ones(tmp_path):
    """eval.accuracy runs on the restored PEFT wrapping of each fused trial, on the same examples."""
    from loraplace.study import run as S

    def cfg(out, fuse):
        c = _study_cfg(tmp_path, out, fuse)
        c.strategies, c.seeds = ["all_linear", "attention_only"], [0]
        c.eval.accuracy, c.eval.accuracy_limit, c.eval.max_new_tokens = True, 3, 4
        return c

    off = S.run_study(cfg("off", "off"), (tiny_models.build("llama"), tiny_models.tokenizer()))
    on = S.run_study(cfg("on", 2), (tiny_models.build("llama"), tiny_models.tokenizer()))
    assert len(off) == len(on) == 2
    for a, b in zip(off, on):
        assert b.metrics["fused_trials"] == 2 and "accuracy" in a.metrics
        assert b.metrics["accuracy"] == a.metrics["accuracy"]


# -- the frozen prefix, computed once per example and reused in later epochs ----------------------








@pytest.mark.parametrize("arch,checkpointing", [("llama", False), ("gpt_neox", False), ("bloom", False),
                                                ("gpt2", False), ("llama", True)])
@pytest.mark.slow
def test_frozen_prefix_is_computed_once_and_results_equal_sequential(tmp_path, arch, checkpointing):
    """Every trial starts at block 2 or above: blocks 0-1 run in epoch 1 only (bloom's blocks return
    tuples; gpt2 has Conv1D layers and positional block arguments), with the sequential numbers."""
    model = deep(arch)
    anat = analyze(model)
    placements, seeds = upper(anat)
    ts = toy_set(21)
    spec = TrainSpec(**SPEC, gradient_checkpointing=checkpointing)
    seq = _sequential(model, placements, seeds, ts, spec, [tmp_path / f"seq{i}" for i in range(4)])
    runs = prefix_runs(model, anat)
    got = _fused(model, placements, seeds, ts, spec, [tmp_path / f"fused{i}" for i in range(4)])
    misses, last = steps_with_new_examples(ts, spec, seeds)
    per_epoch = math.ceil(len(ts) / spec.batch_size)
    assert len(runs) == misses and last <= per_epoch < 12  # the prefix ran in epoch 1 only, once for each such step
    assert len(seq) == len(got) == 4
    for i, (s, f) in enumerate(zip(seq, got)):
        assert isinstance(s, TrialResult) and isinstance(f, TrialResult), (s, f)
        assert f.metrics["prefix_cached_blocks"] == 2
        assert len(f.curve) == len(s.curve) == 12
        assert _same_curve(s, f), (i, s.curve, f.curve)
        assert close(f.metrics["eval_loss"], s.metrics["eval_loss"]), i
        assert s.metrics["eval_loss"] < s.curve[0][1]
        assert_same_adapter(s.adapter_dir, f.adapter_dir)


@pytest.mark.slow
def test_prefix_cache_over_its_cap_is_skipped_with_the_same_results(caplog):
    model = deep("qwen2")
    anat = analyze(model)
    placements, seeds = upper(anat)
    ts, spec = toy_set(21), TrainSpec(**SPEC)
    seq = _sequential(model, placements, seeds, ts, spec)
    runs = prefix_runs(model, anat)
    with caplog.at_level("INFO", logger="loraplace"):
        got = _fused(model, placements, seeds, ts, spec, prefix_cache_bytes=1024)
    assert "not caching the frozen prefix (blocks 0-1)" in caplog.text and "over the cap of" in caplog.text
    assert len(runs) == 12  # every step ran the prefix
    assert len(seq) == len(got) == 4
    for s, f in zip(seq, got):
        assert f.metrics["prefix_cached_blocks"] == 0
        assert _same_curve(s, f)
        assert close(f.metrics["eval_loss"], s.metrics["eval_loss"])


def test_prefix_with_dropout_or_one_epoch_is_not_cached(caplog):
    """A prefix with its own dropout draws new masks every epoch, so its output is not reusable; with one
    pass over the train set nothing is needed twice."""
    ts = toy_set(21)
    model = deep("llama", attention_dropout=0.1)
    anat = analyze(model)
    placements, seeds = upper(anat)
    runs = prefix_runs(model, anat)
    with caplog.at_level("INFO", logger="loraplace"):
        got = _fused(model, placements, seeds, ts, TrainSpec(**SPEC))
    assert "not caching the frozen prefix" in caplog.text and "config.attention_dropout=0.1" in caplog.text
    assert len(runs) == 12 and len(got) == 4 and all(r.metrics["prefix_cached_blocks"] == 0 for r in got)

    model = deep("llama")
    runs = prefix_runs(model, anat)
    got = _fused(model, placements, seeds, ts, TrainSpec(**{**SPEC, "steps": 6}))
    assert len(runs) == 6 and len(got) == 4 and all(r.metrics["prefix_cached_blocks"] == 0 for r in got)


@pytest.mark.slow
def test_prefix_cache_steps_aside_when_block_k_does_not_read_the_prefix_output(caplog):
    """Something between block k-1 and block k (here a pre-hook that rescales block 2's input) would
    be skipped by the cache: it is detected on the first step and the prefix runs every step."""
    model = deep("llama")
    anat = analyze(model)
    model.get_submodule(anat.blocks_path)[2].register_forward_pre_hook(lambda mod, args: (args[0] * 0.5,) + args[1:])
    placements, seeds = upper(anat)
    ts, spec = toy_set(21), TrainSpec(**SPEC)
    seq = _sequential(model, placements, seeds, ts, spec)
    runs = prefix_runs(model, anat)
    with caplog.at_level("INFO", logger="loraplace"):
        got = _fused(model, placements, seeds, ts, spec)
    assert "does not read block 1's output directly" in caplog.text
    assert len(runs) == 12
    assert len(seq) == len(got) == 4
    for s, f in zip(seq, got):
        assert f.metrics["prefix_cached_blocks"] == 0
        assert _same_curve(s, f)


@pytest.mark.slow
def test_prefix_cache_equals_sequential_to_float64_precision(tmp_path):
    """In float64 the kept hidden states are the ones the sequential engine recomputes every epoch."""
    got = _float64_runs(tmp_path, lambda: deep("llama"), upper)
    assert len(got) == 4 and all(f.metrics["prefix_cached_blocks"] == 2 for f in got)
