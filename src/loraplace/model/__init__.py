"""The base model: loading it (``loading``), reading its structure (``anatomy``; how one block's
linears read as attention and MLP projections: ``reading``), and what training it will cost (``estimate``).

Usage::

    from loraplace.model.loading import load, skeleton
    from loraplace.model.anatomy import analyze
    anat = analyze(skeleton("smollm2-135m"))     # structure from the config alone (meta device)

``estimate`` is torch-free; ``loading``, ``anatomy`` and ``reading`` import torch.
"""
