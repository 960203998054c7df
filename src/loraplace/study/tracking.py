"""Experiment tracking: mirror a study's trials as MLflow (or W&B) runs. The store stays the source
of truth: a tracking failure is a warning and never fails or loses a trial.

Usage::

    tracker = open_tracker(cfg)                  # cfg.track = "mlflow" (or "wandb"); imported only then
    tracker.log_trial(store.get(trial_id))       # after the store has the trial's outcome
    log_report(study_dir, write_report(study_dir))   # the report's files on the study's parent run

MLflow layout: one experiment per study directory (named ``loraplace <absolute study dir>``), one
parent run named ``study`` for the study, and one nested run per trial attempt with params (every
shared setting flattened as ``train.lr``, ``data.max_length``, ..., plus ``strategy``, ``seed`` and
``placement.*``), per-step metrics ``train_loss`` and ``lr``, final metrics (every number in the
store's ``metrics_json``), tags (``loraplace.trial_id``, ``loraplace.status``, ``env.*``) and the
adapter's ``adapter_config.json`` as an artifact. The default tracking URI is
``sqlite:///<study dir>/mlflow.db`` with artifacts in ``<study dir>/mlartifacts``: offline, and
``mlflow ui --backend-store-uri sqlite:///<study dir>/mlflow.db`` shows it.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

from loraplace.core.config import ConfigError, StudyConfig
from loraplace.core.errors import first_line
from loraplace.core.metrics import numeric
from loraplace.store.db import DONE, STOPPED, Store, StoreError, TrialRecord
from loraplace.train.schedule import lr_factor

log = logging.getLogger("loraplace")

TRIAL_TAG = "loraplace.trial_id"
ROLE_TAG = "loraplace.role"  # "study" on the parent run, "trial" on each trial's run


def default_uri(study_dir: str | Path) -> str:
    return f"sqlite:///{Path(study_dir).resolve()}/mlflow.db"


def experiment_name(study_dir: str | Path) -> str:
    return f"loraplace {Path(study_dir).resolve()}"


def open_tracker(cfg: StudyConfig):
    """The tracker cfg.track asks for, or None. A missing package is a ConfigError (one line);
    a tracking store that cannot be reached is a warning, and the study runs untracked."""
    if not cfg.track:
        return None
    cls = {"mlflow": MlflowTracker, "wandb": WandbTracker}[cfg.track]
    cls.require()
    try:
        return cls(cfg)
    except Exception as e:  # any client or server error: tracking is optional, the study is not
        log.warning("tracking: %s is not usable (%s); the study runs untracked (the store keeps everything)",
                    cfg.track, first_line(e))
        return None


def trial_params(cfg: StudyConfig, rec: TrialRecord) -> dict[str, str]:
    """Every shared setting flattened (``train.lr``), plus the trial's strategy, seed and placement summary."""
    shared = {k: v for k, v in cfg.to_dict().items() if k not in ("track", "tracking_uri")}
    params = _flatten(shared)
    pl = rec.placement
    modules = pl.get("modules", {})
    params.update({
        "strategy": rec.strategy,
        "seed": rec.seed,
        "phase": rec.phase,  # tune: a trial of the learning-rate search (on the selection split)
        "train.lr": rec.lr if rec.lr is not None else cfg.train.lr,  # the trial's own rate (tuned studies differ)
        "placement.n_modules": len(modules),
        "placement.trainable_params": pl.get("trainable_params"),
        "placement.rank": pl.get("rank"),
        "placement.roles": ",".join(sorted({m["role"] for m in modules.values()})),
        "placement.blocks": ",".join(str(b) for b in sorted({m["block"] for m in modules.values()})),
    })
    return {k: _text(v) for k, v in params.items() if v is not None}


def step_metrics(cfg: StudyConfig, rec: TrialRecord) -> list[tuple[str, float, int]]:
    """(name, value, step) for each stored curve point: ``train_loss`` and the ``lr`` that step used (the whole
    run's schedule: known for a trial stopped by racing only when the run is ``train.steps`` long), and each
    rung evaluation as ``rung_<metric>`` at its step."""
    if rec.status == DONE:
        total = rec.metrics.get("steps") or len(rec.curve)
    else:
        total = cfg.train.steps if cfg.train.epochs is None else None
    out = []
    peak = rec.lr if rec.lr is not None else cfg.train.lr
    for step, loss in rec.curve:
        out.append(("train_loss", float(loss), int(step)))
        if total:
            out.append(("lr", peak * lr_factor(int(step) - 1, int(total), cfg.train), int(step)))
    for step, ev in rec.evals:
        out += [(f"rung_{k}", float(v), int(step)) for k, v in numeric(ev).items()]
    return out


