"""Where the adaptable layers of a causal LM sit and what role each one plays, read from its structure.

Roles come from which sub-block a linear sits in, its shape against the residual width and the config's head and
MLP sizes, and its place in the data flow (one tiny traced forward); names only break ties. Unsure means "other".
Routed experts stored as fused 3-D parameters (``model.experts``) are layers too, named by their parameter.

Usage: ``anat = analyze(model); [l.name for l in anat.by_role()["attn.q"]]``
"""
from __future__ import annotations

import math
import re
from collections import Counter
from dataclasses import asdict, dataclass
from functools import cached_property
from typing import NamedTuple

import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from loraplace.core.errors import LoraplaceError
from loraplace.core.roles import ROLES
from loraplace.model.experts import GATE_TOKENS, UP_TOKENS, read_experts

try:  # PEFT wrappers are looked through; without peft there are none to look through.
    from peft import PeftModel
    from peft.tuners.tuners_utils import BaseTuner, BaseTunerLayer
    from peft.utils.other import AuxiliaryTrainingWrapper
except ImportError:  # pragma: no cover
    PeftModel = BaseTuner = BaseTunerLayer = AuxiliaryTrainingWrapper = ()


# Container names/classes that hint at a sub-block's kind; only used to break ties between shape-valid readings.
_HINT = {"attn": re.compile(r"att", re.I), "mlp": re.compile(r"mlp|ffn|feed_?forward|dense_?relu", re.I)}
# Leaf-name tokens that tell apart projections whose shapes are identical (q/k/v, gate/up).
_TOKENS = {
    "attn.q": {"q", "query", "wq"}, "attn.k": {"k", "key", "wk"}, "attn.v": {"v", "value", "wv"},
    "mlp.gate": GATE_TOKENS, "mlp.up": UP_TOKENS,
}


class AnatomyError(LoraplaceError, ValueError):
    """The model's structure cannot be read (e.g. no stack of repeated transformer blocks)."""


@dataclass(frozen=True)
class Layer:
    """An adaptable weight: a Linear/Conv1D/Embedding module, or a fused expert parameter (kind "Parameter")."""

    name: str  # full name as in model.named_modules() of the object given to analyze(); a parameter: its full name
    block: int  # index in the block stack; -1 outside the blocks
    role: str  # one of ROLES or "other" inside blocks; "embedding" / "lm_head" / "other" outside
    kind: str  # "Linear", "Conv1D", "Embedding", or "Parameter" (fused 3-D expert weights: PEFT target_parameters)
    in_features: int  # Embedding: vocabulary (num_embeddings); Parameter: of one expert
    out_features: int  # Embedding: embedding_dim; Parameter: of one expert
    params: int  # weight + bias elements of the base layer (adapters excluded); Parameter: every expert's
    experts: int = 0  # Parameter: how many experts it stacks (LoRA rank r trains r x experts x (in + out)); else 0
    tied_to: str | None = None  # outside only: the earlier module whose weight this one shares

    @property
    def is_parameter(self) -> bool:
        """A fused expert parameter (PEFT ``target_parameters``), not a module (``target_modules``)."""
        return self.kind == "Parameter"


@dataclass(frozen=True)
class Fixed:
    """A block module whose matrix weights no placement adapts (a mixture-of-experts router, unreadable experts)."""

    name: str
    block: int
    role: str  # "moe.router", "moe.experts" (fused 3-D expert weights whose projections cannot be read), or "other"
    kind: str  # the module's class name, e.g. "MixtralTopKRouter"
    shapes: tuple[tuple[int, ...], ...]  # of its own matrix parameters, e.g. ((8, 4096),)
    params: int
    reason: str


_FIXED_REASON = {
    "moe.experts": "fused 3-D expert weights whose projections (gate, up, down) could not be read from their shapes",
    "moe.router": "the router picks each token's experts; it is no placement role (not an nn.Linear)",
    "other": "weights outside any nn.Linear/Conv1D layer, so LoRA cannot wrap them",
}


