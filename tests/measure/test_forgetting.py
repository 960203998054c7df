"""Forgetting: exactly 0 for an untouched adapter, an unbiased estimate of KL(base || adapted) on text the base
model samples, measured once per trial at its end on either engine, kept per study, re-measured from saved
adapters when its settings change, and reported (column, figure, sentence, max_forgetting)."""

from __future__ import annotations

import dataclasses
import json
import math

import pytest
import tiny_models
import torch
from toys import SPEC, setup, toy_set

from loraplace.core.config import StudyConfig, TrainSpec
from loraplace.model.anatomy import analyze
from loraplace.placement.resolve import resolve
from loraplace.placement.strategy import Strategy
from loraplace.measure import forgetting as FG
from loraplace.study import workspace as W
from loraplace.study.run import run_study
from loraplace.store.db import Store
from loraplace.train import segments, sequential
from loraplace.train.generate import sample
from loraplace.train.loss import evaluate
from loraplace.train.trial import Trial

PAD = 0


def _fset(model, n: int, length: int) -> FG.ForgettingSet:
    seqs = sample(model, [1], n, length, seed=0)
    f = FG.ForgettingSet("k", "base", seqs, 0.0, 0, 64, PAD, "cpu")
    ev = evaluate(model, f.tokenized, 64, PAD)
    f.base_loss, f.tokens = ev["eval_loss"], ev["eval_tokens"]
    return f


def test_an_adapter_whose_b_is_still_zero_forgets_exactly_nothing():
    model = tiny_models.build("llama")
    f = _fset(model, 8, 16)
    s = setup(model, toy_set(21), TrainSpec(**SPEC))
    trial = Trial.start(s, resolve(Strategy("all", "all"), analyze(model), rank=4, alpha=8), seed=0)
    with trial.attached(s) as peft_model:
        assert f.measure(peft_model)["forgetting"] == 0.0  # B = 0: the adapted model is the base, bit for bit


def test_sampling_is_seeded_and_has_the_asked_shape():
    model = tiny_models.build("llama")
    a, b = sample(model, [1], 5, 7, seed=3), sample(model, [1], 5, 7, seed=3)
    assert a == b and len(a) == 5 and all(len(s) == 7 and s[0] == 1 for s in a)
    assert sample(model, [1], 5, 7, seed=4) != a


def test_forgetting_on_base_samples_estimates_kl_base_to_adapted():
    """On text sampled from the base model p, the mean of log p - log q per token estimates KL(p || q): checked
    against the exact KL of the first sampled token's distribution (one token after the start), and, for
    longer sequences, against the exact per-position conditional KLs along the same samples."""
    torch.manual_seed(0)
    base = tiny_models.build("llama")
    s = setup(base, toy_set(21), TrainSpec(**{**SPEC, "lr": 5e-2}))
    trial = sequential.start(s, resolve(Strategy("all", "all"), analyze(base), rank=4, alpha=8), seed=0)
    sequential.advance(s, [trial], 12)  # a trained adapter: q differs from p
    for length, n in ((2, 4000), (4, 1500)):
        f = _fset(base, n, length)
        with trial.attached(s) as q, torch.no_grad():
            est = f.measure(q)["forgetting"]
            ids = torch.tensor(f.sequences)
            lq = torch.log_softmax(q(input_ids=ids).logits.float(), -1)
        with torch.no_grad():
            lp = torch.log_softmax(base(input_ids=ids).logits.float(), -1)
        tgt = ids[:, 1:]
        per_token = (lp[:, :-1].gather(-1, tgt[..., None]) - lq[:, :-1].gather(-1, tgt[..., None])).squeeze(-1)
        assert est == pytest.approx(float(per_token.mean()), rel=1e-4)  # the measured number is this mean
        exact = (lp[:, :-1].exp() * (lp[:, :-1] - lq[:, :-1])).sum(-1)  # KL(p || q) at each position, given the prefix
        se = float(per_token.std()) / math.sqrt(per_token.numel())
        assert abs(est - float(exact.mean())) < 4 * se, (length, est, float(exact.mean()), se)
        assert float(exact.mean()) > 6 * se  # the adapter changed the model: a real difference was estimated


