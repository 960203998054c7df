"""The torch-free core every layer shares: errors, roles, metric definitions, the typed config, text tables.

Usage::

    from loraplace.core.config import StudyConfig
    from loraplace.core.errors import LoraplaceError

Nothing under ``core/`` imports torch, transformers or peft (``tests/core/test_boundary.py`` checks it),
so the read-only commands (``status``, ``report``, ``export``) start in a fraction of a second.
"""