@dataclass(frozen=True)
class Anatomy:
    model_type: str
    blocks_path: str
    n_blocks: int
    layers: tuple[Layer, ...]  # every Linear/Conv1D and fused expert parameter inside the blocks, named_modules order
    outside: tuple[Layer, ...]  # embeddings, lm_head, other linears outside the blocks
    base_params: int  # unique base-model parameters (tied once), never adapter parameters
    fixed: tuple[Fixed, ...] = ()  # block modules with matrix weights outside any adaptable layer (MoE routers)

    def fixed_params(self) -> dict[str, int]:
        """Role of unwrappable block weights ("moe.experts", ...) -> parameter count."""
        out: dict[str, int] = {}
        for f in self.fixed:
            out[f.role] = out.get(f.role, 0) + f.params
        return out

    def adaptable(self) -> list[str]:
        """The modules (and fused expert parameters) a strategy can adapt (every block layer whose role is known:
        what a strategy with roles all and blocks all adapts), by name."""
        return sorted(l.name for l in self.layers if l.role in ROLES and l.block >= 0)

    def roles_present(self) -> tuple[str, ...]:
        present = {l.role for l in self.layers}
        return tuple(r for r in ROLES if r in present)

    def by_role(self) -> dict[str, list[Layer]]:
        """Role -> layers, in ROLES order; unrecognised layers under "other" (last) if there are any."""
        keys = self.roles_present() + (("other",) if any(l.role == "other" for l in self.layers) else ())
        return {k: [l for l in self.layers if l.role == k] for k in keys}

    def role_params(self) -> dict[str, int]:
        return {k: sum(l.params for l in v) for k, v in self.by_role().items()}

    @cached_property
    def _by_name(self) -> dict[str, Layer]:  # layer() is called per module in loops: O(1) lookups
        return {l.name: l for l in self.layers + self.outside}

    def layer(self, name: str) -> Layer:
        if name in self._by_name:
            return self._by_name[name]
        raise KeyError(
            f"{name!r} is not a Linear/Conv1D/Embedding layer or expert parameter of this {self.model_type or 'model'} "
            f"(blocks at {self.blocks_path!r}; e.g. {self.layers[0].name!r})"
        )

    def to_dict(self) -> dict:
        d = {k: getattr(self, k) for k in ("model_type", "blocks_path", "n_blocks", "base_params")}
        d["layers"] = [asdict(l) for l in self.layers]
        d["outside"] = [asdict(l) for l in self.outside]
        d["fixed"] = [asdict(f) for f in self.fixed]
        return d


class _E(NamedTuple):  # one candidate layer: full name, module as registered, kind, shape, parameter count
    name: str
    mod: nn.Module
    kind: str
    inn: int
    out: int
    params: int


def _base(m: nn.Module) -> nn.Module:
    """The original module under any PEFT wrappers (LoRA and other tuner layers, modules_to_save)."""
    while True:
        if isinstance(m, BaseTunerLayer):
            m = m.get_base_layer()
        elif isinstance(m, AuxiliaryTrainingWrapper):
            m = m.original_module
        else:
            return m


def _numel(p: torch.Tensor) -> int:
    """Elements of a parameter as the float model has them: a bitsandbytes 4-bit weight (``Params4bit``) packs two
    per byte into a (n/2, 1) tensor, and its ``quant_state.shape`` keeps the float (out, in) shape."""
    qs = getattr(p, "quant_state", None)
    return math.prod(qs.shape) if qs is not None and getattr(qs, "shape", None) is not None else p.numel()


def _walk(module: nn.Module, prefix: str = "", seen: set | None = None):
    """named_modules(): same names, order and de-duplication, but PEFT wrappers are leaves (adapters are not layers)."""
    seen = set() if seen is None else seen
    if id(module) in seen:
        return
    seen.add(id(module))
    yield prefix, module
    if _base(module) is not module:
        return
    for name, child in module._modules.items():
        if child is not None:
            yield from _walk(child, f"{prefix}.{name}" if prefix else name, seen)


def _entry(name: str, m: nn.Module) -> _E | None:
    b = _base(m)
    if isinstance(b, Conv1D):  # transformers Conv1D stores weight as (in, out)
        kind, inn, out = "Conv1D", b.weight.shape[0], b.weight.shape[1]
    elif isinstance(b, nn.Linear):  # bitsandbytes Linear4bit / Linear8bitLt too (nn.Linear subclasses)
        kind, inn, out = "Linear", b.in_features, b.out_features
    elif isinstance(b, nn.Embedding):
        kind, inn, out = "Embedding", b.num_embeddings, b.embedding_dim
    else:
        return None
    return _E(name, m, kind, int(inn), int(out), sum(_numel(p) for p in b.parameters(recurse=False)))


