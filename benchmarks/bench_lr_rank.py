"""Where the best learning rate sits as rank and placement change, under a fixed alpha and under alpha_per_rank.

Usage::

    python benchmarks/bench_lr_rank.py run --out studies/lr_rank       # the searches (one study per rank and alpha rule)
    python benchmarks/bench_lr_rank.py figure --out studies/lr_rank    # table + lr_rank.png from what they stored

Each study searches ``GRID`` exhaustively (one tuning seed, every rate to the end) for all_linear, attention_only
and mlp_only at one ``train.rank`` (not budget-matched: the rank itself is what varies), with ``train.alpha`` 32
fixed (the LoRA scale alpha/r falls as the rank grows) or as ``train.alpha_per_rank`` sets it in a budget study
(each module's alpha = train.alpha x r / train.rank, so every rank keeps the scale 32 / 16 = 2: here
``train.alpha`` = 2r at ``train.rank`` = r, since alpha_per_rank itself is relative to train.rank and would give
alpha 32 at train.rank = r); rank 16 is the same under both. Its final trials train one seed at the chosen rate.
The figure draws each placement's best rate (the grid point with the lowest selection loss, and the parabola
through it and its neighbours on log10(lr) where both exist) against the rank, one panel per alpha rule.
"""

from __future__ import annotations

import argparse
import math
import subprocess
import sys
from pathlib import Path

from loraplace.core.text import lr_text
from loraplace.store.db import Store

GRID = [1e-4, 3e-4, 1e-3, 3e-3, 1e-2, 3e-2]
RANKS = [4, 16, 64]
STRATEGIES = ["all_linear", "attention_only", "mlp_only"]


def runs() -> list[tuple[str, int, bool]]:
    """(name, rank, per_rank) of each study; rank 16 once (both rules give alpha 32 there)."""
    out = [(f"fixed_r{r}", r, False) for r in RANKS]
    return out + [(f"per_rank_r{r}", r, True) for r in RANKS if r != 16]


def run(out: Path) -> None:
    for name, rank, per_rank in runs():
        cmd = [sys.executable, "-m", "loraplace", "study", f"strategies=[{','.join(STRATEGIES)}]", "seeds=[0]",
               f"train.rank={rank}", *([f"train.alpha={2 * rank}"] if per_rank else []),
               f"tune.lr=[{','.join(map(str, GRID))}]", "tune.at=[]", "tune.record=[]", "tune.compare=false",
               f"out={out / name}"]
        print(" ".join(cmd), flush=True)
        subprocess.run(cmd, check=True)


def vertex(losses: dict[float, float], best: float) -> float:
    """The parabola's vertex through the best grid point and its two neighbours, on log10(lr); the grid point
    itself at an edge (or where the three points do not curve upwards)."""
    rates = sorted(losses)
    i = rates.index(best)
    if i == 0 or i == len(rates) - 1:
        return best
    x = [math.log10(r) for r in rates[i - 1:i + 2]]
    y = [losses[r] for r in rates[i - 1:i + 2]]
    den = (x[0] - x[1]) * (x[0] - x[2]) * (x[1] - x[2])
    a = (x[2] * (y[1] - y[0]) + x[1] * (y[0] - y[2]) + x[0] * (y[2] - y[1])) / den
    b = (x[2] ** 2 * (y[0] - y[1]) + x[1] ** 2 * (y[2] - y[0]) + x[0] ** 2 * (y[1] - y[2])) / den
    return best if a <= 0 else 10 ** (-b / (2 * a))


def read(out: Path) -> dict[tuple[bool, int, str], tuple[float, float, dict]]:
    """(alpha_per_rank, rank, strategy) -> (best grid rate, vertex, {rate: selection loss})."""
    got = {}
    for name, rank, per_rank in runs():
        with Store.open(out / name, create=False) as store:
            meta = store.get_meta("tune")
        for strategy, c in meta["choices"].items():
            losses = {float(k): v for k, v in c["losses"].items()}
            for rule in ([per_rank] if rank != 16 else [False, True]):
                got[(rule, rank, strategy)] = (c["lr"], vertex(losses, c["lr"]), losses)
    return got


def figure(out: Path) -> None:
    import matplotlib
    from matplotlib.figure import Figure

    from loraplace.analysis.style import RC, styles

    got = read(out)
    print("| alpha | rank | " + " | ".join(f"{s} best (vertex)" for s in STRATEGIES) + " |")
    print("|---|---:|" + "---|" * len(STRATEGIES))
    for rule in (False, True):
        for r in RANKS:
            cells = [f"{lr_text(got[(rule, r, s)][0])} ({got[(rule, r, s)][1]:.2g})" for s in STRATEGIES]
            print(f"| {'alpha x r / 16' if rule else '32 fixed'} | {r} | " + " | ".join(cells) + " |")
    st = styles(STRATEGIES)
    with matplotlib.rc_context(RC):
        fig = Figure(figsize=(11, 4.8), layout="constrained")
        axes = fig.subplots(1, 2, sharey=True)
        for ax, rule in zip(axes, (False, True)):
            for s in STRATEGIES:
                ys = [got[(rule, r, s)][1] for r in RANKS]
                ax.plot(RANKS, ys, color=st[s]["color"], ls=st[s]["ls"], marker=st[s]["marker"], ms=8, lw=2, label=s)
            ax.set_xscale("log", base=2)
            ax.set_yscale("log")
            ax.set_xticks(RANKS, [str(r) for r in RANKS])
            ax.set_yticks(GRID, [lr_text(x) for x in GRID])
            ax.set_xlabel("LoRA rank")
            ax.set_title("alpha 32 fixed (scale 32/r)" if not rule else "alpha_per_rank (scale 2 at every rank)")
            ax.grid(True, alpha=0.3)
        axes[0].set_ylabel("Best peak learning rate (vertex of the parabola on log lr)")
        axes[0].legend(loc="best")
        fig.savefig(out / "lr_rank.png", dpi=120, facecolor="white")
    print(f"\n{out / 'lr_rank.png'}")


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("what", choices=("run", "figure"))
    ap.add_argument("--out", type=Path, default=Path("studies/lr_rank"))
    args = ap.parse_args(argv)
    (run if args.what == "run" else figure)(args.out)


if __name__ == "__main__":
    main()
