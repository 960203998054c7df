"""Roles of the linear layers inside a transformer block, in data-flow order.

Usage: ``[r for r in ROLES if r.startswith("attn.")] == list(ROLE_GROUPS["attn"])``

Attention in (q, k, v or a fused qkv), attention out, MLP in (gate, up or a fused gate_up), MLP out.
Every listing (inspect, plan, the placement maps, exports) uses this one order.
"""

from __future__ import annotations


# Roles of the linear layers inside a transformer block, in data-flow order: attention in (q, k, v or a fused
# qkv), attention out, MLP in (gate, up or a fused gate_up), MLP out. Every listing (inspect, plan, the
# placement maps, exports) uses this one order.
ROLES = ("attn.q", "attn.k", "attn.v", "attn.qkv", "attn.o", "mlp.gate", "mlp.up", "mlp.gate_up", "mlp.down")


ROLE_GROUPS = {g: tuple(r for r in ROLES if r.startswith(g + ".")) for g in ("attn", "mlp")}


def role_rank(role: str) -> int:
    """Sort key: a role's place in ROLES; unknown roles ("other") after every known one."""
    return ROLES.index(role) if role in ROLES else len(ROLES)
