"""Putting a placement on a model with PEFT, exactly: explicit full module names, checked after wrapping.

Usage::

    peft_model = apply(model, placement, dropout=0.0)     # LoRA on exactly placement.modules, verified
    lora_layers(peft_model)                               # base module name -> its PEFT LoRA layer
    peft_model.unload()                                   # the base model again, unmerged and pristine

Imports peft (and so torch) when called; the rest of ``placement`` is torch-free.
"""

from __future__ import annotations

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
    """Base-model module name -> its PEFT LoRA layer (those carrying the default adapter)."""
    from peft.tuners.lora import LoraLayer

    return {base_name(name): mod for name, mod in peft_model.named_modules()
            if isinstance(mod, LoraLayer) and "default" in mod.lora_A}


def apply(model: "torch.nn.Module", placement: Placement, dropout: float = 0.0, total_steps: int | None = None,
          initialise: bool = True):
    """Wrap ``model`` with PEFT on exactly ``placement.modules`` as its variant configures it
    (``Variant.peft_config``: AdaLoRA's schedule needs the run's ``total_steps``) and verify the result.
    ``initialise=False``: PEFT's plain initialisation whatever the variant's (PiSSA's SVDs), for tensors that are
    replaced anyway."""
    from peft import get_peft_model

    peft_model = get_peft_model(model, placement.variant.peft_config(placement, dropout, total_steps, initialise))
    verify(peft_model, placement)
    return peft_model


def verify(peft_model, placement: Placement) -> None:
    """The modules carrying LoRA, their ranks and the trainable count must equal the placement."""
    found = {name: layer.r["default"] for name, layer in lora_layers(peft_model).items()}
    if set(found) != set(placement.modules):
        extra = sorted(set(found) - set(placement.modules))[:3]
        missing = sorted(set(placement.modules) - set(found))[:3]
        raise PlacementError(f"PEFT adapted a different set of modules: extra {extra}, missing {missing}")
    wrong = [n for n, r in found.items() if r != placement.modules[n]]
    if wrong:
        raise PlacementError(f"PEFT gave {wrong[0]} rank {found[wrong[0]]}, expected {placement.modules[wrong[0]]}")
    trainable = sum(p.numel() for p in peft_model.parameters() if p.requires_grad)
    if trainable != placement.trainable_params:
        raise PlacementError(f"trainable parameters {trainable:,} differ from the placement's {placement.trainable_params:,}")
