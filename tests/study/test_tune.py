"""The learning-rate search's rules (study/tune.py): successive halving within a strategy, and the choice."""

from __future__ import annotations

import math
from dataclasses import replace

import pytest
import tiny_models
from toys import tiny_study

from loraplace.analysis.from_store import analyze_store
from loraplace.analysis.report import write_report
from loraplace.cli import main as main_cli
from loraplace.core.config import StudyConfig, TuneSpec
from loraplace.core.text import lr_text
from loraplace.model.anatomy import analyze
from loraplace.store.db import DONE, FAILED, STOPPED, Store
from loraplace.store.results import export_csv
from loraplace.study.plan import plan_trials, resolve_placements
from loraplace.study.run import run_study
from loraplace.study.tune import Choice, Halving, choose, cost, halve, halvings, rate_key, survivors
from loraplace.train import segments

GRID = [2e-4, 5e-4, 1.5e-3, 4e-3, 1e-2]


def test_labels_are_exact_and_readable():
    assert [lr_text(x) for x in GRID] == ["2e-4", "5e-4", "1.5e-3", "4e-3", "1e-2"]
    assert len({rate_key(x) for x in GRID}) == len(GRID)
    assert all(float(rate_key(x)) == x for x in GRID)


def test_survivors_is_a_share_rounded_up_with_a_floor():
    assert [survivors(n, 0.5, 1) for n in range(1, 7)] == [math.ceil(n / 2) for n in range(1, 7)]
    assert survivors(5, 0.5, 3) == 3 and survivors(2, 0.5, 3) == 2  # never more than there are
    assert survivors(4, 1.0, 1) == 4


def test_halving_keeps_the_best_rates_of_each_strategy_by_their_mean_over_seeds():
    # seed means: 2e-4: 3.0, 5e-4: 2.5, 1.5e-3: 2.0, 4e-3: 2.1, 1e-2: 4.0; seed 1 reorders 1.5e-3 and 4e-3 alone
    values = {"all_linear": {2e-4: {0: 3.0, 1: 3.0}, 5e-4: {0: 2.5, 1: 2.5}, 1.5e-3: {0: 1.9, 1: 2.1},
                             4e-3: {0: 2.2, 1: 2.0}, 1e-2: {0: 4.0, 1: 4.0}},
              "mlp_only": {2e-4: {0: 3.1, 1: 3.1}, 1e-2: {0: 2.9, 1: 2.9}}}
    d = halve(values, keep=0.5, min_keep=1, step=8, fraction=0.25)
    assert set(d.kept["all_linear"]) == {rate_key(x) for x in (1.5e-3, 4e-3, 5e-4)}  # ceil(2.5) = 3
    assert set(d.stopped["all_linear"]) == {rate_key(x) for x in (2e-4, 1e-2)}
    assert set(d.kept["mlp_only"]) == {rate_key(1e-2)} and set(d.stopped["mlp_only"]) == {rate_key(2e-4)}
    assert d.stops("all_linear", 1e-2) and not d.stops("all_linear", 4e-3)
    assert "only the best 3 go on" in d.stopped["all_linear"][rate_key(2e-4)]
    assert Halving.from_dict(d.to_dict()) == d


def test_halving_ranks_accuracy_the_other_way_round():
    values = {"s": {1e-3: {0: 0.2}, 1e-2: {0: 0.6}}}
    d = halve(values, keep=0.5, min_keep=1, step=4, fraction=0.5, metric="accuracy")
    assert set(d.kept["s"]) == {rate_key(1e-2)}


def test_the_choice_is_the_lowest_mean_selection_loss_and_says_when_it_is_an_edge():
    done = {2e-4: {0: {"eval_loss": 3.0}, 1: {"eval_loss": 2.8}}, 4e-3: {0: {"eval_loss": 2.0}, 1: {"eval_loss": 2.2}},
            1e-2: {0: {"eval_loss": 2.05}, 1: {"eval_loss": 2.1}}}
    c = choose("all_linear", GRID, done, stopped={5e-4: "stopped at step 8"}, failed={})
    assert c.lr == 1e-2 and c.edge == "highest"  # 2.075 < 2.1
    assert math.isclose(c.losses[rate_key(4e-3)], 2.1) and math.isclose(c.spread[rate_key(4e-3)], math.sqrt(0.02))
    assert c.stopped == {rate_key(5e-4): "stopped at step 8"}
    assert "highest of the grid" in c.edge_text() and "1e-2" in c.edge_text()
    assert Choice.from_dict(c.to_dict()) == c