# -- in studies -----------------------------------------------------------------------------------------------------
def _cfg(tmp_path, out="study", **over) -> StudyConfig:
    data = {
        "out": str(tmp_path / out), "strategies": ["all_linear", "attention_only", "mlp_only"], "seeds": [0, 1],
        "data": {"limit": 60, "eval_size": 12, "max_length": 96},
        "train": {"steps": 6, "batch_size": 4, "rank": 4, "alpha": 8, "lr": 3e-2},
        "eval": {"batch_size": 8, "forgetting_size": 6, "forgetting_length": 12},
    }
    for k, v in over.items():
        data[k] = {**data.get(k, {}), **v} if isinstance(v, dict) else v
    return StudyConfig.from_dict(data)


def _model():
    return tiny_models.build("llama"), tiny_models.tokenizer()


@pytest.mark.slow
def test_a_study_measures_forgetting_once_per_trial_on_one_stored_set(tmp_path, monkeypatch, capsys):
    from loraplace.cli import main

    cfg = _cfg(tmp_path)
    records = run_study(cfg, _model())
    with Store.open(cfg.out, create=False) as store:
        meta = store.get_meta("forgetting")
    assert len(meta["sequences"]) == 6 and all(len(q) == 12 for q in meta["sequences"]) and meta["source"] == "base"
    for r in records:
        assert r.measured == {"forgetting": meta["key"]}
        assert r.metrics["forgetting"] == pytest.approx(r.metrics["forgetting_loss"] - meta["base_loss"])
        # a trained adapter moved the model (6 x 12 sampled tokens: the estimate may fall either side of the KL)
        assert r.metrics["forgetting"] != 0 and r.metrics["forgetting_time_s"] >= 0
    # the set is kept: a resumed study samples nothing again
    monkeypatch.setattr(FG, "sample", lambda *a, **k: pytest.fail("the forgetting set was sampled again"))
    run_study(cfg, _model())
    # other forgetting settings: the done trials are measured again from their saved adapters, not retrained
    monkeypatch.undo()
    monkeypatch.setattr(segments, "run_to", lambda *a, **k: pytest.fail("a finished trial was trained again"))
    again = run_study(_cfg(tmp_path, eval={"forgetting_size": 4}), _model())
    with Store.open(cfg.out, create=False) as store:
        new = store.get_meta("forgetting")
    assert new["key"] != meta["key"] and len(new["sequences"]) == 4
    assert all(r.measured == {"forgetting": new["key"]} for r in again)
    assert [r.trial_id for r in again] == [r.trial_id for r in records]  # not part of a trial's identity
    # the report: a column, a figure, the sentence
    assert main(["report", cfg.out]) == 0
    out = capsys.readouterr().out
    assert "Forgetting (nats/tok)" in out and "Δ forgetting vs baseline" in out and "Forgetting: Of the strategies" in out
    assert (tmp_path / "study" / "report" / "forgetting.png").is_file()


@pytest.mark.slow
def test_fused_trials_forget_what_sequential_ones_do(tmp_path):
    seq = run_study(_cfg(tmp_path, "seq"), _model())
    fused = run_study(_cfg(tmp_path, "fused", train={"fuse": 3}), _model())
    for a, b in zip(seq, fused):
        assert b.metrics["fused_trials"] == 3
        assert b.metrics["forgetting"] == pytest.approx(a.metrics["forgetting"], rel=1e-3, abs=1e-6)


