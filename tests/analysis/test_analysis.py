"""Statistics against hand-computed values: intervals, paired deltas, retained improvement, fronts,
and every branch of the recommendation (decided, undecidable, one seed, missing inputs)."""

import math
import random
from statistics import NormalDist

import pytest

from loraplace.core.stats import mean_curve, paired_comparison, pareto_front, t_interval
from loraplace.analysis.study import analyze
from loraplace.analysis.text import interval_text
from loraplace.store import claims
from loraplace.store.db import Store

ZS = 3.0  # zero-shot eval loss of the fake base model (nats/token)
T975_DF2 = 4.302652729911275  # Student t quantile 0.975 with 2 degrees of freedom (tables)
Z975 = NormalDist().inv_cdf(0.975)  # the normal quantile of a two-sided 95% interval


def wilson_by_hand(p: float, n: int) -> tuple[float, float]:
    """The Wilson score interval from its definition: centre (p + z²/2n) / (1 + z²/n), half-width
    z / (1 + z²/n) * sqrt(p(1-p)/n + z²/4n²), clipped to [0, 1]."""
    z2 = Z975 * Z975
    centre = (p + z2 / (2 * n)) / (1 + z2 / n)
    half = Z975 / (1 + z2 / n) * math.sqrt(p * (1 - p) / n + z2 / (4 * n * n))
    return max(0.0, centre - half), min(1.0, centre + half)


def add(store, strategy, seed, loss, params, status="done", time_s=10.0, curve=None):
    tid = f"{strategy}-{seed}"
    store.add_pending(tid, strategy, seed, {"strategy": strategy, "seed": seed})
    claims.claim(store, tid)
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
    assert iv.half == pytest.approx(half)


def test_one_value_has_no_interval():
    iv = t_interval([2.5])
    assert iv.mean == 2.5 and iv.lo is None and iv.hi is None and iv.half is None
    assert iv.excludes(0.0) is None
    assert "no interval" in interval_text(iv)
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


def test_paired_comparison_with_zero_spread_is_consistent():
    """Every pair differing by the same amount: no t statistic, and no doubt: p 0 and significant when the
    difference is not 0, p 1 and not significant when it is; one pair: no test at all."""
    same = paired_comparison({0: 2.5, 1: 3.5, 2: 4.0}, {0: 2.0, 1: 3.0, 2: 3.5})  # exactly +0.5 in every seed
    assert same.diff.sd == 0 and same.diff.mean == 0.5
    assert same.p_value == 0.0 and same.significant is True
    none = paired_comparison({0: 2.0, 1: 3.0}, {0: 2.0, 1: 3.0})
    assert none.p_value == 1.0 and none.significant is False
    one = paired_comparison({0: 2.5}, {0: 2.0})
    assert one.p_value is None and one.significant is None
    # with spread, p < 0.05 exactly when the interval excludes 0, and p is the paired t-test's
    rng = random.Random(0)
    for _ in range(200):
        n = rng.randint(2, 6)
        base = {i: rng.gauss(2.0, 0.1) for i in range(n)}
        other = {i: v + rng.gauss(0.03, 0.05) for i, v in base.items()}
        p = paired_comparison(other, base)
        assert (p.p_value < 0.05) == p.significant
        d = p.diff
        t = d.mean / (d.sd / math.sqrt(n))
        if n == 3:  # two-sided p of Student t with 2 degrees of freedom, in closed form
            assert p.p_value == pytest.approx(1 - abs(t) / math.sqrt(2 + t * t))


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


# -- accuracy as the quality metric --------------------------------------------------------------
ZA = 0.20  # zero-shot accuracy of the fake base model
# strategy -> (params, eval loss per seed, accuracy per seed): loss and accuracy disagree on the winner.
# On loss, cheap keeps ~99% of the baseline's gain and wins; on accuracy it keeps only ~50% and mlp,
# which keeps ~101% of the accuracy gain but only ~70% of the loss gain, wins.
DISAGREE = {
    "all_linear": (1000, [2.00, 2.02, 2.04], [0.600, 0.620, 0.610]),
    "cheap": (300, [2.01, 2.03, 2.05], [0.400, 0.410, 0.420]),
    "mlp": (600, [2.30, 2.32, 2.34], [0.605, 0.625, 0.615]),
}


def accuracy_study(tmp_path, metric, table=DISAGREE, n_examples=50, zero_shot_accuracy=ZA):
    store = Store.open(tmp_path)
    for name, (params, losses, accs) in table.items():
        for seed, (loss, acc) in enumerate(zip(losses, accs)):
            tid = f"{name}-{seed}"
            store.add_pending(tid, name, seed, {})
            store.mark_done(tid, {"eval_loss": loss, "accuracy": acc, "accuracy_n": n_examples,
                                  "trainable_params": params, "train_time_s": 10.0}, [], {}, {})
    trials = store.trials()
    store.close()
    return analyze(trials, "all_linear", ZS, 0.95, metric=metric, zero_shot_accuracy=zero_shot_accuracy)


