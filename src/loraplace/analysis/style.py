"""The look shared by every figure (one colour, marker, line style and hatch per strategy, fonts) and saving a
figure in each format the report asks for.

Usage::

    st = styles(names); ...; return save(fig, out_dir / "pareto.png")   # inside ``with saving_as(("png", "pdf")):``
"""

from __future__ import annotations

from contextlib import contextmanager
from contextvars import ContextVar
from pathlib import Path

from matplotlib.figure import Figure

from loraplace.analysis.findings import StrategyStats
from loraplace.core.config import ConfigError

COLOURS = ["#0072B2", "#D55E00", "#009E73", "#CC79A7", "#E69F00", "#56B4E9", "#000000", "#F0E442"]
MARKERS = ["o", "s", "^", "D", "v", "P", "X", "*"]
LINESTYLES = ["-", "--", "-.", ":", (0, (5, 1, 1, 1, 1, 1)), (0, (1, 1)), (0, (8, 2)), (0, (3, 1, 1, 1))]
HATCHES = ["", "//", "\\\\", "xx", "..", "++", "oo", "--"]
DPI = 120
RC = {
    "font.size": 11, "axes.titlesize": 12, "axes.labelsize": 11, "xtick.labelsize": 10,
    "ytick.labelsize": 10, "legend.fontsize": 10, "figure.titlesize": 13, "hatch.linewidth": 0.8,
    "pdf.fonttype": 42, "svg.fonttype": "path",  # TrueType fonts embedded in PDFs (what journals ask); SVG text as paths
}
MIB = 2**20  # bytes per MiB


def styles(names: list[str]) -> dict[str, dict]:
    """Per-strategy colour, marker, line style and hatch, in the given order. Past 8 strategies the colours repeat
    with the markers, line styles and hatches shifted by one more each round, so no two of 64 strategies look alike."""
    out = {}
    for i, n in enumerate(names):
        shift = i // 8  # 0 for the first eight: colour, marker, line and hatch go together
        out[n] = {"color": COLOURS[i % 8], "marker": MARKERS[(i + shift) % 8], "ls": LINESTYLES[(i + shift) % 8],
                  "hatch": HATCHES[(i + shift) % 8]}
    return out


def half_width(s: StrategyStats, metric: str, scale: float = 1.0) -> float:
    iv = s.metrics.get(metric)
    return 0.0 if iv is None or iv.half is None else iv.half / scale


def count(v: float) -> str:
    """1500000 -> '1.5M', 400000 -> '400k'."""
    for unit, div in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(v) >= div:
            return f"{v / div:g}{unit}"
    return f"{v:g}"


FORMATS = ("png", "pdf", "svg")  # what --format may ask for; PDF and SVG are vector, their fonts embedded
_formats: ContextVar[tuple[str, ...]] = ContextVar("formats", default=("png",))  # what draw_all writes now


def save(fig: Figure, path: Path) -> Path:
    """The figure in every format ``draw_all`` asks for, beside each other (``path``'s name, each suffix); returns
    the PNG (or the first format's) path."""
    out = []
    for fmt in _formats.get():
        target = path.with_suffix(f".{fmt}")
        fig.savefig(target, dpi=DPI, facecolor="white", format=fmt, metadata=_METADATA.get(fmt))
        out.append(target)
    return next((p for p in out if p.suffix == ".png"), out[0])


@contextmanager
def saving_as(formats: tuple[str, ...]):
    """Within it, ``save`` writes each figure in every one of ``formats`` (of ``FORMATS``)."""
    bad = [f for f in formats if f not in FORMATS]
    if bad or not formats:
        raise ConfigError(f"--format: {', '.join(bad) or 'none'} is not a figure format; choose from {', '.join(FORMATS)}")
    token = _formats.set(tuple(formats))
    try:
        yield
    finally:
        _formats.reset(token)


_METADATA = {"pdf": {"Creator": "loraplace", "CreationDate": None}, "svg": {"Date": None}, "png": None}
