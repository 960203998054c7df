"""A whole study on a tiny random-init Mixtral (no downloads): all_linear and mlp_only train the routed experts
beside attention_only, the base stays pristine, the report is written and the exports rebuild (or refuse) the
studied placements."""

from __future__ import annotations

import pytest

import json

import tiny_models
import torch
import yaml
from toys import tiny_study

from loraplace.cli import main
from loraplace.placement.peft import lora_layers
from loraplace.store.db import Store
from loraplace.study.run import run_study


@pytest.mark.slow
def test_a_study_trains_the_experts_end_to_end(tmp_path, capsys):
    from peft import LoraConfig, PeftModel, get_peft_model

    cfg = tiny_study(tmp_path, ["all_linear", "attention_only", "mlp_only"], train={"fuse": 2})
    model = tiny_models.build("mixtral")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    records = {r.strategy: r for r in run_study(cfg, (model, tiny_models.tokenizer()))}
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert {s: r.status for s, r in records.items()} == dict.fromkeys(records, "done")
    roles = {s: {m["role"] for m in r.placement["modules"].values()} for s, r in records.items()}
    assert roles["mlp_only"] == {"mlp.experts.gate_up", "mlp.experts.down"}  # Mixtral's whole MLP is its experts
    assert roles["all_linear"] == roles["attention_only"] | roles["mlp_only"]
    for s, r in records.items():  # stored count == PEFT's count of the saved adapter on a fresh model
        loaded = PeftModel.from_pretrained(tiny_models.build("mixtral"), tmp_path / "study" / r.adapter_path)
        assert sum(p.numel() for n, p in loaded.named_parameters() if "lora_" in n) == r.metrics["trainable_params"], s
    assert records["mlp_only"].metrics["eval_loss"] != records["attention_only"].metrics["eval_loss"]

    assert main(["report", str(tmp_path / "study")]) == 0
    assert "mlp_only" in (tmp_path / "study" / "report" / "report.md").read_text()
    capsys.readouterr()

    assert main(["export", str(tmp_path / "study"), "--strategy", "all_linear", "--format", "peft"]) == 0
    exported = json.loads(capsys.readouterr().out)
    exported.pop("peft_type")
    rebuilt = get_peft_model(tiny_models.build("mixtral", seed=1), LoraConfig(**exported))
    with Store.open(cfg.out, create=False) as store:
        stored = next(t.placement for t in store.current_trials() if t.strategy == "all_linear")
    assert {n: l.r["default"] for n, l in lora_layers(rebuilt).items()} == {n: m["rank"] for n, m in stored["modules"].items()}
    assert sum(p.numel() for p in rebuilt.parameters() if p.requires_grad) == stored["trainable_params"]

    assert main(["export", str(tmp_path / "study"), "--strategy", "mlp_only", "--format", "axolotl"]) == 0
    axolotl = yaml.safe_load(capsys.readouterr().out)
    assert axolotl["lora_target_modules"] == [] and len(axolotl["lora_target_parameters"]) == 4
    assert main(["export", str(tmp_path / "study"), "--strategy", "mlp_only", "--format", "llamafactory"]) == 2
    assert "cannot target routed experts" in capsys.readouterr().err
