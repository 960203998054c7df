"""Strategy ``kappa``'s order: the adaptable modules by increasing weight condition number, once per study.

Usage::

    order = kappa_order_of(cfg, ws, store)    # module names, lowest condition number first; meta kappa

The condition numbers are PEFT's KappaTune (``model.conditioning.kappa_order``); the order and the seconds the
SVDs took (the method's own cost) are kept in meta ``kappa`` under the key of what they depend on
(``store.keys``: the model, PEFT's version, ``train.dtype`` and the device type).
"""

from __future__ import annotations

import logging

from loraplace.core.config import StudyConfig
from loraplace.store.db import Store
from loraplace.store.keys import key

log = logging.getLogger("loraplace")

META = "kappa"


def kappa_order_of(cfg: StudyConfig, ws, store: Store) -> list[str]:
    """The order of ``ws``'s base model (``ws``: a ``study.workspace.Workspace``), read back from meta ``kappa``
    when its key matches, else computed and stored."""
    import peft

    from loraplace.model.conditioning import kappa_order

    k = key("kappa", cfg, device=ws.device, peft=peft.__version__)
    meta = store.get_meta(META)
    if not meta or meta.get("key") != k:
        order, seconds = kappa_order(ws.model, ws.anatomy)
        meta = {"key": k, "order": order, "time_s": seconds}
        store.put_meta(META, meta)
        log.info("kappa: condition numbers of %d modules (PEFT's find_kappa_target_modules) in %.1f s", len(order), seconds)
    return list(meta["order"])