def test_loss_and_accuracy_disagree_and_the_choice_follows_the_metric(tmp_path):
    by_loss = accuracy_study(tmp_path / "a", "eval_loss")
    by_acc = accuracy_study(tmp_path / "b", "accuracy")
    assert by_loss.recommendation.decided and by_loss.recommendation.strategy == "cheap"
    assert by_acc.recommendation.decided and by_acc.recommendation.strategy == "mlp"
    assert "in accuracy" in by_acc.recommendation.text and "in eval loss" in by_loss.recommendation.text
    assert any(e.startswith("cheap") and "falls short" in e for e in by_acc.recommendation.evidence)
    # fronts: on loss mlp (600, 2.32) is dominated by cheap (300, 2.03); on accuracy all_linear
    # (1000, 61.0%) is dominated by mlp (600, 61.5%)
    assert by_loss.pareto_params == ["cheap", "all_linear"]
    assert by_acc.pareto_params == ["cheap", "mlp"]
    assert by_acc.metric == "accuracy" and by_acc.zero_shot == ZA and by_loss.zero_shot == ZS

    # retained improvement on accuracy, seed by seed: (acc_s - acc_zero) / (acc_b - acc_zero)
    r = [(0.605 - ZA) / (0.600 - ZA), (0.625 - ZA) / (0.620 - ZA), (0.615 - ZA) / (0.610 - ZA)]
    rm = sum(r) / 3
    rsd = math.sqrt(sum((x - rm) ** 2 for x in r) / 2)
    mlp = by_acc.get("mlp")
    assert mlp.retained.mean == pytest.approx(rm) and mlp.retained.half == pytest.approx(T975_DF2 * rsd / math.sqrt(3))
    assert by_acc.get("cheap").retained.mean == pytest.approx((0.2 / 0.4 + 0.21 / 0.42 + 0.22 / 0.41) / 3)
    # on loss mlp keeps (3-2.30)/(3-2.00) = 70%, 68/98, 66/96
    assert by_loss.get("mlp").retained.mean == pytest.approx((0.70 + 0.68 / 0.98 + 0.66 / 0.96) / 3)

    # paired accuracy deltas are computed whatever the metric: mlp - baseline = +0.005 in every seed
    for a in (by_loss, by_acc):
        d = a.get("cheap").paired_accuracy.diff
        assert d.mean == pytest.approx(((0.4 - 0.6) + (0.41 - 0.62) + (0.42 - 0.61)) / 3)
        assert a.get("mlp").paired_accuracy.diff.mean == pytest.approx(0.005)
        assert a.get("all_linear").paired_accuracy is None
        assert a.get("mlp").accuracy.mean == pytest.approx(0.615)


def test_accuracy_metric_without_accuracy_is_a_config_error(tmp_path):
    from loraplace.core.config import ConfigError

    store = Store.open(tmp_path)
    add(store, "all_linear", 0, 2.0, 10)
    with pytest.raises(ConfigError, match="no finished trial of this study has an accuracy") as e:
        analyze(store.trials(), "all_linear", ZS, metric="accuracy")
    assert "\n" not in str(e.value)
    with pytest.raises(ConfigError, match="analysis.metric"):
        analyze(store.trials(), "all_linear", ZS, metric="f1")


def test_accuracy_without_zero_shot_accuracy_cannot_decide(tmp_path):
    a = accuracy_study(tmp_path, "accuracy", zero_shot_accuracy=None)
    assert not a.recommendation.decided and "zero-shot accuracy" in a.recommendation.text
    assert a.get("mlp").retained is None and a.get("mlp").paired_accuracy is not None


def test_baseline_no_better_than_zero_shot_accuracy(tmp_path):
    a = accuracy_study(tmp_path, "accuracy", zero_shot_accuracy=0.61)  # inside the baseline's interval
    assert not a.recommendation.decided and "not reliably better" in a.recommendation.text
    assert "accuracy interval reaches the zero-shot accuracy" in a.recommendation.text


def test_wilson_interval_by_hand():
    from loraplace.core.stats import wilson_interval

    # 21 of 50 right
    assert wilson_interval(0.42, 50) == pytest.approx(wilson_by_hand(0.42, 50))
    # 0 of 10: the interval is [0, z²/10 / (1 + z²/10)], not empty as the normal approximation's would be
    lo, hi = wilson_interval(0.0, 10)
    assert lo == 0.0 and hi == pytest.approx((Z975**2 / 10) / (1 + Z975**2 / 10))
    with pytest.raises(ValueError):
        wilson_interval(0.5, 0)


def test_one_seed_accuracy_gets_a_wilson_interval(tmp_path):
    one = {k: (p, losses[:1], accs[:1]) for k, (p, losses, accs) in DISAGREE.items()}
    a = accuracy_study(tmp_path, "accuracy", table=one, n_examples=50)
    s = a.get("cheap")  # 0.40 on 50 examples
    assert s.accuracy.lo is None
    lo, hi = s.wilson()
    assert (lo, hi) == pytest.approx(wilson_by_hand(0.40, 50))
    assert not a.recommendation.decided and a.recommendation.tentative == "mlp"
    assert any(f"95% Wilson {100 * lo:.1f}-{100 * hi:.1f}%, n=50 examples" in e for e in a.recommendation.evidence)
    multi = accuracy_study(tmp_path / "m", "accuracy")
    assert multi.get("cheap").wilson() is None  # several seeds: the t-interval across seeds instead
