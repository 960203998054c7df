"""The learning-rate figure: each strategy's selection loss against the peak learning rate (log axis), its chosen
rate marked, so a reader sees that every optimum lies inside the grid (or that it does not).

Usage::

    path = lr_curves(tuning, "eval_loss", out_dir / "lr.png")    # tuning: analysis.tuning.Tuning; inside saving_as(...)
"""

from __future__ import annotations

from pathlib import Path

import matplotlib
from matplotlib.figure import Figure
from matplotlib.ticker import FuncFormatter, NullFormatter

from loraplace.analysis.style import RC, save, styles
from loraplace.analysis.tuning import Tuning
from loraplace.core.metrics import QUALITY
from loraplace.core.text import lr_text


def lr_curves(t: Tuning, metric: str, path: Path) -> Path:
    """One line per strategy over the grid: the mean final selection value over the tuning seeds with its 95%
    interval (bars; none with one seed), a hollow marker at the rung value of a rate halving stopped, an x on the
    axis where a rate diverged, and a ringed star at the chosen rate."""
    st = styles(list(t.curves))
    label = QUALITY[metric].label
    with matplotlib.rc_context(RC):
        fig = Figure(figsize=(11.5, 5.8), layout="constrained")
        ax = fig.subplots()
        ax.set_xscale("log")
        for name, points in t.curves.items():
            s = st[name]
            done = [p for p in points if p.value is not None]
            xs, ys = [p.lr for p in done], [p.value.mean for p in done]
            err = [p.value.half or 0.0 for p in done]
            ax.errorbar(xs, ys, yerr=err if any(err) else None, color=s["color"], ls=s["ls"], marker=s["marker"], lw=2,
                        ms=8, capsize=4, label=name, zorder=3)
            for p in points:
                if p.status == "stopped" and p.rung is not None:
                    ax.plot(p.lr, p.rung[1], s["marker"], color=s["color"], mfc="none", ms=8, alpha=0.7, zorder=2)
                elif p.status == "failed":
                    ax.plot(p.lr, 0.0, "x", color=s["color"], ms=10, mew=2, transform=ax.get_xaxis_transform(),
                            clip_on=False, zorder=4)
            chosen = t.chosen(name)
            best = next((p for p in done if p.lr == chosen), None)
            if best is not None:
                ax.plot(best.lr, best.value.mean, "*", color=s["color"], ms=18, mec="black", mew=1.2, zorder=5)
        clipped = _clip_off_scale(ax, t, st)
        ax.set_xticks(t.grid)
        ax.xaxis.set_major_formatter(FuncFormatter(lambda x, _: lr_text(x)))
        ax.xaxis.set_minor_formatter(NullFormatter())
        ax.set_xlabel("Peak learning rate (log scale)")
        ax.set_ylabel(f"Selection {label}" + (" (nats/token)" if metric == "eval_loss" else ""))
        seeds = ", ".join(map(str, t.seeds))
        ax.set_title(f"Learning-rate search on a selection split of {t.selection} training examples "
                     f"(tuning seed{'s' if len(t.seeds) > 1 else ''} {seeds})")
        ax.grid(True, which="major", alpha=0.3)
        handles, labels = ax.get_legend_handles_labels()
        notes = ["★ chosen rate", "hollow: stopped by halving (its rung value)"]
        if clipped:
            notes.append("▲ above the axis: off scale (its value)")
        if any(p.status == "failed" for ps in t.curves.values() for p in ps):
            notes.append("x on the axis: diverged")
        ax.legend(handles, labels, loc="upper left", bbox_to_anchor=(1.01, 1.0), title="\n".join(notes),
                  title_fontsize=9, alignment="left")
        return save(fig, path)


def _values(t: Tuning) -> list[float]:
    """Every plotted value: finished rates' means and stopped rates' rung values."""
    vals = [p.value.mean for ps in t.curves.values() for p in ps if p.value is not None]
    return vals + [p.rung[1] for ps in t.curves.values() for p in ps if p.status == "stopped" and p.rung is not None]


OFF_SCALE = 3.0  # the y axis ends this many times (median - best) above the best value: a rate that blew up (loss
# 6 where the optimum is 2, with a t-interval of +-30 over two seeds) would otherwise flatten every other curve


def _clip_off_scale(ax, t: Tuning, st: dict) -> bool:
    """Keep the region around the optima readable: values above the cap are drawn as a triangle at the top edge
    with their value written beside it. True when some value is off scale."""
    vals = sorted(_values(t))
    if len(vals) < 3:
        return False
    best, median = vals[0], vals[len(vals) // 2]
    top = best + OFF_SCALE * max(median - best, 1e-6)
    if vals[-1] <= top:
        ax.set_ylim(best - 0.08 * (vals[-1] - best) - 1e-6, vals[-1] + 0.08 * (vals[-1] - best) + 1e-6)
        return False
    ax.set_ylim(best - 0.08 * (top - best), top)
    stacked: dict[float, int] = {}  # rate -> off-scale values written there so far (written one under another)
    for name, points in t.curves.items():
        for p in points:
            v = p.value.mean if p.value is not None else (p.rung[1] if p.status == "stopped" and p.rung else None)
            if v is not None and v > top:
                k = stacked[p.lr] = stacked.get(p.lr, -1) + 1
                ax.plot(p.lr, 0.985, "^", color=st[name]["color"], ms=10, transform=ax.get_xaxis_transform(),
                        clip_on=False, zorder=6)
                ax.annotate(f"{v:.2f}", (p.lr, 0.985), xycoords=("data", "axes fraction"), xytext=(8, -4 - 11 * k),
                            textcoords="offset points", fontsize=8, color=st[name]["color"])
    return True
