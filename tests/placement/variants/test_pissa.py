"""Variant pissa: PEFT's PiSSA trained inside loraplace's trial lifecycle computes what PEFT's own PiSSA model computes,
leaves the shared base pristine, survives checkpoints, and saves an adapter for the original base."""

from __future__ import annotations

import copy
import json
import logging

import pytest
import tiny_models
import torch
from toys import run_batches, tiny_study, tiny_workspace

from loraplace.cli import main
from loraplace.core.config import StudyConfig
from loraplace.placement.record import PlacementRecord
from loraplace.study.plan import resolve_placements
from loraplace.store.db import Store
from loraplace.train import checkpoint, sequential
from loraplace.train.schedule import lr_factor

DEFINE = {"pis": {"roles": "all", "variant": "pissa"}, "attn_pissa": {"roles": "attn", "variant": "pissa"}}


def _cfg(tmp_path, **over) -> StudyConfig:
    return tiny_study(tmp_path, ["all_linear", "pis"], train={"steps": 4}, define=DEFINE, **over)


@pytest.fixture(scope="module")
def ws(tmp_path_factory):
    return tiny_workspace(_cfg(tmp_path_factory.mktemp("ws")))


def _weights(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def test_a_trial_computes_what_peft_own_pissa_model_computes_and_the_base_stays_pristine(ws, tmp_path):
    from peft import LoraConfig, get_peft_model

    cfg = _cfg(tmp_path)
    p = resolve_placements(cfg, ws.anatomy)["pis"]
    setup = ws.setup
    before = _weights(ws.model)
    ours = sequential.start(setup, p, seed=0)
    assert all(torch.equal(before[n], q) for n, q in ws.model.named_parameters())  # PiSSA's rewrite undone
    batches = run_batches(ours, setup)
    theirs = get_peft_model(copy.deepcopy(ws.model), LoraConfig(
        r=4, lora_alpha=8, target_modules=sorted(p.modules), init_lora_weights="pissa", task_type="CAUSAL_LM"))
    named = {n.removeprefix("base_model.model."): q for n, q in theirs.named_parameters() if q.requires_grad}
    assert all(torch.equal(ours.params[n], q) for n, q in named.items())  # PiSSA's A0, B0
    with torch.no_grad(), ours.attached(setup) as attached:  # the residual base: PEFT's, bit for bit
        x = batches[0]["input_ids"]
        torch.testing.assert_close(attached(input_ids=x).logits, theirs(input_ids=x).logits, rtol=0, atol=0)
        torch.testing.assert_close(attached(input_ids=x).logits, ws.model(input_ids=x).logits, rtol=1e-4, atol=1e-4)
    sequential.advance(setup, [ours], setup.total_steps)
    params = list(named.values())
    opt = torch.optim.AdamW(params, lr=cfg.train.lr, weight_decay=cfg.train.weight_decay)
    theirs.train()
    for i, batch in enumerate(batches):
        theirs(input_ids=batch["input_ids"], labels=batch["labels"], use_cache=False).loss.backward()
        torch.nn.utils.clip_grad_norm_(params, cfg.train.max_grad_norm)
        for group in opt.param_groups:
            group["lr"] = cfg.train.lr * lr_factor(i, setup.total_steps, cfg.train)
        opt.step()
        opt.zero_grad()
    for n, q in named.items():
        torch.testing.assert_close(ours.params[n], q, rtol=1e-4, atol=1e-5)
    assert all(torch.equal(before[n], q) for n, q in ws.model.named_parameters())


def test_the_saved_adapter_is_a_lora_of_the_original_base(ws, tmp_path):
    from peft import PeftModel

    p = resolve_placements(_cfg(tmp_path), ws.anatomy)["pis"]
    trial = sequential.start(ws.setup, p, seed=1)
    sequential.advance(ws.setup, [trial], ws.setup.total_steps)
    sequential.evaluate(ws.setup, [trial])
    result = trial.finish(ws.setup, tmp_path / "adapter")
    assert result.metrics["method_time_s"] > 0 and result.placement.variant == "pissa"
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert config["r"] == 8 and config["init_lora_weights"] is True  # PEFT's conversion: [B, -B0] [A; A0]
    x = trial.batch(ws.setup)["input_ids"]
    loaded = PeftModel.from_pretrained(copy.deepcopy(ws.model), tmp_path / "adapter")
    with torch.no_grad(), trial.attached(ws.setup) as attached:
        torch.testing.assert_close(loaded(input_ids=x).logits, attached(input_ids=x).logits, rtol=1e-4, atol=1e-4)


def test_a_checkpoint_continues_exactly(ws, tmp_path):
    p = resolve_placements(_cfg(tmp_path), ws.anatomy)["pis"]
    whole = sequential.start(ws.setup, p, seed=2)
    sequential.advance(ws.setup, [whole], ws.setup.total_steps)
    piece = sequential.start(ws.setup, p, seed=2)
    sequential.advance(ws.setup, [piece], 2)
    checkpoint.save(piece, tmp_path / "ck")
    restored = checkpoint.restore(tmp_path / "ck", ws.setup, p)
    sequential.advance(ws.setup, [restored], ws.setup.total_steps)
    for n, q in whole.params.items():
        torch.testing.assert_close(restored.params[n], q, rtol=0, atol=0)


def test_a_pissa_study_runs_sequentially_and_exports_pissa(tmp_path, capsys, caplog):
    model_dir = tiny_models.save("llama", tmp_path / "tiny")
    common = [f"model={model_dir}", f"out={tmp_path / 'study'}", "data.limit=48", "data.eval_size=8",
              "data.max_length=96", "train.steps=2", "train.batch_size=8", "train.rank=4", "train.alpha=8",
              "seeds=[0]", "strategies=[all_linear,attention_only,attn_pissa]", f"define={json.dumps(DEFINE)}",
              "budget=same:attention_only", "eval.forgetting=false", "train.fuse=4"]
    with caplog.at_level(logging.INFO, logger="loraplace"):
        assert main(["study", *common]) == 0
    assert "run one after the other: PiSSA" in caplog.text
    capsys.readouterr()
    with Store.open(tmp_path / "study", create=False) as store:
        trials = {t.strategy: t for t in store.current_trials()}
    rec = PlacementRecord.from_dict(trials["attn_pissa"].placement)
    assert rec.variant == "pissa" and rec.names() == PlacementRecord.from_dict(trials["attention_only"].placement).names()
    assert trials["attn_pissa"].metrics["eval_loss"] != trials["attention_only"].metrics["eval_loss"]
    assert main(["export", str(tmp_path / "study"), "--strategy", "attn_pissa", "--format", "peft"]) == 0
    assert json.loads(capsys.readouterr().out)["init_lora_weights"] == "pissa"
    assert main(["export", str(tmp_path / "study"), "--strategy", "attn_pissa", "--format", "llamafactory"]) == 0
    assert "pissa_init: true" in capsys.readouterr().out
    assert main(["report", str(tmp_path / "study")]) == 0
    methods = (tmp_path / "study" / "report" / "methods.md").read_text()
    assert "`attn_pissa` started A and B from each adapted weight's top-r singular part" in methods
    row = next(line for line in (tmp_path / "study" / "report" / "report.md").read_text().splitlines()
               if line.startswith("| attn_pissa"))
    assert row.rstrip(" |").endswith("per trial")  # PiSSA's SVDs, in the Method cost column
