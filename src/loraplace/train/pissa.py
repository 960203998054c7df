"""PiSSA inside a trial: the base weights it rewrites become the trial's own; the shared base stays pristine.

Usage::

    saved = originals(model, placement.modules)     # before PEFT's PiSSA initialisation rewrites them
    restore(model, saved)                           # right after it: the base is the original again
    with residual(peft_model, origin):              # attached: W_res = W - scale B0 A0, as PEFT computes it
        ...
    save_converted(peft_model, target, origin, params)   # a LoRA adapter for the *original* base (rank 2r)

PEFT's PiSSA (``init_lora_weights="pissa"``) puts each adapted weight's top-r singular part into A and B and
replaces the weight in place by the residual. loraplace shares one frozen base among trials (and engines), so
``Trial.start`` puts the original weights back right after PEFT's initialisation and keeps the initial A0, B0
(``origin``); each attachment then swaps in the residual, computed with PEFT's own operations on the same
tensors (so the numbers are PEFT's), and swaps the original back when detached. Saving uses PEFT's own
conversion (``path_initial_model_for_weight_conversion``): delta W = s (B A - B0 A0) as one LoRA of rank 2r.
"""

from __future__ import annotations

import contextlib
import tempfile
from pathlib import Path

import torch

from loraplace.core.files import atomic_dir
from loraplace.placement.peft import lora_layers

A, B = ".lora_A.default.weight", ".lora_B.default.weight"  # a module's adapter tensors, by base-model name


def originals(model: torch.nn.Module, modules) -> dict[str, torch.Tensor]:
    """The weight tensors of ``modules`` as they are now (PEFT's PiSSA swaps ``.data``, it does not write into them)."""
    return {m: model.get_submodule(m).weight.data for m in modules}


def restore(model: torch.nn.Module, saved: dict[str, torch.Tensor]) -> None:
    for m, w in saved.items():
        model.get_submodule(m).weight.data = w


@contextlib.contextmanager
def residual(peft_model, origin: dict[str, torch.Tensor]):
    """While active, each adapted base weight is PiSSA's residual W - scale B0 A0 (``LoraLayer.pissa_init``'s
    arithmetic: float32, transposed for fan_in_fan_out layers, cast back); the original afterwards."""
    from peft.utils import transpose

    saved = {}
    layers = lora_layers(peft_model)
    try:
        for m, layer in layers.items():
            base = layer.get_base_layer()
            w = base.weight.data
            saved[m] = w
            res = transpose(w.to(torch.float32), layer.fan_in_fan_out) - layer.scaling["default"] * origin[m + B] @ origin[m + A]
            base.weight.data = transpose(res.to(w.dtype), layer.fan_in_fan_out)
        yield
    finally:
        for m, w in saved.items():
            layers[m].get_base_layer().weight.data = w


def save_converted(peft_model, target: str | Path, origin: dict[str, torch.Tensor], params: dict) -> Path:
    """Save the attached trial as a LoRA adapter of the original base, by PEFT's PiSSA-to-LoRA conversion: the
    initial adapter (A0, B0) is saved first, then the trained one relative to it (all or nothing)."""
    with atomic_dir(target) as tmp, tempfile.TemporaryDirectory() as init_dir:
        trained = {n: p.data for n, p in params.items()}
        try:
            for n, p in params.items():
                p.data = origin[n].to(p.device, p.dtype)
            peft_model.save_pretrained(init_dir)
        finally:
            for n, p in params.items():
                p.data = trained[n]
        peft_model.save_pretrained(tmp, path_initial_model_for_weight_conversion=init_dir)
    return Path(target)
