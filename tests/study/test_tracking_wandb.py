"""track=wandb: each trial is a W&B run carrying what the store says, checked against a stand-in ``wandb`` module
(no account, no network): the calls loraplace makes are recorded and compared with the store."""

from __future__ import annotations

import logging
import sys
import types

import pytest
import tiny_models

from loraplace.core.config import StudyConfig
from loraplace.core.metrics import numeric
from loraplace.study.run import run_study
from loraplace.store.db import Store


class _Run:
    def __init__(self, **kw):
        self.init, self.logged, self.summary, self.exit_code = kw, [], {}, None

    def log(self, values: dict, step: int):
        self.logged.append((step, values))

    def finish(self, exit_code: int = 0):
        self.exit_code = exit_code


@pytest.fixture()
def fake_wandb(monkeypatch):
    runs: list[_Run] = []

    def init(**kw):
        runs.append(_Run(**kw))
        return runs[-1]

    monkeypatch.setitem(sys.modules, "wandb", types.SimpleNamespace(init=init))
    return runs


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return tiny_models.save("llama", tmp_path_factory.mktemp("tiny-llama"))


def _cfg(model_dir, out, **over) -> StudyConfig:
    return StudyConfig.from_dict({
        "model": model_dir, "out": str(out), "track": "wandb", "tracking_uri": "my-project",
        "strategies": ["all_linear", "mlp_only"], "seeds": [0], "baseline": "all_linear",
        "data": {"limit": 60, "eval_size": 12, "max_length": 96},
        "train": {"steps": 4, "batch_size": 4, "rank": 4, "alpha": 8, "lr": 1e-2, "warmup": 2, "threads": 1},
        **over,
    })


def test_trials_are_wandb_runs_that_match_the_store(model_dir, tmp_path, fake_wandb):
    cfg = _cfg(model_dir, tmp_path / "study")
    records = run_study(cfg)
    assert [r.status for r in records] == ["done", "done"] and len(fake_wandb) == 2
    with Store.open(cfg.out, create=False) as store:
        for run, rec in zip(fake_wandb, records):
            rec = store.get(rec.trial_id)
            assert run.init["project"] == "my-project"  # tracking_uri names the W&B project
            assert run.init["name"] == f"{rec.strategy}-s0" and run.init["notes"] == rec.trial_id
            assert run.init["config"]["strategy"] == rec.strategy and run.init["config"]["train.lr"] == "0.01"
            assert run.init["tags"] == ["done", "final"] and run.exit_code == 0
            losses = [(step, v["train_loss"]) for step, v in run.logged if "train_loss" in v]
            assert [s for s, _ in losses] == [s for s, _ in rec.curve] and [v for _, v in losses] == [v for _, v in rec.curve]
            assert {k: v for k, v in run.summary.items() if k not in ("trial_id", "status")} == numeric(rec.metrics)
            assert run.summary["status"] == "done"


def test_a_wandb_failure_is_a_warning_and_keeps_every_trial(model_dir, tmp_path, monkeypatch, caplog):
    def down(**kw):
        raise ConnectionError("wandb is down")

    monkeypatch.setitem(sys.modules, "wandb", types.SimpleNamespace(init=down))
    with caplog.at_level(logging.WARNING, logger="loraplace"):
        records = run_study(_cfg(model_dir, tmp_path / "study"))
    assert [r.status for r in records] == ["done", "done"]
    warned = [r.getMessage() for r in caplog.records if "could not log trial" in r.getMessage()]
    assert len(warned) == 2 and "wandb is down" in warned[0]
