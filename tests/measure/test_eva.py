"""Strategy eva: PEFT's EVA resolved once per study at the budget, trials starting from its A matrices exactly as
PEFT's own loader would start them, stored, reported and exported as exactly its modules and ranks."""

from __future__ import annotations

import copy

import pytest
import tiny_models
import torch
from toys import exported_layers, tiny_study, tiny_workspace

from loraplace.cli import main
from loraplace.core.config import ConfigError, StudyConfig
from loraplace.placement.peft import lora_layers
from loraplace.placement.record import PlacementRecord
from loraplace.placement.resolve import BUDGET_TOLERANCE, resolve
from loraplace.placement.strategy import get_strategy
from loraplace.measure import eva as E
from loraplace.study.plan import eva_placement
from loraplace.store.db import Store
from loraplace.train.trial import Trial


def _cfg(tmp_path, **over) -> StudyConfig:
    return tiny_study(tmp_path, ["all_linear", "eva"], **over)


@pytest.fixture(scope="module")
def ws(tmp_path_factory):
    return tiny_workspace(_cfg(tmp_path_factory.mktemp("ws")))


def test_eva_redistributes_the_rank_sum_meets_the_budget_and_is_kept(ws, tmp_path):
    cfg = _cfg(tmp_path)
    anat = ws.anatomy
    target = resolve(get_strategy("all_linear"), anat, rank=4).trainable_params // 2
    with Store.open(cfg.out) as store:
        init = E.eva_init(cfg, ws, store, target)
        assert sorted(init.base) == anat.adaptable() and max(init.base.values()) - min(init.base.values()) <= 1
        assert sum(init.ranks.values()) == sum(init.base.values())  # EVA keeps the rank sum
        assert all(r <= round(cfg.eva.rho * init.base[n]) for n, r in init.ranks.items())
        assert len(set(init.ranks.values())) > 1
        p = eva_placement(cfg, anat, init)
        assert abs(p.trainable_params - target) <= BUDGET_TOLERANCE * target
        assert all(p.alphas[n] == pytest.approx(8 * r / init.base[n]) for n, r in p.modules.items())  # alpha/r kept
        assert {n: tuple(w.shape) for n, w in init.weights.items()} == {
            n: (r, anat.layer(n).in_features) for n, r in init.ranks.items()}
        again = E.eva_init(cfg, ws, store, target)  # read back, not recomputed
        assert again.time_s == init.time_s and all(torch.equal(again.weights[n], w) for n, w in init.weights.items())
        assert E.load(store, "another key") is None
    with pytest.raises(ConfigError, match="eva.rho"):
        _cfg(tmp_path, eva={"rho": 0.5})


def test_a_trial_starts_where_peft_own_eva_loader_starts(ws, tmp_path):
    from peft import EvaConfig, LoraConfig, get_peft_model, initialize_lora_eva_weights

    cfg = _cfg(tmp_path)
    with Store.open(cfg.out) as store:
        init = E.eva_init(cfg, ws, store, None)  # no budget: train.rank on every module before redistribution
    assert set(init.base.values()) == {4}
    ws.eva = init
    try:
        trial = Trial.start(ws.setup, eva_placement(cfg, ws.anatomy, init), seed=0)
    finally:
        ws.eva = None
    theirs = get_peft_model(copy.deepcopy(ws.model), LoraConfig(
        r=4, lora_alpha=8, target_modules=ws.anatomy.adaptable(), init_lora_weights="eva",
        eva_config=EvaConfig(rho=cfg.eva.rho)))
    initialize_lora_eva_weights(theirs, eva_state_dict={f"base_model.model.{n}": w.clone() for n, w in init.weights.items()},
                                show_progress_bar=False)
    layers = lora_layers(theirs)
    assert {n: layer.r["default"] for n, layer in layers.items()} == init.ranks
    assert trial.scales == pytest.approx({n: float(layer.scaling["default"]) for n, layer in layers.items()})
    for n, layer in layers.items():
        assert torch.equal(trial.params[f"{n}.lora_A.default.weight"], layer.lora_A["default"].weight)
        assert not trial.params[f"{n}.lora_B.default.weight"].any()


@pytest.mark.slow
def test_an_eva_study_trains_stores_reports_and_exports_exactly_its_modules(tmp_path, capsys):
    model_dir = tiny_models.save("llama", tmp_path / "tiny")
    common = [f"model={model_dir}", f"out={tmp_path / 'study'}", "data.limit=48", "data.eval_size=8",
              "data.max_length=96", "train.steps=2", "train.batch_size=8", "train.rank=4", "train.alpha=8",
              "seeds=[0,1]", "strategies=[all_linear,eva]", "budget=same:attention_only", "eval.forgetting=false"]
    assert main(["plan", *common]) == 0
    assert "skipped eva: resolved from the train data's activations" in capsys.readouterr().out
    assert main(["study", *common]) == 0
    capsys.readouterr()
    with Store.open(tmp_path / "study", create=False) as store:
        meta = store.get_meta("eva")
        trials = [t for t in store.current_trials() if t.strategy == "eva"]
    assert len(trials) == 2 and all(t.status == "done" for t in trials)
    rec = PlacementRecord.from_dict(trials[0].placement)
    assert rec.init == "eva" and {n: m.rank for n, m in rec.modules.items()} == meta["ranks"]
    assert trials[0].metrics["eval_loss"] != trials[1].metrics["eval_loss"]  # seeds still differ (data order)
    # the fused engine starts from the same A matrices and computes what the sequential one did
    fused = [c if not c.startswith("out=") else f"out={tmp_path / 'fused'}" for c in common]
    assert main(["study", *fused, "train.fuse=4", "strategies=[eva]", "baseline=eva"]) == 0
    capsys.readouterr()
    with Store.open(tmp_path / "fused", create=False) as store:
        together = {t.seed: t.metrics for t in store.current_trials()}
    assert all(together[t.seed]["fused_trials"] == 2 for t in trials)
    assert all(together[t.seed]["eval_loss"] == pytest.approx(t.metrics["eval_loss"], rel=1e-5) for t in trials)
    assert main(["plan", *common]) == 0  # now from the study's stored result
    assert "eva: PEFT's EVA" in capsys.readouterr().out
    rebuilt, err = exported_layers(tmp_path / "study", "eva", capsys)
    assert "initialize_lora_eva_weights" in err
    assert {n: layer.r["default"] for n, layer in rebuilt.items()} == meta["ranks"]
    assert {n: layer.scaling["default"] for n, layer in rebuilt.items()} == pytest.approx(
        {n: 8 / meta["base"][n] for n in meta["ranks"]})
    assert main(["report", str(tmp_path / "study")]) == 0
    methods = (tmp_path / "study" / "report" / "methods.md").read_text()
    assert "`eva` took its ranks and initial A matrices from PEFT's EVA" in methods
    report = (tmp_path / "study" / "report" / "report.md").read_text()
    row = next(line for line in report.splitlines() if line.startswith("| eva"))
    assert row.rstrip(" |").endswith(f"{meta['time_s']:.1f} once")  # EVA's cost, once per study, in the table
