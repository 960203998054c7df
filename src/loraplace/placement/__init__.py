"""Strategies -> explicit LoRA placements: full module names, a rank and alpha per module, and their record.

Usage::

    from loraplace.placement.strategy import get_strategy
    from loraplace.placement.resolve import resolve, match_budget
    p = resolve(get_strategy("attention_only"), anat, rank=16, alpha=32)
    record = p.record(dropout=0.0)              # placement.record: stored with the trial, read back by export

Modules: ``strategy`` (the vocabulary: roles x blocks x rank), ``resolve`` (a strategy on one model, budget
matching), ``select`` (``auto`` and ``random:K``: module sets filled to a budget), ``record`` (the stored
placement and the one PEFT ``LoraConfig``), ``variants`` (what each variant is: LoRA, DoRA, rsLoRA, PiSSA,
AdaLoRA), ``peft`` (wrapping a model), ``export`` (configs for other tools). All torch-free at import: ``peft``
and the variants import torch and peft inside the functions that use them.
"""
