"""The frozen prefix: blocks below a run's lowest adapted block, computed once per training example.

Usage::

    cache = prefix_cache(model, anatomy, lowest_block(placements), train_set, spec, steps, device)
    with PrefixCache.around(cache, parts, batch["input_ids"].shape):   # parts: the step's batches
        loss = ...                                                     # one training forward
    PrefixCache.blocks_reused(cache)                                   # k, or 0 if never reused

The base is frozen, so the blocks below the lowest adapted block k never enter the backward graph.
When k > 0 and training passes over the train set more than once, block k's input is kept per
training example (by its index in the train set, at its true length) the first time a step meets
it; a step whose examples are all kept bypasses blocks 0..k-1 and feeds block k the kept states.
Not cached: a base with its own randomness (dropout, router noise: one draw would be frozen), a
cache over ``PREFIX_CACHE_SHARE`` of free memory (logged), or a model whose block k reads something
other than block k-1's output (detected on the first step). Both engines use it (``train.sequential``,
``train.fused``).
"""

from __future__ import annotations

import contextlib
import logging
import math

import torch

from loraplace.train import memory as M

log = logging.getLogger("loraplace")

# The cache may take at most this share of the training device's free memory at the start of a run:
# it fits in the 20% that ``auto`` group sizing leaves outside its activation estimate.
PREFIX_CACHE_SHARE = 0.15


def base_randomness(model: torch.nn.Module) -> str | None:
    """Why the base model's own training forward is random (dropout, router noise), or None: the masks of a
    stacked batch would come from one stream, and a cached prefix output would freeze one draw."""
    for name, mod in model.named_modules():
        if isinstance(mod, torch.nn.Dropout) and mod.p > 0:
            return f"the base model has its own dropout ({name or 'model'}, p={mod.p})"
    cfg = getattr(model, "config", None)
    for key in ("attention_dropout", "attn_pdrop", "attention_probs_dropout_prob", "hidden_dropout"):
        if float(getattr(cfg, key, 0) or 0) > 0:
            return f"the base model has its own dropout (config.{key}={getattr(cfg, key)})"
    if float(getattr(cfg, "router_jitter_noise", 0) or 0) > 0:  # Mixtral-style: multiplies router inputs by noise
        return f"the base model's router adds noise in training (config.router_jitter_noise={cfg.router_jitter_noise})"
    return None


