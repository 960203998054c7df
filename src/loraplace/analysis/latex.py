"""The study's tables as LaTeX a paper can ``\\input`` as they are: booktabs, intervals, the best value in bold.

Usage::

    text = tables_tex(a)          # a: analysis.findings.StudyAnalysis; two tables, each with a caption and \\label
    escape("top_half")            # 'top\\_half'

Every number comes from the analysis (``a``), never from another rendering of it, and is written with its
95% interval across seeds as ``$3.141 \\pm 0.089$``. In each column where "better" means something (lower eval
loss, perplexity and forgetting; higher accuracy and retained improvement) the best strategy's value is bold.
The paired-delta table marks deltas whose interval excludes 0 with a dagger; the captions say what every mark
means. Needs only ``\\usepackage{booktabs}``.
"""

from __future__ import annotations

import math

from loraplace.analysis.findings import StrategyStats, StudyAnalysis
from loraplace.core.stats import Interval, Paired
from loraplace.core.text import lr_text

_ESCAPES = {"\\": r"\textbackslash{}", "&": r"\&", "%": r"\%", "$": r"\$", "#": r"\#", "_": r"\_", "{": r"\{",
            "}": r"\}", "~": r"\textasciitilde{}", "^": r"\textasciicircum{}", "|": r"\textbar{}",
            "<": r"\textless{}", ">": r"\textgreater{}"}


def escape(text: str) -> str:
    """Plain text as LaTeX text (strategy names such as ``top_half`` or ``random:2``)."""
    return "".join(_ESCAPES.get(c, c) for c in str(text))


def params(n: float) -> str:
    """A parameter count as a paper writes it: '4.88M', '921.6k'."""
    if math.isnan(n):
        return "--"
    for unit, div in (("B", 1e9), ("M", 1e6), ("k", 1e3)):
        if n >= div:
            return f"{n / div:.3g}{unit}"
    return f"{n:.0f}"


def lr_tex(lr: float) -> str:
    """A learning rate in math mode: 1.5e-3 -> $1.5\\times10^{-3}$."""
    mantissa, exp = lr_text(lr).split("e")
    return f"${mantissa}\\times10^{{{exp}}}$" if mantissa != "1" else f"$10^{{{exp}}}$"


def number(iv: Interval | None, fmt: str, scale: float = 1.0, bold: bool = False) -> str:
    """'$3.141 \\pm 0.089$' (mean alone with one seed or no spread); bold as ``\\mathbf``; '--' when missing."""
    if iv is None or math.isnan(iv.mean):
        return "--"
    m = fmt.format(iv.mean * scale)
    body = m if iv.lo is None or not iv.half else f"{m} \\pm {fmt.format(iv.half * scale)}"
    return f"$\\mathbf{{{body}}}$" if bold else f"${body}$"


def delta(p: Paired | None, fmt: str, scale: float = 1.0) -> str:
    """A paired delta '$+0.331 \\pm 0.049^{\\dagger}$' (dagger: its interval excludes 0)."""
    if p is None:
        return "--"
    d = p.diff
    half = "" if d.lo is None else f" \\pm {fmt.replace('+', '').format(d.half * scale)}"
    mark = "^{\\dagger}" if p.significant else ""
    return f"${fmt.format(d.mean * scale)}{half}{mark}$"


# column: (header, metric, format, scale, better: "low" | "high" | None)
_RESULTS = [
    ("Eval loss", "eval_loss", "{:.4f}", 1.0, "low"),
    ("Accuracy (\\%)", "accuracy", "{:.1f}", 100.0, "high"),
    ("Forgetting", "forgetting", "{:.4f}", 1.0, "low"),
    ("Retained (\\%)", "retained", "{:.1f}", 100.0, "high"),
    ("Train time (s)", "train_time_s", "{:.1f}", 1.0, None),
]


def _value(s: StrategyStats, metric: str) -> Interval | None:
    return s.retained if metric == "retained" else s.metrics.get(metric)


def _best(rows: list[StrategyStats], metric: str, better: str | None, baseline: str) -> str | None:
    if better is None:
        return None
    have = [(s.strategy, _value(s, metric).mean) for s in rows if _value(s, metric) is not None
            and not (metric == "retained" and s.strategy == baseline)]  # the baseline's 100% is by definition
    if len(have) < 2:
        return None
    return (min if better == "low" else max)(have, key=lambda kv: kv[1])[0]


