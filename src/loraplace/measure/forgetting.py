"""Forgetting: how far a trained adapter moved the model away from the base model, in nats per token.

Usage::

    fset = forgetting_set(cfg, ws, store)     # built (or read back) once per study, stored in meta "forgetting"
    fset.measure(peft_model)                  # {"forgetting": nats/token, "forgetting_loss": ...}
    backfill(cfg, ws, store, fset)            # done trials measured on another set: their saved adapters again

The forgetting set is ``eval.forgetting_size`` token sequences, and forgetting is the adapted model's mean
per-token negative log-likelihood on them minus the base model's (every token but each sequence's first):

* ``eval.forgetting_source: base`` (default): the sequences are sampled from the base model itself, at
  temperature 1, ``eval.forgetting_length`` tokens each, starting from its tokenizer's BOS token (its EOS when it
  has none), with a fixed seed, once per study, and kept in the study database so every trial, and every resumed
  or repeated study with the same settings, scores the same tokens. On text sampled from the base model p, the
  mean of log p(x) - log q(x) per token is an unbiased estimate of KL(p || q) per token for the adapted model q:
  how far the adapter moved the model from what it was, on what it writes, with no corpus needed. It weighs what
  the base model is likely to write, not a domain chosen for its importance.
* a data file (any supported format) or ``hub:NAME[:CONFIG]``: the first ``forgetting_size`` examples as text
  (prompt and completion together; a conversation's turns joined), the loss on every token, cut at
  ``forgetting_length`` tokens: the rise in loss on that text from the base model to the adapted one (the
  definition of PEFT's method comparison), for whoever has a general or in-house corpus.

A trial's forgetting is measured at its end (after racing, on the survivors only), on the adapted model; an
adapter whose B matrices are all still zero has forgetting exactly 0. It is not part of a trial's identity:
changing the forgetting settings re-measures the done trials from their saved adapters (``backfill``).
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path

from loraplace.core.config import DataSpec, StudyConfig
from loraplace.core.files import write_text_atomic
from loraplace.core.metrics import IGNORE_INDEX
from loraplace.data.sources import load_examples
from loraplace.data.tokenize import TokenizedSet, pad_id
from loraplace.model.loading import ALIASES, cache_root
from loraplace.store import keys
from loraplace.store.db import DONE, Store
from loraplace.train.generate import sample
from loraplace.train.loss import evaluate

log = logging.getLogger("loraplace")

SEED = 0  # the sampling seed of the base-model forgetting set: one fixed set per model and settings
META = "forgetting"


@dataclass
class ForgettingSet:
    """The sequences every trial of a study is scored on, and the base model's loss on them."""

    key: str  # a hash of what the sequences and the base loss follow from (``key``)
    source: str
    sequences: list[list[int]]
    base_loss: float  # nats/token
    tokens: int  # the tokens the loss averages over
    batch_size: int
    pad_id: int
    device: str
    sample_time_s: float = 0.0

    @property
    def tokenized(self) -> TokenizedSet:
        return TokenizedSet([list(s) for s in self.sequences], [[IGNORE_INDEX] + list(s[1:]) for s in self.sequences])

    def score(self, model) -> dict:
        """``train.loss.evaluate`` of ``model`` on the set: {"eval_loss" (nats/token), "eval_tokens", ...}."""
        return evaluate(model, self.tokenized, self.batch_size, self.pad_id, self.device)

    def loss(self, model) -> float:
        return self.score(model)["eval_loss"]

    def measure(self, model) -> dict:
        """{"forgetting", "forgetting_loss", "forgetting_time_s"} of ``model`` (an adapted base)."""
        t0 = time.perf_counter()
        loss = self.loss(model)
        return {"forgetting": loss - self.base_loss, "forgetting_loss": loss,
                "forgetting_time_s": time.perf_counter() - t0}


def key(cfg: StudyConfig, device: str) -> str:
    """The forgetting set's key (``store.keys.KINDS["forgetting"]``): the model, the source, the sizes, the
    sampling seed, ``train.dtype`` and the device type (sampling draws from the device's random stream)."""
    return keys.key("forgetting", cfg, device=device, seed=SEED)


