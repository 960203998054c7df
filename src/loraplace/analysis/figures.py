"""The figures of a study analysis (PNG, and PDF/SVG on request), drawn headless (matplotlib Agg, no pyplot).

Usage::

    from loraplace.analysis.figures import draw_all
    paths = draw_all(analysis, out_dir, ("png", "pdf"))    # {"pareto": Path, "decision": ..., "curves": ..., ...}

Every strategy keeps one colour (Okabe-Ito, colour-blind safe), one marker, one line style and one
hatch across figures, so the figures still read in greyscale. Fonts are >= 10 pt.
"""

from __future__ import annotations

import math
from pathlib import Path

import matplotlib
import numpy as np
from matplotlib.colors import LogNorm, Normalize
from matplotlib.figure import Figure
from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

from loraplace.analysis.decision_figures import decision, forgetting
from loraplace.analysis.lr_figure import lr_curves
from loraplace.analysis.findings import StudyAnalysis
from loraplace.analysis.style import MIB, RC, count, half_width, save, saving_as, styles
from loraplace.core.metrics import QUALITY
from loraplace.core.roles import ROLES  # rows of the block x role map, in data-flow order
from loraplace.core.stats import pareto_front

def _quality_panel(ax, a: StudyAnalysis, st: dict, xmetric: str, xlabel: str, logx: bool, quality: str) -> None:
    """One quality-vs-cost panel: means, interval bars, the Pareto frontier of this pair, references.

    quality: eval_loss (lower is better) or accuracy (higher is better, drawn in %; with one seed
    the bar is the 95% Wilson interval over the accuracy examples)."""
    acc = quality == "accuracy"  # drawn in % of examples
    higher = QUALITY[quality].higher_is_better
    scale = 100.0 if acc else 1.0
    pts = {}
    for s in a.strategies:
        q, x = s.metrics.get(quality), s.mean(xmetric)
        if q is None or math.isnan(x):
            continue
        y = q.mean * scale
        if s.stopped is None:  # a stopped strategy's value is a rung's: drawn hollow, never on the frontier
            pts[s.strategy] = (x, y)
        yerr = None if q.half is None else q.half * scale
        if yerr is None and acc and s.wilson() is not None:
            lo, hi = s.wilson()
            yerr = [[y - lo * scale], [hi * scale - y]]  # asymmetric
        xerr = None if logx else (half_width(s, xmetric) or None)
        stopped = s.stopped is not None
        label = s.strategy + (f" (stopped at step {s.stopped['step']}: its value there)" if stopped else "")
        ax.errorbar(x, y, yerr=yerr, xerr=xerr, fmt=st[s.strategy]["marker"], color=st[s.strategy]["color"],
                    ms=9, capsize=4, elinewidth=1.3, label=label, zorder=3, mfc="none" if stopped else None,
                    alpha=0.8 if stopped else 1.0)
        if s.strategy == a.baseline:
            ax.plot(x, y, "o", ms=20, mfc="none", mec="black", mew=1.5, zorder=4, label="baseline (ringed)")
            ax.annotate("baseline", (x, y), xytext=(12, 12), textcoords="offset points", fontsize=10)
    front = pareto_front({k: (x, -y if higher else y) for k, (x, y) in pts.items()})
    fr = [pts[n] for n in front]
    if len(fr) >= 2:
        ax.plot([p[0] for p in fr], [p[1] for p in fr], color="black", ls="--", lw=1.2, zorder=2,
                label="Pareto frontier")
    elif len(fr) == 1:
        ax.plot(*fr[0], "k+", ms=14, zorder=2, label="Pareto frontier (one point)")
    zero = a.zero_shot_accuracy if acc else a.zero_shot_loss
    if zero is not None:
        ax.axhline(zero * scale, color="dimgray", ls=":", lw=1.5, label="zero-shot (base model)")
    if logx and pts:
        ax.set_xscale("log")
        ax.xaxis.set_major_locator(LogLocator(subs=(1.0, 2.0, 5.0)))
        ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: count(v)))
        ax.xaxis.set_minor_formatter(NullFormatter())
    ax.set_xlabel(xlabel)
    ax.set_ylabel("Accuracy (% of examples)" if acc else "Eval loss (nats/token)")
    ax.grid(True, which="major", alpha=0.3)
    if not pts:
        ax.text(0.5, 0.5, f"{xmetric if any(quality in s.metrics for s in a.strategies) else quality} not recorded",
                transform=ax.transAxes, ha="center")