def results_table(a: StudyAnalysis, label: str = "tab:loraplace-results") -> str:
    rows = [s for s in a.strategies if s.stopped is None]
    cols = [c for c in _RESULTS if any(_value(s, c[1]) is not None for s in rows)]
    best = {c[1]: _best(rows, c[1], c[4], a.baseline) for c in cols}
    lines = [r"\begin{table}[t]", r"\centering", r"\small", r"\setlength{\tabcolsep}{4pt}",
             r"\begin{tabular}{l" + "r" * (2 + len(cols)) + "}", r"\toprule",
             " & ".join(["Strategy", "Params", "LR"] + [c[0] for c in cols]) + r" \\", r"\midrule"]
    for s in rows:
        cells = [escape(s.strategy), params(s.mean("trainable_params")), "--" if s.lr is None else lr_tex(s.lr)]
        for header, metric, fmt, scale, better in cols:
            if metric == "retained" and s.strategy == a.baseline:
                cells.append("100 (ref.)")
                continue
            cells.append(number(_value(s, metric), fmt, scale, bold=best[metric] == s.strategy))
        lines.append(" & ".join(cells) + r" \\")
    stopped = [s.strategy for s in a.strategies if s.stopped is not None]
    seeds = sorted({len(s.seeds) for s in rows}) or [0]
    n = f"{seeds[0]} seed{'s' if seeds[0] != 1 else ''}" if len(seeds) == 1 else f"{seeds[0]}-{seeds[-1]} seeds"
    caption = (f"Results per strategy: mean $\\pm$ half-width of the 95\\% Student-t interval across seeds "
               f"({n}; a value without $\\pm$ had one seed or no spread). Params: trainable LoRA parameters. LR: the peak "
               "learning rate the strategy trained at. Bold: the best "
               "strategy of a column (lower eval loss, perplexity and forgetting; higher accuracy and retained "
               f"improvement). Retained: the share of {escape(a.baseline)}'s improvement over the base model in "
               f"{escape(a.metric.replace('_', ' '))}, per seed.")
    if "forgetting" in [c[1] for c in cols]:
        caption += " Forgetting: the adapted model's loss minus the base model's on the forgetting set, nats/token."
    if stopped:
        caption += f" Not shown: {escape(', '.join(stopped))} (stopped by racing)."
    lines += [r"\bottomrule", r"\end{tabular}", f"\\caption{{{caption}}}", f"\\label{{{label}}}", r"\end{table}"]
    return "\n".join(lines)


def deltas_table(a: StudyAnalysis, label: str = "tab:loraplace-deltas") -> str:
    rows = [s for s in a.strategies if s.stopped is None and s.strategy != a.baseline]
    cols = [("$\\Delta$ eval loss", "paired", "{:+.4f}", 1.0),
            ("$\\Delta$ accuracy (pp)", "paired_accuracy", "{:+.1f}", 100.0),
            ("$\\Delta$ forgetting", "paired_forgetting", "{:+.4f}", 1.0)]
    cols = [c for c in cols if any(getattr(s, c[1]) is not None for s in rows)]
    lines = [r"\begin{table}[t]", r"\centering", r"\begin{tabular}{l" + "r" * len(cols) + "}", r"\toprule",
             " & ".join(["Strategy"] + [c[0] for c in cols]) + r" \\", r"\midrule"]
    for s in rows:
        lines.append(" & ".join([escape(s.strategy)] + [delta(getattr(s, c[1]), c[2], c[3]) for c in cols]) + r" \\")
    caption = (f"Paired differences from the baseline {escape(a.baseline)}: per seed, strategy minus baseline, "
               "mean $\\pm$ half-width of the 95\\% Student-t interval across the paired seeds. $^{\\dagger}$: the "
               "interval excludes 0 (paired t-test $p < 0.05$). Eval loss and forgetting: positive is worse; "
               "accuracy, in percentage points: positive is better.")
    lines += [r"\bottomrule", r"\end{tabular}", f"\\caption{{{caption}}}", f"\\label{{{label}}}", r"\end{table}"]
    return "\n".join(lines)


def tables_tex(a: StudyAnalysis) -> str:
    head = ("% Written by loraplace report from the study's database; include with \\input{report/tables.tex}\n"
            "% (needs \\usepackage{booktabs}).\n")
    return head + results_table(a) + "\n\n" + deltas_table(a) + "\n"
