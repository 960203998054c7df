"""Routed experts stored as fused 3-D parameters: which projection each parameter is and its per-expert shape.

transformers 5 keeps a mixture-of-experts MLP's routed experts (Mixtral, Qwen2-MoE, Qwen3-MoE, ...) in one
module whose parameters stack every expert, e.g. ``gate_up_proj`` (experts, 2 x intermediate, hidden) and
``down_proj`` (experts, hidden, intermediate). PEFT adapts such a parameter through ``target_parameters``
(``lora.ParamWrapper``), reading its shape as (experts, out, in), or (experts, in, out) when the module says
``is_transposed``; the shapes here are read the same way.

Usage: ``read_experts(model.model.layers[0].mlp.experts, hidden=4096)`` -> [ExpertParam("gate_up_proj", ...), ...]
"""

from __future__ import annotations

import math
import re
from typing import NamedTuple

# Leaf-name tokens that tell apart projections whose shapes are identical (gate vs up; down when in == out).
GATE_TOKENS = {"gate", "w1", "wg"}
UP_TOKENS = {"up", "w3", "wu"}
DOWN_TOKENS = {"down", "w2", "wo"}


class ExpertParam(NamedTuple):
    """One fused expert parameter as PEFT adapts it: rank r trains r x experts x (in + out) numbers."""

    name: str  # its attribute on the experts module, e.g. "gate_up_proj"
    role: str  # mlp.experts.gate | .up | .gate_up | .down
    experts: int
    in_features: int  # of one expert
    out_features: int
    params: int  # the parameter's elements, plus those of its bias ("<name>_bias") when it has one


def _tokens(name: str) -> set[str]:
    return set(re.split(r"[\W_]+", name.lower())) | {name.lower()}


def _numel(p) -> int:
    return math.prod(p.shape)


def read_experts(module, hidden: int) -> list[ExpertParam] | None:
    """The fused expert parameters of ``module`` (its own 3-D parameters) with their roles, in registration order;
    None when it has none, or when they do not read as one gated or plain MLP per expert (inputs hidden -> d or
    2d, one output d -> hidden)."""
    own = dict(module.named_parameters(recurse=False))
    cubes = {n: p for n, p in own.items() if p.dim() == 3}
    if not cubes or len({p.shape[0] for p in cubes.values()}) != 1:
        return None
    transposed = bool(getattr(module, "is_transposed", False))  # as PEFT's ParamWrapper reads it
    shape = {n: ((p.shape[1], p.shape[2]) if transposed else (p.shape[2], p.shape[1])) for n, p in cubes.items()}
    outs = [n for n, (_, o) in shape.items() if o == hidden]
    if len(outs) > 1:  # in == out == hidden: the name says which one goes back to the residual stream
        outs = [n for n in outs if _tokens(n) & DOWN_TOKENS]
    if len(outs) != 1:
        return None
    down, d = outs[0], shape[outs[0]][0]
    ins = [n for n in cubes if n != down]
    if not ins or any(shape[n][0] != hidden for n in ins):
        return None
    roles = {down: "mlp.experts.down"}
    widths = [shape[n][1] for n in ins]
    if len(ins) == 1 and widths[0] in (d, 2 * d):
        roles[ins[0]] = "mlp.experts.up" if widths[0] == d else "mlp.experts.gate_up"
    elif len(ins) == 2 and widths == [d, d]:
        gate = [n for n in ins if _tokens(n) & GATE_TOKENS and not _tokens(n) & UP_TOKENS]
        up = [n for n in ins if _tokens(n) & UP_TOKENS and not _tokens(n) & GATE_TOKENS]
        if len(gate) != 1 or len(up) != 1:
            return None
        roles.update({gate[0]: "mlp.experts.gate", up[0]: "mlp.experts.up"})
    else:
        return None
    experts = next(iter(cubes.values())).shape[0]
    return [ExpertParam(n, roles[n], int(experts), int(shape[n][0]), int(shape[n][1]),
                        _numel(p) + (_numel(own[f"{n}_bias"]) if f"{n}_bias" in own else 0))
            for n, p in cubes.items()]
