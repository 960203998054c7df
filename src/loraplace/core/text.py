"""Plain-text presentation shared by every command: aligned tables, counts, byte sizes.

Usage::

    print(text_table(["role", "params"], [["attn.q", fmt_int(1024)]]))
    fmt_bytes(4.3e9)   # "4.3 GB" (10^9 bytes)
"""

from __future__ import annotations


def text_table(headers: list[str], rows: list[list[str]], right: set[int] | None = None) -> str:
    """Aligned plain-text table; columns in ``right`` are right-aligned (default: all but the first)."""
    right = set(range(1, len(headers))) if right is None else right
    widths = [max(len(str(r[i])) for r in [headers] + rows) for i in range(len(headers))]

    def line(cells: list[str]) -> str:
        return "  ".join(str(c).rjust(w) if i in right else str(c).ljust(w)
                         for i, (c, w) in enumerate(zip(cells, widths))).rstrip()

    return "\n".join([line(headers), "  ".join("-" * w for w in widths)] + [line(r) for r in rows])


def fmt_int(n: int) -> str:
    """1234567 -> '1,234,567'."""
    return f"{n:,}"


def fmt_bytes(n: float) -> str:
    """Bytes in decimal units (kB = 10^3 bytes, GB = 10^9), one decimal."""
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} GB"


def fmt_gflop(flops: float) -> str:
    """FLOPs as GFLOP: thousands separators from 10 GFLOP on, two significant digits below."""
    g = flops / 1e9
    return f"{g:,.0f}" if g >= 10 else f"{g:.2g}"


def lr_text(lr: float) -> str:
    """A learning rate as people write it: 0.0005 -> '5e-4', 0.0015 -> '1.5e-3', 0.01 -> '1e-2'."""
    mantissa, exp = f"{float(lr):.6e}".split("e")
    return f"{float(mantissa):g}e{int(exp)}"
