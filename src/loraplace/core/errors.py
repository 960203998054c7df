"""The one base class of every error loraplace raises on purpose, and how an exception becomes one line.

Usage::

    class DataError(LoraplaceError, ValueError): ...
    print(f"loraplace: error: {first_line(e)}")

The CLI prints a ``LoraplaceError``'s message on one line and exits 2; every error class lives with the
concept it belongs to (``core.config.ConfigError``, ``data.examples.DataError``, ...) and derives from it.
"""

from __future__ import annotations


class LoraplaceError(Exception):
    """Base class of every error loraplace raises on purpose; the CLI prints its one-line message and exits 2."""


def first_line(e: BaseException, limit: int | None = 300) -> str:
    """An exception as one line for a one-line error: its first line (at most ``limit`` characters), else its type."""
    text = str(e).strip() or type(e).__name__
    return text.splitlines()[0][:limit]
