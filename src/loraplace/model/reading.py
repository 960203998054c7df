"""How the linears of one transformer block are read as attention and MLP projections.

A sub-block reads as attention when its inputs go H -> q, k, v (or one fused qkv) and its last-executed output
d -> H, with d the config's query width; as an MLP when they go H -> gate, up (or one up, or fused gate_up) and
d -> H, with d the intermediate size. Shapes decide; container names only break ties between shape-valid
readings, and leaf names only tell same-shape projections apart (q/k/v, gate/up).

Usage: ``reader = RoleReader(lin, trace_order(model, mods, vocab), hidden, q_dim, head_dim, inter);
reader.assign(block, "model.layers.0"); reader.roles`` (id(module) -> role)
"""
from __future__ import annotations

import math
import re
from typing import NamedTuple

import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from loraplace.model.experts import GATE_TOKENS, UP_TOKENS

try:  # PEFT wrappers are looked through; without peft there are none to look through.
    from peft.tuners.tuners_utils import BaseTunerLayer
    from peft.utils.other import AuxiliaryTrainingWrapper
except ImportError:  # pragma: no cover
    BaseTunerLayer = AuxiliaryTrainingWrapper = ()


# Container names/classes that hint at a sub-block's kind; only used to break ties between shape-valid readings.
_HINT = {"attn": re.compile(r"att", re.I), "mlp": re.compile(r"mlp|ffn|feed_?forward|dense_?relu", re.I)}
# Leaf-name tokens that tell apart projections whose shapes are identical (q/k/v, gate/up).
_TOKENS = {
    "attn.q": {"q", "query", "wq"}, "attn.k": {"k", "key", "wk"}, "attn.v": {"v", "value", "wv"},
    "mlp.gate": GATE_TOKENS, "mlp.up": UP_TOKENS,
}


class Entry(NamedTuple):  # one candidate layer: full name, module as registered, kind, shape, parameter count
    name: str
    mod: nn.Module
    kind: str
    inn: int
    out: int
    params: int


def base_layer(m: nn.Module) -> nn.Module:
    """The original module under any PEFT wrappers (LoRA and other tuner layers, modules_to_save)."""
    while True:
        if isinstance(m, BaseTunerLayer):
            m = m.get_base_layer()
        elif isinstance(m, AuxiliaryTrainingWrapper):
            m = m.original_module
        else:
            return m


def numel(p: torch.Tensor) -> int:
    """Elements of a parameter as the float model has them: a bitsandbytes 4-bit weight (``Params4bit``) packs two
    per byte into a (n/2, 1) tensor, and its ``quant_state.shape`` keeps the float (out, in) shape."""
    qs = getattr(p, "quant_state", None)
    return math.prod(qs.shape) if qs is not None and getattr(qs, "shape", None) is not None else p.numel()


def walk(module: nn.Module, prefix: str = "", seen: set | None = None):
    """named_modules(): same names, order and de-duplication, but PEFT wrappers are leaves (adapters are not layers)."""
    seen = set() if seen is None else seen
    if id(module) in seen:
        return
    seen.add(id(module))
    yield prefix, module
    if base_layer(module) is not module:
        return
    for name, child in module._modules.items():
        if child is not None:
            yield from walk(child, f"{prefix}.{name}" if prefix else name, seen)


def entry(name: str, m: nn.Module) -> Entry | None:
    """`m` as a candidate layer (a Linear, Conv1D or Embedding under any PEFT wrappers); None for anything else."""
    b = base_layer(m)
    if isinstance(b, Conv1D):  # transformers Conv1D stores weight as (in, out)
        kind, inn, out = "Conv1D", b.weight.shape[0], b.weight.shape[1]
    elif isinstance(b, nn.Linear):  # bitsandbytes Linear4bit / Linear8bitLt too (nn.Linear subclasses)
        kind, inn, out = "Linear", b.in_features, b.out_features
    elif isinstance(b, nn.Embedding):
        kind, inn, out = "Embedding", b.num_embeddings, b.embedding_dim
    else:
        return None
    return Entry(name, m, kind, int(inn), int(out), sum(numel(p) for p in b.parameters(recurse=False)))


def trace_order(model: nn.Module, mods: list[nn.Module], vocab: int) -> dict[int, int]:
    """Execution order (id(module) -> rank) of `mods` in one no-grad eval forward on 1x4 tokens; {} if it fails."""
    order: dict[int, int] = {}

    def seen(mod, _args):  # returns None: inputs pass through untouched
        order.setdefault(id(mod), len(order))

    hooks = [m.register_forward_pre_hook(seen) for m in mods]
    modes = [(m, m.training) for m in model.modules()]  # eval() so dropout draws no random numbers
    try:
        model.eval()
        dev = next(model.parameters()).device
        with torch.no_grad():
            ids = torch.arange(4, device=dev).remainder(max(vocab, 1))[None]
            model(input_ids=ids, attention_mask=torch.ones_like(ids))
    except Exception:  # any model we cannot run: fall back to registration order
        order.clear()
    finally:
        for h in hooks:
            h.remove()
        for m, t in modes:
            m.training = t
    return order


