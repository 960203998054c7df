"""The probe and the placements built on it: scores, auto and random:K at a budget, the verdict, end to end."""

from __future__ import annotations

import math
import random

import pytest
import tiny_models
import torch

from loraplace.analysis.verdict import probe_verdict
from loraplace.cli import main
from loraplace.core.config import ConfigError, StudyConfig
from loraplace.data.batches import batches, train_batches
from loraplace.placement.peft import apply, lora_layers
from loraplace.placement.resolve import BUDGET_TOLERANCE, resolve
from loraplace.placement.select import auto_placement, random_placement
from loraplace.placement.strategy import PlacementError, get_strategy
from loraplace.measure import probe as P
from loraplace.measure import probe_scores as PS
from loraplace.study.plan import resolve_placements
from loraplace.store.db import Store, TrialRecord
from loraplace.study.workspace import Workspace
from loraplace.train.loss import target_nll, target_positions


def _cfg(tmp_path, **over) -> StudyConfig:
    data = {
        "out": str(tmp_path / "study"),
        "data": {"limit": 80, "eval_size": 16, "max_length": 96},
        "train": {"steps": 3, "batch_size": 4, "rank": 4, "alpha": 8, "lr": 1e-2},
        "eval": {"batch_size": 8},
        "probe": {"steps": 3, "score_batches": 2},
    }
    data.update(over)
    return StudyConfig.from_dict(data)


@pytest.fixture(scope="module")
def ws(tmp_path_factory):
    cfg = _cfg(tmp_path_factory.mktemp("ws"))
    return Workspace.build(cfg, (tiny_models.build("llama"), tiny_models.tokenizer()))


def _cost(anat, name, rank):
    layer = anat.layer(name)
    return rank * (layer.in_features + layer.out_features)


# -- scores ------------------------------------------------------------------------------------
def test_probe_scores_every_module_by_every_criterion_and_leaves_the_base_pristine(ws):
    before = {k: v.clone() for k, v in ws.model.state_dict().items()}
    rows, info = P.run_probe(ws.setup, ws.anatomy, ws.cfg, 0)
    assert all(torch.equal(before[k], v) for k, v in ws.model.state_dict().items())
    assert not any("lora" in n for n, _ in ws.model.named_modules())  # unloaded
    modules = {l.name for l in ws.anatomy.layers}
    assert len(modules) == 14 and len(rows) == 14 * len(PS.CRITERIA)
    assert {(r[2], r[3]) for r in rows} == {(m, c) for m in modules for c in PS.CRITERIA}
    assert all((r[0], r[1]) == (ws.anatomy.layer(r[2]).block, ws.anatomy.layer(r[2]).role) for r in rows)
    assert all(math.isfinite(r[4]) and r[4] > 0 for r in rows)
    assert info["steps"] == 3 and info["rank"] == 4 and info["time_s"] > 0
    again, _ = P.run_probe(ws.setup, ws.anatomy, ws.cfg, 0)
    other, _ = P.run_probe(ws.setup, ws.anatomy, ws.cfg, 1)
    assert again == rows and other != rows  # deterministic per seed; seeds differ


def test_lora_drop_matches_a_direct_computation(ws):
    torch.manual_seed(0)
    placement = resolve(get_strategy("all_linear"), ws.anatomy, rank=4, alpha=8)
    peft_model = apply(ws.model, placement)
    try:
        layers = lora_layers(peft_model)
        for layer in layers.values():  # B starts at 0; give it values so the norm is not trivially 0
            torch.nn.init.normal_(layer.lora_B["default"].weight, std=0.1)
        batch = next(batches(ws.train_set, 4, seed=0, pad_id=ws.tokenizer.pad_token_id))
        inputs = {}
        hooks = [l.register_forward_pre_hook(lambda m, args, n=n: inputs.__setitem__(n, args[0].detach()))
                 for n, l in layers.items()]
        with torch.no_grad():
            target_nll(peft_model, batch)
        for h in hooks:
            h.remove()
        got = P.lora_drop(peft_model, [batch])
        select, _ = target_positions(batch["labels"])
        for n, layer in layers.items():
            a, b = layer.lora_A["default"].weight, layer.lora_B["default"].weight
            delta = inputs[n] @ a.T @ b.T * layer.scaling["default"]  # (batch, seq, out)
            want = float(delta.detach().norm(dim=-1)[select].mean())
            assert got[n] == pytest.approx(want, rel=1e-5), n
    finally:
        peft_model.unload()