def _quality_figure(a: StudyAnalysis, path: Path, quality: str, title: str) -> Path:
    st = styles([s.strategy for s in a.strategies])
    with matplotlib.rc_context(RC):
        fig = Figure(figsize=(13, 5.6), layout="constrained")
        axes = fig.subplots(1, 2)
        _quality_panel(axes[0], a, st, "trainable_params", "Trainable parameters (count, log scale)", True, quality)
        _quality_panel(axes[1], a, st, "train_time_s", "Train time (s)", False, quality)
        axes[0].set_title("Quality vs adapter size")
        axes[1].set_title("Quality vs training time")
        handles, labels = axes[0].get_legend_handles_labels()
        fig.legend(handles, labels, loc="outside right center", frameon=False)
        n = a.min_seeds
        if n >= 2:
            bars = ", bars = 95% t-interval"
        elif quality == "accuracy":
            bars = " (one seed: bars = 95% Wilson interval over the examples)"
        else:
            bars = " (one seed: no interval bars)"
        fig.suptitle(title + ": mean over seeds" + bars)
        return save(fig, path)


def pareto(a: StudyAnalysis, path: Path) -> Path:
    """Eval loss vs trainable params (log x) and vs train time, interval bars, fronts, references."""
    return _quality_figure(a, path, "eval_loss", "Eval loss")


def accuracy(a: StudyAnalysis, path: Path) -> Path:
    """Task accuracy vs trainable params (log x) and vs train time, as ``pareto`` draws eval loss."""
    return _quality_figure(a, path, "accuracy", "Accuracy")


def _smooth(ys: list[float], k: int) -> list[float]:
    """Centred moving average over k points (shrinking at the ends)."""
    h = k // 2
    return [sum(ys[max(0, i - h): i + h + 1]) / len(ys[max(0, i - h): i + h + 1]) for i in range(len(ys))]