class RoleReader:
    """Reads the role of every linear in one model's blocks from sub-block membership, shapes and data flow."""

    def __init__(self, lin: dict, order: dict, hidden: int, q_dim: int | None, head_dim: int | None, inter: int | None):
        self.lin, self.order, self.H, self.q_dim, self.head_dim, self.inter = lin, order, hidden, q_dim, head_dim, inter
        self.roles: dict[int, str] = {}

    def assign(self, module: nn.Module, prefix: str, hint: str = "") -> list[Entry]:
        """Match each child subtree as a whole; split unmatched ones further; pool leftovers (e.g. OPT fc1/fc2)."""
        left = []
        for cname, child in module._modules.items():
            if child is None:
                continue
            name = f"{prefix}.{cname}"
            if id(child) in self.lin:
                left.append(self.lin[id(child)])
                continue
            group = [self.lin[id(x)] for _, x in walk(child, name) if id(x) in self.lin]
            sub_hint = f"{cname} {type(child).__name__}"
            if group and not self.match(group, sub_hint):
                left += self.assign(child, name, sub_hint)
        return [] if left and self.match(left, hint) else left

    def match(self, group: list[Entry], hint: str) -> bool:
        """Read `group` as one attention or one MLP: inputs H->*, last-executed output d->H (d: q_dim or intermediate)."""
        if self.order:
            group = sorted(group, key=lambda e: self.order.get(id(e.mod), math.inf))
        else:  # no trace: registration order, with the projections back to the residual stream moved last
            group = sorted(group, key=lambda e: (e.out == self.H, e.out == self.H and e.inn != self.H))
        out, ins, H = group[-1], group[:-1], self.H
        if out.out != H or not ins or any(e.inn != H for e in ins):
            return False
        d = out.inn
        readings = []
        for kind, roles, want in (("attn", self._attn(ins, d), self.q_dim), ("mlp", self._mlp(ins, d), self.inter)):
            if roles is None:
                continue
            other = "mlp" if kind == "attn" else "attn"
            score = (bool(_HINT[kind].search(hint)) - bool(_HINT[other].search(hint))
                     + (0 if not want else 1 if d == want else -2))  # config agreement outweighs a name hint
            if score >= 0:
                roles[id(out.mod)] = f"{kind}.{'o' if kind == 'attn' else 'down'}"
                readings.append((score, roles))
        readings.sort(key=lambda r: -r[0])
        if not readings or (len(readings) > 1 and readings[0][0] == readings[1][0]):
            return False  # no shape-valid reading, or two equally good ones: leave for splitting / "other"
        self.roles.update(readings[0][1])
        return True

    def _kv_ok(self, kv: int, q: int) -> bool:  # kv width of GQA/MQA: whole heads, a divisor of the q width
        return 0 < kv <= q and q % kv == 0 and (not self.head_dim or kv % self.head_dim == 0)

    def _attn(self, ins: list[Entry], q: int) -> dict | None:
        if len(ins) == 1:  # fused: out = q + 2 * kv
            kv2 = ins[0].out - q
            return {id(ins[0].mod): "attn.qkv"} if kv2 > 0 and kv2 % 2 == 0 and self._kv_ok(kv2 // 2, q) else None
        if len(ins) != 3:
            return None
        outs = sorted((e.out for e in ins), key=lambda o: o == q)  # the q-wide one (if any is) last
        kv = outs[0]
        if outs[2] != q or outs[1] != kv or not self._kv_ok(kv, q):
            return None
        if kv != q:  # GQA/MQA: q is told by its shape; only k vs v need names
            qe = next(e for e in ins if e.out == q)
            return {id(qe.mod): "attn.q", **_by_name([e for e in ins if e is not qe], ("attn.k", "attn.v"))}
        return _by_name(ins, ("attn.q", "attn.k", "attn.v"))

    def _mlp(self, ins: list[Entry], inter: int) -> dict | None:
        if len(ins) == 1 and ins[0].out in (inter, 2 * inter):  # plain up, or fused gate+up (2 x intermediate)
            return {id(ins[0].mod): "mlp.up" if ins[0].out == inter else "mlp.gate_up"}
        if len(ins) == 2 and all(e.out == inter for e in ins):
            return _by_name(ins, ("mlp.gate", "mlp.up"))
        return None


def _by_name(entries: list[Entry], roles: tuple[str, ...]) -> dict[int, str]:
    """Tie-break same-shape projections by leaf-name tokens; one leftover takes the one leftover role; else "other"."""
    got: dict[int, str] = {}
    for e in entries:
        leaf = e.name.rsplit(".", 1)[-1].lower()
        toks = set(re.split(r"[\W_]+", leaf)) | {leaf}
        hits = [r for r in roles if toks & _TOKENS[r]]
        if len(hits) == 1 and hits[0] not in got.values():
            got[id(e.mod)] = hits[0]
    rest_e = [e for e in entries if id(e.mod) not in got]
    rest_r = [r for r in roles if r not in got.values()]
    if len(rest_e) == 1 and len(rest_r) == 1:
        got[id(rest_e[0].mod)] = rest_r[0]
    return {id(e.mod): got.get(id(e.mod), "other") for e in entries}