def test_grad_norm_of_a_one_step_probe_is_the_norm_of_the_first_gradient(ws, tmp_path):
    cfg = _cfg(tmp_path, probe={"steps": 1, "score_batches": 1})
    rows, _ = P.run_probe(ws.setup, ws.anatomy, cfg, 3)
    got = {r[2]: r[4] for r in rows if r[3] == "grad_norm"}
    fisher = {r[2]: r[4] for r in rows if r[3] == "fisher"}
    torch.manual_seed(3)  # what run_probe does before wrapping: the same lora_A init
    placement = resolve(get_strategy("all_linear"), ws.anatomy, rank=4, alpha=8)  # alpha/r as the trials'
    peft_model = apply(ws.model, placement)
    try:
        batch = next(train_batches(ws.train_set, cfg.train.batch_size, 3, ws.tokenizer.pad_token_id, 1))
        nll, n = target_nll(peft_model, batch)
        (nll / n).backward()
        for name, layer in lora_layers(peft_model).items():
            gb, ga = layer.lora_B["default"].weight.grad, layer.lora_A["default"].weight.grad
            assert got[name] == pytest.approx(float(gb.norm()), rel=1e-4)
            assert fisher[name] == pytest.approx(float(gb.pow(2).sum() + ga.pow(2).sum()), rel=1e-4)
    finally:
        peft_model.unload()


def test_a_probe_step_in_row_groups_scores_the_whole_steps_gradient(ws, monkeypatch):
    from loraplace.train import loss as L

    whole, _ = P.run_probe(ws.setup, ws.anatomy, ws.cfg, 0)
    groups = []
    target_nll = L.target_nll
    monkeypatch.setattr(L, "target_nll", lambda m, b: groups.append(len(b["input_ids"])) or target_nll(m, b))
    monkeypatch.setattr(L, "HEAD_BYTES", 1)  # every row its own forward and backward
    split, _ = P.run_probe(ws.setup, ws.anatomy, ws.cfg, 0)
    assert groups and set(groups) == {1}
    assert [r[:4] for r in split] == [r[:4] for r in whole]
    assert [r[4] for r in split] == pytest.approx([r[4] for r in whole], rel=1e-4)  # per step, not per row group


def test_spearman_agrees_with_scipy_including_ties():
    from scipy import stats

    rng = random.Random(0)
    for _ in range(20):
        a = [rng.choice([0.1, 0.2, 0.3, rng.random()]) for _ in range(15)]
        b = [x + rng.gauss(0, 0.2) for x in a]
        assert PS.spearman(a, b) == pytest.approx(stats.spearmanr(a, b).statistic, abs=1e-12)
    assert math.isnan(PS.spearman([1, 1, 1], [1, 2, 3]))


def test_probe_scores_aggregate_across_seeds():
    rows = [(s, b, "attn.q", f"m{b}", "lora_drop", v) for s, vals in ((0, [1.0, 2.0, 3.0]), (1, [3.0, 2.0, 1.0]))
            for b, v in enumerate(vals)]
    ps = PS.ProbeScores("k", rows, {"seeds": {"0": {"time_s": 2.0}, "1": {"time_s": 3.0}}})
    assert ps.seeds == [0, 1] and ps.time_s == 5.0
    assert ps.only([1]).seeds == [1] and ps.only([1]).time_s == 3.0 and ps.only([1]).spread("lora_drop") is None
    assert ps.mean("lora_drop") == {"m0": 2.0, "m1": 2.0, "m2": 2.0}
    assert ps.spread("lora_drop")["m0"] == pytest.approx(math.sqrt(2))
    assert ps.rank_correlation("lora_drop") == [(0, 1, pytest.approx(-1.0))]
    assert "block" in ps.table("lora_drop") and "±71%" in ps.table("lora_drop")
    with pytest.raises(PS.ProbeError, match="no 'fisher' scores"):
        ps.mean("fisher")


