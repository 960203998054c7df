"""How numbers with intervals are written: in sentences (evidence, verdicts) and in table cells.

Usage::

    interval_text(iv)                   # '3.1402 ± 0.0886' or '3.1402 (n=1, no interval)'
    retained_text(iv)                   # '71.6% [95% CI 69.2%, 74.0%]'
    delta_text(paired, "loss")          # 'Δ loss vs baseline +0.3309 [95% CI +0.2823, +0.3795], p=0.002'
    interval_cell(iv, "{:.4f}")         # '3.1402 ± 0.0886' (a table cell: the mean alone when there is no spread)
    paired_cell(paired)                 # '+0.3309 ± 0.0486*' (* = the interval excludes 0)

``±`` is always the half-width of the 95% interval (``core.stats``); accuracies are fractions,
written as percentages, and their deltas in percentage points.
"""

from __future__ import annotations

from loraplace.core.stats import Interval, Paired

NONE = "—"  # a cell with no value


def pct(x: float) -> str:
    return f"{100 * x:.1f}%"


def interval_text(iv: Interval, fmt: str = "{:.4f}", scale: float = 1.0) -> str:
    """'1.2345 ± 0.0123' or '1.2345 (n=1, no interval)'; values times ``scale``."""
    m = fmt.format(iv.mean * scale)
    if iv.lo is None:
        return f"{m} (n={iv.n}, no interval)"
    return f"{m} ± {fmt.format(iv.half * scale)}"


def retained_text(iv: Interval) -> str:
    """A share with its interval: '71.6% [95% CI 69.2%, 74.0%]'."""
    if iv.lo is None:
        return f"{pct(iv.mean)} (n={iv.n}, no interval)"
    return f"{pct(iv.mean)} [95% CI {pct(iv.lo)}, {pct(iv.hi)}]"


def accuracy_text(acc: Interval, wilson: tuple[float, float] | None = None, n_examples: float | None = None) -> str:
    """'42.0% ± 3.1%' across seeds; with one seed and its Wilson interval over the examples
    '42.0% (one seed; 95% Wilson 29.3-55.9%, n=50 examples)'."""
    if wilson is not None:
        return f"{pct(acc.mean)} (one seed; 95% Wilson {100 * wilson[0]:.1f}-{pct(wilson[1])}, n={n_examples:.0f} examples)"
    return interval_text(acc, "{:.1f}%", 100) if acc.lo is not None else f"{pct(acc.mean)} (n={acc.n}, no interval)"


def delta_text(pr: Paired, what: str, fmt: str = "{:+.4f}", scale: float = 1.0, unit: str = "") -> str:
    """A paired difference in a sentence, with its interval and p-value."""
    d = pr.diff
    p = f", p={pr.p_value:.3g}" if pr.p_value is not None else ""
    ci = (f" [95% CI {fmt.format(d.lo * scale)}, {fmt.format(d.hi * scale)}{unit}]" if d.lo is not None
          else " (one pair, no interval)")
    return f"Δ {what} vs baseline {fmt.format(d.mean * scale)}{unit}{ci}{p}"


def interval_cell(iv: Interval | None, fmt: str, divide: float = 1.0) -> str:
    """A table cell: 'mean ± half' (values divided by ``divide``, e.g. bytes -> MiB); the mean alone with one
    seed (no interval) or a zero-width interval (identical across seeds, e.g. parameter counts)."""
    if iv is None:
        return NONE
    m = fmt.format(iv.mean / divide)
    return m if iv.lo is None or iv.half == 0 else f"{m} ± {fmt.format(iv.half / divide)}"


def paired_cell(paired: Paired | None, fmt: str = "{:+.4f}", scale: float = 1.0, unit: str = "") -> str:
    """A paired delta in a table cell: 'mean ± half*' (* = significant), the mean alone for one pair."""
    if paired is None:
        return NONE
    d = paired.diff
    if d.lo is None:
        return fmt.format(scale * d.mean) + unit
    half = fmt.replace("+", "").format(scale * d.half)  # the same precision, no sign
    return f"{fmt.format(scale * d.mean)} ± {half}{unit}" + ("*" if paired.significant else "")


def accuracy_cell(acc: Interval | None, wilson: tuple[float, float] | None = None) -> str:
    """'42.0 ± 3.1%' across seeds; one seed: '42.0% [29.3, 55.9]' (95% Wilson interval over the examples)."""
    if acc is None:
        return NONE
    if wilson is not None:
        return f"{100 * acc.mean:.1f}% [{100 * wilson[0]:.1f}, {100 * wilson[1]:.1f}]"
    if acc.lo is None or acc.half == 0:
        return f"{100 * acc.mean:.1f}%"
    return f"{100 * acc.mean:.1f} ± {100 * acc.half:.1f}%"


def retained_cell(iv: Interval | None, is_baseline: bool = False) -> str:
    """Retained improvement in a table cell: '71.6 ± 2.4%', '100% (ref.)' for the baseline."""
    if iv is None:
        return NONE
    if is_baseline:
        return "100% (ref.)"
    return f"{100 * iv.mean:.1f}%" if iv.lo is None else f"{100 * iv.mean:.1f} ± {100 * iv.half:.1f}%"
