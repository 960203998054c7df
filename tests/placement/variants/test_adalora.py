"""Variant adalora: PEFT's AdaLoRA trained inside loraplace's trial lifecycle computes what PEFT's own training loop
computes, survives checkpoints, ends within the study's budget, and is stored and exported as the ranks it kept."""

from __future__ import annotations

import copy
import logging

import pytest
import tiny_models
import torch
from toys import run_batches, exported_layers, tiny_study, tiny_workspace

from loraplace.cli import main
from loraplace.core.config import ConfigError, StudyConfig
from loraplace.placement.record import PlacementRecord
from loraplace.placement.resolve import BUDGET_TOLERANCE, adalora_placement, resolve
from loraplace.placement.strategy import PlacementError, Strategy, get_strategy
from loraplace.study.plan import resolve_placements
from loraplace.store.db import Store
from loraplace.train import checkpoint, sequential
from loraplace.train.schedule import lr_factor
from loraplace.train.trial import Trial


def _cfg(tmp_path, **over) -> StudyConfig:
    return tiny_study(tmp_path, ["all_linear", "adalora"], train={"steps": 6, "schedule": "constant", "warmup": 0}, **over)


@pytest.fixture(scope="module")
def ws(tmp_path_factory):
    return tiny_workspace(_cfg(tmp_path_factory.mktemp("ws")))


def test_a_trial_computes_what_peft_own_adalora_loop_computes(ws, tmp_path):
    """PEFT's documented loop: loss with labels (AdaLoraModel.forward adds the orthogonality penalty), backward,
    AdamW step, update_and_allocate, zero_grad. Same init, batches and learning rates: same ranks kept, same tensors."""
    from peft import AdaLoraConfig, get_peft_model

    cfg = _cfg(tmp_path)
    p = resolve_placements(cfg, ws.anatomy)["adalora"]  # no budget: PEFT's meaning of init_r 12, target_r 8
    assert p.allocation["target"] is None and set(p.modules.values()) == {12} and p.allocation["triplets"] == 8 * len(p.modules)
    setup = ws.setup
    ours = sequential.start(setup, p, seed=0)
    batches = run_batches(ours, setup)
    with ours.attached(setup):
        sequential.advance(setup, [ours], setup.total_steps)

    torch.manual_seed(0)
    theirs = get_peft_model(copy.deepcopy(ws.model), AdaLoraConfig(
        target_modules=sorted(p.modules), init_r=12, target_r=8, lora_alpha=8, total_step=setup.total_steps, task_type="CAUSAL_LM"))
    params = [q for q in theirs.parameters() if q.requires_grad]
    opt = torch.optim.AdamW(params, lr=cfg.train.lr, weight_decay=cfg.train.weight_decay)
    theirs.train()
    for i, batch in enumerate(batches):
        loss = theirs(input_ids=batch["input_ids"], labels=batch["labels"], use_cache=False).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, cfg.train.max_grad_norm)
        for group in opt.param_groups:
            group["lr"] = cfg.train.lr * lr_factor(i, setup.total_steps, cfg.train)
        opt.step()
        theirs.base_model.update_and_allocate(i + 1)
        opt.zero_grad()
    pattern = theirs.peft_config["default"].rank_pattern
    assert ours.variant_state["pattern"] == pattern
    kept = {n.split(".lora_E.")[0]: sum(k) for n, k in pattern.items()}
    assert sum(kept.values()) == 8 * len(p.modules)  # PEFT's final budget: target_r triplets per module
    assert {n: r for n, r in kept.items() if r} == ours.trained.modules
    for name, q in theirs.named_parameters():
        if q.requires_grad:
            torch.testing.assert_close(ours.params[name.removeprefix("base_model.model.")], q, rtol=1e-4, atol=1e-5)


def test_the_penalty_is_peft_own(ws):
    p = adalora_placement(get_strategy("adalora"), ws.anatomy, StudyConfig().adalora)
    trial = Trial.start(ws.setup, p, seed=3)
    with torch.no_grad():
        for q in trial.params.values():
            q.normal_()  # away from PEFT's near-orthogonal start
    with trial.attached(ws.setup) as peft_model:
        batch = trial.batch(ws.setup)
        with_penalty = peft_model(input_ids=batch["input_ids"], labels=batch["labels"], use_cache=False).loss
        plain = peft_model.get_base_model()(input_ids=batch["input_ids"], labels=batch["labels"], use_cache=False).loss
    torch.testing.assert_close(with_penalty - plain, trial.penalty(), rtol=1e-5, atol=1e-6)
    assert float(trial.penalty()) > 0.5