# -- auto and random placements ----------------------------------------------------------------
def _random_scores(anat, seed=0):
    rng = random.Random(seed)
    return {l.name: rng.random() for l in anat.layers}


@pytest.mark.parametrize("budget_of", ["attention_only", "mlp_only", "qv_only"])
def test_auto_meets_the_budget_and_takes_the_top_scored_modules_that_fit(ws, budget_of):
    anat = ws.anatomy
    target = resolve(get_strategy(budget_of), anat, rank=4).trainable_params
    scores = _random_scores(anat)
    p = auto_placement(anat, scores, target, rank=4, alpha=8)
    assert abs(p.trainable_params - target) <= BUDGET_TOLERANCE * target
    assert set(p.modules.values()) == {4}
    best = max(scores, key=scores.get)
    assert best in p.modules
    # a higher-scored module is left out only when it costs more than every lower-scored one taken
    for u in set(scores) - set(p.modules):
        for c in p.modules:
            if scores[u] > scores[c]:
                assert _cost(anat, u, 4) > _cost(anat, c, 4), (u, c)
    # with equal costs auto is exactly the top-k: restrict the scores to the 4 same-width q/o modules
    qo = {n: s for n, s in scores.items() if anat.layer(n).role in ("attn.q", "attn.o")}
    only_qo = {n: (s + 10 if n in qo else s) for n, s in scores.items()}
    two = auto_placement(anat, only_qo, 2 * _cost(anat, next(iter(qo)), 4), rank=4, alpha=8)
    assert set(two.modules) == set(sorted(qo, key=qo.get)[-2:])


def test_auto_rank_spreads_the_budget_over_every_module_in_proportion_to_its_score(ws):
    anat = ws.anatomy
    target = resolve(get_strategy("all_linear"), anat, rank=4).trainable_params // 2
    scores = {n: 0.5 + s for n, s in _random_scores(anat, seed=3).items()}  # 0.5-1.5: ranks from ~1x to ~3x
    p = auto_placement(anat, scores, target, rank=4, alpha=8, allocate="rank")
    assert set(p.modules) == {l.name for l in anat.layers}  # every module
    assert abs(p.trainable_params - target) <= BUDGET_TOLERANCE * target
    assert len(set(p.modules.values())) > 2  # not uniform
    # ranks are the scores times one factor, rounded (and nudged by at most one rank to meet the budget)
    f = sum(p.modules.values()) / sum(scores.values())
    assert all(abs(r - f * scores[n]) <= 1.5 for n, r in p.modules.items()), (f, p.modules)
    assert p.strategy.name == "auto" and "proportional" in p.strategy.description
    # the placement the executor rebuilds from the ranks is the same
    again = resolve(p.strategy, anat, rank=4, alpha=8, ranks=p.modules)
    assert again.modules == p.modules and again.trainable_params == p.trainable_params
    # a module the probe scored 0 still trains at rank 1; no score above 0 is an error
    zero = dict(scores, **{next(iter(scores)): 0.0})
    assert auto_placement(anat, zero, target, rank=4, alpha=8, allocate="rank").modules[next(iter(scores))] == 1
    with pytest.raises(PlacementError, match="one above 0"):
        auto_placement(anat, dict.fromkeys(scores, 0.0), target, rank=4, alpha=8, allocate="rank")
    with pytest.raises(PlacementError, match="unreachable"):
        auto_placement(anat, scores, 10, rank=4, alpha=8, allocate="rank")


