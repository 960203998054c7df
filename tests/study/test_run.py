"""Study engine on a tiny model: trials x seeds stored, resumable, crash-safe, deterministic."""

from __future__ import annotations

import gc

import pytest
import tiny_models
import torch

from loraplace.core.config import StudyConfig
from loraplace.study import plan as P
from loraplace.study import run as S
from loraplace.study import workspace as W
from loraplace.store.db import Store
from loraplace.train import segments
from loraplace.train.trial import TrialError


def _cfg(tmp_path, **over) -> StudyConfig:
    data = {
        "out": str(tmp_path / "study"),
        "strategies": ["all_linear", "attention_only"],
        "seeds": [0, 1],
        "data": {"limit": 80, "eval_size": 16, "max_length": 96},
        "train": {"steps": 3, "batch_size": 4, "rank": 4, "alpha": 8, "lr": 1e-2},
        "eval": {"batch_size": 8},
    }
    for k, v in over.items():
        data[k] = v
    return StudyConfig.from_dict(data)


def _model():
    return tiny_models.build("llama"), tiny_models.tokenizer()


@pytest.mark.slow
def test_study_runs_every_trial_and_stores_it(tmp_path):
    from peft import PeftModel

    cfg = _cfg(tmp_path)
    model, tok = _model()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    records = S.run_study(cfg, (model, tok))
    assert [(r.strategy, r.seed, r.status) for r in records] == [
        ("all_linear", 0, "done"), ("attention_only", 0, "done"), ("all_linear", 1, "done"), ("attention_only", 1, "done")
    ]
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # base pristine
    assert gc.get_freeze_count() == 0  # the study froze the loaded objects only while it ran (train.memory.frozen_heap)
    with Store.open(cfg.out, create=False) as store:
        zero = store.get_meta("zero_shot")
        saved = store.study_config()
        rec = store.get(records[0].trial_id)
    assert saved == cfg  # the config goes into the store and comes back typed
    assert StudyConfig.load(tmp_path / "study" / "config.yaml") == cfg  # the resolved config, rerunnable
    assert "zero_shot_loss" not in rec.metrics and zero["eval_loss"] > 0 and len(rec.curve) == 3  # kept once, in meta
    assert rec.env["torch"] == torch.__version__ and rec.placement["strategy"] == "all_linear"
    loaded = PeftModel.from_pretrained(tiny_models.build("llama"), tmp_path / "study" / rec.adapter_path)
    assert sum(p.numel() for n, p in loaded.named_parameters() if "lora_" in n) == rec.metrics["trainable_params"]
    # the same seed gives the same numbers in a fresh study
    again = S.run_study(_cfg(tmp_path, out=str(tmp_path / "again"), strategies=["all_linear"], seeds=[0]), _model())
    assert again[0].metrics["eval_loss"] == records[0].metrics["eval_loss"]
    assert again[0].curve == records[0].curve
    assert records[0].metrics["eval_loss"] != records[2].metrics["eval_loss"]  # seed 1 differs


def test_rerun_skips_finished_trials(tmp_path, monkeypatch):
    cfg = _cfg(tmp_path, seeds=[0])
    S.run_study(cfg, _model())

    def boom(*a, **k):
        raise AssertionError("a finished trial was run again")

    monkeypatch.setattr(segments, "run_to", boom)
    records = S.run_study(cfg, _model())
    assert all(r.status == "done" for r in records)


@pytest.mark.slow
def test_interrupted_study_resumes_and_failures_are_recorded(tmp_path, monkeypatch):
    cfg = _cfg(tmp_path, seeds=[0], strategies=["all_linear", "attention_only", "mlp_only"])
    real = segments.run_to
    calls = []

    def flaky(shared, trials, *a, **k):  # how the executor trains a trial (to its end here: no racing)
        name = trials[0].placement.strategy.name
        calls.append(name)
        if name == "attention_only":
            raise TrialError("non-finite train loss (nan) at step 2")
        if name == "mlp_only" and calls.count("mlp_only") == 1:
            raise KeyboardInterrupt  # the process dies mid-trial
        return real(shared, trials, *a, **k)

    monkeypatch.setattr(segments, "run_to", flaky)
    with pytest.raises(KeyboardInterrupt):
        S.run_study(cfg, _model())
    with Store.open(cfg.out, create=False) as store:
        status = {t.strategy: (t.status, t.error) for t in store.trials()}
    assert status["all_linear"][0] == "done"
    assert status["attention_only"] == ("failed", "TrialError: non-finite train loss (nan) at step 2")
    assert status["mlp_only"] == ("pending", None)  # no half-written result; its claim is given back
    records = S.run_study(cfg, _model())
    assert {r.strategy: r.status for r in records} == {"all_linear": "done", "attention_only": "failed", "mlp_only": "done"}
    assert calls.count("all_linear") == 1 and calls.count("mlp_only") == 2