def test_a_checkpoint_mid_allocation_continues_exactly(ws, tmp_path):
    cfg = _cfg(tmp_path, budget="same:mlp_only")
    p = resolve_placements(cfg, ws.anatomy)["adalora"]
    setup = ws.setup
    whole = sequential.start(setup, p, seed=1)
    sequential.advance(setup, [whole], setup.total_steps)
    piece = sequential.start(setup, p, seed=1)
    sequential.advance(setup, [piece], 3)
    assert piece.trained is p  # not fixed yet: the starting placement
    checkpoint.save(piece, tmp_path / "ck")
    restored = checkpoint.restore(tmp_path / "ck", setup, p)
    sequential.advance(setup, [restored], setup.total_steps)
    assert restored.variant_state["pattern"] == whole.variant_state["pattern"]
    for n, q in whole.params.items():
        torch.testing.assert_close(restored.params[n], q, rtol=0, atol=0)
    final = whole.trained
    target = p.allocation["target"]
    assert abs(final.trainable_params - target) <= BUDGET_TOLERANCE * target
    assert len(set(final.modules.values())) > 1  # AdaLoRA moved rank between modules
    assert all(final.alphas[n] == pytest.approx(8 * r / p.allocation["init_r"]) for n, r in final.modules.items())


def test_settings_and_placements_say_what_is_wrong(ws, tmp_path):
    with pytest.raises(ConfigError, match="adalora.target_r"):
        _cfg(tmp_path, adalora={"init_r": 4, "target_r": 8})
    with pytest.raises(ConfigError, match="adalora.beta1"):
        _cfg(tmp_path, adalora={"beta1": 1.0})
    with pytest.raises(PlacementError, match="one rank"):
        adalora_placement(Strategy("x", "all", rank={"attn": 4}, variant="adalora"), ws.anatomy, StudyConfig().adalora)
    p = resolve_placements(_cfg(tmp_path, adalora={"tfinal": 5}), ws.anatomy)["adalora"]
    with pytest.raises(PlacementError, match="leaves no step to allocate in a 6-step run"):
        Trial.start(ws.setup, p, seed=0)
    # under a budget the rank it starts from scales with the budget, PEFT's 12:8
    target = resolve(get_strategy("all_linear"), ws.anatomy, rank=4).trainable_params
    q = adalora_placement(get_strategy("adalora"), ws.anatomy, StudyConfig().adalora, target)
    assert q.allocation["init_r"] == 6 and q.trainable_params > target


@pytest.mark.slow
def test_an_adalora_study_stores_reports_and_exports_the_ranks_it_kept(tmp_path, capsys, caplog):
    model_dir = tiny_models.save("llama", tmp_path / "tiny")
    common = [f"model={model_dir}", f"out={tmp_path / 'study'}", "data.limit=48", "data.eval_size=8",
              "data.max_length=96", "train.steps=4", "train.batch_size=8", "train.rank=4", "train.alpha=8",
              "seeds=[0,1]", "strategies=[all_linear,mlp_only,adalora]", "budget=same:attention_only",
              "eval.forgetting=false", "train.fuse=4"]
    assert main(["plan", *common]) == 0
    assert "adalora" in capsys.readouterr().out
    with caplog.at_level(logging.INFO, logger="loraplace"):
        assert main(["study", *common]) == 0
    assert "run one after the other: AdaLoRA's adapters are SVD triplets" in caplog.text
    capsys.readouterr()
    with Store.open(tmp_path / "study", create=False) as store:
        trials = {(t.strategy, t.seed): t for t in store.current_trials()}
    budget = trials[("all_linear", 0)].metrics["trainable_params"]
    for seed in (0, 1):
        t = trials[("adalora", seed)]
        assert t.status == "done" and "fused_trials" not in t.metrics
        rec = PlacementRecord.from_dict(t.placement)
        assert rec.variant == "adalora" and len({m.rank for m in rec.modules.values()}) > 1
        assert abs(rec.trainable_params - budget) <= BUDGET_TOLERANCE * budget
        assert t.metrics["trainable_params"] == rec.trainable_params  # what it ended with, not the 1.5x it started at
    rebuilt, err = exported_layers(tmp_path / "study", "adalora", capsys)
    assert "AdaLoraConfig" in err
    assert {n: layer.r["default"] for n, layer in rebuilt.items()} in (  # one seed's kept ranks, exactly
        {n: m.rank for n, m in PlacementRecord.from_dict(trials[("adalora", s)].placement).modules.items()} for s in (0, 1))
    assert main(["report", str(tmp_path / "study")]) == 0
    methods = (tmp_path / "study" / "report" / "methods.md").read_text()
    assert "`adalora` trained PEFT's AdaLoRA" in methods and "of a trial's training time" in methods
    report = (tmp_path / "study" / "report" / "report.md").read_text()
    row = next(line for line in report.splitlines() if line.startswith("| adalora"))
    assert "Method cost (s)" in report and row.rstrip(" |").endswith("per trial")  # AdaLoRA's allocation, per trial