def test_auto_strategies_named_by_allocation_and_score_share_one_study(ws, tmp_path):
    anat = ws.anatomy
    names = ["auto", "auto:rank", "auto:subset:grad_norm", "auto:rank:grad_norm", "all_linear"]
    cfg = _cfg(tmp_path, strategies=names, auto={"budget": "same:attention_only"})
    scores = {"lora_drop": _random_scores(anat, 1), "grad_norm": _random_scores(anat, 2)}
    placements = resolve_placements(cfg, anat, scores)
    target = resolve(get_strategy("attention_only"), anat, rank=4).trainable_params
    for name in names[:4]:
        assert abs(placements[name].trainable_params - target) <= BUDGET_TOLERANCE * target, name
    assert placements["auto"].modules == auto_placement(anat, scores["lora_drop"], target, rank=4).modules
    assert placements["auto:subset:grad_norm"].modules == auto_placement(anat, scores["grad_norm"], target, rank=4).modules
    for name, crit in (("auto:rank", "lora_drop"), ("auto:rank:grad_norm", "grad_norm")):
        assert placements[name].modules == auto_placement(anat, scores[crit], target, rank=4, allocate="rank").modules
    assert placements["auto:rank"].modules != placements["auto:rank:grad_norm"].modules
    # auto.allocate=rank makes plain auto spread ranks; an explicit :subset still overrides it
    ranked = _cfg(tmp_path, strategies=["auto", "auto:subset"], auto={"budget": "same:attention_only", "allocate": "rank"})
    both = resolve_placements(ranked, anat, scores)
    assert both["auto"].modules == placements["auto:rank"].modules
    assert both["auto:subset"].modules == placements["auto"].modules
    # a missing criterion is named
    with pytest.raises(PlacementError, match="grad_norm"):
        resolve_placements(cfg, anat, {"lora_drop": scores["lora_drop"]})
    for bad, says in (("auto:magic", "not a probe score"), ("auto:rank:subset", "expected auto:ALLOCATE"),
                      ("auto:rank:fisher:x", "expected auto:ALLOCATE")):
        with pytest.raises(ConfigError, match=says):
            _cfg(tmp_path, strategies=[bad])
    with pytest.raises(ConfigError, match="auto.allocate"):
        _cfg(tmp_path, auto={"allocate": "spread"})


def test_random_draws_differ_are_deterministic_and_meet_the_budget(ws):
    anat = ws.anatomy
    target = resolve(get_strategy("attention_only"), anat, rank=4).trainable_params
    draws = [random_placement(anat, k, target, rank=4, alpha=8) for k in range(3)]
    sets = [frozenset(d.modules) for d in draws]
    assert len(set(sets)) == 3
    assert all(abs(d.trainable_params - target) <= BUDGET_TOLERANCE * target for d in draws)
    assert [frozenset(random_placement(anat, k, target, rank=4, alpha=8).modules) for k in range(3)] == sets
    assert [d.strategy.name for d in draws] == ["random:0", "random:1", "random:2"]


def test_resolve_placements_with_auto_random_and_same_auto(ws, tmp_path):
    anat = ws.anatomy
    cfg = _cfg(tmp_path, strategies=["auto", "random:0", "random:1", "all_linear", "mlp_only"],
               budget="same:auto", auto={"budget": "same:attention_only"})
    placements = resolve_placements(cfg, anat, {"lora_drop": _random_scores(anat)})
    assert list(placements) == cfg.strategies
    target = resolve(get_strategy("attention_only"), anat, rank=4).trainable_params
    auto = placements["auto"].trainable_params
    for name in ("auto", "random:0", "random:1"):
        assert abs(placements[name].trainable_params - target) <= BUDGET_TOLERANCE * target
    for name in ("all_linear", "mlp_only"):  # the fixed strategies budget-matched to auto's count
        assert abs(placements[name].trainable_params - auto) <= BUDGET_TOLERANCE * auto
    # a trial rebuilds the same placement from its ranks (what the executor does)
    again = resolve(get_strategy("auto"), anat, rank=4, alpha=8, ranks=placements["auto"].modules)
    assert again.modules == placements["auto"].modules
    with pytest.raises(PlacementError, match="needs probe scores"):
        resolve_placements(cfg, anat)
    with pytest.raises(PlacementError, match="need a budget"):
        resolve_placements(_cfg(tmp_path, strategies=["random:0"]), anat)
    with pytest.raises(PlacementError, match="chosen per study"):
        resolve(get_strategy("auto"), anat)


