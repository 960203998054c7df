"""Strategy kappa: PEFT's KappaTune order of the base weights' condition numbers, its share of the modules at the
study's rank or budget, trained, stored, reported and exported as exactly those modules and ranks."""

from __future__ import annotations

import json

import pytest
import tiny_models
import torch

from loraplace.cli import main
from loraplace.core.config import ConfigError, StudyConfig
from loraplace.model.anatomy import analyze
from loraplace.model.conditioning import kappa_order
from loraplace.placement.peft import lora_layers
from loraplace.placement.record import PlacementRecord
from loraplace.placement.resolve import BUDGET_TOLERANCE, resolve
from loraplace.placement.select import kappa_placement
from loraplace.placement.strategy import PlacementError, get_strategy
from loraplace.study.plan import resolve_placements
from loraplace.store.db import Store


def _kappa(weight: torch.Tensor) -> float:
    s = torch.linalg.svdvals(weight.detach().float())
    return float(s[0] / s[-1])


def test_kappa_order_is_every_adaptable_module_by_increasing_condition_number():
    model = tiny_models.build("llama")
    anat = analyze(model)
    order, seconds = kappa_order(model, anat)
    assert sorted(order) == anat.adaptable() and seconds >= 0  # the head and embeddings are not candidates
    kappas = [_kappa(model.get_submodule(n).weight) for n in order]
    assert all(a <= b * (1 + 1e-4) for a, b in zip(kappas, kappas[1:])), kappas


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_the_adaptable_modules_are_the_block_linears_of_known_role(arch):
    """What kappa orders, EVA and the probe cover and auto and random:K choose from: all_linear's modules."""
    from dataclasses import replace

    from loraplace.model.anatomy import Layer

    anat = analyze(tiny_models.build(arch))
    assert anat.adaptable() == sorted(resolve(get_strategy("all_linear"), anat, rank=4).modules)
    assert not {l.name for l in anat.outside} & set(anat.adaptable())  # embeddings and the head are not
    unknown = Layer(f"{anat.blocks_path}.0.extra", 0, "other", "Linear", 8, 8, 64)
    assert replace(anat, layers=anat.layers + (unknown,)).adaptable() == anat.adaptable()


def test_kappa_takes_peft_share_at_the_rank_or_scaled_to_the_budget():
    model = tiny_models.build("llama")
    anat = analyze(model)
    order, _ = kappa_order(model, anat)
    p = kappa_placement(anat, order, 0.2, None, rank=4)
    assert list(p.modules) == sorted(order[:int(len(order) * 0.2)]) and set(p.modules.values()) == {4}
    assert len(kappa_placement(anat, order, 0.01, None, rank=4).modules) == 1  # at least one, as PEFT
    target = resolve(get_strategy("all_linear"), anat, rank=4).trainable_params // 2
    matched = kappa_placement(anat, order, 0.5, target, rank=4)
    assert set(matched.modules) == set(order[:len(order) // 2])
    assert abs(matched.trainable_params - target) <= BUDGET_TOLERANCE * target
    assert max(matched.modules.values()) > 4  # half the modules carry the budget of all of them at half rank
    with pytest.raises(PlacementError, match="another model"):
        kappa_placement(anat, order[1:], 0.2, None)
    with pytest.raises(PlacementError, match="condition numbers"):
        resolve_placements(StudyConfig.from_dict({"strategies": ["kappa", "all_linear"]}), anat)
    with pytest.raises(ConfigError, match="kappa.top_p"):
        StudyConfig.from_dict({"kappa": {"top_p": 0}})
    with pytest.raises(ConfigError, match="define.kappa"):
        StudyConfig.from_dict({"define": {"kappa": {"roles": "attn"}}})


@pytest.mark.slow
def test_a_kappa_study_trains_stores_reports_and_exports_exactly_its_modules(tmp_path, capsys):
    model_dir = tiny_models.save("llama", tmp_path / "tiny")
    common = [f"model={model_dir}", f"out={tmp_path / 'study'}", "data.limit=40", "data.eval_size=8",
              "data.max_length=96", "train.steps=2", "train.batch_size=4", "train.rank=4", "train.alpha=8",
              "seeds=[0]", "strategies=[all_linear,kappa]", "budget=same:attention_only", "kappa.top_p=0.3",
              "eval.forgetting=false"]
    assert main(["plan", *common]) == 0  # no study yet: the order comes from the weights
    planned = capsys.readouterr().out
    assert "kappa: the 0.3 share of modules" in planned
    assert main(["study", *common]) == 0
    capsys.readouterr()
    with Store.open(tmp_path / "study", create=False) as store:
        meta = store.get_meta("kappa")
        trial = next(t for t in store.current_trials() if t.strategy == "kappa")
    model = tiny_models.build("llama")
    anat = analyze(model)
    assert meta["order"] == kappa_order(model, anat)[0] and meta["time_s"] >= 0
    rec = PlacementRecord.from_dict(trial.placement)
    target = resolve(get_strategy("attention_only"), anat, rank=4).trainable_params
    assert set(rec.modules) == set(meta["order"][:int(len(meta["order"]) * 0.3)])
    assert abs(trial.metrics["trainable_params"] - target) <= BUDGET_TOLERANCE * target
    assert main(["export", str(tmp_path / "study"), "--strategy", "kappa", "--format", "peft"]) == 0
    exported = json.loads(capsys.readouterr().out)
    exported.pop("peft_type")
    from peft import LoraConfig, get_peft_model

    rebuilt = lora_layers(get_peft_model(tiny_models.build("llama"), LoraConfig(**exported)))
    assert {n: layer.r["default"] for n, layer in rebuilt.items()} == {n: m.rank for n, m in rec.modules.items()}
    assert main(["report", str(tmp_path / "study")]) == 0
    methods = (tmp_path / "study" / "report" / "methods.md").read_text()
    assert "`kappa` adapted the 0.3 share" in methods and "find_kappa_target_modules" in methods
