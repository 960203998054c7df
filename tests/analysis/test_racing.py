"""Would racing have been safe: the rung checks recommend with the study's own settings, analysis.max_forgetting
included, through the same function as the study's recommendation."""

from __future__ import annotations

from loraplace.analysis.decision import recommend_for
from loraplace.analysis.racing import racing
from loraplace.analysis.study import analyze
from loraplace.core.config import StudyConfig
from loraplace.store.db import DONE, TrialRecord
from loraplace.study.race import rung_steps

ZS = 3.0  # zero-shot eval loss (nats/token)
STEPS = 40  # optimizer steps of every trial
MAX_FORGETTING = 0.1  # nats/token
# strategy -> (trainable params, final eval loss per seed, forgetting per seed): cheap keeps ~99% of the
# baseline's gain but forgets more than MAX_FORGETTING; mid keeps as much and forgets little; tiny keeps ~10%
PLAN = {
    "all_linear": (1000, [2.00, 2.02, 2.04], [0.02, 0.02, 0.03]),
    "cheap": (100, [2.01, 2.03, 2.05], [0.50, 0.52, 0.55]),
    "mid": (400, [2.01, 2.03, 2.05], [0.01, 0.02, 0.01]),
    "tiny": (10, [2.90, 2.91, 2.92], [0.00, 0.00, 0.01]),
}


def _trials(cfg: StudyConfig) -> list[TrialRecord]:
    rungs = rung_steps(cfg.race.record, STEPS)
    out = []
    for name, (params, losses, forgets) in PLAN.items():
        for seed, (loss, forget) in enumerate(zip(losses, forgets)):
            # at each rung every strategy is behind its end by the same amount, less the later the rung
            evals = [[step, {"eval_loss": loss + 0.2 * (1 - step / STEPS)}] for step in rungs]
            metrics = {"eval_loss": loss, "trainable_params": params, "forgetting": forget, "steps": STEPS,
                       "train_time_s": 10.0}
            out.append(TrialRecord(f"{name}-{seed}", name, seed, DONE, metrics=metrics, evals=evals))
    return out


def test_the_safety_check_honours_max_forgetting():
    cfg = StudyConfig(strategies=list(PLAN), seeds=[0, 1, 2])
    cfg.analysis.max_forgetting = MAX_FORGETTING
    trials = _trials(cfg)
    a = analyze(trials, cfg.baseline, ZS, cfg.threshold, order=cfg.strategies,
                max_forgetting=cfg.analysis.max_forgetting)
    a.config = cfg
    assert a.recommendation.strategy == "mid"  # cheap keeps enough but forgets too much
    assert analyze(trials, cfg.baseline, ZS, cfg.threshold, order=cfg.strategies).recommendation.strategy == "cheap"
    r = racing(a, trials, [])
    assert r is not None and not r.raced and [c.step for c in r.checks] == rung_steps(cfg.race.record, STEPS)
    assert any("tiny" in c.would_stop for c in r.checks)  # the rule stops something, so the check has work to do
    assert all(c.recommended == "mid" for c in r.checks)  # each rung recommends with the cap, as the end does
    assert r.safe is True and "Safe: the recommendation without what it stops" in r.lines[0]
    assert recommend_for(a) == a.recommendation  # the study's recommendation is the function the checks call