def test_config_checks_auto_and_probe_settings(tmp_path):
    with pytest.raises(ConfigError, match="auto.score"):
        _cfg(tmp_path, auto={"score": "magic"})
    with pytest.raises(ConfigError, match="define.auto"):
        _cfg(tmp_path, define={"auto": {"roles": "attn"}})
    with pytest.raises(ConfigError, match="probe.seeds"):
        _cfg(tmp_path, probe={"seeds": [0, 0]})
    assert StudyConfig.load(overrides=["probe.steps=7", "auto.budget=1M"]).probe.steps == 7


# -- stored, reused, reported -------------------------------------------------------------------
def test_probe_is_stored_and_reused(ws, tmp_path, monkeypatch):
    cfg = _cfg(tmp_path, probe={"steps": 2, "seeds": [0], "score_batches": 1})
    with Store.open(cfg.out) as store:
        first = P.ensure_probe(cfg, ws, store)
        calls = []
        real = P.run_probe
        monkeypatch.setattr(P, "run_probe", lambda *a, **k: calls.append(a[3]) or real(*a, **k))
        assert P.ensure_probe(cfg, ws, store).rows == first.rows and calls == []  # reused
        more = _cfg(tmp_path, probe={"steps": 2, "seeds": [0, 1], "score_batches": 1})
        both = P.ensure_probe(more, ws, store)
        assert calls == [1] and both.seeds == [0, 1] and PS.probe_key(more) == first.key
        other = P.ensure_probe(_cfg(tmp_path, probe={"steps": 3, "seeds": [0], "score_batches": 1}), ws, store)
        assert other.key != first.key and calls == [1, 0]
        latest = PS.load(store)
        assert latest.key == other.key and len(store.probe_rows(first.key)) == 2 * 14 * 3


def _trial(strategy, seed, loss, **metrics):
    return TrialRecord("x", strategy, seed, "done", metrics={"eval_loss": loss, "train_time_s": 10.0, **metrics})


def test_verdict_says_whether_auto_beats_random_whatever_the_answer():
    zs = 3.0
    base = [_trial("all_linear", s, 2.0 + 0.01 * s) for s in range(3)]
    randoms = [_trial(f"random:{k}", s, 2.5 + 0.01 * k + 0.02 * s) for k in range(3) for s in range(3)]
    better = probe_verdict(base + randoms + [_trial("auto", s, 2.2 + 0.015 * s) for s in range(3)], zs)
    assert better.text.startswith("auto beats random placement at equal budget")
    assert better.vs_random.diff.hi < 0 and better.retained_auto.mean == pytest.approx(0.8, abs=0.01)
    worse = probe_verdict(base + randoms + [_trial("auto", s, 2.8 + 0.01 * s) for s in range(3)], zs)
    assert worse.text.startswith("auto does worse than random")
    same = probe_verdict(base + randoms + [_trial("auto", s, 2.51 + (-1) ** s * 0.05) for s in range(3)], zs)
    assert same.text.startswith("auto does not beat random")
    alone = probe_verdict(base + [_trial("auto", 0, 2.2)], zs)
    assert alone.vs_random is None and "no finished random:K draw" in alone.text
    assert probe_verdict(base, zs) is None