class MlflowTracker:
    """Trial runs in MLflow through ``MlflowClient`` (no global active run)."""

    @staticmethod
    def require() -> None:
        try:
            import mlflow  # noqa: F401
        except ImportError:
            raise ConfigError("track=mlflow needs MLflow: pip install 'loraplace[mlflow]' (or pip install 'mlflow>=3')") from None

    def __init__(self, cfg: StudyConfig):
        from mlflow.tracking import MlflowClient

        self.cfg, self.study_dir = cfg, Path(cfg.out)
        self.uri = cfg.tracking_uri or default_uri(cfg.out)
        self.client = MlflowClient(tracking_uri=self.uri)
        name = experiment_name(cfg.out)
        exp = self.client.get_experiment_by_name(name)
        if exp is None:
            # A local SQLite store keeps its artifacts next to it (MLflow's default is under the current directory).
            where = None
            if self.uri.startswith("sqlite:///"):
                where = (Path(self.uri[len("sqlite:///"):]).resolve().parent / "mlartifacts").as_uri()
            self.experiment_id = self.client.create_experiment(name, artifact_location=where)
        else:
            self.experiment_id = exp.experiment_id
        self.parent_id = self._parent_run()

    def _parent_run(self) -> str:
        runs = self.client.search_runs([self.experiment_id], filter_string=f"tags.`{ROLE_TAG}` = 'study'", max_results=1)
        if runs:
            return runs[0].info.run_id
        run = self.client.create_run(self.experiment_id, run_name="study", tags={ROLE_TAG: "study",
                                                                                "loraplace.study_dir": str(self.study_dir.resolve())})
        return run.info.run_id

    def logged(self, trial_id: str, status: str = DONE) -> bool:
        """A run of this trial with this final status is already there (a resumed study does not log it twice)."""
        runs = self.client.search_runs(
            [self.experiment_id], filter_string=f"tags.`{TRIAL_TAG}` = '{trial_id}' and tags.`loraplace.status` = '{status}'",
            max_results=1)
        return bool(runs)

    def log_trial(self, rec: TrialRecord) -> None:
        try:
            self._log_trial(rec)
        except Exception as e:  # never fail a trial the store already holds
            log.warning("tracking: could not log trial %s to MLflow at %s: %s", rec.trial_id, self.uri, first_line(e))

    def _log_trial(self, rec: TrialRecord) -> None:
        from mlflow.entities import Metric, Param

        if rec.status in (DONE, STOPPED) and self.logged(rec.trial_id, rec.status):
            return
        tags = {"mlflow.parentRunId": self.parent_id, ROLE_TAG: "trial", TRIAL_TAG: rec.trial_id,
                "loraplace.status": rec.status, "loraplace.strategy": rec.strategy, "loraplace.seed": str(rec.seed),
                "loraplace.phase": rec.phase,
                **{f"env.{k}": _text(v) for k, v in rec.env.items()}}
        if rec.error:
            tags["loraplace.error"] = rec.error[:5000]
        name = f"{rec.strategy}-s{rec.seed}" + (f"-tune-lr{rec.lr:g}" if rec.phase == "tune" else "")
        run = self.client.create_run(self.experiment_id, run_name=name, tags=tags)
        rid, now = run.info.run_id, int(time.time() * 1000)
        params = [Param(k, v) for k, v in trial_params(self.cfg, rec).items()]
        metrics = [Metric(k, v, now, s) for k, v, s in step_metrics(self.cfg, rec)]
        metrics += [Metric(k, v, now, 0) for k, v in numeric(rec.metrics).items()]
        for i in range(0, len(params), 100):  # MLflow's batch limits: 100 params, 1000 metrics a call
            self.client.log_batch(rid, params=params[i:i + 100])
        for i in range(0, len(metrics), 1000):
            self.client.log_batch(rid, metrics=metrics[i:i + 1000])
        if rec.adapter_path and (self.study_dir / rec.adapter_path / "adapter_config.json").is_file():
            self.client.log_artifact(rid, str(self.study_dir / rec.adapter_path / "adapter_config.json"), "adapter")
        self.client.set_terminated(rid, status={DONE: "FINISHED", STOPPED: "KILLED"}.get(rec.status, "FAILED"))

    def remeasured(self, rec: TrialRecord) -> None:
        """A logged trial's forgetting was measured again (other ``eval.forgetting*`` settings, from its saved
        adapter): its run gets the new values as the metrics' latest, the earlier ones stay in their history."""
        from mlflow.entities import Metric

        try:
            runs = self.client.search_runs(
                [self.experiment_id], filter_string=f"tags.`{TRIAL_TAG}` = '{rec.trial_id}' and tags.`loraplace.status` = "
                                                    f"'{rec.status}'", max_results=1)
            if not runs:
                return self.log_trial(rec)
            rid, now = runs[0].info.run_id, int(time.time() * 1000)
            metrics = [Metric(k, v, now, 0) for k, v in numeric(rec.metrics).items() if k.startswith("forgetting")]
            self.client.log_batch(rid, metrics=metrics)
            self.client.set_tag(rid, "loraplace.forgetting_set", rec.measured.get("forgetting", ""))
        except Exception as e:  # never fail a study over its mirror
            log.warning("tracking: could not update trial %s in MLflow at %s: %s", rec.trial_id, self.uri, first_line(e))

    def close(self) -> None:
        """The study's run in this process is over: the parent run shows as finished."""
        try:
            self.client.set_terminated(self.parent_id, status="FINISHED")
        except Exception as e:
            log.warning("tracking: could not close the study's MLflow run: %s", first_line(e))

    def log_report(self, paths: dict[str, Path]) -> None:
        try:
            for kind, path in paths.items():
                if kind != "dir" and Path(path).is_file():
                    self.client.log_artifact(self.parent_id, str(path), "report")
        except Exception as e:
            log.warning("tracking: could not log the report to MLflow at %s: %s", self.uri, first_line(e))


