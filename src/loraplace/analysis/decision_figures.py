"""The figures of what a study decided on: paired differences and retained improvement (``decision``), and what
each strategy learns against what it forgets (``forgetting``).

Usage::

    decision(analysis, out_dir / "decision.png"); forgetting(analysis, out_dir / "forgetting.png")
"""

from __future__ import annotations

from pathlib import Path

import matplotlib
from matplotlib.figure import Figure

from loraplace.analysis.findings import StudyAnalysis
from loraplace.analysis.style import RC, save, styles
from loraplace.core.metrics import QUALITY
from loraplace.core.stats import pareto_front


def forgetting(a: StudyAnalysis, path: Path) -> Path:
    """Improvement over the base model (zero-shot minus eval loss, or accuracy gain) against forgetting, per
    strategy, with 95% intervals across seeds, and the frontier of strategies no other beats on both (more
    improvement and less forgetting)."""
    acc = a.metric == "accuracy"
    zero = a.zero_shot
    rows = [s for s in a.strategies if s.stopped is None and s.forgetting is not None and s.metrics.get(a.metric)]
    st = styles([s.strategy for s in a.strategies])
    with matplotlib.rc_context(RC):
        fig = Figure(figsize=(10, 6), layout="constrained")
        ax = fig.subplots()
        pts = {}
        for s in rows:
            q = s.metrics[a.metric]
            gain = (q.mean - zero) * (100 if acc else 1) if acc else zero - q.mean
            x = s.forgetting.mean
            pts[s.strategy] = (x, gain)
            ax.errorbar(x, gain, xerr=s.forgetting.half or None, yerr=(q.half * (100 if acc else 1)) if q.half else None,
                        fmt=st[s.strategy]["marker"], color=st[s.strategy]["color"], ms=9, capsize=4, label=s.strategy,
                        zorder=3)
            if s.strategy == a.baseline:
                ax.plot(x, gain, "o", ms=20, mfc="none", mec="black", mew=1.5, zorder=4, label="baseline (ringed)")
        front = pareto_front({k: (x, -y) for k, (x, y) in pts.items()})
        fr = sorted((pts[n] for n in front), key=lambda p: p[0])
        if len(fr) >= 2:
            ax.plot([p[0] for p in fr], [p[1] for p in fr], color="black", ls="--", lw=1.2, zorder=2,
                    label="frontier (no other both learns more and forgets less)")
        ax.axvline(0, color="dimgray", ls=":", lw=1.2, label="no forgetting (the base model)")
        ax.set_xlabel("Forgetting (nats/token: adapted minus base loss on the forgetting set)")
        ax.set_ylabel("Accuracy gain over the base model (points)" if acc else
                      "Improvement: zero-shot minus eval loss (nats/token)")
        ax.grid(True, alpha=0.3)
        ax.legend(loc="best")
        bars = ", bars = 95% t-interval" if a.min_seeds >= 2 else " (one seed: no interval bars)"
        ax.set_title("What each strategy learns against what it forgets: mean over seeds" + bars)
        if not rows or zero is None:
            ax.text(0.5, 0.5, "forgetting or the zero-shot value not recorded", transform=ax.transAxes, ha="center")
        return save(fig, path)


def decision(a: StudyAnalysis, path: Path) -> Path:
    """What the study decided on, per strategy: its paired difference from the baseline (left) and the share of
    the baseline's improvement it keeps (right), each with its 95% interval across the paired seeds, the
    threshold drawn in. Paired intervals are far narrower than the per-strategy ones of ``pareto``."""
    acc = a.metric == "accuracy"
    rows = [s for s in a.strategies if s.stopped is None and s.strategy != a.baseline]
    st = styles([s.strategy for s in a.strategies])
    with matplotlib.rc_context(RC):
        fig = Figure(figsize=(13, max(4.0, 0.55 * len(rows) + 2.0)), layout="constrained")
        left, right = fig.subplots(1, 2, sharey=True)
        ys = list(range(len(rows)))
        for y, s in zip(ys, rows):
            p = s.paired_accuracy if acc else s.paired
            if p is not None:
                scale = 100 if acc else 1
                err = None if p.diff.half is None else p.diff.half * scale
                left.errorbar(p.diff.mean * scale, y, xerr=err, fmt=st[s.strategy]["marker"], color=st[s.strategy]["color"],
                              ms=9, capsize=4)
            if s.retained is not None:
                err = None if s.retained.half is None else 100 * s.retained.half
                right.errorbar(100 * s.retained.mean, y, xerr=err, fmt=st[s.strategy]["marker"],
                               color=st[s.strategy]["color"], ms=9, capsize=4)
        left.axvline(0, color="black", lw=1)
        right.axvline(100 * a.threshold, color="#D55E00", ls="--", lw=1.5, label=f"threshold {100 * a.threshold:.0f}%")
        right.axvline(100, color="dimgray", ls=":", lw=1.2, label=f"{a.baseline} (100%)")
        left.set_yticks(ys, [s.strategy for s in rows])
        left.invert_yaxis()
        left.set_xlabel(("Accuracy minus the baseline's (points)" if acc else "Eval loss minus the baseline's (nats/token)")
                        + ", paired by seed")
        right.set_xlabel(f"Retained improvement in {QUALITY[a.metric].label} (% of {a.baseline}'s)")
        left.set_title(f"Paired difference from {a.baseline}" + (" (right: worse)" if not acc else " (right: better)"))
        right.set_title("Share of the baseline's improvement kept")
        for ax in (left, right):
            ax.grid(True, axis="x", alpha=0.3)
        right.legend(loc="best")  # "lower right" hid the last strategy's point
        n = a.min_seeds
        fig.suptitle("What the recommendation rests on: " + (f"95% t-intervals over {n} paired seeds" if n >= 2 else
                                                             "one seed, no intervals"))
        if not rows:
            left.text(0.5, 0.5, "no strategy besides the baseline", transform=left.transAxes, ha="center")
        return save(fig, path)
