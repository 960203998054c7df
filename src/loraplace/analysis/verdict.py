"""The probe's verdict: does ``auto`` beat random module sets at the same budget, paired by seed?

Usage::

    v = probe_verdict(trials, zero_shot=2.9, reference="all_linear", probe=probe_scores)
    v.text, v.vs_random, v.retained_auto

On the study's quality metric: per seed, d = auto's value minus the mean of the ``random:K`` draws' (seeds
where auto and every draw finished), its mean and 95% interval across seeds, and the share of the
reference's improvement over the base model each keeps.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from loraplace.core.stats import Interval, Paired, paired_comparison, retained_improvement
from loraplace.analysis.text import retained_text
from loraplace.core.metrics import QUALITY
from loraplace.core.names import AUTO, is_random
from loraplace.store.db import DONE, TrialRecord


# -- probe verdict: does the probe's choice (auto) beat random module sets at the same budget? ------
@dataclass
class ProbeVerdict:
    """auto against the mean of the random draws (paired by seed) and against the reference's improvement."""

    randoms: list[str]  # the random:K strategies with done trials
    vs_random: Paired | None  # auto minus the mean of the random draws, per seed where all ran (in ``metric``)
    retained_auto: Interval | None  # share of the reference's improvement over zero-shot that auto keeps
    retained_random: Interval | None  # the same for the per-seed mean loss of the random draws
    reference: str  # all_linear when the study has it, else the baseline
    text: str  # the verdict in one paragraph, whatever it is
    evidence: list[str] = field(default_factory=list)
    probe_time_s: float | None = None  # wall time of the probe seeds
    probe_share: float | None = None  # probe time / (probe time + train and eval time of the study's done trials)
    metric: str = "eval_loss"  # eval_loss (lower is better) or accuracy (higher is better)


def _per_seed(trials: list[TrialRecord], name: str, metric: str) -> dict[int, float]:
    return {int(t.seed): float(t.metrics[metric]) for t in trials
            if t.strategy == name and t.status == DONE and metric in t.metrics}


def probe_verdict(trials: list[TrialRecord], zero_shot: float | None, reference: str = "all_linear", probe=None,
                  criterion: str = "lora_drop", metric: str = "eval_loss", name: str = AUTO) -> ProbeVerdict | None:
    """The verdict on ``auto`` (or the auto strategy ``name``, e.g. auto:rank; None when the study has no done
    trial of it), on ``metric`` (eval_loss: lower is
    better; accuracy: higher is better; ``zero_shot`` is the base model's value of it). Random draws are averaged
    per seed (seeds where every draw finished); intervals as everywhere (95% t across seeds)."""
    higher = QUALITY[metric].higher_is_better
    label = "accuracy" if higher else "loss"

    auto = _per_seed(trials, name, metric)
    if not auto:
        return None
    randoms = sorted({t.strategy for t in trials if is_random(t.strategy) and _per_seed(trials, t.strategy, metric)})
    per_draw = {r: _per_seed(trials, r, metric) for r in randoms}
    rand_mean = {s: sum(per_draw[r][s] for r in randoms) / len(randoms)
                 for s in set.intersection(*(set(v) for v in per_draw.values()))} if randoms else {}
    ref = _per_seed(trials, reference, metric)
    vs = paired_comparison(auto, rand_mean) if rand_mean else None
    ret_a = retained_improvement(auto, ref, zero_shot, higher) if zero_shot is not None and ref else None
    ret_r = retained_improvement(rand_mean, ref, zero_shot, higher) if zero_shot is not None and ref and rand_mean else None
    evidence = []
    if vs is None:
        text = (f"No verdict on {name} against random placement: the study has no finished random:K draw at auto's "
                f"budget for a seed {name} ran (add random:0, random:1, random:2 to the strategies).")
    else:
        d = vs.diff
        n_draws = f"{len(randoms)} random draw{'s' if len(randoms) != 1 else ''}"
        ci = f"Δ {label} ({name} − mean of {n_draws}) {d.mean:+.4f}"
        if d.lo is None:
            text = (f"Undecided: {name} vs {n_draws} at equal budget has one paired seed ({ci}, no interval); run at "
                    "least 3 seeds.")
        else:
            ci += f" [95% CI {d.lo:+.4f}, {d.hi:+.4f}] over {d.n} seeds"
            if (d.lo > 0) if higher else (d.hi < 0):
                text = f"{name} beats random placement at equal budget: {ci}."
            elif (d.hi < 0) if higher else (d.lo > 0):
                text = f"{name} does worse than random placement at equal budget: {ci}."
            else:
                text = f"{name} does not beat random placement at equal budget: the interval includes 0 ({ci})."
        evidence.append(ci)
    if ret_a is not None:
        line = f"{name} retains {retained_text(ret_a)} of {reference}'s improvement over the base model"
        if ret_r is not None:
            line += f"; the random draws (mean per seed) retain {retained_text(ret_r)}"
        text += " " + line + "."
        evidence.append(line)
    elif ref:
        evidence.append(f"retained improvement of {name} not available (no zero-shot {label} or {reference} did not "
                        "improve on it in every seed)")
    probe_time = share = None
    if probe is not None:
        probe_time = probe.time_s
        trial_time = sum(float(t.metrics.get("train_time_s", 0)) + float(t.metrics.get("eval_time_s", 0))
                         for t in trials if t.status == DONE)
        share = probe_time / (probe_time + trial_time) if probe_time + trial_time > 0 else None
        cost = f"probe: {len(probe.seeds)} seed(s), {probe_time:.0f} s"
        if share is not None:
            cost += f" = {100 * share:.1f}% of the study's time (probe + trials' train and eval time)"
        evidence.append(cost)
        for c in probe.criteria:
            evidence.append(("auto.score = " if c == criterion else "") + probe.summary(c))
    return ProbeVerdict(randoms, vs, ret_a, ret_r, reference, text, evidence, probe_time, share, metric)
