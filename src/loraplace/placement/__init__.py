"""Strategies -> explicit LoRA placements: full module names, a rank and alpha per module, and their record.

Usage::

    from loraplace.placement.strategy import get_strategy
    from loraplace.placement.resolve import resolve, match_budget
    p = resolve(get_strategy("attention_only"), anat, rank=16, alpha=32)
    record = p.record(dropout=0.0)              # placement.record: stored with the trial, read back by export

Modules: ``strategy`` (the vocabulary: roles x blocks x rank), ``resolve`` (a strategy on one model, budget
matching), ``select`` (``auto`` and ``random:K``: module sets filled to a budget), ``record`` (the stored
placement and the one PEFT ``LoraConfig``), ``peft`` (wrapping a model, imports peft), ``export`` (configs
for other tools). All but ``peft`` are torch-free.
"""