def test_verdict_on_accuracy_counts_higher_as_better():
    def acc(strategy, seed, value):
        return _trial(strategy, seed, 2.0, accuracy=value)

    base = [acc("all_linear", s, 0.5 + 0.01 * s) for s in range(3)]
    randoms = [acc(f"random:{k}", s, 0.3 + 0.01 * k + 0.02 * s) for k in range(3) for s in range(3)]
    autos = [acc("auto", s, 0.45 + 0.015 * s) for s in range(3)]
    v = probe_verdict(base + randoms + autos, 0.1, metric="accuracy")
    assert v.text.startswith("auto beats random placement") and "Δ accuracy" in v.text
    assert v.vs_random.diff.lo > 0 and 0.8 < v.retained_auto.mean < 0.9  # (0.45 - 0.1) / (0.5 - 0.1) at seed 0
    assert probe_verdict(base + randoms + autos, 0.1).text.startswith("auto does not beat")  # the losses are equal


@pytest.mark.slow
def test_cli_probe_plan_study_report_with_auto(capsys, tmp_path):
    model_dir = tiny_models.save("llama", tmp_path / "tiny")
    out = tmp_path / "s"
    common = [f"model={model_dir}", f"out={out}", "data.limit=60", "data.eval_size=12", "train.batch_size=4",
              "train.rank=4", "probe.steps=2", "probe.score_batches=1"]
    assert main(["plan", "--strategies", "auto", *common, "auto.budget=same:attention_only"]) == 2
    assert "needs the probe's scores" in capsys.readouterr().err
    assert main(["probe", *common]) == 0
    text = capsys.readouterr().out
    assert "lora_drop by block and role" in text and "mlp.down" in text and "Spearman rho" in text
    assert main(["plan", "--strategies", "auto,random:0", *common, "auto.budget=same:attention_only"]) == 0
    text = capsys.readouterr().out
    assert "auto chose" in text and "filled to same:attention_only" in text
    argv = ["study", *common, "strategies=[auto,auto:rank,random:0,random:1,random:2,all_linear]", "seeds=[0,1]",
            "train.steps=2", "budget=same:auto", "auto.budget=same:attention_only"]
    assert main(argv) == 0
    text = capsys.readouterr().out
    assert "Probe verdict:" in text
    assert main(["report", str(out)]) == 0
    capsys.readouterr()
    md = (out / "report" / "report.md").read_text()
    html = (out / "report" / "report.html").read_text()
    assert (out / "report" / "probe.png").is_file() and "![probe](probe.png)" in md
    assert "Probe verdict: auto vs random at equal budget" in md and "Probe verdict" in html
    assert "random draws" in md and "Spearman rho" in md
    with Store.open(out, create=False) as store:
        trials = [t for t in store.trials() if t.status == "done"]
        assert {t.strategy for t in trials} == {"auto", "auto:rank", "random:0", "random:1", "random:2", "all_linear"}
        auto = next(t for t in trials if t.strategy == "auto")
        probe = PS.load(store)
        cfg = store.study_config()
    # the stored auto trial adapted exactly the modules auto_placement picks from the stored probe scores
    from loraplace.model.anatomy import analyze
    from loraplace.study.plan import selected_budget

    anat = analyze(tiny_models.build("llama"))
    expected = auto_placement(anat, probe.mean(cfg.auto.score), selected_budget(cfg, anat), rank=4, alpha=cfg.train.alpha)
    assert auto.placement["strategy"] == "auto"
    assert {n: m["rank"] for n, m in auto.placement["modules"].items()} == expected.modules
    # auto:rank trained every module at the ranks allocate=rank gives, and its PEFT export rebuilds exactly those
    spread = auto_placement(anat, probe.mean(cfg.auto.score), selected_budget(cfg, anat), rank=4, allocate="rank")
    ranked = next(t for t in trials if t.strategy == "auto:rank")
    assert {n: m["rank"] for n, m in ranked.placement["modules"].items()} == spread.modules
    assert main(["export", str(out), "--strategy", "auto:rank", "--format", "peft"]) == 0
    import json

    from peft import LoraConfig, get_peft_model

    exported = json.loads(capsys.readouterr().out)
    exported.pop("peft_type")
    rebuilt = lora_layers(get_peft_model(tiny_models.build("llama"), LoraConfig(**exported)))
    assert {n: layer.r["default"] for n, layer in rebuilt.items()} == spread.modules