def _find_blocks(mods: list, lin: dict) -> tuple[str, nn.ModuleList]:
    """The outermost, longest ModuleList of same-class modules that each contain a Linear/Conv1D."""
    cands = []
    for name, m in mods:
        if isinstance(m, nn.ModuleList) and len(m) and len({type(c) for c in m}) == 1:
            if all(id(c) not in lin and any(id(x) in lin for _, x in _walk(c)) for c in m):
                cands.append((name, m))
    outer = [(n, m) for n, m in cands if not any(n.startswith(o + ".") for o, _ in cands)]
    if not outer:
        raise AnatomyError(
            f"no block stack in {type(mods[0][1]).__name__}: expected an nn.ModuleList of repeated "
            "same-class modules that contain Linear/Conv1D layers"
        )
    return max(outer, key=lambda nm: (len(nm[1]), sum(lin[id(x)].params for _, x in _walk(nm[1]) if id(x) in lin)))


def _trace(model: nn.Module, mods: list[nn.Module], vocab: int) -> dict[int, int]:
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


class _Reader:
    """Reads the role of every linear in one model's blocks from sub-block membership, shapes and data flow."""

    def __init__(self, lin: dict, order: dict, hidden: int, q_dim: int | None, head_dim: int | None, inter: int | None):
        self.lin, self.order, self.H, self.q_dim, self.head_dim, self.inter = lin, order, hidden, q_dim, head_dim, inter
        self.roles: dict[int, str] = {}

    def assign(self, module: nn.Module, prefix: str, hint: str = "") -> list[_E]:
        """Match each child subtree as a whole; split unmatched ones further; pool leftovers (e.g. OPT fc1/fc2)."""
        left = []
        for cname, child in module._modules.items():
            if child is None:
                continue
            name = f"{prefix}.{cname}"
            if id(child) in self.lin:
                left.append(self.lin[id(child)])
                continue
            group = [self.lin[id(x)] for _, x in _walk(child, name) if id(x) in self.lin]
            sub_hint = f"{cname} {type(child).__name__}"
            if group and not self.match(group, sub_hint):
                left += self.assign(child, name, sub_hint)
        return [] if left and self.match(left, hint) else left

    def match(self, group: list[_E], hint: str) -> bool:
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

    def _attn(self, ins: list[_E], q: int) -> dict | None:
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

    def _mlp(self, ins: list[_E], inter: int) -> dict | None:
        if len(ins) == 1 and ins[0].out in (inter, 2 * inter):  # plain up, or fused gate+up (2 x intermediate)
            return {id(ins[0].mod): "mlp.up" if ins[0].out == inter else "mlp.gate_up"}
        if len(ins) == 2 and all(e.out == inter for e in ins):
            return _by_name(ins, ("mlp.gate", "mlp.up"))
        return None


def _by_name(entries: list[_E], roles: tuple[str, ...]) -> dict[int, str]:
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


def _cfg_int(cfg, *names: str) -> int | None:
    for n in names:
        v = getattr(cfg, n, None)
        if isinstance(v, int) and not isinstance(v, bool) and v > 0:
            return v
    return None


def _unwrappable(blocks, blocks_path: str, entries: dict, hidden: int) -> tuple[dict[str, list[Layer]], list[Fixed]]:
    """Matrix weights in the blocks that no Linear/Conv1D owns: fused expert parameters as layers (module name ->
    its parameters' layers; a PEFT ParamWrapper is looked through), and what is left (routers) as Fixed."""
    experts, fixed = {}, []
    for i, blk in enumerate(blocks):
        for n, m in _walk(blk, f"{blocks_path}.{i}"):
            b = _base(m)
            own = {} if id(m) in entries else {k: p for k, p in b.named_parameters(recurse=False) if p.dim() >= 2}
            read = read_experts(b, hidden) if any(p.dim() == 3 for p in own.values()) else None
            if read:
                experts[n] = [Layer(f"{n}.{x.name}", i, x.role, "Parameter", x.in_features, x.out_features, x.params,
                                    experts=x.experts) for x in read]
                for x in read:  # a parameter and its bias are its expert layer's, not left over
                    own.pop(x.name)
                    own.pop(f"{x.name}_bias", None)
            if own:
                role = ("moe.experts" if any(p.dim() == 3 for p in own.values())
                        else "moe.router" if re.search(r"router|gate", type(b).__name__ + " " + n.rsplit(".", 1)[-1], re.I)
                        else "other")
                fixed.append(Fixed(n, i, role, type(b).__name__, tuple(tuple(p.shape) for p in own.values()),
                                   sum(p.numel() for p in own.values()), _FIXED_REASON[role]))
    return experts, fixed