def test_a_diverged_rate_is_not_chosen_and_max_forgetting_leaves_rates_out():
    done = {5e-4: {0: {"eval_loss": 2.5, "forgetting": 0.1}}, 4e-3: {0: {"eval_loss": 2.0, "forgetting": 0.5}},
            1e-2: {0: {"eval_loss": float("nan"), "forgetting": 3.0}}}
    c = choose("s", GRID, done, stopped={}, failed={2e-4: "non-finite train loss (nan) at step 3"})
    assert c.lr == 4e-3 and c.edge is None and rate_key(1e-2) not in c.losses
    limited = choose("s", GRID, done, stopped={}, failed={}, max_forgetting=0.2)
    assert limited.lr == 5e-4 and rate_key(4e-3) in limited.excluded
    nothing = choose("s", GRID, {}, stopped={}, failed={r: "diverged" for r in GRID})
    assert nothing.lr is None and nothing.edge_text() is None


def test_when_every_rate_forgets_too_much_the_best_is_still_chosen():
    done = {5e-4: {0: {"eval_loss": 2.5, "forgetting": 0.3}}, 4e-3: {0: {"eval_loss": 2.0, "forgetting": 0.5}}}
    c = choose("s", GRID, done, stopped={}, failed={}, max_forgetting=0.2)
    assert c.lr == 4e-3 and set(c.excluded) == {rate_key(5e-4), rate_key(4e-3)}


# -- a tuned study, end to end (tiny Llama) ---------------------------------------------------------

def test_the_cost_counts_the_final_trials_the_search_trains():
    """tune.reuse: each tuning seed that is a study seed trains one final trial per strategy in the search (none in a
    study that races, none without reuse); `plan` says so."""
    spec = TuneSpec(lr=GRID, compare=False)
    c = cost(spec, 4, [0, 1, 2])
    assert (c.tuning, c.final, c.replayed) == (12.0, 12.0, 4.0) and c.ratio == pytest.approx(20 / 12)
    assert cost(spec, 4, [0, 1, 2], races=True).replayed == 0
    assert cost(replace(spec, reuse=False), 4, [0, 1, 2]).ratio == 2.0
    assert cost(replace(spec, seeds=[0, 1, 7]), 4, [0, 1, 2]).replayed == 8
    from loraplace.cli.commands import _tuning_plan

    cfg = StudyConfig.from_dict({"tune": {"lr": GRID, "compare": False}})
    assert "the study's trials 12 less the 4 the search trains (tune.reuse): at most 1.67x" in _tuning_plan(cfg, 4)


RATES = [1e-3, 1e-2, 5e-2]


def _tuned(tmp_path, name="study", **over):
    return tiny_study(tmp_path, ["all_linear", "attention_only"], train={"steps": 4},
                      out=str(tmp_path / name), seeds=[0, 1],
                      tune={"lr": RATES, "selection": 8, "at": [0.5], "keep": 0.5, "min_keep": 1, "record": [0.5]},
                      **over)


def _model():
    return tiny_models.build("llama"), tiny_models.tokenizer()


