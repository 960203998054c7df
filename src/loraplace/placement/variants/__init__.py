"""What each variant is, in one place: how its adapters learn, what else they train and cost, what a trial does for it.

Usage::

    v = get_variant("dora")                       # or placement.variant
    v.switches                                    # PEFT's LoraConfig switches: {"use_dora": True}
    v.extra_params(layer, rank)                   # trained on a module beside A and B (DoRA: out_features)
    v.unfusable                                   # why its trials run on the sequential engine (None: they fuse)
    v.export_switch("axolotl")                    # {"peft_use_dora": True}; None: that tool has no switch for it

A strategy's ``variant`` names one of ``VARIANTS``: plain ``lora``, ``dora``, ``rslora``, ``pissa``, ``adalora``.
Budget counting (``placement.resolve``), ``placement.peft.apply``, the exporters, ``model.estimate``, the trial
lifecycle (``train.trial``), the engines, the executor and the methods paragraph ask the variant instead of comparing
names; a new variant is a ``Variant`` subclass here, registered in ``VARIANTS``. The base class is plain LoRA:
every hook does nothing. A trial calls the hooks with itself (``train.trial.Trial``); what a variant keeps per trial
lives in the trial's one attribute ``variant_state`` (built by ``start``, checkpointed by ``state_dict`` /
``load_state``). Torch-free at import: a variant imports torch and peft inside the hooks that need them
(``placement.peft`` is torch-free too). EVA is not a variant but how A starts (``Placement.init``, ``measure.eva``).
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import TYPE_CHECKING

from loraplace.core.files import atomic_dir
from loraplace.placement.strategy import PlacementError

if TYPE_CHECKING:  # read only
    from loraplace.model.anatomy import Layer
    from loraplace.placement.resolve import Placement


class Variant:
    """How the placed adapters learn: plain LoRA here, the others override what differs."""

    name = "lora"
    label = "LoRA"  # in messages
    methods_label: str | None = None  # after the ranks in the methods paragraph's list of placements (None: nothing)
    scale = "alpha/r"  # the LoRA scale its adapter output is multiplied by (the methods paragraph says it)
    switches: dict = {}  # PEFT LoraConfig keyword arguments that give it (PEFT's own implementation)
    tools: dict[str, str] = {}  # export format -> that tool's boolean switch for it
    unfusable: str | None = None  # why the fused forward (scale x B A x) would not compute it; None: it fuses
    unquantizable: str | None = None  # why it cannot train on a bitsandbytes base (``quantize``); None: it can

    # -- counting, placing, exporting, reporting (torch-free) ----------------------------------------------------
    def extra_params(self, layer: Layer, rank: int) -> int:
        """Parameters it trains on ``layer`` beside A and B, at ``rank`` (already capped at min(in, out))."""
        return 0

    def check(self, strategy, allocation: dict | None) -> None:
        """Refuse (PlacementError) a placement that cannot train this way: ``allocation`` is AdaLoRA's."""

    def memory(self, placement: Placement, tokens: int, act_bytes: int, checkpointing: bool) -> dict[str, int]:
        """Bytes a training step of ``placement`` keeps beside plain LoRA's, by ``model.estimate`` term; ``tokens``
        in the step, ``act_bytes`` per activation element, under gradient checkpointing or not."""
        return {}

    def export_switch(self, fmt: str) -> dict | None:
        """Keys a tool's config (``placement.export``: axolotl, llamafactory, torchtune) needs for this variant:
        {} when it exports as plain LoRA (no PEFT switch), None when the tool has no switch for it."""
        if not self.switches:
            return {}
        return {self.tools[fmt]: True} if fmt in self.tools else None

    def export_note(self, strategy: str, kept: dict[int, dict], exported: dict) -> str | None:
        """What ``loraplace export`` says on stderr about this variant's exported config, or None. ``kept``: seed
        -> the modules each finished trial stored; ``exported``: the modules of the exported placement."""
        return None

    def methods(self, strategies: list, config) -> str | None:
        """The methods paragraph's sentence on the ``strategies`` (``analysis.study`` summaries) trained this way
        in a study of ``config``, or None."""
        return None

    # -- PEFT ------------------------------------------------------------------------------------------------------
    def peft_config(self, placement: Placement, dropout: float, total_steps: int | None, initialise: bool):
        """The PEFT config of ``placement`` (``placement.peft.apply``). ``initialise=False``: PEFT's plain
        initialisation whatever the variant's (PiSSA's SVDs), for tensors that are replaced anyway."""
        config = placement.record(dropout).lora_config()
        if not initialise:
            config.init_lora_weights = True
        return config

    # -- a trial's life (``trial`` is a train.trial.Trial; torch side) ---------------------------------------------
    def initialising(self, model, placement: Placement):
        """A context around PEFT's initialisation of a new trial's adapters on the shared ``model``."""
        return contextlib.nullcontext()

    def start(self, trial, init_time: float):
        """The trial's ``variant_state`` at step 0, once its tensors exist; ``init_time``: s PEFT's initialisation took."""
        return None

    def attached(self, trial, peft_model):
        """A context while the trial's tensors sit in ``peft_model`` (the PEFT wrapping of the shared base)."""
        return contextlib.nullcontext()

    def after_step(self, trial, setup) -> str | None:
        """After AdamW's step, before zero_grad (``trial.step`` not yet advanced): why the trial fails now, or None."""
        return None

    def penalty(self, trial):
        """What the training loss adds beside the NLL (a tensor, or 0.0)."""
        return 0.0

    def trained(self, trial) -> Placement:
        """The placement the trial trains at its current step."""
        return trial.placement

    def save_adapter(self, trial, peft_model, target: str | Path) -> Path:
        """Save the attached trial's adapter in PEFT format into ``target``, all or nothing (``core.files.atomic_dir``)."""
        with atomic_dir(target) as tmp:
            peft_model.save_pretrained(tmp)
        return Path(target)

    def state_dict(self, state) -> dict:
        """Checkpoint entries of ``variant_state`` (``train.checkpoint``)."""
        return {}

    def load_state(self, saved: dict, device):
        """``variant_state`` from a checkpoint's entries, on ``device``; LookupError naming what the checkpoint lacks."""
        return None

    def method_time(self, state) -> float | None:
        """s the variant's own work took (the ``method_time_s`` metric), or None: not reported."""
        return None


class RsLoRA(Variant):
    """rsLoRA: PEFT's ``use_rslora`` scales by alpha/sqrt(r), not alpha/r; the fused engine reads the scale from PEFT."""

    name, label, methods_label = "rslora", "rsLoRA", "rsLoRA (scale alpha/sqrt(r))"
    scale = "alpha/sqrt(r)"
    switches = {"use_rslora": True}
    tools = {"axolotl": "peft_use_rslora", "llamafactory": "use_rslora"}


from loraplace.placement.variants.adalora import AdaLoRA  # noqa: E402  (they subclass Variant)
from loraplace.placement.variants.dora import DoRA  # noqa: E402
from loraplace.placement.variants.pissa import PiSSA  # noqa: E402

VARIANTS: dict[str, Variant] = {v.name: v for v in (Variant(), DoRA(), RsLoRA(), PiSSA(), AdaLoRA())}


def get_variant(name: str) -> Variant:
    """The variant called ``name``; PlacementError naming the valid ones."""
    if name not in VARIANTS:
        raise PlacementError(f"variant {name!r} is not one of {', '.join(VARIANTS)}")
    return VARIANTS[name]
