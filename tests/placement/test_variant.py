"""A strategy's variant (placement.variants): PEFT's own DoRA and rsLoRA on exactly the placed modules, counted in
the budget, trained on either engine's path, stored in the placement record and exported."""

from __future__ import annotations

import json
import math

import pytest
import tiny_models
import yaml

from loraplace.cli import main
from loraplace.core.config import StudyConfig
from loraplace.model.anatomy import analyze
from loraplace.placement.export import ExportError, export
from loraplace.placement.peft import apply, lora_layers
from loraplace.placement.record import PlacementRecord
from loraplace.placement.resolve import match_budget, resolve
from loraplace.placement.strategy import PlacementError, Strategy, get_strategy
from loraplace.placement.variants import VARIANTS
from loraplace.study.run import run_study


def _model():
    return tiny_models.build("llama")


def test_a_variant_is_peft_own_on_exactly_the_placed_modules_and_counted():
    model = _model()
    anat = analyze(model)
    plain = resolve(Strategy("attn", "attn"), anat, rank=4, alpha=8)
    for variant in ("dora", "rslora"):
        p = resolve(Strategy("attn", "attn", variant=variant), anat, rank=4, alpha=8)
        peft_model = apply(model, p)  # verifies modules, ranks and the trainable count against the placement
        try:
            layers = lora_layers(peft_model)
            assert set(layers) == set(p.modules)
            layer = next(iter(layers.values()))
            if variant == "dora":
                assert layer.use_dora["default"]
                extra = sum(anat.layer(n).out_features for n in p.modules)  # the magnitude vectors
                assert p.trainable_params == plain.trainable_params + extra
            else:
                assert layer.scaling["default"] == pytest.approx(8 / math.sqrt(4))  # alpha / sqrt(r), not alpha / r
                assert p.trainable_params == plain.trainable_params
            trainable = sum(x.numel() for x in peft_model.parameters() if x.requires_grad)
            assert trainable == p.trainable_params
        finally:
            peft_model.unload()


def test_every_variant_counts_what_peft_trains():
    """A placement's count (LoRA's r x (in + out) plus what its variant says it trains beside A and B) is PEFT's,
    which apply verifies, for every variant but AdaLoRA (placed with its allocation: placement/variants/test_adalora)."""
    for name, variant in VARIANTS.items():
        if name == "adalora":
            continue
        model = _model()
        anat = analyze(model)
        p = resolve(Strategy("mixed", "all", rank={"attn": 2, "mlp": 4}, variant=name), anat, rank=4, alpha=8)
        plain = resolve(Strategy("mixed", "all", rank={"attn": 2, "mlp": 4}), anat, rank=4, alpha=8)
        extra = sum(variant.extra_params(anat.layer(n), r) for n, r in p.modules.items())
        assert p.trainable_params == plain.trainable_params + extra
        peft_model = apply(model, p)  # raises unless PEFT trains exactly p.trainable_params
        peft_model.unload()


def test_budget_matching_counts_dora_magnitudes():
    anat = analyze(_model())
    target = resolve(Strategy("all", "all"), anat, rank=8).trainable_params
    p = match_budget(Strategy("mlp", "mlp", variant="dora"), anat, target, rank=8)
    assert abs(p.trainable_params - target) <= 0.05 * target
    assert p.trainable_params > sum(r * (anat.layer(n).in_features + anat.layer(n).out_features) for n, r in p.modules.items())


def test_an_unknown_variant_is_one_line():
    with pytest.raises(PlacementError, match="variant 'vera' is not one of lora, dora, rslora, pissa, adalora"):
        Strategy.from_dict("x", {"roles": "attn", "variant": "vera"})
    assert "variant" not in Strategy.from_dict("x", {"roles": "attn"}).to_dict()  # plain LoRA's trial ids unchanged


