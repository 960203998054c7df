"""Roles of the adaptable weights inside a transformer block, in data-flow order.

Usage: ``[r for r in ROLES if r.startswith("attn.")] == list(ROLE_GROUPS["attn"])``

Attention in (q, k, v or a fused qkv), attention out, MLP in (gate, up or a fused gate_up), MLP out, then a
mixture-of-experts MLP's routed experts (``mlp.experts.*``: each role is one fused 3-D parameter holding that
projection of every expert, adapted through PEFT's ``target_parameters``). Every listing (inspect, plan, the
placement maps, exports) uses this one order.
"""

from __future__ import annotations


ROLES = ("attn.q", "attn.k", "attn.v", "attn.qkv", "attn.o", "mlp.gate", "mlp.up", "mlp.gate_up", "mlp.down",
         "mlp.experts.gate", "mlp.experts.up", "mlp.experts.gate_up", "mlp.experts.down")

EXPERTS = "mlp.experts"  # the group of routed-expert roles: parameters, not modules

# Role groups: every role whose name starts with the group's; "mlp" holds the routed experts too.
ROLE_GROUPS = {g: tuple(r for r in ROLES if r.startswith(g + ".")) for g in ("attn", "mlp", EXPERTS)}


def role_rank(role: str) -> int:
    """Sort key: a role's place in ROLES; unknown roles ("other") after every known one."""
    return ROLES.index(role) if role in ROLES else len(ROLES)


def is_expert_role(role: str) -> bool:
    """Whether ``role`` names routed experts' fused 3-D parameter (PEFT ``target_parameters``), not a module."""
    return role.startswith(EXPERTS + ".")


def role_keys(role: str) -> tuple[str, ...]:
    """The role, then the groups that hold it, the most specific first: where a per-role setting is looked up
    (``mlp.experts.down`` -> itself, ``mlp.experts``, ``mlp``)."""
    return (role, *sorted((g for g in ROLE_GROUPS if role in ROLE_GROUPS[g]), key=len, reverse=True))