@pytest.mark.slow
def test_a_tuned_study_chooses_each_rate_on_the_selection_split_and_trains_there(tmp_path, capsys):
    cfg = _tuned(tmp_path)
    records = run_study(cfg, _model())
    tune = [r for r in records if r.phase == "tune"]
    assert len(tune) == len(RATES) * 2 and {r.lr for r in tune} == set(RATES)
    # halving at 50%: of three rates per strategy, ceil(1.5) = 2 go on
    assert sorted(sum(r.status == STOPPED for r in tune if r.strategy == s) for s in cfg.strategies) == [1, 1]
    with Store.open(cfg.out, create=False) as store:
        meta = store.get_meta("tune")
        [rung] = halvings(store)
        a = analyze_store(store)
        csv = export_csv(store.trials())
    assert rung.step == 2 and all(len(v) == 3 for v in rung.values.values())
    assert "ranked on the first" not in meta["rule"]  # tune.eval_limit (16) does not cut the 8-example split
    for name in cfg.strategies:
        c = meta["choices"][name]
        finished = {float(k): v for k, v in c["losses"].items()}
        assert c["lr"] == min(finished, key=finished.get)  # the lowest selection loss among the rates that finished
        done = [r for r in tune if r.strategy == name and r.status == DONE]
        assert {r.lr for r in done} == set(finished)
        # a tuning trial's eval loss is on the selection split: it is what the choice compared
        assert {r.lr: r.metrics["eval_loss"] for r in done} == pytest.approx(finished)
        assert a.get(name).lr == c["lr"]
    finals = [r for r in records if r.phase == "final"]
    main = [r for r in finals if r.lr == meta["choices"][r.strategy]["lr"]]
    assert len(main) == 2 * len(cfg.seeds) and all(r.status == DONE for r in main)
    # tune.reuse: a final trial trains on the search's data, so the tuning seed's final trial at the chosen rate is
    # its tuning trial's training (read from its snapshots), the other seeds' are trained
    by_key = {(r.strategy, r.lr, r.seed): r for r in tune}
    for r in main:
        assert r.config["train_data"] == {"less_selection": meta["selection"]}
        trained_as = r.measured.get("trained_as")
        assert trained_as == (by_key[(r.strategy, r.lr, r.seed)].trial_id if r.seed in cfg.tune.seeds else None)
    assert not list((tmp_path / "study" / "snapshots").glob("*"))  # removed once every final trial is done
    # tune.compare: the other strategy at the baseline's rate too, unless it chose that rate
    base_lr = meta["choices"][cfg.baseline]["lr"]
    other = [r for r in finals if r.strategy == "attention_only" and r.lr == base_lr]
    assert len(other) == len(cfg.seeds) and all(r.status == DONE for r in other)
    assert a.lr_comparison is not None and a.lr_comparison.lr == base_lr
    assert a.tuning is not None and {p.status for ps in a.tuning.curves.values() for p in ps} == {"done", "stopped"}
    header = csv.splitlines()[0].split(",")
    assert header[:5] == ["trial_id", "strategy", "seed", "phase", "lr"]
    assert {line.split(",")[3] for line in csv.splitlines()[1:]} == {"tune", "final"}
    # `status` says which loss a row shows: a stopped tuning trial its last rung's selection loss
    assert main_cli(["status", cfg.out]) == 0
    shown = capsys.readouterr().out
    assert "loss: on the eval set for final trials, on the selection split for tune trials" in shown
    stopped = next(r for r in tune if r.status == STOPPED)
    row = next(line for line in shown.splitlines() if stopped.trial_id in line)
    assert f"{dict(stopped.evals)[2]['eval_loss']:.4f}" in row
    # the report: the figure, the methods' own sentence for the search, and each strategy's rate in the table
    paths = write_report(cfg.out)
    assert paths["lr"].exists()
    methods = paths["methods"].read_text()
    assert (f"Each strategy's peak learning rate was chosen from {', '.join(lr_text(x) for x in RATES)}" in methods
            and f"a selection split of {meta['selection']} training examples" in methods)
    replayed = sum(bool(r.measured.get("trained_as")) for r in finals)
    assert replayed >= 2 and (f"The final trials trained on the same data as the tuning trials; {replayed} of them were "
                              "the tuning trials of the same seed and rate" in methods)
    report = paths["markdown"].read_text()
    assert "## Does the learning rate change the answer?" in report
    rows = {line.split(" | ")[0].strip("| †"): line for line in report.splitlines() if line.startswith("| ")}
    assert all(f"| {lr_text(meta['choices'][name]['lr'])} |" in rows[name] for name in cfg.strategies)


def replace_lr(cfg, lr):
    return replace(cfg, train=replace(cfg.train, lr=lr), tune=replace(cfg.tune, lr=[]))


