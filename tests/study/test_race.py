"""Racing: the stopping rule, and raced studies on a tiny model: a clearly worse strategy stops, one that is not
goes on with exactly a full study's numbers, an interrupted race resumes from its checkpoints with the same
decisions, a fused race decides what a sequential one does, and the report says what happened."""

from __future__ import annotations

import json
import sqlite3

import pytest
import tiny_models
from toys import FIRST_SCHEMA

from loraplace.core.config import ConfigError, RaceSpec, StudyConfig
from loraplace.study import race
from loraplace.study.race import decide, rung_steps
from loraplace.study.run import run_study
from loraplace.store.db import Store
from loraplace.train import trial as T


def test_rung_steps_are_whole_steps_inside_the_run():
    assert rung_steps([0.25, 0.5], 30) == [8, 15]
    assert rung_steps([0.01, 0.99], 10) == [1, 9]  # at least step 1, before the last step
    assert rung_steps([0.5, 0.52], 4) == [2]  # two fractions on one step: one rung
    assert rung_steps([], 30) == []


def _values(base, other, seeds=(0, 1, 2)):
    """Eval losses per seed: the baseline at ``base`` and a strategy at ``other`` (zero-shot 3.0)."""
    return {"all_linear": {s: base + 0.01 * s for s in seeds}, "x": {s: other + 0.01 * s for s in seeds}}


def test_the_rule_stops_what_cannot_clear_the_threshold_and_nothing_on_too_little_evidence():
    spec = RaceSpec(at=[0.25], slack=0.2, confidence=0.95)
    # zero-shot 3.0; baseline 2.0: a gain of 1.0. x at 2.9 keeps ~10%: far below 95% - 0.2 x 0.75^2 at a quarter
    d = decide(_values(2.0, 2.9), "all_linear", 3.0, 0.95, spec, 0.25, 8)
    bar = 0.95 - spec.slack * (1 - 0.25) ** 2  # the bar's definition: threshold - slack x (remaining share)^2
    assert list(d.stopped) == ["x"] and "upper 95% bound" in d.stopped["x"] and d.bar == pytest.approx(bar)
    assert d.kept["all_linear"] == "the baseline is never stopped"
    # x at 2.15 keeps ~85%: above the bar at a quarter of the steps (83.75%), so it goes on ...
    assert not decide(_values(2.0, 2.15), "all_linear", 3.0, 0.95, spec, 0.25, 8).stopped
    # ... but not at three quarters, where the bar is 95% - 1.25 points (an upper bound of ~85% misses it)
    assert list(decide(_values(2.0, 2.15), "all_linear", 3.0, 0.95, spec, 0.75, 23).stopped) == ["x"]
    # one seed: no interval, no stop, however bad
    one = decide(_values(2.0, 2.95, seeds=(0,)), "all_linear", 3.0, 0.95, spec, 0.25, 8)
    assert not one.stopped and "one seed's noise" in one.kept["x"]
    # a baseline that has not improved on the base model in every seed: retained improvement is undefined
    flat = _values(2.0, 2.9)
    flat["all_linear"][1] = 3.2
    assert not decide(flat, "all_linear", 3.0, 0.95, spec, 0.25, 8).stopped
    # noisy seeds widen the bound: the same mean with a large spread is not stopped
    noisy = {"all_linear": {0: 2.0, 1: 2.0, 2: 2.0}, "x": {0: 2.0, 1: 2.9, 2: 2.6}}
    assert not decide(noisy, "all_linear", 3.0, 0.95, spec, 0.25, 8).stopped
    # accuracy: higher is better
    acc = {"all_linear": {0: 0.6, 1: 0.61, 2: 0.62}, "x": {0: 0.12, 1: 0.13, 2: 0.11}}
    assert list(decide(acc, "all_linear", 0.1, 0.95, spec, 0.25, 8, metric="accuracy").stopped) == ["x"]


@pytest.mark.parametrize("bad", ["race.at=[0]", "race.at=[1.5]", "race.at=[0.5,0.5]", "race.slack=1",
                                 "race.confidence=0.2", "race.record=[-0.1]"])
