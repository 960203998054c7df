"""Statistics against hand-computed values: intervals, paired deltas, retained improvement, fronts,
and every branch of the recommendation (decided, undecidable, one seed, missing inputs)."""

import math

import pytest

from loraplace.analysis import analyze, mean_curve, pareto_front, t_interval
from loraplace.store import Store

ZS = 3.0  # zero-shot eval loss of the fake base model (nats/token)
T975_DF2 = 4.302652729911275  # Student t quantile 0.975 with 2 degrees of freedom (tables)


def add(store, strategy, seed, loss, params, status="done", time_s=10.0, curve=None):
    tid = f"{strategy}-{seed}"
    store.add_pending(tid, strategy, seed, {"strategy": strategy, "seed": seed})
    store.mark_running(tid)
    if status == "failed":
        store.mark_failed(tid, "RuntimeError: boom\nsecond line")
        return
    if status == "done":
        metrics = {"eval_loss": loss, "perplexity": math.exp(loss), "trainable_params": params,
                   "train_time_s": time_s, "zero_shot_loss": ZS}
        store.mark_done(tid, metrics, curve or [[1, 3.0], [2, 2.5]], {"strategy": strategy, "modules": {}}, {})


def study(tmp_path, table, zero_shot=ZS):
    """table: {strategy: (params, [loss per seed 0, 1, ...])}; returns the analysis."""
    store = Store.open(tmp_path)
    for name, (params, losses) in table.items():
        for seed, loss in enumerate(losses):
            add(store, name, seed, loss, params)
    trials = store.trials()
    store.close()
    return analyze(trials, "all_linear", zero_shot, threshold=0.95)


def test_t_interval_by_hand():
    iv = t_interval([1.0, 2.0, 4.0])
    mean = (1.0 + 2.0 + 4.0) / 3  # 7/3
    var = ((1 - mean) ** 2 + (2 - mean) ** 2 + (4 - mean) ** 2) / (3 - 1)  # 7/3
    half = T975_DF2 * math.sqrt(var) / math.sqrt(3)
    assert iv.mean == pytest.approx(mean) and iv.n == 3
    assert iv.sd == pytest.approx(math.sqrt(7 / 3))
    assert iv.lo == pytest.approx(mean - half) and iv.hi == pytest.approx(mean + half)
    assert iv.half == pytest.approx(3.7946, abs=1e-4)


def test_one_value_has_no_interval():
    iv = t_interval([2.5])
    assert iv.mean == 2.5 and iv.lo is None and iv.hi is None and iv.half is None
    assert iv.excludes(0.0) is None
    assert "no interval" in iv.text()
    with pytest.raises(ValueError):
        t_interval([])


def test_paired_and_retained_by_hand(tmp_path):
    base = [2.00, 2.10, 2.05]
    attn = [2.03, 2.12, 2.10]
    a = study(tmp_path, {"all_linear": (1000, base), "attn": (400, attn)})
    s = a.get("attn")
    assert s.seeds == [0, 1, 2]
    assert s.eval_loss.mean == pytest.approx((2.03 + 2.12 + 2.10) / 3)

    d = [0.03, 0.02, 0.05]  # attn - baseline, seed by seed
    dm = sum(d) / 3
    sd = math.sqrt(sum((x - dm) ** 2 for x in d) / 2)
    half = T975_DF2 * sd / math.sqrt(3)
    p = s.paired
    assert p.seeds == (0, 1, 2)
    assert p.diff.mean == pytest.approx(dm)
    assert p.diff.lo == pytest.approx(dm - half) and p.diff.hi == pytest.approx(dm + half)
    assert p.significant is False  # interval [-0.0046, 0.0713] contains 0
    t = dm / (sd / math.sqrt(3))
    assert p.p_value == pytest.approx(1 - t / math.sqrt(2 + t * t))  # two-sided p of Student t, 2 df

    r = [(3 - 2.03) / (3 - 2.00), (3 - 2.12) / (3 - 2.10), (3 - 2.10) / (3 - 2.05)]
    rm = sum(r) / 3
    rsd = math.sqrt(sum((x - rm) ** 2 for x in r) / 2)
    assert s.retained.mean == pytest.approx(rm)
    assert s.retained.half == pytest.approx(T975_DF2 * rsd / math.sqrt(3))
    assert a.get("all_linear").paired is None
    assert a.get("all_linear").retained.mean == pytest.approx(1.0)


def test_significant_difference(tmp_path):
    a = study(tmp_path, {"all_linear": (1000, [2.00, 2.10, 2.05]), "tiny": (10, [2.50, 2.61, 2.54])})
    p = a.get("tiny").paired
    assert p.significant is True and p.diff.lo > 0 and p.p_value < 0.05


def test_pareto_front_by_hand():
    pts = {"a": (1, 3.0), "b": (2, 2.0), "c": (3, 2.5), "d": (4, 1.0), "e": (2, 2.0), "f": (5, 1.0)}
    # c is dominated by b (cheaper and better); f by d (cheaper, equal loss); b and e tie: both stay
    assert pareto_front(pts) == ["a", "b", "e", "d"]
    assert pareto_front({"x": (1, math.nan), "y": (2, 1.0)}) == ["y"]


def test_fronts_in_analysis(tmp_path):
    a = study(tmp_path, {"all_linear": (1000, [2.0, 2.0]), "worse_cheap": (100, [2.3, 2.3]),
                         "dominated": (500, [2.4, 2.4])})
    assert a.pareto_params == ["worse_cheap", "all_linear"]
    assert [s.strategy for s in a.strategies] == ["worse_cheap", "dominated", "all_linear"]


