"""PiSSA: PEFT's ``init_lora_weights="pissa"``; the base weights it rewrites become the trial's own, the shared base
stays pristine.

Usage::

    with PiSSA().initialising(model, placement): apply(model, placement)   # PEFT's SVDs; the base put back afterwards
    state = PiSSA().start(trial, init_time)          # {"origin": A0 and B0 by parameter name, "time": s of the SVDs}
    with PiSSA().attached(trial, peft_model): ...    # W_res = W - scale B0 A0, as PEFT computes it
    PiSSA().save_adapter(trial, peft_model, target)  # a LoRA adapter for the *original* base (rank 2r)

PEFT's PiSSA puts each adapted weight's top-r singular part into A and B and replaces the weight in place by the
residual. loraplace shares one frozen base among trials (and engines), so a trial's start puts the original weights
back right after PEFT's initialisation and keeps the initial A0, B0 (``origin``); each attachment then swaps in the
residual, computed with PEFT's own operations on the same tensors (so the numbers are PEFT's), and swaps the
original back when detached. Saving uses PEFT's own conversion (``path_initial_model_for_weight_conversion``):
delta W = s (B A - B0 A0) as one LoRA of rank 2r. Not fused: the residual is the trial's own base weight.
Memory (``model.estimate``): the residual copy of each adapted weight while it trains, in ``weights``.
"""

from __future__ import annotations

import contextlib
import tempfile
from pathlib import Path

from loraplace.core.files import atomic_dir
from loraplace.placement.peft import lora_layers
from loraplace.placement.variants import Variant

A, B = ".lora_A.default.weight", ".lora_B.default.weight"  # a module's adapter tensors, by base-model name


class PiSSA(Variant):
    name, label, methods_label = "pissa", "PiSSA", "PiSSA"
    switches = {"init_lora_weights": "pissa"}
    tools = {"llamafactory": "pissa_init"}
    unfusable = "PiSSA trains on a residual base weight of its own, not the base the group shares"
    unquantizable = ("PiSSA writes W - B A into the base weight, which PEFT does only on a float base (its advice: "
                     "initialise on the float model, then quantize the residual)")

    def memory(self, placement, tokens: int, act_bytes: int, checkpointing: bool) -> dict[str, int]:
        anat = placement.anatomy
        return {"weights": sum(anat.layer(n).in_features * anat.layer(n).out_features for n in placement.modules) * act_bytes}

    def methods(self, strategies: list, config) -> str | None:
        times = [s.mean("method_time_s", 0.0) for s in strategies]
        return (f"{', '.join(f'`{s.strategy}`' for s in strategies)} started A and B from each adapted weight's top-r "
                "singular part (PEFT's PiSSA) and trained on the residual weight; the SVDs took "
                f"{min(times):.1f}-{max(times):.1f} s per trial; the saved adapters are PEFT's conversion to LoRA "
                "adapters of the original base (rank 2r).")

    @contextlib.contextmanager
    def initialising(self, model, placement):
        # PEFT's PiSSA swaps each weight's ``.data`` for the residual (it does not write into the tensor): keep them
        saved = {m: model.get_submodule(m).weight.data for m in placement.modules}
        try:
            yield
        finally:
            for m, w in saved.items():
                model.get_submodule(m).weight.data = w

    def start(self, trial, init_time: float) -> dict:
        # where A and B started: the residual base of every attachment is computed from them
        return {"origin": {n: p.detach().clone() for n, p in trial.params.items()}, "time": init_time}

    @contextlib.contextmanager
    def attached(self, trial, peft_model):
        """Each adapted base weight is PiSSA's residual W - scale B0 A0 (``LoraLayer.pissa_init``'s arithmetic:
        float32, transposed for fan_in_fan_out layers, cast back); the original afterwards."""
        import torch
        from peft.utils import transpose

        origin = trial.variant_state["origin"]
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

    def save_adapter(self, trial, peft_model, target: str | Path) -> Path:
        """PEFT's PiSSA-to-LoRA conversion: the initial adapter (A0, B0) is saved first, then the trained one
        relative to it (all or nothing)."""
        origin = trial.variant_state["origin"]
        with atomic_dir(target) as tmp, tempfile.TemporaryDirectory() as init_dir:
            trained = {n: p.data for n, p in trial.params.items()}
            try:
                for n, p in trial.params.items():
                    p.data = origin[n].to(p.device, p.dtype)
                peft_model.save_pretrained(init_dir)
            finally:
                for n, p in trial.params.items():
                    p.data = trained[n]
            peft_model.save_pretrained(tmp, path_initial_model_for_weight_conversion=init_dir)
        return Path(target)

    def state_dict(self, state: dict) -> dict:
        return {"origin": state["origin"], "method_time": state["time"]}

    def load_state(self, saved: dict, device) -> dict:
        if not saved.get("origin"):
            raise LookupError("PiSSA's initial A and B")
        return {"origin": {n: t.to(device) for n, t in saved["origin"].items()}, "time": saved.get("method_time", 0.0)}

    def method_time(self, state: dict) -> float:
        return state["time"]  # the SVD of every adapted weight at the trial's start (not in train_time_s)
