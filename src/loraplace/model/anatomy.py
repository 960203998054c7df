"""Where the adaptable layers of a causal LM sit and what role each one plays, read from its structure.

Roles come from which sub-block a linear sits in, its shape against the residual width and the config's head and
MLP sizes, and its place in the data flow (one tiny traced forward); names only break ties. Unsure means "other".
How one block's linears are read is ``reading``'s; this module finds the blocks and builds the ``Anatomy``.
Routed experts stored as fused 3-D parameters (``model.experts``) are layers too, named by their parameter.

Usage: ``anat = analyze(model); [l.name for l in anat.by_role()["attn.q"]]``
"""
from __future__ import annotations

import re
from collections import Counter
from dataclasses import asdict, dataclass
from functools import cached_property

from torch import nn

from loraplace.core.errors import LoraplaceError
from loraplace.core.roles import ROLES
from loraplace.model.experts import read_experts
from loraplace.model.reading import RoleReader, base_layer, entry, numel, trace_order, walk

try:  # a PeftModel is looked through; without peft there is none to look through.
    from peft import PeftModel
    from peft.tuners.tuners_utils import BaseTuner
except ImportError:  # pragma: no cover
    PeftModel = BaseTuner = ()


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


def _find_blocks(mods: list, lin: dict) -> tuple[str, nn.ModuleList]:
    """The outermost, longest ModuleList of same-class modules that each contain a Linear/Conv1D."""
    cands = []
    for name, m in mods:
        if isinstance(m, nn.ModuleList) and len(m) and len({type(c) for c in m}) == 1:
            if all(id(c) not in lin and any(id(x) in lin for _, x in walk(c)) for c in m):
                cands.append((name, m))
    outer = [(n, m) for n, m in cands if not any(n.startswith(o + ".") for o, _ in cands)]
    if not outer:
        raise AnatomyError(
            f"no block stack in {type(mods[0][1]).__name__}: expected an nn.ModuleList of repeated "
            "same-class modules that contain Linear/Conv1D layers"
        )
    return max(outer, key=lambda nm: (len(nm[1]), sum(lin[id(x)].params for _, x in walk(nm[1]) if id(x) in lin)))


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
        for n, m in walk(blk, f"{blocks_path}.{i}"):
            b = base_layer(m)
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
    mods = list(walk(model))
    pre = next(n for n, m in mods if m is root)
    mods = [(n, m) for n, m in mods if not pre or n == pre or n.startswith(pre + ".")]

    entries = {id(m): e for n, m in mods if (e := entry(n, m))}
    lin = {k: e for k, e in entries.items() if e.kind != "Embedding"}
    blocks_path, blocks = _find_blocks(mods, lin)
    block_of = {id(x): i for i, blk in enumerate(blocks) for _, x in walk(blk) if id(x) in lin}

    cfg = getattr(root, "config", None)
    tcfg = cfg.get_text_config() if hasattr(cfg, "get_text_config") else cfg
    hidden = _cfg_int(tcfg, "hidden_size", "n_embd", "d_model")
    if hidden is None:  # no config: the width most block linears read from is the residual stream
        hidden = Counter(lin[k].inn for k in block_of).most_common(1)[0][0]
    heads = _cfg_int(tcfg, "num_attention_heads", "n_head")
    head_dim = _cfg_int(tcfg, "head_dim") or (hidden // heads if heads else None)
    q_dim = heads * head_dim if heads and head_dim else None
    inter = _cfg_int(tcfg, "intermediate_size", "n_inner", "ffn_dim", "ffn_hidden_size")

    order = trace_order(model, [lin[k].mod for k in block_of], _cfg_int(tcfg, "vocab_size") or 1) if trace else {}
    reader = RoleReader(lin, order, hidden, q_dim, head_dim, inter)
    for i, blk in enumerate(blocks):
        reader.assign(blk, f"{blocks_path}.{i}")

    experts, fixed = _unwrappable(blocks, blocks_path, entries, hidden)
    try:
        head = base_layer(root.get_output_embeddings())
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
            role = "embedding" if e.kind == "Embedding" else "lm_head" if base_layer(m) is head else "other"
            w = getattr(base_layer(m), "weight", None)
            tied = weight_owner.setdefault(id(w), n) if w is not None else n  # tied embeddings share one tensor
            outside.append(Layer(n, -1, role, e.kind, e.inn, e.out, e.params, tied_to=tied if tied != n else None))

    seen, base_params = set(), 0
    for _, m in mods:  # wrappers: only the wrapped base layer's tensors; plain modules: their own tensors
        for p in (base_layer(m).parameters() if base_layer(m) is not m else m.parameters(recurse=False)):
            if id(p) not in seen:
                seen.add(id(p))
                base_params += numel(p)
    return Anatomy(getattr(cfg, "model_type", "") or "", blocks_path, len(blocks), tuple(layers), tuple(outside),
                   base_params, tuple(fixed))
