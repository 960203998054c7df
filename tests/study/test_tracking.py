"""track=mlflow: each trial is an MLflow run that says what the store says; tracking never costs a trial."""

from __future__ import annotations

import logging

import pytest
import tiny_models

from loraplace.cli import main
from loraplace.core.config import StudyConfig
from loraplace.study import tracking
from loraplace.study.run import run_study
from loraplace.store.db import Store
from loraplace.train.schedule import lr_factor

mlflow = pytest.importorskip("mlflow", reason="MLflow is not installed (it comes with the [dev] extra)")
from mlflow.tracking import MlflowClient  # noqa: E402


def _cfg(model_dir, out, **over) -> StudyConfig:
    return StudyConfig.from_dict({
        "model": model_dir, "out": str(out), "track": "mlflow",
        "strategies": ["all_linear", "mlp_only"], "seeds": [0], "baseline": "all_linear",
        "data": {"limit": 60, "eval_size": 12, "max_length": 96},
        "train": {"steps": 4, "batch_size": 4, "rank": 4, "alpha": 8, "lr": 1e-2, "warmup": 2, "threads": 1},
        **over,
    })


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return tiny_models.save("llama", tmp_path_factory.mktemp("tiny-llama"))


def _trial_runs(client, out):
    exp = client.get_experiment_by_name(tracking.experiment_name(out))
    runs = client.search_runs([exp.experiment_id], filter_string="tags.`loraplace.role` = 'trial'")
    return exp, {r.data.tags[tracking.TRIAL_TAG]: r for r in runs}


@pytest.mark.slow
def test_trials_are_mlflow_runs_that_match_the_store(model_dir, tmp_path, capsys):
    out = tmp_path / "study"
    cfg = _cfg(model_dir, out)
    records = run_study(cfg)
    assert all(r.status == "done" for r in records)
    assert (out / "mlflow.db").is_file()  # the default store lives in the study directory
    client = MlflowClient(tracking_uri=f"sqlite:///{out.resolve()}/mlflow.db")
    exp, runs = _trial_runs(client, out)
    assert sorted(runs) == sorted(r.trial_id for r in records)
    (parent,) = client.search_runs([exp.experiment_id], filter_string="tags.`loraplace.role` = 'study'")
    for rec in records:
        run = runs[rec.trial_id]
        assert run.info.status == "FINISHED" and run.data.tags["mlflow.parentRunId"] == parent.info.run_id
        assert run.data.tags["loraplace.status"] == "done" and run.data.tags["env.torch"] == rec.env["torch"]
        p = run.data.params
        assert (p["strategy"], p["seed"], p["train.lr"], p["data.max_length"], p["model"]) == (
            rec.strategy, "0", "0.01", "96", model_dir)
        assert p["placement.n_modules"] == str(rec.metrics["n_modules"])
        assert p["placement.trainable_params"] == str(rec.metrics["trainable_params"])
        # every number the store holds, as the run's final metrics
        assert {k: v for k, v in run.data.metrics.items() if k not in ("train_loss", "lr") and not k.startswith("rung_")} \
            == pytest.approx({k: float(v) for k, v in rec.metrics.items()})
        # the rung evaluations (race.record: steps 1 and 2 of 4) as per-step metrics
        rung = sorted(client.get_metric_history(run.info.run_id, "rung_eval_loss"), key=lambda m: m.step)
        assert [m.step for m in rung] == [s for s, _ in rec.evals] == [1, 2]
        assert [m.value for m in rung] == pytest.approx([ev["eval_loss"] for _, ev in rec.evals])
        losses = client.get_metric_history(run.info.run_id, "train_loss")
        losses = sorted(losses, key=lambda m: m.step)
        assert [m.step for m in losses] == [step for step, _ in rec.curve]  # steps exactly, values approximately
        assert [m.value for m in losses] == pytest.approx([loss for _, loss in rec.curve])
        lrs = sorted(client.get_metric_history(run.info.run_id, "lr"), key=lambda m: m.step)
        assert [m.value for m in lrs] == pytest.approx([1e-2 * lr_factor(s - 1, 4, cfg.train) for s in range(1, 5)])
        assert lrs[0].value < lrs[1].value and lrs[3].value < lrs[2].value  # warm-up, then decay, as trained
        arts = [a.path for a in client.list_artifacts(run.info.run_id, "adapter")]
        assert arts == ["adapter/adapter_config.json"]

    # a resumed study logs nothing twice
    run_study(cfg)
    assert sorted(_trial_runs(client, out)[1]) == sorted(runs)

    # other forgetting settings measure the finished trials again from their adapters: their runs follow the store
    again = run_study(_cfg(model_dir, out, eval={"forgetting_size": 3, "forgetting_length": 8}))
    now = _trial_runs(client, out)[1]
    assert sorted(now) == sorted(runs)  # the same runs, updated, not new ones
    for rec, old in zip(again, records):
        assert rec.metrics["forgetting"] != old.metrics["forgetting"]
        assert now[rec.trial_id].data.metrics["forgetting"] == pytest.approx(rec.metrics["forgetting"])
        assert now[rec.trial_id].data.tags["loraplace.forgetting_set"] == rec.measured["forgetting"]

    # the report's figures land on the study's parent run
    assert main(["report", str(out)]) == 0
    capsys.readouterr()
    report = {a.path for a in client.list_artifacts(parent.info.run_id, "report")}
    assert {"report/report.md", "report/report.html", "report/pareto.png", "report/curves.png"} <= report


def test_an_unusable_tracking_store_is_a_warning_not_a_failure(model_dir, tmp_path, caplog):
    (tmp_path / "blocker").write_text("a file where the store's directory would be")
    cfg = _cfg(model_dir, tmp_path / "study", strategies=["all_linear"],
               tracking_uri=f"sqlite:///{tmp_path}/blocker/mlflow.db")
    with caplog.at_level(logging.WARNING, logger="loraplace"):
        records = run_study(cfg)
    assert [r.status for r in records] == ["done"]
    assert any(r.getMessage().startswith("tracking: mlflow is not usable") for r in caplog.records)
    with Store.open(cfg.out, create=False) as store:
        assert store.get(records[0].trial_id).metrics["eval_loss"] == records[0].metrics["eval_loss"]


@pytest.mark.slow
def test_a_tracking_failure_mid_study_keeps_every_trial(model_dir, tmp_path, caplog, monkeypatch):
    def down(self, *a, **k):
        raise ConnectionError("tracking server went away")

    monkeypatch.setattr(MlflowClient, "log_batch", down)
    with caplog.at_level(logging.WARNING, logger="loraplace"):
        records = run_study(_cfg(model_dir, tmp_path / "study"))
    assert [r.status for r in records] == ["done", "done"]
    warned = [r.getMessage() for r in caplog.records if "could not log trial" in r.getMessage()]
    assert len(warned) == 2 and "tracking server went away" in warned[0]