def test_recommends_cheapest_confident(tmp_path):
    base = [2.00, 2.02, 2.04]
    a = study(tmp_path, {
        "all_linear": (1000, base),
        "cheap": (300, [2.01, 2.03, 2.05]),  # retained ~99%, tight interval
        "tiny": (10, [2.50, 2.52, 2.54]),  # retained ~50%
    })
    rec = a.recommendation
    assert rec.decided and rec.strategy == "cheap"
    assert "cheap" in rec.text and "95.0%" in rec.text
    assert any(e.startswith("tiny") and "falls short" in e for e in rec.evidence)
    assert any(e.startswith("cheap") and "meets" in e for e in rec.evidence)


def test_baseline_when_nothing_cheaper_keeps_enough(tmp_path):
    a = study(tmp_path, {"all_linear": (1000, [2.00, 2.02, 2.04]), "tiny": (10, [2.50, 2.52, 2.54])})
    assert a.recommendation.decided and a.recommendation.strategy == "all_linear"


def test_undecidable_when_interval_straddles(tmp_path):
    base = [2.00, 2.02, 2.04]
    gains = [ZS - b for b in base]
    mid = [ZS - r * g for r, g in zip([0.90, 1.00, 0.96], gains)]  # retained 90%, 100%, 96%
    a = study(tmp_path, {"all_linear": (1000, base), "mid": (200, mid), "cheap": (300, [2.01, 2.03, 2.05])})
    ret = a.get("mid").retained
    assert ret.lo < 0.95 < ret.hi
    rec = a.recommendation
    assert not rec.decided and rec.strategy is None
    assert "Cannot decide" in rec.text and "mid" in rec.text
    assert rec.fallback == "cheap"  # known to meet the threshold, but mid might be cheaper and good enough


def test_one_seed_cannot_decide(tmp_path):
    a = study(tmp_path, {"all_linear": (1000, [2.00]), "cheap": (300, [2.01]), "tiny": (10, [2.5])})
    rec = a.recommendation
    assert not rec.decided and rec.strategy is None
    assert "no interval" in rec.text and "seeds" in rec.text
    assert rec.tentative == "cheap"  # point estimate only
    assert a.get("cheap").eval_loss.lo is None
    assert any("no interval" in n for n in a.notes)


def test_no_zero_shot_cannot_decide(tmp_path):
    store = Store.open(tmp_path)
    for seed, loss in enumerate([2.0, 2.1]):
        store.add_pending(f"b{seed}", "all_linear", seed, {})
        store.mark_done(f"b{seed}", {"eval_loss": loss, "trainable_params": 10}, [], {}, {})
        store.add_pending(f"c{seed}", "cheap", seed, {})
        store.mark_done(f"c{seed}", {"eval_loss": loss + 0.01, "trainable_params": 5}, [], {}, {})
    a = analyze(store.trials(), "all_linear", None)
    assert a.zero_shot_loss is None and a.get("cheap").retained is None
    assert not a.recommendation.decided and "zero-shot" in a.recommendation.text
    assert a.get("cheap").paired is not None  # deltas need no zero-shot loss


def test_zero_shot_taken_from_trial_metrics(tmp_path):
    store = Store.open(tmp_path)
    add(store, "all_linear", 0, 2.0, 10)
    a = analyze(store.trials(), "all_linear", None)
    assert a.zero_shot_loss == ZS


def test_missing_baseline_cannot_decide(tmp_path):
    a = study(tmp_path, {"cheap": (300, [2.01, 2.03]), "tiny": (10, [2.5, 2.6])})
    assert not a.recommendation.decided
    assert "'all_linear'" in a.recommendation.text and "no finished trial" in a.recommendation.text


def test_baseline_no_better_than_zero_shot(tmp_path):
    a = study(tmp_path, {"all_linear": (1000, [2.9, 3.1, 3.05]), "cheap": (10, [2.95, 3.0, 3.1])})
    assert not a.recommendation.decided and "not reliably better" in a.recommendation.text


def test_only_done_trials_count_and_failures_are_listed(tmp_path):
    store = Store.open(tmp_path)
    for seed, loss in enumerate([2.0, 2.1, 2.05]):
        add(store, "all_linear", seed, loss, 1000)
    add(store, "cheap", 0, 2.0, 10)
    add(store, "cheap", 1, 0.0, 10, status="failed")
    add(store, "cheap", 2, 0.0, 10, status="running")
    add(store, "broken", 0, 0.0, 5, status="failed")
    a = analyze(store.trials(), "all_linear", ZS)
    assert a.get("cheap").seeds == [0] and a.get("cheap").n_failed == 1
    assert a.get("broken") is None
    assert {(f.strategy, f.seed) for f in a.failed} == {("cheap", 1), ("broken", 0)}
    assert all(f.error == "RuntimeError: boom" for f in a.failed)
    assert [(f.strategy, f.status) for f in a.unfinished] == [("cheap", "running")]
    assert any("broken" in n for n in a.notes)


def test_mean_curve_over_seeds():
    c = mean_curve([[[1, 3.0], [2, 2.0], [3, 1.0]], [[1, 2.0], [2, 1.0]]])
    assert c == [(1.0, 2.5), (2.0, 1.5), (3.0, 1.0)]