def curves(a: StudyAnalysis, path: Path) -> Path:
    """Mean train loss per step for each strategy."""
    st = styles([s.strategy for s in a.strategies])
    with matplotlib.rc_context(RC):
        fig = Figure(figsize=(10, 5.6), layout="constrained")
        ax = fig.subplots()
        longest = max((len(s.curve) for s in a.strategies), default=0)
        k = max(1, longest // 10)  # per-step losses are noisy (each step is one batch): smooth from 20 steps on
        for s in a.strategies:
            if not s.curve:
                continue
            xs, ys = [p[0] for p in s.curve], [p[1] for p in s.curve]
            ax.plot(xs, _smooth(ys, k) if k > 1 else ys, color=st[s.strategy]["color"], ls=st[s.strategy]["ls"],
                    lw=2, marker=st[s.strategy]["marker"], markevery=max(1, len(xs) // 8), ms=7,
                    label=f"{s.strategy} (n={len(s.seeds)})")
        if a.zero_shot_loss is not None:
            ax.axhline(a.zero_shot_loss, color="dimgray", ls=":", lw=1.5, label="zero-shot eval loss")
        ax.set_xlabel("Optimizer step")
        ax.set_ylabel("Train loss (nats/token)")
        smooth = f", moving average over {k} steps" if k > 1 else ""
        ax.set_title(f"Training loss, mean over seeds{smooth}")
        ax.grid(True, alpha=0.3)
        if longest:
            ax.legend(loc="upper right")
        else:
            ax.text(0.5, 0.5, "no training curves recorded", transform=ax.transAxes, ha="center")
        return save(fig, path)


def placement_map(a: StudyAnalysis, path: Path) -> Path:
    """Block x role grid per strategy; cell colour = LoRA rank, white = not adapted."""
    rows = [s for s in a.strategies if s.placement is not None and s.placement.modules]
    present = {m.role for s in rows for m in s.placement.modules.values()}
    roles = [r for r in ROLES if r in present] + sorted(r for r in present - set(ROLES) if r)
    n_blocks = max([int(s.placement.n_blocks or 0) for s in rows] +
                   [m.block + 1 for s in rows for m in s.placement.modules.values()] + [1])
    max_rank = max([m.rank for s in rows for m in s.placement.modules.values()] + [1])
    min_rank = min([m.rank for s in rows for m in s.placement.modules.values()] + [1])
    with matplotlib.rc_context(RC):
        height = max(2.5, len(rows) * (0.33 * max(len(roles), 1) + 1.0) + 0.8)
        fig = Figure(figsize=(12, height), layout="constrained")
        if not rows:
            fig.text(0.5, 0.5, "no placements recorded", ha="center")
            return save(fig, path)
        axes = fig.subplots(len(rows), 1, squeeze=False, sharex=True)[:, 0]
        cmap = matplotlib.colormaps["viridis_r"].with_extremes(bad="white")  # NaN = not adapted
        # ranks spread over more than a factor 16 (rank allocation): a log scale, or rank 1 and 8 look alike
        norm = LogNorm(vmin=min_rank, vmax=max_rank) if max_rank > 16 * min_rank else Normalize(vmin=0, vmax=max_rank)
        mesh = None
        for ax, s in zip(axes, rows):
            grid = [[math.nan] * n_blocks for _ in roles]
            for m in s.placement.modules.values():
                if m.role in roles and m.block >= 0:
                    grid[roles.index(m.role)][m.block] = float(m.rank)
            mesh = ax.pcolormesh(np.ma.masked_invalid(np.array(grid)), cmap=cmap, norm=norm,
                                 edgecolors="lightgray", linewidth=0.5)
            ax.set_yticks([i + 0.5 for i in range(len(roles))], roles)
            ax.invert_yaxis()
            n_mod = len(s.placement.modules)
            params = s.mean("trainable_params")
            ptxt = f", {params:,.0f} params" if not math.isnan(params) else ""
            vtxt = f", {s.placement.variant}" if s.placement is not None and s.placement.variant != "lora" else ""
            ax.set_title(f"{s.strategy}: {n_mod} modules{ptxt}{vtxt}", loc="left")
            ax.set_ylabel("Role")
        step = max(1, n_blocks // 15)
        axes[-1].set_xticks([b + 0.5 for b in range(0, n_blocks, step)], [str(b) for b in range(0, n_blocks, step)])
        axes[-1].set_xlabel("Transformer block (0 = nearest the embeddings)")
        fig.colorbar(mesh, ax=list(axes), label="LoRA rank (white = not adapted)", location="right",
                     fraction=0.025, aspect=25, shrink=min(1.0, 0.4 + 0.6 / len(rows)))
        fig.suptitle("What each strategy adapts")
        return save(fig, path)


def costs(a: StudyAnalysis, path: Path) -> Path:
    """Bars of train time, peak memory and adapter size, with 95% interval whiskers."""
    st = styles([s.strategy for s in a.strategies])
    panels = [("train_time_s", "Train time (s)", 1.0), ("peak_mem_bytes", "Peak memory (MiB)", MIB),
              ("adapter_bytes", "Adapter size on disk (MiB)", MIB)]
    with matplotlib.rc_context(RC):
        fig = Figure(figsize=(13, 5.2), layout="constrained")
        axes = fig.subplots(1, 3)
        names = [s.strategy for s in a.strategies]
        for ax, (metric, label, scale) in zip(axes, panels):
            have = [s for s in a.strategies if metric in s.metrics]
            if not have:
                ax.text(0.5, 0.5, f"{metric} not recorded", transform=ax.transAxes, ha="center")
            for s in have:
                i = names.index(s.strategy)
                err = half_width(s, metric, scale) or None
                ax.bar(i, s.mean(metric) / scale, yerr=err, capsize=5, color=st[s.strategy]["color"],
                       hatch=st[s.strategy]["hatch"], edgecolor="black", linewidth=0.8)
            ax.set_xticks(range(len(names)), names, rotation=30, ha="right")
            ax.set_ylabel(label)
            ax.set_title(label.split(" (")[0])
            ax.grid(True, axis="y", alpha=0.3)
        fig.suptitle("Cost per strategy: mean over seeds" + (", whiskers = 95% t-interval" if a.min_seeds >= 2 else ""))
        return save(fig, path)


def probe_heatmap(a: StudyAnalysis, path: Path) -> Path:
    """One block x role heatmap per probe criterion: colour = the module's percentile rank among all modules by
    its mean score over probe seeds (auto uses only the order; one outlier would wash out a linear scale);
    dots mark the modules ``auto`` adapts, on the panel of the criterion it used."""
    probe = a.probe
    chosen_by = a.config.auto.score if a.config is not None else None
    auto = a.get("auto")
    chosen = set(auto.placement.modules) if auto is not None and auto.placement is not None else set()
    layout = probe.layout()
    roles = sorted({r for _, r in layout.values()}, key=lambda r: ROLES.index(r) if r in ROLES else len(ROLES))
    n_blocks = max(b for b, _ in layout.values()) + 1
    criteria = probe.criteria
    with matplotlib.rc_context(RC):
        fig = Figure(figsize=(12, 1.2 + len(criteria) * (0.33 * len(roles) + 1.1)), layout="constrained")
        axes = fig.subplots(len(criteria), 1, squeeze=False, sharex=True)[:, 0]
        cmap = matplotlib.colormaps["magma_r"]
        for ax, crit in zip(axes, criteria):
            mean = probe.mean(crit)
            top = max(mean.values())
            order = sorted(mean, key=lambda m: (mean[m], m))
            grid = np.full((len(roles), n_blocks), np.nan)
            for i, m in enumerate(order):
                b, r = layout[m]
                grid[roles.index(r), b] = i / max(1, len(order) - 1)
            mesh = ax.pcolormesh(np.ma.masked_invalid(grid), cmap=cmap, norm=Normalize(0, 1), edgecolors="lightgray",
                                 linewidth=0.5)
            if crit == chosen_by and chosen:
                pts = [(layout[m][0] + 0.5, roles.index(layout[m][1]) + 0.5) for m in chosen if m in layout]
                ax.scatter([p[0] for p in pts], [p[1] for p in pts], s=45, c="#56B4E9", edgecolors="black",
                           linewidths=0.6, zorder=3, label="adapted by auto")
                ax.legend(loc="upper right", bbox_to_anchor=(1.0, 1.35), frameon=False)
            ax.set_yticks([i + 0.5 for i in range(len(roles))], roles)
            ax.invert_yaxis()
            rho = [r for _, _, r in probe.rank_correlation(crit)]
            rtxt = f"; Spearman rho across probe seeds {sum(rho) / len(rho):.2f}" if rho else ""
            ax.set_title(f"{crit} (max {top:.3g}){' = auto.score' if crit == chosen_by else ''}{rtxt}", loc="left")
            ax.set_ylabel("Role")
        step = max(1, n_blocks // 15)
        axes[-1].set_xticks([b + 0.5 for b in range(0, n_blocks, step)], [str(b) for b in range(0, n_blocks, step)])
        axes[-1].set_xlabel("Transformer block (0 = nearest the embeddings)")
        fig.colorbar(mesh, ax=list(axes), label="percentile rank of the score (1 = highest)", location="right", fraction=0.025, aspect=25)
        fig.suptitle(f"Probe scores per module, mean over probe seeds {', '.join(map(str, probe.seeds))}")
        return save(fig, path)


FIGURES = {"pareto": pareto, "decision": decision, "accuracy": accuracy, "forgetting": forgetting, "curves": curves,
           "placement_map": placement_map, "costs": costs}


def draw_all(a: StudyAnalysis, out_dir: Path, formats: tuple[str, ...] = ("png", "pdf")) -> dict[str, Path]:
    """Every figure as out_dir/<name>.<format> for each of ``formats`` (the same figure saved in each); returns
    {name: the PNG path (the first format's without PNG)}. ``accuracy`` only when trials carry accuracy,
    ``forgetting`` when they carry forgetting, ``probe`` only when the study has probe scores."""
    out_dir = Path(out_dir)
    with saving_as(formats):
        out_dir.mkdir(parents=True, exist_ok=True)
        figs = {name: fn(a, out_dir / f"{name}.png") for name, fn in FIGURES.items()
                if (name != "accuracy" or a.has_accuracy) and (name != "forgetting" or a.has_forgetting)}
        if getattr(a, "probe", None) is not None:  # the study ran a probe (strategy auto)
            figs["probe"] = probe_heatmap(a, out_dir / "probe.png")
        if a.tuning is not None and a.tuning.curves:  # the study searched the learning rate
            figs["lr"] = lr_curves(a.tuning, a.metric, out_dir / "lr.png")
    return figs
