"""Trials that train routed experts (fused 3-D parameters, PEFT's ParamWrapper) on a tiny random-init Mixtral: the
sequential engine trains them and a raced trial's checkpointed pieces compute what it computes in one go; the
frozen-prefix cache serves the blocks below them; the fused engine refuses them, saying why."""

from __future__ import annotations

import logging

import pytest
import tiny_models
import torch
from safetensors.torch import load_file
from toys import SPEC, close, deep, outcomes, run, setup, tasks, toy_set, toy_workspace

from loraplace.core.config import TrainSpec
from loraplace.model.anatomy import analyze
from loraplace.placement.resolve import resolve
from loraplace.placement.strategy import Strategy
from loraplace.train import fused, sequential
from loraplace.train.fused import EXPERTS_UNFUSABLE, group_size
from loraplace.train.result import TrialResult
from loraplace.train.trial import TrialError

EXPERTS = Strategy("experts", "mlp.experts")
RACE = {"at": [4 / 12, 7 / 12]}  # a raced study pauses (checkpoints) the trial at steps 4 and 7 of 12


def _tensors(result) -> dict[str, torch.Tensor]:
    return load_file(result.adapter_dir / "adapter_model.safetensors")


@pytest.mark.slow
def test_an_expert_trial_trains_and_its_checkpointed_pieces_are_bit_identical(tmp_path):
    from peft import PeftModel

    model, ts, spec = tiny_models.build("mixtral"), toy_set(21), TrainSpec(**SPEC)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    p = resolve(Strategy("all_linear", "all"), analyze(model), rank=4, alpha=8)
    assert any(p.anatomy.layer(n).is_parameter for n in p.modules)
    [whole] = run(toy_workspace(model, ts, spec), [p], [3], [tmp_path / "whole"])  # under the frozen-base guard
    assert isinstance(whole, TrialResult) and whole.metrics["eval_loss"] < whole.curve[0][1]  # it trained
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # the shared base is pristine

    ws = toy_workspace(model, ts, spec, race=RACE)
    todo = tasks(ws, [p], [3], [tmp_path / "pieces"], [tmp_path / "ckpt"])
    assert [o.step for o in outcomes(ws, todo)] == [4]  # paused at the first rung, checkpointed
    assert [o.step for o in outcomes(ws, todo)] == [7]  # restored from it as a fresh trial
    [pieces] = outcomes(ws, todo)
    assert pieces.curve == whole.curve and pieces.metrics["eval_loss"] == whole.metrics["eval_loss"]
    ta, tb = _tensors(whole), _tensors(pieces)
    assert ta.keys() == tb.keys() and all(torch.equal(ta[k], tb[k]) for k in ta)
    assert any(".experts." in k for k in ta)  # the experts' adapters are saved (PEFT names them by wrapper)

    # the saved adapter is PEFT's: it loads on a fresh model with every expert parameter and its trained tensors
    loaded = PeftModel.from_pretrained(tiny_models.build("mixtral", seed=1), whole.adapter_dir)
    trained = {k: v for k, v in loaded.named_parameters() if "lora_" in k}
    assert sum(v.numel() for v in trained.values()) == whole.metrics["trainable_params"] == p.trainable_params
    assert any(not torch.equal(v, torch.zeros_like(v)) for k, v in trained.items() if "experts" in k and "lora_B" in k)


def test_the_blocks_below_the_adapted_experts_are_served_from_the_prefix_cache(tmp_path):
    model = deep("mixtral")
    p = resolve(Strategy("top_experts", "mlp.experts", "last:50%"), analyze(model), rank=4, alpha=8)
    ts, spec = toy_set(21), TrainSpec(**SPEC)  # 12 steps of 4 over 21 examples: two epochs
    [ref] = run(toy_workspace(model, ts, spec, prefix_cache_bytes=0), [p], [1], [tmp_path / "ref"])
    [got] = run(toy_workspace(model, ts, spec), [p], [1], [tmp_path / "cached"])
    assert ref.metrics["prefix_cached_blocks"] == 0 and got.metrics["prefix_cached_blocks"] == 2
    assert all(close(a, b) for (_, a), (_, b) in zip(ref.curve, got.curve)), (ref.curve, got.curve)
    assert close(got.metrics["eval_loss"], ref.metrics["eval_loss"])


def test_fusing_is_refused_for_expert_trials_with_the_reason(caplog):
    model, ts = tiny_models.build("mixtral"), toy_set(21)
    anat = analyze(model)
    spec = TrainSpec(**{**SPEC, "fuse": 4})
    attention = resolve(Strategy("attention_only", "attn"), anat, rank=4, alpha=8)
    experts = resolve(EXPERTS, anat, rank=4, alpha=8)
    assert fused.unfusable(attention) is None and fused.unfusable(experts) == EXPERTS_UNFUSABLE
    assert group_size(spec, model, "cpu", [attention, attention], 64) == 2
    with caplog.at_level(logging.INFO, logger="loraplace"):
        assert group_size(spec, model, "cpu", [attention, experts], 64) == 1
    assert EXPERTS_UNFUSABLE in caplog.text
    s = setup(model, ts, spec)
    trials = [sequential.start(s, attention, 0), sequential.start(s, experts, 0)]
    for call in (lambda: fused.advance(s, trials, 1), lambda: fused.evaluate(s, trials)):
        with pytest.raises(TrialError, match="experts trials cannot be fused: LoRA on routed experts"):
            call()
    assert [t.step for t in trials] == [0, 0]