@pytest.mark.slow
def test_forgetting_from_a_file_is_the_rise_in_loss_on_its_text(tmp_path):
    text = tmp_path / "general.jsonl"
    lines = [f"line {i}: the quick brown fox jumps over the lazy dog" for i in range(10)]
    text.write_text("".join(json.dumps({"text": t}) + "\n" for t in lines))
    cfg = _cfg(tmp_path, eval={"forgetting_source": str(text), "forgetting_size": 5, "forgetting_length": 20})
    records = run_study(cfg, _model())
    with Store.open(cfg.out, create=False) as store:
        meta = store.get_meta("forgetting")
    tok = tiny_models.tokenizer()
    assert meta["source"] == str(text) and meta["sequences"] == [tok(t)["input_ids"][:20] for t in lines[:5]]
    base = evaluate(tiny_models.build("llama"), FG.ForgettingSet("k", "f", meta["sequences"], 0, 0, 8, PAD,
                                                                  "cpu").tokenized, 8, tok.pad_token_id)
    assert meta["base_loss"] == pytest.approx(base["eval_loss"], rel=1e-5)  # the base model's loss on every token
    for r in records:
        assert r.metrics["forgetting"] == pytest.approx(r.metrics["forgetting_loss"] - meta["base_loss"])


def test_max_forgetting_leaves_strategies_out_of_the_recommendation(tmp_path):
    from fake_study import FORGET, make_study

    from loraplace.analysis.from_store import analyze_store

    with Store.open(make_study(tmp_path / "free", forgetting=True), create=False) as store:
        free = analyze_store(store)
    assert free.recommendation.strategy == "attention_only"  # the cheapest that keeps the loss
    assert "top_half" not in free.least_forgetting and "all_linear forgets least" in free.least_forgetting
    cap = (max(FORGET["all_linear"]) + min(FORGET["attention_only"])) / 2  # between the two
    with Store.open(make_study(tmp_path / "capped", forgetting=True, max_forgetting=cap), create=False) as store:
        capped = analyze_store(store)
    assert capped.recommendation.strategy == "all_linear"
    assert any(e.startswith("attention_only") and "left out: it forgets" in e for e in capped.recommendation.evidence)
    with Store.open(make_study(tmp_path / "none", forgetting=True, max_forgetting=0.001), create=False) as store:
        none = analyze_store(store)
    assert not none.recommendation.decided and "analysis.max_forgetting" in none.recommendation.text


def test_a_built_in_models_forgetting_set_is_sampled_once_for_every_study(tmp_path, monkeypatch):
    """A study of a built-in model (fixed weights) keeps its sampled set in loraplace's cache: a second study in
    another directory reads the same sequences instead of sampling; a local model is never shared."""
    monkeypatch.setenv("LORAPLACE_CACHE", str(tmp_path / "cache"))
    monkeypatch.setitem(FG.ALIASES, "tiny", object())  # as if "tiny" were a built-in alias ...
    build = W.Workspace.build.__func__
    monkeypatch.setattr(W.Workspace, "build", classmethod(  # ... that the study loaded by its name
        lambda cls, cfg, given=None: dataclasses.replace(build(cls, cfg, given), named=True)))
    first = _cfg(tmp_path, out="one", model="tiny", strategies=["all_linear"], seeds=[0])
    run_study(first, _model())
    with Store.open(first.out, create=False) as store:
        meta = store.get_meta("forgetting")
    shared = FG.shared_file(first, meta["key"])
    assert shared.is_file() and json.loads(shared.read_text())["sequences"] == meta["sequences"]
    monkeypatch.setattr(FG, "sample", lambda *a, **k: pytest.fail("the forgetting set was sampled again"))
    second = _cfg(tmp_path, out="two", model="tiny", strategies=["attention_only"], baseline="attention_only", seeds=[0])
    run_study(second, _model())
    with Store.open(second.out, create=False) as store:
        assert store.get_meta("forgetting")["sequences"] == meta["sequences"]
    assert FG.shared_file(_cfg(tmp_path, model="./my-model"), meta["key"]) is None
    # a model handed in under a built-in alias's name never writes the shared set (it may be any weights)
    monkeypatch.undo()
    monkeypatch.setenv("LORAPLACE_CACHE", str(tmp_path / "cache2"))
    run_study(_cfg(tmp_path, out="three", strategies=["all_linear"], seeds=[0]), _model())  # cfg.model: the default alias
    assert not (tmp_path / "cache2" / "forgetting").exists()