@pytest.mark.slow
def test_without_reuse_a_final_trial_is_the_untuned_studys_trial_at_that_rate(tmp_path):
    """tune.reuse=false: the final trials train on the whole training data, exactly as an untuned study at the chosen
    rate would train them (the same ids), and none is read from the search."""
    cfg = _tuned(tmp_path)
    cfg = replace(cfg, tune=replace(cfg.tune, reuse=False, compare=False))
    records = run_study(cfg, _model())
    finals = [r for r in records if r.phase == "final"]
    assert len(finals) == 2 * len(cfg.seeds) and all(r.status == DONE for r in finals)
    for r in finals:
        assert "train_data" not in r.config and "trained_as" not in r.measured
        untuned = plan_trials(replace_lr(cfg, r.lr), resolve_placements(replace_lr(cfg, r.lr), _anat()))
        assert r.trial_id in {t.trial_id for t in untuned if t.strategy == r.strategy}
    assert not (tmp_path / "study" / "snapshots").exists()  # no tuning trial kept any
    assert "The final trials trained on the whole training data." in write_report(cfg.out)["methods"].read_text()


@pytest.mark.slow
def test_a_final_trial_read_from_its_tuning_trial_is_the_trial_trained_again(tmp_path, monkeypatch):
    """tune.reuse: the final trial read from its tuning trial's snapshots has the numbers of the same final trial
    trained from step 0 (the same id): its curve, rung evaluations, eval loss and forgetting."""
    over = {"seeds": [0, 1], "eval": {"forgetting": True, "forgetting_size": 2, "forgetting_length": 12},
            "tune": {"lr": RATES, "selection": 8, "at": [0.5], "keep": 0.5, "min_keep": 1, "record": [0.5],
                     "compare": False}}
    read = tiny_study(tmp_path, ["all_linear", "attention_only"], train={"steps": 4}, out=str(tmp_path / "read"),
                      **over)
    got = {r.trial_id: r for r in run_study(read, _model()) if r.phase == "final"}
    replayed = [r for r in got.values() if r.measured.get("trained_as")]
    assert {(r.strategy, r.seed) for r in replayed} == {("all_linear", 0), ("attention_only", 0)}
    from loraplace.study import tune as T

    monkeypatch.setattr(T, "replays", lambda finals, tuning: finals)  # every final trial trained from step 0
    trained = tiny_study(tmp_path, ["all_linear", "attention_only"], train={"steps": 4}, out=str(tmp_path / "trained"),
                         **over)
    again = {r.trial_id: r for r in run_study(trained, _model()) if r.phase == "final"}
    assert again.keys() == got.keys()
    for r in replayed:
        twin = again[r.trial_id]
        assert "trained_as" not in twin.measured
        assert r.curve == twin.curve and r.evals == twin.evals
        for k in ("eval_loss", "forgetting", "train_loss_final", "train_tokens", "steps", "trainable_params"):
            assert r.metrics[k] == twin.metrics[k], k
        assert r.placement == twin.placement


def _anat():
    return analyze(tiny_models.build("llama"))


@pytest.mark.slow
def test_a_rerun_reuses_the_search_and_the_trials(tmp_path, monkeypatch):
    cfg = _tuned(tmp_path)
    first = {r.trial_id: (r.status, r.metrics.get("eval_loss")) for r in run_study(cfg, _model())}
    monkeypatch.setattr(segments, "run_to", lambda *a, **k: pytest.fail("a stored trial was trained again"))
    again = {r.trial_id: (r.status, r.metrics.get("eval_loss")) for r in run_study(cfg, _model())}
    assert again == first


@pytest.mark.slow
def test_a_rate_that_diverges_is_a_failed_tuning_trial_not_a_failed_study(tmp_path):
    cfg = tiny_study(tmp_path, ["all_linear", "attention_only"], train={"steps": 3}, seeds=[0, 1],
                     tune={"lr": [1e-2, 1e12], "selection": 8, "at": [], "record": []})
    records = run_study(cfg, _model())
    diverged = [r for r in records if r.phase == "tune" and r.lr == 1e12]
    assert diverged and all(r.status == FAILED and "non-finite" in r.error for r in diverged)
    with Store.open(cfg.out, create=False) as store:
        meta = store.get_meta("tune")
        a = analyze_store(store)
    assert {c["lr"] for c in meta["choices"].values()} == {1e-2}
    assert all(c["edge"] == "lowest" for c in meta["choices"].values())  # the best rate is the grid's lowest
    assert any("lowest of the grid" in line for line in a.tuning.lines)
    assert all(r.status == DONE for r in records if r.phase == "final")