def analyze(model: nn.Module, trace: bool = True) -> Anatomy:
    """Read `model`'s block stack, per-layer roles and base size. A PeftModel is looked through, but every
    name stays as `model.named_modules()` of the object passed in gives it (e.g. "base_model.model.model.layers.0...").
    `trace`: learn data-flow order from one tiny no-grad forward (falls back to registration order if that fails)."""
    root = model
    if isinstance(model, PeftModel):
        root = model.get_base_model()
    elif isinstance(model, BaseTuner):
        root = model.model
    mods = list(_walk(model))
    pre = next(n for n, m in mods if m is root)
    mods = [(n, m) for n, m in mods if not pre or n == pre or n.startswith(pre + ".")]

    entries = {id(m): e for n, m in mods if (e := _entry(n, m))}
    lin = {k: e for k, e in entries.items() if e.kind != "Embedding"}
    blocks_path, blocks = _find_blocks(mods, lin)
    block_of = {id(x): i for i, blk in enumerate(blocks) for _, x in _walk(blk) if id(x) in lin}

    cfg = getattr(root, "config", None)
    tcfg = cfg.get_text_config() if hasattr(cfg, "get_text_config") else cfg
    hidden = _cfg_int(tcfg, "hidden_size", "n_embd", "d_model")
    if hidden is None:  # no config: the width most block linears read from is the residual stream
        hidden = Counter(lin[k].inn for k in block_of).most_common(1)[0][0]
    heads = _cfg_int(tcfg, "num_attention_heads", "n_head")
    head_dim = _cfg_int(tcfg, "head_dim") or (hidden // heads if heads else None)
    q_dim = heads * head_dim if heads and head_dim else None
    inter = _cfg_int(tcfg, "intermediate_size", "n_inner", "ffn_dim", "ffn_hidden_size")

    order = _trace(model, [lin[k].mod for k in block_of], _cfg_int(tcfg, "vocab_size") or 1) if trace else {}
    reader = _Reader(lin, order, hidden, q_dim, head_dim, inter)
    for i, blk in enumerate(blocks):
        reader.assign(blk, f"{blocks_path}.{i}")

    experts, fixed = _unwrappable(blocks, blocks_path, entries, hidden)
    try:
        head = _base(root.get_output_embeddings())
    except Exception:  # not a PreTrainedModel
        head = None
    layers, outside, weight_owner = [], [], {}
    for n, m in mods:
        layers += experts.get(n, [])  # fused expert parameters sit where their module does
        e = entries.get(id(m))
        if e is None:
            continue
        if id(m) in block_of:
            layers.append(Layer(n, block_of[id(m)], reader.roles.get(id(m), "other"), e.kind, e.inn, e.out, e.params))
        elif not n.startswith(blocks_path + "."):
            role = "embedding" if e.kind == "Embedding" else "lm_head" if _base(m) is head else "other"
            w = getattr(_base(m), "weight", None)
            tied = weight_owner.setdefault(id(w), n) if w is not None else n  # tied embeddings share one tensor
            outside.append(Layer(n, -1, role, e.kind, e.inn, e.out, e.params, tied_to=tied if tied != n else None))

    seen, base_params = set(), 0
    for _, m in mods:  # wrappers: only the wrapped base layer's tensors; plain modules: their own tensors
        for p in (_base(m).parameters() if _base(m) is not m else m.parameters(recurse=False)):
            if id(p) not in seen:
                seen.add(id(p))
                base_params += _numel(p)
    return Anatomy(getattr(cfg, "model_type", "") or "", blocks_path, len(blocks), tuple(layers), tuple(outside),
                   base_params, tuple(fixed))
