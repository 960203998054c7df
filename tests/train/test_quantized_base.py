"""Trials on a bitsandbytes base (``quantize``): the study's path trains and leaves the base as it was, and both
engines and the frozen-prefix cache give the numbers they give on a float base (each other's)."""
from __future__ import annotations

import importlib.util

import pytest
import tiny_models
import torch
from toys import SPEC, assert_same_adapter, close, deep, run, tiny_study, toy_set, toy_workspace, upper

from loraplace.core.config import TrainSpec
from loraplace.model.anatomy import analyze
from loraplace.model.loading import load
from loraplace.placement.resolve import resolve
from loraplace.placement.strategy import Strategy
from loraplace.study import run as S
from loraplace.study.workspace import Workspace
from loraplace.train.prefix import lowest_block
from loraplace.train.loss import evaluate
from loraplace.train.result import TrialResult

pytestmark = pytest.mark.skipif(importlib.util.find_spec("bitsandbytes") is None,
                                reason="bitsandbytes is not installed (pip install -e '.[quant]')")


def _state(model) -> dict:
    """Everything the base holds, bitsandbytes' quantization state included (state_dict serialises it)."""
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


@pytest.mark.parametrize("mode", ["nf4", "fp4", "int8"])
def test_a_study_trains_on_a_quantized_base_and_leaves_it_unchanged(tmp_path, mode):
    d = tiny_models.save("llama", tmp_path / "model")
    cfg = tiny_study(tmp_path, ["all_linear"], train={"steps": 6}, model=d, quantize=mode)
    ws = Workspace.build(cfg)  # what run_study builds: the base quantized once, from the float directory
    assert getattr(ws.model, "is_loaded_in_8bit" if mode == "int8" else "is_loaded_in_4bit")
    before = _state(ws.model)
    zero = evaluate(ws.model, ws.eval_set, cfg.eval.batch_size, ws.tokenizer.pad_token_id)["eval_loss"]
    records = S.run_study(cfg, (ws.model, ws.tokenizer))  # every trial on this one base
    assert [r.status for r in records] == ["done"] and records[0].metrics["eval_loss"] < zero  # it learned
    after = _state(ws.model)
    assert after.keys() == before.keys() and all(torch.equal(after[k], before[k]) for k in before)


def _quantized_deep(tmp_path, mode: str):
    """The 4-block tiny Llama (toys.deep) saved and loaded with ``quantize=mode``."""
    d = tmp_path / "deep"
    deep("llama").save_pretrained(d)
    tiny_models.tokenizer().save_pretrained(d)
    return load(str(d), quantize=mode)[0]


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["nf4"])  # int8's eval rows interact: model/test_quantize.py
def test_fused_and_prefix_cached_trials_equal_sequential_ones_on_a_quantized_base(tmp_path, mode):
    """The fused engine adds each trial's LoRA delta in a forward hook on the base layer: on bitsandbytes layers
    too. Placements from block 2 up: the group's frozen prefix (blocks 0-1) comes from the cache after epoch 1.
    Every run goes through the executor, so the frozen-base guard checks the base (quantization state included)."""
    model = _quantized_deep(tmp_path, mode)
    anat = analyze(model)
    placements, seeds = upper(anat)
    placements, seeds = [resolve(Strategy("all_linear", "all"), anat, rank=4, alpha=8)] + placements[1:3], [0] + seeds[1:3]
    ts, spec = toy_set(9), TrainSpec(**{**SPEC, "steps": 6})  # batches of 4, 4, 1: two epochs
    before = _state(model)
    seq = run(toy_workspace(model, ts, spec, prefix_cache_bytes=0), placements, seeds,
              [tmp_path / f"seq{i}" for i in range(len(placements))])
    [cached] = run(toy_workspace(model, ts, spec), placements[1:2], seeds[1:2], [tmp_path / "cached"])
    got = run(toy_workspace(model, ts, spec), placements, seeds, [tmp_path / f"fused{i}" for i in range(len(placements))],
              fuse=True)
    assert all(torch.equal(v, before[k]) for k, v in _state(model).items())
    assert cached.metrics["prefix_cached_blocks"] == lowest_block(placements[1:2]) > 0 and close(cached.metrics["eval_loss"], seq[1].metrics["eval_loss"])
    assert_same_adapter(seq[1].adapter_dir, cached.adapter_dir)
    for s, f in zip(seq, got):
        assert isinstance(s, TrialResult) and isinstance(f, TrialResult), (s, f)
        assert f.metrics["fused_trials"] == len(placements)
        assert s.metrics["eval_loss"] < s.curve[0][1]  # it trained
        assert all(close(lf, ls) for (_, ls), (_, lf) in zip(s.curve, f.curve)), (s.curve, f.curve)
        assert close(f.metrics["eval_loss"], s.metrics["eval_loss"])
        assert_same_adapter(s.adapter_dir, f.adapter_dir)