@pytest.mark.slow
def test_the_eval_set_never_chooses_a_rate(tmp_path):
    """Two studies that differ only in their fixed eval set choose the same rates from the same selection losses."""
    seen = []
    for limit in (4, 12):
        data = {"source": "builtin", "limit": 48, "max_length": 96, "eval_source": "builtin", "eval_limit": limit}
        cfg = tiny_study(tmp_path, ["all_linear", "attention_only"], train={"steps": 2}, data=data,
                         out=str(tmp_path / f"eval{limit}"),
                         tune={"lr": RATES, "selection": 8, "at": [], "record": [], "compare": False})
        run_study(cfg, _model())
        with Store.open(cfg.out, create=False) as store:
            meta = store.get_meta("tune")
        seen.append({n: (c["lr"], c["losses"]) for n, c in meta["choices"].items()})
    assert seen[0] == seen[1]


def _search(tmp_path, name, **tune):
    cfg = tiny_study(tmp_path, ["all_linear", "attention_only"], train={"steps": 4}, out=str(tmp_path / name),
                     tune={"lr": RATES, "selection": 8, "record": [0.5], "compare": False, **tune})
    records = run_study(cfg, _model())
    return {(r.strategy, r.lr): r for r in records if r.phase == "tune"}


@pytest.mark.slow
def test_halving_keeps_the_exhaustive_numbers_of_the_rates_it_keeps(tmp_path):
    """Racing's guarantee for the search: a rate that survives halving ends with the selection loss (and
    forgetting) the exhaustive grid gives it, since its schedule is the whole run's."""
    full = _search(tmp_path, "full", at=[])
    raced = _search(tmp_path, "raced", at=[0.5], keep=0.5, min_keep=1)
    survivors = [k for k, r in raced.items() if r.status == DONE]
    assert len(survivors) == 4 and sum(r.status == STOPPED for r in raced.values()) == 2
    for k in survivors:
        assert raced[k].metrics["eval_loss"] == full[k].metrics["eval_loss"]
        assert raced[k].curve == full[k].curve
    # what halving saw at the rung is what the exhaustive trials recorded there
    for k, r in raced.items():
        assert dict(r.evals)[2]["eval_loss"] == dict(full[k].evals)[2]["eval_loss"]


@pytest.mark.slow
def test_tune_eval_limit_ranks_rungs_on_the_first_selection_examples_and_ends_on_all(tmp_path):
    """With tune.eval_limit the rungs (and so halving) score the first N selection examples; a trial's end still
    scores the whole split, so a surviving rate ends with the exhaustive grid's numbers. Other ids: the rungs differ."""
    full = _search(tmp_path, "full", at=[])
    few = _search(tmp_path, "few", at=[0.5], keep=0.5, min_keep=1, eval_limit=3)
    with Store.open(tmp_path / "few", create=False) as store:
        [rung] = halvings(store)
        rule = store.get_meta("tune")["rule"]
    assert "ranked on the first 3 examples of the selection split" in rule
    survived = [k for k, r in few.items() if r.status == DONE]
    assert len(survived) == 4
    for k, r in few.items():
        assert r.trial_id != full[k].trial_id
        at_rung = dict(r.evals)[2]
        assert at_rung["eval_tokens"] < dict(full[k].evals)[2]["eval_tokens"]  # fewer examples than the split
        assert rung.values[k[0]][rate_key(k[1])] == at_rung["eval_loss"]  # halving ranked on those
        if k in survived:
            assert r.metrics["eval_loss"] == full[k].metrics["eval_loss"]
            assert r.metrics["eval_tokens"] == full[k].metrics["eval_tokens"]


@pytest.mark.slow
def test_fused_tuning_trials_compute_what_sequential_ones_do(tmp_path):
    seq = _search(tmp_path, "seq", at=[])
    fused = tiny_study(tmp_path, ["all_linear", "attention_only"], train={"steps": 4, "fuse": 6},
                       out=str(tmp_path / "fused"), tune={"lr": RATES, "selection": 8, "record": [0.5], "compare": False,
                                                          "at": []})
    got = {(r.strategy, r.lr): r for r in run_study(fused, _model()) if r.phase == "tune"}
    assert got.keys() == seq.keys()
    for k, r in got.items():
        assert r.metrics["fused_trials"] > 1
        assert r.metrics["eval_loss"] == pytest.approx(seq[k].metrics["eval_loss"], rel=1e-4)