class PrefixCache:
    """Block k's input for every training example, kept the first time a step meets the example; a step
    whose examples are all kept skips blocks 0..k-1 and feeds block k from here (the embeddings still run).

    Exact because the prefix is frozen and deterministic (no dropout, checked before) and rows never
    mix: an example's hidden states at its real positions do not depend on the batch it sits in or
    on the padding after it (within float rounding of different batch shapes, as in any two runs).
    """

    def __init__(self, blocks: torch.nn.ModuleList, k: int):
        self.blocks, self.k = blocks, k
        self.store: dict[int, torch.Tensor] = {}  # example index -> its hidden states (true length, H), detached
        self.arity: int | None = None  # a block returns a tensor (None) or a tuple of this length
        self.rows: list[tuple[int, int, int]] = []  # this step: (row of the stacked batch, example index, length)
        self.broken: str | None = None  # why the cache cannot be used on this model after all
        self.reused = 0  # steps fed from the cache

    @staticmethod
    @contextlib.contextmanager
    def around(cache: "PrefixCache | None", parts: list[dict], shape):
        """Around one training forward over ``parts`` (a step's batches, each with ``index``) stacked
        into a batch of ``shape`` (rows, width), part i's rows from i * rows / len(parts) on."""
        if cache is None:
            yield
            return
        cache.plan(parts, shape[0] // len(parts))
        with cache.step(tuple(shape)):
            yield

    @staticmethod
    def blocks_reused(cache: "PrefixCache | None") -> int:
        """k when the cache fed at least one step, else 0 (the ``prefix_cached_blocks`` metric)."""
        return cache.k if cache is not None and cache.reused else 0

    def plan(self, parts: list[dict], stride: int) -> None:
        """The stacked batch's rows: slot i's rows start at i * stride."""
        self.rows = [(i * stride + j, int(idx), int(n))
                     for i, p in enumerate(parts)
                     for j, (idx, n) in enumerate(zip(p["index"].tolist(), p["attention_mask"].sum(1).tolist()))]

    @contextlib.contextmanager
    def step(self, shape: tuple[int, int]):
        """Around one training forward over a stacked batch of ``shape`` (rows, width)."""
        if self.broken is not None:
            yield
        elif all(i in self.store for _, i, _ in self.rows):
            with self._bypass(shape):
                yield
            self.reused += 1
        else:
            with self._capture():
                yield

    @contextlib.contextmanager
    def _capture(self):
        """Run the prefix and keep block k-1's output for each new example (and check that block k reads it)."""
        last, seen = self.blocks[self.k - 1], {}

        def keep(mod, args, out):
            h = out[0] if isinstance(out, tuple) else out
            self.arity = len(out) if isinstance(out, tuple) else None
            seen["h"] = h
            for row, i, n in self.rows:
                if i not in self.store:
                    self.store[i] = h[row, :n].detach().clone()

        def check(mod, args, kwargs):  # block k must get block k-1's output itself, nothing made in between
            given = args[0] if args else kwargs.get("hidden_states")
            if given is not seen.get("h") and self.broken is None:
                self.broken = f"block {self.k} does not read block {self.k - 1}'s output directly"
                self.store.clear()
                log.info("not caching the frozen prefix: %s", self.broken)

        handles = [last.register_forward_hook(keep), self.blocks[self.k].register_forward_pre_hook(check, with_kwargs=True)]
        try:
            yield
        finally:
            for h in handles:
                h.remove()

    @contextlib.contextmanager
    def _bypass(self, shape: tuple[int, int]):
        """Blocks 0..k-1 return the cached hidden states (zeros on padding) instead of computing them."""
        first = next(iter(self.store.values()))
        hidden = first.new_zeros(*shape, first.shape[-1])
        for row, i, n in self.rows:
            hidden[row, :n] = self.store[i]
        out = hidden if self.arity is None else (hidden,) + (None,) * (self.arity - 1)
        skipped = [self.blocks[j] for j in range(self.k)]
        for blk in skipped:  # an instance attribute shadows the class's forward (and its checkpointing wrapper)
            blk.forward = lambda *args, **kwargs: out
        try:
            yield
        finally:
            for blk in skipped:
                del blk.forward


def lowest_block(placements) -> int:
    """The lowest block any of ``placements`` adapts (0 when none adapts anything)."""
    return min((p.anatomy.layer(n).block for p in placements for n in p.modules), default=0)


def prefix_cache(model, anat, k: int, train_set, spec, steps: int, device, cap: int | None = None) -> PrefixCache | None:
    """A cache of blocks 0..k-1's output when k > 0 and ``steps`` see an example more than once; else None
    (logging why where it is not obvious). ``model``: the base, before any LoRA wrapping (its own
    dropout is what matters). ``cap``: bytes the cache may take (None: ``PREFIX_CACHE_SHARE`` of the
    device's free memory; 0: no cache)."""
    if k <= 0 or steps <= math.ceil(len(train_set) / spec.batch_size):
        return None  # block 0 is adapted, or one pass: no prefix output is ever needed twice
    why = base_randomness(model)
    if why:
        log.info("not caching the frozen prefix (blocks 0-%d): %s", k - 1, why)
        return None
    hidden = getattr(model.config, "hidden_size", None) or model.get_input_embeddings().embedding_dim
    elt = model.get_input_embeddings().weight.element_size()
    need = sum(train_set.lengths) * hidden * elt
    cap = int(PREFIX_CACHE_SHARE * M.free_memory_bytes(device)) if cap is None else cap
    if need > cap:
        log.info("not caching the frozen prefix (blocks 0-%d): its output for the train set takes %.0f MB, "
                 "over the cap of %.0f MB", k - 1, need / 2**20, cap / 2**20)
        return None
    return PrefixCache(model.get_submodule(anat.blocks_path), k)