def test_changed_shared_setting_makes_new_trials(tmp_path):
    m = tiny_models.build("llama")
    from loraplace.model.anatomy import analyze

    anat = analyze(m)
    a = P.plan_trials(_cfg(tmp_path), P.resolve_placements(_cfg(tmp_path), anat))
    b = P.plan_trials(_cfg(tmp_path, train={"steps": 4}), P.resolve_placements(_cfg(tmp_path), anat))
    c = P.plan_trials(_cfg(tmp_path, out=str(tmp_path / "elsewhere")), P.resolve_placements(_cfg(tmp_path), anat))
    assert len({p.trial_id for p in a}) == 4
    assert not {p.trial_id for p in a} & {p.trial_id for p in b}
    assert [p.trial_id for p in a] == [p.trial_id for p in c]  # the output directory is not part of a trial


def test_budget_matched_study_resolves_ranks(tmp_path):
    cfg = _cfg(tmp_path, budget="same:all_linear", strategies=["attention_only", "mlp_only"])
    from loraplace.model.anatomy import analyze

    anat = analyze(tiny_models.build("llama"))
    placements = P.resolve_placements(cfg, anat)
    target = P.resolve_placements(_cfg(tmp_path, strategies=["all_linear"]), anat)["all_linear"].trainable_params
    assert all(abs(p.trainable_params - target) <= 0.05 * target for p in placements.values())


def test_trial_ids_ignore_int_vs_float_spelling(tmp_path):
    """A default of 32 and an override or YAML value of 32.0 are one setting, hence one trial."""
    from loraplace.model.anatomy import analyze

    anat = analyze(tiny_models.build("llama"))
    default = _cfg(tmp_path)
    spelled = StudyConfig.load(overrides=[f"{k}={v}" for k, v in {
        "out": default.out, "strategies": "[all_linear,attention_only]", "seeds": "[0,1]", "data.limit": 80,
        "data.eval_size": "16.0", "data.max_length": 96, "train.steps": 3, "train.batch_size": 4, "train.rank": 4,
        "train.alpha": "8.0", "train.lr": 1e-2, "eval.batch_size": 8}.items()])
    ids = [[p.trial_id for p in P.plan_trials(c, P.resolve_placements(c, anat))] for c in (default, spelled)]
    assert ids[0] == ids[1]


def test_analysis_counts_only_the_latest_configs_trials(tmp_path):
    from loraplace.analysis.from_store import analyze_store

    with Store.open(tmp_path) as store:
        for tid, strategy, seed, loss in [("old", "all_linear", 0, 3.0), ("new0", "all_linear", 0, 2.0),
                                          ("new1", "all_linear", 1, 2.2), ("gone", "mlp_only", 0, 2.5)]:
            store.add_pending(tid, strategy, seed, {})
            store.mark_done(tid, {"eval_loss": loss, "trainable_params": 10}, [], {}, {})
        store.put_study_config(StudyConfig(strategies=["all_linear"]), ["new0", "new1"])
        a = analyze_store(store)
    assert [s.strategy for s in a.strategies] == ["all_linear"]
    assert a.get("all_linear").eval_loss.mean == pytest.approx(2.1)  # 'old' and 'gone' are not mixed in


