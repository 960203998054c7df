"""The torch-free vocabulary every module shares: the error base class, LoRA-target roles, text tables.

Usage::

    from loraplace.core import LoraplaceError, ROLES, text_table
    print(text_table(["role", "params"], [["attn.q", "1,024"]]))

Importing this module (and the other torch-free modules: config, store, metrics, placement's record,
analysis, report, export) never imports torch, transformers or peft, so the read-only commands
(``status``, ``report``, ``export``) start in a fraction of a second.
"""

from __future__ import annotations


class LoraplaceError(Exception):
    """Base class of every error loraplace raises on purpose; the CLI prints its one-line message and exits 2."""


# Roles of the linear layers inside a transformer block, in data-flow order: attention in (q, k, v or a fused
# qkv), attention out, MLP in (gate, up or a fused gate_up), MLP out. Every listing (inspect, plan, the
# placement maps, exports) uses this one order.
ROLES = ("attn.q", "attn.k", "attn.v", "attn.qkv", "attn.o", "mlp.gate", "mlp.up", "mlp.gate_up", "mlp.down")
ROLE_GROUPS = {g: tuple(r for r in ROLES if r.startswith(g + ".")) for g in ("attn", "mlp")}


def first_line(e: BaseException, limit: int | None = 300) -> str:
    """An exception as one line for a one-line error: its first line (at most ``limit`` characters), else its type."""
    text = str(e).strip() or type(e).__name__
    return text.splitlines()[0][:limit]


def role_rank(role: str) -> int:
    """Sort key: a role's place in ROLES; unknown roles ("other") after every known one."""
    return ROLES.index(role) if role in ROLES else len(ROLES)


def text_table(headers: list[str], rows: list[list[str]], right: set[int] | None = None) -> str:
    """Aligned plain-text table; columns in ``right`` are right-aligned (default: all but the first)."""
    right = set(range(1, len(headers))) if right is None else right
    widths = [max(len(str(r[i])) for r in [headers] + rows) for i in range(len(headers))]

    def line(cells: list[str]) -> str:
        return "  ".join(str(c).rjust(w) if i in right else str(c).ljust(w)
                         for i, (c, w) in enumerate(zip(cells, widths))).rstrip()

    return "\n".join([line(headers), "  ".join("-" * w for w in widths)] + [line(r) for r in rows])