def test_bad_race_settings_are_config_errors(bad):
    with pytest.raises(ConfigError, match="race\\."):
        StudyConfig.load(overrides=[bad])


# -- raced studies on a tiny model -------------------------------------------------------------------------------
DEFINE = {"weak": {"roles": "attn.q", "blocks": "0", "rank": 1}}  # one rank-1 adapter: clearly worse


def _cfg(tmp_path, out, **over) -> StudyConfig:
    data = {
        "out": str(tmp_path / out), "strategies": ["all_linear", "attention_only", "weak"], "seeds": [0, 1, 2],
        "define": DEFINE, "data": {"limit": 60, "eval_size": 12, "max_length": 96},
        "train": {"steps": 8, "batch_size": 4, "rank": 4, "alpha": 8, "lr": 3e-2},
        "eval": {"batch_size": 8},
    }
    for k, v in over.items():
        data[k] = {**data.get(k, {}), **v} if isinstance(v, dict) else v
    return StudyConfig.from_dict(data)


def _model():
    return tiny_models.build("llama"), tiny_models.tokenizer()


@pytest.fixture(scope="module")
def full(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("race")
    return tmp, {(r.strategy, r.seed): r for r in run_study(_cfg(tmp, "full"), _model())}


@pytest.fixture(scope="module")
def raced(full):
    tmp, _ = full
    return run_study(_cfg(tmp, "raced", race={"at": [0.25, 0.5], "slack": 0.2}), _model())


def _same_numbers(a, b):
    assert a.curve == b.curve and a.metrics["eval_loss"] == b.metrics["eval_loss"]
    assert a.evals == b.evals


@pytest.mark.slow
def test_a_raced_study_stops_the_clearly_worse_and_keeps_the_full_studys_numbers(full, raced):
    tmp, ref = full
    status = {(r.strategy, r.seed): r for r in raced}
    assert {s for (s, _), r in status.items() if r.status == "stopped"} == {"weak"}
    for key, r in status.items():
        if key[0] == "weak":
            assert r.step == 2 and r.error.startswith("stopped at step 2: retained improvement") and len(r.curve) == 2
            assert r.evals == ref[key].evals[:1]  # what it measured at the rung is what the full study measured
        else:
            assert r.status == "done"
            _same_numbers(ref[key], r)  # a survivor is bit for bit the full study's trial
    with Store.open(tmp / "raced", create=False) as store:
        ds = race.decisions(store)
        cfg = _cfg(tmp, "raced", race={"at": [0.25, 0.5], "slack": 0.2})
        assert [d.step for d in ds] == rung_steps(cfg.race.at, cfg.train.steps)
        assert list(ds[0].stopped) == ["weak"] and not ds[1].stopped
    checkpoints = tmp / "raced" / "checkpoints"
    assert not checkpoints.exists() or not any(checkpoints.iterdir())  # removed as trials finished or stopped
    # rerunning finds its decisions and changes nothing
    again = run_study(_cfg(tmp, "raced", race={"at": [0.25, 0.5], "slack": 0.2}), _model())
    assert [(r.status, r.finished_at) for r in again] == [(r.status, r.finished_at) for r in raced]


@pytest.mark.slow
def test_the_report_of_a_raced_and_of_a_full_study(full, raced, capsys):
    from loraplace.cli import main

    tmp, _ = full
    assert main(["report", str(tmp / "raced")]) == 0
    out = capsys.readouterr().out
    assert "weak (stopped)" in out and "Racing: Stopped weak at step 2" in out and "Its rung evaluations: seed 0" in out
    md = (tmp / "raced" / "report" / "report.md").read_text()
    assert "## Racing" in md and "optimizer steps a full study runs" in md
    assert main(["status", str(tmp / "raced"), "--csv"]) == 0
    rows = capsys.readouterr().out.splitlines()
    assert sum(",stopped," in r for r in rows) == 3
    assert main(["report", str(tmp / "full")]) == 0
    out = capsys.readouterr().out
    assert "Would racing have been safe" in out and "Kendall's tau" in out and "would have stopped weak" in out


@pytest.mark.slow
def test_an_interrupted_race_resumes_from_its_checkpoints_with_the_same_decisions(full, raced, monkeypatch):
    tmp, ref = full
    cfg = _cfg(tmp, "interrupted", race={"at": [0.25, 0.5], "slack": 0.2})
    real, steps = T.Trial.update, []
    rung1, rung2 = rung_steps(cfg.race.at, cfg.train.steps)
    trials = len(cfg.strategies) * len(cfg.seeds)
    # every trial's steps to rung 1; then two survivors' steps to rung 2, the second dying at its last one
    dies_at = trials * rung1 + 2 * (rung2 - rung1)

    def counting(self, *a, **k):
        steps.append(self.placement.strategy.name)
        if len(steps) == dies_at:
            raise KeyboardInterrupt
        return real(self, *a, **k)

    monkeypatch.setattr(T.Trial, "update", counting)
    with pytest.raises(KeyboardInterrupt):
        run_study(cfg, _model())
    with Store.open(cfg.out, create=False) as store:
        assert [d.step for d in race.decisions(store)] == [rung1]  # the first rung was decided before it died
        at = {t.trial_id: t.step for t in store.trials() if t.status in ("paused", "pending") and t.checkpoint_path}
        survivors = trials - len(cfg.seeds)  # weak's seeds stopped at rung 1
        # one survivor reached rung 2, the one it was training did not
        assert sorted(at.values()) == [rung1] * (survivors - 1) + [rung2]
    before = len(steps)
    records = run_study(cfg, _model())
    survivors = [r for r in records if r.status == "done"]
    # the resumed run trains every survivor from its checkpoint, not from step 0
    assert len(steps) - before == sum(8 - at[r.trial_id] for r in survivors)
    with Store.open(cfg.out, create=False) as store, Store.open(tmp / "raced", create=False) as other:
        assert [d.to_dict() for d in race.decisions(store)] == [d.to_dict() for d in race.decisions(other)]
    for r in survivors:
        _same_numbers(ref[(r.strategy, r.seed)], r)


@pytest.mark.slow
def test_a_fused_race_decides_what_a_sequential_race_does(full):
    tmp, ref = full
    fused = run_study(_cfg(tmp, "fused", race={"at": [0.25, 0.5], "slack": 0.2}, train={"fuse": 3}), _model())
    assert {r.strategy for r in fused if r.status == "stopped"} == {"weak"}
    for r in fused:
        if r.status == "done":
            assert r.metrics["fused_trials"] >= 2
            assert r.metrics["eval_loss"] == pytest.approx(ref[(r.strategy, r.seed)].metrics["eval_loss"], rel=1e-4)


def test_a_store_from_before_racing_opens_and_takes_the_new_statuses(tmp_path):
    """A study.db whose status check predates paused and stopped is rebuilt on open, every row kept."""
    conn = sqlite3.connect(tmp_path / "study.db")
    conn.executescript(FIRST_SCHEMA + """
        INSERT INTO trials(trial_id, strategy, seed, status, config_json, metrics_json, created_at)
            VALUES ('t1', 'all_linear', 0, 'done', '{}', '{"eval_loss": 2.5, "steps": 30}', '2026-11-01T00:00:00+00:00');
    """)
    conn.commit()
    conn.close()
    with Store.open(tmp_path) as store:
        t = store.get("t1")
        assert (t.status, t.metrics, t.evals, t.step) == ("done", {"eval_loss": 2.5, "steps": 30}, [], 30)  # step: its steps
        store.add_pending("t2", "mlp_only", 0, {})
        store.conn.execute("UPDATE trials SET status='stopped' WHERE trial_id='t2'")
        assert store.get("t2").status == "stopped"
        sql = store.conn.execute("SELECT sql FROM sqlite_master WHERE name='trials'").fetchone()[0]
        assert "'stopped'" in sql and "'paused'" in sql
    assert json.loads(json.dumps(t.metrics)) == {"eval_loss": 2.5, "steps": 30}
