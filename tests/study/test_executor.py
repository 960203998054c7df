"""Trials on Ray workers give the same results as in-process trials, and land in the same store."""

from __future__ import annotations

import pytest
import tiny_models

from loraplace.core.config import ConfigError, StudyConfig
from loraplace.study.run import run_study

ray = pytest.importorskip("ray", reason="Ray is not installed (it comes with the [dev] extra)")


@pytest.fixture(scope="module")
def ray_cluster():
    # Small object store: the default reserves 30% of RAM. Start-up takes a few seconds.
    ray.init(num_cpus=2, include_dashboard=False, object_store_memory=200 * 2**20, log_to_driver=False)
    yield
    ray.shutdown()


def _cfg(model_dir, out, executor):
    return StudyConfig.from_dict({
        "model": model_dir, "out": str(out), "executor": executor, "cpus_per_trial": 1,
        "strategies": ["all_linear", "attention_only", "mlp_only"], "seeds": [0],
        "data": {"limit": 60, "eval_size": 12, "max_length": 96},
        "train": {"steps": 3, "batch_size": 4, "rank": 4, "alpha": 8, "lr": 1e-2, "threads": 1},
    })


@pytest.mark.slow
def test_ray_trials_match_local_trials(ray_cluster, tmp_path):
    model_dir = tiny_models.save("llama", tmp_path / "model")
    local = run_study(_cfg(model_dir, tmp_path / "local", "local"))
    remote = run_study(_cfg(model_dir, tmp_path / "ray", "ray"))
    assert [(r.strategy, r.status) for r in remote] == [(r.strategy, "done") for r in local]
    for a, b in zip(local, remote):
        assert a.trial_id == b.trial_id  # the executor is not part of a trial's identity
        assert b.metrics["eval_loss"] == pytest.approx(a.metrics["eval_loss"], rel=1e-5)
        assert [l for _, l in b.curve] == pytest.approx([l for _, l in a.curve], rel=1e-5)
        assert (tmp_path / "ray" / b.adapter_path / "adapter_model.safetensors").is_file()
    # rerunning skips what the workers finished
    again = run_study(_cfg(model_dir, tmp_path / "ray", "ray"))
    assert [r.finished_at for r in again] == [r.finished_at for r in remote]


@pytest.mark.slow
def test_a_race_on_ray_decides_what_a_local_race_does(ray_cluster, tmp_path):
    """Ray workers run the pieces of work to each rung (checkpoints in the study directory); the driver decides
    once every trial still racing has reached the rung; the survivors go on from their checkpoints."""
    from loraplace.study import race
    from loraplace.store.db import Store

    model_dir = tiny_models.save("llama", tmp_path / "model")

    def raced(out, executor):
        cfg = _cfg(model_dir, tmp_path / out, executor)
        cfg.seeds, cfg.train.steps = [0, 1], 6
        cfg.race.at = [0.5]
        return run_study(cfg)

    local, remote = raced("local", "local"), raced("ray", "ray")
    assert [(r.strategy, r.seed, r.status) for r in remote] == [(r.strategy, r.seed, r.status) for r in local]
    for a, b in zip(local, remote):
        assert [s for s, _ in b.evals] == [s for s, _ in a.evals]
        if a.status == "done":
            assert b.metrics["eval_loss"] == pytest.approx(a.metrics["eval_loss"], rel=1e-5)
    with Store.open(tmp_path / "local", create=False) as s1, Store.open(tmp_path / "ray", create=False) as s2:
        assert [(d.step, sorted(d.stopped)) for d in race.decisions(s1)] == \
               [(d.step, sorted(d.stopped)) for d in race.decisions(s2)]


def test_unknown_executor_is_a_config_error():
    with pytest.raises(ConfigError, match="executor: 'slurm' is not one of local, ray"):
        StudyConfig.from_dict({"executor": "slurm"})
