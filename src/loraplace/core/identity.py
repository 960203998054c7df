"""How settings become identities: the canonical form of plain data and its hash.

Usage::

    trial_id = digest({"model": "smollm2-135m", "seed": 0, ...})   # 16 hex digits
    plain(32.0)                                                     # 32

A trial, a probe and the zero-shot measurement are keyed by ``digest`` of the settings that can change
their numbers, so a changed setting makes a new key instead of silently reusing old results.
"""

from __future__ import annotations

import hashlib
import json


def plain(x):
    """Integral floats as ints (alpha 32.0 -> 32), as configs are written; anything else unchanged."""
    return int(x) if isinstance(x, float) and x.is_integer() else x


def canonical(obj):
    """``plain`` applied all the way down: a default of 32 and an override of 32.0 are the same setting."""
    if isinstance(obj, dict):
        return {k: canonical(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [canonical(v) for v in obj]
    return plain(obj)


def digest(obj, plain_numbers: bool = True) -> str:
    """16 hex digits of SHA-256 over the JSON of ``obj`` (keys sorted; non-JSON values by str), made
    ``canonical`` first unless ``plain_numbers`` is False (probe keys, whose stored form predates it)."""
    text = json.dumps(canonical(obj) if plain_numbers else obj, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]
