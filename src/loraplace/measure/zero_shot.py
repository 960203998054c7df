"""The base model's own loss (and accuracy) on the study's eval set: the reference of every retained improvement.

Usage::

    zero = zero_shot(cfg, ws, store)     # {"eval_loss", "perplexity", "eval_tokens", "key", ...}, meta zero_shot

Measured once per study and kept in meta ``zero_shot`` under the keys of what each number depends on
(``store.keys``: ``zero_shot`` for the loss, ``accuracy`` for the accuracy), so a changed eval set, dtype or
device measures the loss again, and changed accuracy examples or generation settings only the accuracy.
"""

from __future__ import annotations

import logging

from loraplace.core.config import StudyConfig
from loraplace.data.answers import STOP_RULE
from loraplace.store.db import Store
from loraplace.store.keys import key
from loraplace.train.loss import evaluate

log = logging.getLogger("loraplace")

META = "zero_shot"


def zero_shot(cfg: StudyConfig, ws, store: Store) -> dict:
    """The base model's loss on the eval set (and accuracy on the accuracy examples) of ``ws`` (a
    ``study.workspace.Workspace``), read back from meta ``zero_shot`` when their keys match, else measured and
    stored."""
    zkey = key("zero_shot", cfg, device=ws.device)
    zero = store.get_meta(META)
    if not zero or zero.get("key") != zkey:
        log.info("evaluating the base model (zero-shot) on %d eval examples", len(ws.eval_set.input_ids))
        zero = {**evaluate(ws.model, ws.eval_set, cfg.eval.batch_size, ws.tokenizer.pad_token_id, ws.device), "key": zkey}
        store.put_meta(META, zero)
    scored = ws.accuracy_examples
    if cfg.eval.accuracy and not scored:
        log.warning("eval.accuracy is on but no eval example has a checkable answer; skipping accuracy")
    akey = key("accuracy", cfg, device=ws.device, stop=STOP_RULE)
    if scored and zero.get("accuracy_key") != akey:
        log.info("measuring the base model's accuracy (zero-shot) on %d examples", len(scored))
        zero = {**zero, **ws.accuracy(ws.model), "accuracy_key": akey}
        store.put_meta(META, zero)
    return zero
