"""The base model: loading it (``loading``), reading its structure (``anatomy``), and what training it will cost (``estimate``).

Usage::

    from loraplace.model.loading import load, skeleton
    from loraplace.model.anatomy import analyze
    anat = analyze(skeleton("smollm2-135m"))     # structure from the config alone (meta device)

``estimate`` is torch-free; ``loading`` and ``anatomy`` import torch.
"""