def test_exports_carry_the_variant_and_peft_rebuilds_it():
    model = _model()
    anat = analyze(model)
    rec = resolve(Strategy("attn_dora", "attn", variant="dora"), anat, rank=4, alpha=8).record(dropout=0.0)
    assert PlacementRecord.from_dict(json.loads(json.dumps(rec.to_dict()))) == rec
    cfg = json.loads(export(rec, "peft"))
    assert cfg["use_dora"] is True
    from peft import LoraConfig, get_peft_model

    cfg.pop("peft_type")
    rebuilt = get_peft_model(model, LoraConfig(**cfg))
    layers = lora_layers(rebuilt)
    assert {n: layer.r["default"] for n, layer in layers.items()} == {n: m.rank for n, m in rec.modules.items()}
    assert all(layer.use_dora["default"] for layer in layers.values())
    assert sum(x.numel() for x in rebuilt.parameters() if x.requires_grad) == rec.trainable_params
    rebuilt.unload()
    assert yaml.safe_load(export(rec, "axolotl"))["peft_use_dora"]
    assert yaml.safe_load(export(rec, "llamafactory"))["use_dora"]
    rs = resolve(Strategy("attn_rs", "attn", variant="rslora"), anat, rank=4, alpha=8).record(dropout=0.0)
    assert yaml.safe_load(export(rs, "llamafactory"))["use_rslora"]
    with pytest.raises(ExportError, match="torchtune has no switch for rslora"):
        export(rs, "torchtune")


@pytest.mark.slow
def test_a_study_of_variants_trains_them_and_keeps_dora_off_the_fused_engine(tmp_path, caplog):
    model_dir = tiny_models.save("llama", tmp_path / "tiny")
    cfg = StudyConfig.from_dict({
        "model": str(model_dir), "out": str(tmp_path / "study"), "seeds": [0],
        "strategies": ["all_linear", "attn_dora", "attn_rs", "attention_only"], "baseline": "all_linear",
        "define": {"attn_dora": {"roles": "attn", "variant": "dora"}, "attn_rs": {"roles": "attn", "variant": "rslora"}},
        "data": {"limit": 40, "eval_size": 8, "max_length": 96},
        "train": {"steps": 3, "batch_size": 4, "rank": 4, "alpha": 8, "lr": 1e-2, "threads": 1, "fuse": 4},
        "eval": {"forgetting": False},
    })
    with caplog.at_level("INFO", logger="loraplace"):
        records = {r.strategy: r for r in run_study(cfg)}
    assert all(r.status == "done" for r in records.values()), {s: r.error for s, r in records.items()}
    assert any("run one after the other: DoRA rescales" in m.getMessage() for m in caplog.records)
    assert "fused_trials" not in records["attn_dora"].metrics  # sequential, through PEFT's DoRA
    assert records["attn_rs"].metrics["fused_trials"] == 3  # rsLoRA only changes the scale: it fuses
    for name, variant in (("attn_dora", "dora"), ("attn_rs", "rslora"), ("attention_only", "lora")):
        rec = PlacementRecord.from_dict(records[name].placement)
        assert rec.variant == variant
        assert records[name].metrics["trainable_params"] == rec.trainable_params
    # rsLoRA fused computes what it computes alone (the scale comes from PEFT's layer)
    alone = run_study(StudyConfig.from_dict({**cfg.to_dict(), "out": str(tmp_path / "alone"), "strategies": ["attn_rs"],
                                             "baseline": "attn_rs", "train": {**cfg.to_dict()["train"], "fuse": "off"}}))
    assert alone[0].metrics["eval_loss"] == pytest.approx(records["attn_rs"].metrics["eval_loss"], rel=1e-5)
    # the three attention placements differ only in how they learn: their eval losses differ
    losses = {records[n].metrics["eval_loss"] for n in ("attn_dora", "attn_rs", "attention_only")}
    assert len(losses) == 3
    # the report's methods paragraph says which strategy trained which variant
    assert main(["report", cfg.out]) == 0
    methods = (tmp_path / "study" / "report" / "methods.md").read_text()
    assert "`attn_dora` (" in methods and "rank 4, DoRA)" in methods and "rank 4, rsLoRA" in methods


def test_adalora_is_placed_only_with_its_allocation():
    anat = analyze(tiny_models.build("llama"))
    with pytest.raises(PlacementError, match="adalora_placement"):
        resolve(get_strategy("adalora"), anat, rank=4)
    assert "adalora" in VARIANTS and get_strategy("adalora").variant == "adalora"