class WandbTracker:
    """Trial runs in Weights & Biases (one run per trial, grouped by study); only where wandb is installed."""

    @staticmethod
    def require() -> None:
        try:
            import wandb  # noqa: F401
        except ImportError:
            raise ConfigError("track=wandb needs Weights & Biases: pip install wandb (or use track=mlflow)") from None

    def __init__(self, cfg: StudyConfig):
        self.cfg, self.study_dir = cfg, Path(cfg.out)
        self.project = cfg.tracking_uri or "loraplace"  # for W&B, tracking_uri names the project

    def log_trial(self, rec: TrialRecord) -> None:
        import wandb

        try:
            run = wandb.init(project=self.project, group=experiment_name(self.cfg.out), name=f"{rec.strategy}-s{rec.seed}",
                             job_type="trial", config=trial_params(self.cfg, rec), dir=str(self.study_dir),
                             tags=[rec.status, rec.phase], notes=rec.trial_id)
            for name, value, step in step_metrics(self.cfg, rec):
                run.log({name: value}, step=step)
            run.summary.update({**numeric(rec.metrics), "trial_id": rec.trial_id, "status": rec.status})
            run.finish(exit_code=0 if rec.status == DONE else 1)
        except Exception as e:
            log.warning("tracking: could not log trial %s to W&B: %s", rec.trial_id, first_line(e))

    def remeasured(self, rec: TrialRecord) -> None:
        log.warning("tracking: trial %s's forgetting was measured again; its finished W&B run keeps the first value "
                    "(the study's database and report have the new one)", rec.trial_id)

    def close(self) -> None:
        pass

    def log_report(self, paths: dict[str, Path]) -> None:
        pass  # the report stays in the study directory


def log_report(study_dir: str | Path, paths: dict[str, Path]) -> None:
    """If the study in study_dir is tracked, attach the report's files to its parent run."""
    with Store.open(study_dir, create=False) as store:
        try:
            cfg = store.study_config()
        except StoreError as e:  # saved by another loraplace version
            log.warning("tracking: the report is not logged (%s)", e)
            return
    if cfg is None or not cfg.track:
        return
    cfg.out = str(study_dir)  # where it is now (the directory may have moved)
    tracker = open_tracker(cfg)
    if tracker is not None:
        tracker.log_report(paths)


def _flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict) and k != "define":
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def _text(v) -> str:
    text = v if isinstance(v, str) else json.dumps(v, sort_keys=True)
    return text[:6000]  # MLflow 3's limit on a param value