@pytest.mark.slow
def test_zero_shot_accuracy_is_measured_once_and_reused(tmp_path, monkeypatch):
    calls = []  # (model class, number of examples) of every accuracy measurement of the base model
    real = W.answer_accuracy

    def counting(model, tok, prompts, *a, **k):
        if not type(model).__name__.startswith("Peft"):  # the base model; trials measure their adapted one
            calls.append((type(model).__name__, len(prompts)))
        return real(model, tok, prompts, *a, **k)

    monkeypatch.setattr(W, "answer_accuracy", counting)
    cfg = _cfg(tmp_path, seeds=[0], eval={"batch_size": 8, "accuracy": True, "accuracy_limit": 5, "max_new_tokens": 3},
               analysis={"metric": "accuracy"})
    records = S.run_study(cfg, _model())
    assert calls == [("LlamaForCausalLM", 5)]  # the base model, once, on the trials' 5 examples
    with Store.open(cfg.out, create=False) as store:
        zero = store.get_meta("zero_shot")
    assert zero["accuracy_n"] == 5 and zero["accuracy_key"] and zero["key"]
    # the stored numbers are what scoring the base model, and each trial's saved adapter, gives on those 5 examples
    from peft import PeftModel

    ws = W.Workspace.build(cfg, _model())
    assert ws.accuracy(ws.model) == {"accuracy": zero["accuracy"], "accuracy_n": 5}
    for r in records:
        loaded = PeftModel.from_pretrained(tiny_models.build("llama"), tmp_path / "study" / r.adapter_path)
        assert ws.accuracy(loaded) == {"accuracy": r.metrics["accuracy"], "accuracy_n": 5}
    n = len(calls)  # the check above measured the base model once more

    S.run_study(cfg, _model())  # resume: nothing to measure again
    assert len(calls) == n
    more = _cfg(tmp_path, seeds=[0], eval={"batch_size": 8, "accuracy": True, "accuracy_limit": 6, "max_new_tokens": 3})
    S.run_study(more, _model())  # other accuracy examples: the zero-shot accuracy is measured again, the loss kept
    assert calls[n:] == [("LlamaForCausalLM", 6)]
    with Store.open(cfg.out, create=False) as store:
        again = store.get_meta("zero_shot")
        from loraplace.analysis.from_store import analyze_store

        a = analyze_store(store, metric="accuracy")
    assert again["accuracy_n"] == 6 and again["key"] == zero["key"] and again["eval_loss"] == zero["eval_loss"]
    assert a.zero_shot_accuracy == again["accuracy"] and a.metric == "accuracy"


def test_accuracy_metric_needs_accuracy(tmp_path):
    from loraplace.core.config import ConfigError

    with pytest.raises(ConfigError, match="analysis.metric=accuracy needs eval.accuracy=true"):
        _cfg(tmp_path, analysis={"metric": "accuracy"})
    with pytest.raises(ConfigError, match="analysis.metric: 'f1' is not one of eval_loss, accuracy"):
        StudyConfig.load(overrides=["analysis.metric=f1"])
    cfg = StudyConfig.load(overrides=["analysis.metric=accuracy", "eval.accuracy=true"])
    assert cfg.analysis.metric == "accuracy" and StudyConfig.from_dict(cfg.to_dict()) == cfg


def test_a_rerun_in_bfloat16_measures_the_zero_shot_loss_again(tmp_path, monkeypatch):
    """The zero-shot loss is the reference of every retained improvement: a directory rerun in another dtype
    measures it again (its key holds train.dtype) instead of reusing the float32 one; the same dtype reuses it."""
    from toys import tiny_study

    from loraplace.measure import zero_shot as Z

    calls = []
    real = Z.evaluate

    def counting(model, *a, **k):
        calls.append(type(model).__name__)
        return real(model, *a, **k)

    monkeypatch.setattr(Z, "evaluate", counting)
    fp32 = tiny_study(tmp_path, ["all_linear"])
    S.run_study(fp32, _model())
    S.run_study(fp32, _model())  # a rerun: nothing to measure again
    assert calls == ["LlamaForCausalLM"]
    with Store.open(fp32.out, create=False) as store:
        first = store.get_meta("zero_shot")
    bf16 = tiny_study(tmp_path, ["all_linear"], train={"dtype": "bfloat16"})
    model, tok = _model()
    S.run_study(bf16, (model.to(torch.bfloat16), tok))  # as Workspace.build loads it in train.dtype
    assert calls == ["LlamaForCausalLM"] * 2
    with Store.open(bf16.out, create=False) as store:
        again = store.get_meta("zero_shot")
    ws = W.Workspace.build(bf16, (model, tok))
    assert again["key"] != first["key"] and again["eval_loss"] != first["eval_loss"]
    assert again["eval_loss"] == real(model, ws.eval_set, bf16.eval.batch_size, tok.pad_token_id, "cpu")["eval_loss"]


def test_each_piece_of_work_checks_the_base_against_the_workspaces_first_reading(tmp_path):
    from loraplace.study.executor import run_one
    from loraplace.train.guard import BaseWeightsChanged

    cfg = _cfg(tmp_path, strategies=["all_linear"], seeds=[0])
    ws = W.Workspace.build(cfg, _model())
    task = P.plan_trials(cfg, P.resolve_placements(cfg, ws.anatomy, None, None, None))[0]
    assert run_one(ws, task).result is not None  # reads the base as it is now (ws.base_fingerprint)
    with torch.no_grad():
        ws.model.lm_head.weight[0, 0] += 1.0  # changed between two pieces of work, outside any guard
    with pytest.raises(BaseWeightsChanged, match=f"during trial {task.trial_id}"):
        run_one(ws, task)