def forgetting_set(cfg: StudyConfig, ws, store: Store) -> ForgettingSet | None:
    """The study's forgetting set (``ws``: a ``study.workspace.Workspace``): read back from meta ``forgetting``
    when its key matches, else built (sampled, or read from the source) and the base model's loss measured and
    stored. None with ``eval.forgetting: false``."""
    e = cfg.eval
    if not e.forgetting:
        return None
    stored = load(cfg, ws, store)
    if stored is not None:
        return stored
    k, tok, pad = key(cfg, ws.device), ws.tokenizer, pad_id(ws.tokenizer)
    t0 = time.perf_counter()
    shared = shared_file(cfg, k) if ws.named else None  # a model handed in may not be what cfg.model names
    if shared is not None and shared.is_file():  # sampled by an earlier study of this model with these settings
        seqs = json.loads(shared.read_text())["sequences"]
        log.info("forgetting: %d sequences sampled from the base model earlier, read from %s", len(seqs), shared)
    elif e.forgetting_source == "base":
        start = tok.bos_token_id if tok.bos_token_id is not None else tok.eos_token_id
        log.info("forgetting: sampling %d sequences of %d tokens from the base model", e.forgetting_size,
                 e.forgetting_length)
        seqs = sample(ws.model, [start], e.forgetting_size, e.forgetting_length, SEED, ws.device, e.batch_size)
        if shared is not None:
            shared.parent.mkdir(parents=True, exist_ok=True)
            write_text_atomic(shared, json.dumps({"key": k, "sequences": seqs}))
    else:
        seqs = text_sequences(e.forgetting_source, tok, e.forgetting_size, e.forgetting_length)
    spent = time.perf_counter() - t0
    fset = ForgettingSet(k, e.forgetting_source, seqs, 0.0, 0, e.batch_size, pad, ws.device, spent)
    ev = fset.score(ws.model)
    fset.base_loss, fset.tokens = ev["eval_loss"], ev["eval_tokens"]
    store.put_meta(META, {"key": k, "source": e.forgetting_source, "size": len(seqs), "length": e.forgetting_length,
                          "sequences": seqs, "base_loss": fset.base_loss, "tokens": fset.tokens,
                          "sample_time_s": spent, "seed": SEED})
    log.info("forgetting: the base model's loss on the set %.4f nats/token (%d tokens, %.1f s to build)",
             fset.base_loss, fset.tokens, spent)
    return fset


def shared_file(cfg: StudyConfig, k: str) -> Path | None:
    """Where a base-model forgetting set is kept for every study of a built-in model (``model.loading.ALIASES``:
    fixed weights) with the same settings, under loraplace's cache; None otherwise (a directory's weights may
    change under the same name). Used only when the study loaded the model by that name itself
    (``Workspace.named``): a model handed to ``run_study`` may be any weights."""
    if cfg.eval.forgetting_source != "base" or cfg.model not in ALIASES:
        return None
    return cache_root() / "forgetting" / f"{k}.json"


def load(cfg: StudyConfig, ws, store: Store) -> ForgettingSet | None:
    """The study's stored forgetting set for these settings, or None (off, or not built yet)."""
    stored = store.get_meta(META)
    if not cfg.eval.forgetting or not stored or stored.get("key") != key(cfg, ws.device):
        return None
    return ForgettingSet(stored["key"], stored["source"], stored["sequences"], stored["base_loss"], stored["tokens"],
                         cfg.eval.batch_size, pad_id(ws.tokenizer), ws.device, stored.get("sample_time_s", 0.0))


def text_sequences(source: str, tokenizer, size: int, length: int) -> list[list[int]]:
    """The first ``size`` examples of a data source as token sequences of at most ``length`` tokens, the text of
    each example whole (prompt and completion, or a conversation's turns), tokenized as the tokenizer does by
    default (BOS where it adds one)."""
    examples = load_examples(DataSpec(source=source))
    out = []
    for ex in examples:
        text = "\n".join(c for _, c in ex.messages) if ex.messages is not None else ex.prompt + ex.completion
        ids = tokenizer(text)["input_ids"][:length]
        if len(ids) >= 2:
            out.append(list(ids))
        if len(out) == size:
            break
    if not out:
        from loraplace.data.examples import DataError

        raise DataError(f"eval.forgetting_source={source}: no example has 2 tokens or more")
    return out


def backfill(cfg: StudyConfig, ws, store: Store, fset: ForgettingSet | None) -> list[str]:
    """Measure forgetting on the current set for every done trial of the study that lacks it (a trial finished
    under other forgetting settings, or before forgetting existed), from its saved adapter. Returns their ids."""
    if fset is None:
        return []
    from peft import PeftModel

    ids = []
    for t in store.current_trials():
        if t.status != DONE or t.measured.get("forgetting") == fset.key:
            continue
        if not t.adapter_path or not (store.directory / t.adapter_path).is_dir():
            continue
        peft_model = PeftModel.from_pretrained(ws.model, store.directory / t.adapter_path)
        try:
            m = fset.measure(peft_model)
        finally:
            peft_model.unload()
        store.update_metrics(t.trial_id, m, {"forgetting": fset.key})
        ids.append(t.trial_id)
    if ids:
        log.info("forgetting: measured %d finished trial(s) on the current forgetting set from their adapters", len(ids))
    return ids
