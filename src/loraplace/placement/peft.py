"""Putting a placement on a model with PEFT, exactly: explicit full module names, checked after wrapping.

Usage::

    peft_model = apply(model, placement, dropout=0.0)     # LoRA on exactly placement.modules, verified
    lora_layers(peft_model)                               # base module (or expert parameter) name -> its LoRA layer
    peft_model.unload()                                   # the base model again, unmerged and pristine

Routed experts (fused 3-D parameters, roles ``mlp.experts.*``) go to PEFT as ``target_parameters`` by full
parameter name; PEFT wraps each in a ``lora.ParamWrapper`` (nested when one module holds several), which
``lora_layers`` names by the parameter. Imports peft (and so torch) when called; the rest of ``placement`` is
torch-free.
"""

from __future__ import annotations

import re
import warnings
from typing import TYPE_CHECKING

from loraplace.placement.strategy import PlacementError

if TYPE_CHECKING:
    import torch

    from loraplace.placement.resolve import Placement

PEFT_PREFIX = "base_model.model."  # what PeftModel puts before the base model's module names


def base_name(peft_name: str) -> str:
    """A PeftModel module or parameter name as the base model names it."""
    return peft_name[len(PEFT_PREFIX):] if peft_name.startswith(PEFT_PREFIX) else peft_name


def lora_layers(peft_model) -> dict[str, object]:
    """Base-model module name -> its PEFT LoRA layer (those carrying the default adapter); a ``ParamWrapper``
    under its parameter's full name (e.g. "model.layers.0.mlp.experts.down_proj")."""
    from peft.tuners.lora import LoraLayer

    out = {}
    for name, mod in peft_model.named_modules():
        if isinstance(mod, LoraLayer) and "default" in mod.lora_A:
            param = getattr(mod, "parameter_name", None)  # a ParamWrapper; nested ones sit at ...base_layer
            out[_NESTED.sub("", base_name(name)) + f".{param}" if param else base_name(name)] = mod
    return out


_NESTED = re.compile(r"(\.base_layer)+$")  # PEFT nests a module's ParamWrappers: experts, experts.base_layer, ...


def apply(model: "torch.nn.Module", placement: Placement, dropout: float = 0.0, total_steps: int | None = None,
          initialise: bool = True):
    """Wrap ``model`` with PEFT on exactly ``placement.modules`` as its variant configures it
    (``Variant.peft_config``: AdaLoRA's schedule needs the run's ``total_steps``) and verify the result.
    ``initialise=False``: PEFT's plain initialisation whatever the variant's (PiSSA's SVDs), for tensors that are
    replaced anyway."""
    from peft import get_peft_model

    expert = next((n for n in placement.modules if placement.anatomy.layer(n).is_parameter), None)
    if expert is not None and dropout:
        raise PlacementError(f"LoRA dropout {dropout:g} cannot apply to routed experts ({expert}): PEFT adapts a fused "
                             "expert parameter by adding B A to the weight, with no input to drop; set train.dropout=0")
    config = placement.variant.peft_config(placement, dropout, total_steps, initialise)
    # PEFT checks rank/alpha_pattern keys against the adapted modules only, so it says an expert parameter's key "did
    # not match" although it applies it; verify() below checks every rank.
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", r"The following (rank|alpha)_pattern keys did not match", RuntimeWarning)
        peft_model = get_peft_model(model, config)
    verify(peft_model, placement)
    return peft_model


def verify(peft_model, placement: Placement) -> None:
    """The modules and expert parameters carrying LoRA, their ranks (and an expert parameter's experts and per-expert
    shape) and the trainable count must equal the placement."""
    layers = lora_layers(peft_model)
    found = {name: layer.r["default"] for name, layer in layers.items()}
    if set(found) != set(placement.modules):
        extra = sorted(set(found) - set(placement.modules))[:3]
        missing = sorted(set(placement.modules) - set(found))[:3]
        raise PlacementError(f"PEFT adapted a different set of modules: extra {extra}, missing {missing}")
    wrong = [n for n, r in found.items() if r != placement.modules[n]]
    if wrong:
        raise PlacementError(f"PEFT gave {wrong[0]} rank {found[wrong[0]]}, expected {placement.modules[wrong[0]]}")
    for name in placement.modules:
        want = placement.anatomy.layer(name)
        got = layers[name]
        if want.is_parameter and (got.num_experts, got.in_features, got.out_features) != (
                want.experts, want.in_features, want.out_features):
            raise PlacementError(f"PEFT read {name} as {got.num_experts} experts of {got.in_features}x{got.out_features}, "
                                 f"expected {want.experts} of {want.in_features}x{want.out_features}")
    trainable = sum(p.numel() for p in peft_model.parameters() if p.requires_grad)
    if trainable != placement.trainable_params:
        raise PlacementError(f"trainable parameters {trainable:,} differ from the placement's {placement.trainable_params:,}")
