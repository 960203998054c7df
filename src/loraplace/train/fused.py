"""The fused engine: a group of trials trains in one pass over the shared frozen base, with the same numbers.

Usage::

    size = group_size(spec, model, device, placements, max_length)    # train.fuse: auto | off | N
    for group in plan_groups(tasks, size): ...                           # study.executor runs each group
    trials = [Trial.start(setup, p, s) ...]
    advance(setup, trials, 10); evaluate(setup, trials)                  # then each trial.finish(...)

How: the group's batches (one per trial, each from its own seed and step) are stacked along the batch
dimension, trial after trial. Every base linear layer computes its frozen product once over all
rows; a forward hook then adds ``scale_t * B_t A_t x_t`` on trial t's contiguous row slice for
each trial t that adapts that module (a module t does not adapt adds nothing for t). The loss is
each trial's own token-weighted mean over its targets; the sum of those is backpropagated once.
Adapter parameters are disjoint and rows never mix (right padding, causal attention, row-wise
norms), so each trial's gradients are the ones it gets alone. Everything else is the trial's own
(``train.trial.Trial``): the adapter initialisation, AdamW, the learning-rate schedule, gradient
clipping by its own norm, LoRA-dropout masks (each trial keeps its own RNG stream), non-finite-loss
detection (a failing trial leaves the group, the others go on), and the saved PEFT adapter.
Only variants whose adapter is plain LoRA's scale x B A x fuse (``Variant.unfusable``: rsLoRA does, its scale
is read from PEFT; DoRA, PiSSA and AdaLoRA run on the sequential engine), and only placements on modules: LoRA on
routed experts (fused 3-D parameters) changes weights inside the experts module, so those trials run on the
sequential engine (``unfusable``: the executor asks per placement and fuses the others, logged).

``train_time_s`` / ``eval_time_s`` of a fused trial are its equal share of each group step (so a study's trials
still sum to its wall time; they do not tell strategies apart); ``group_train_time_s`` is the group's whole
training wall time and ``fused_trials`` its size; ``peak_mem_bytes`` is the group's peak.

Trials of the same seed draw identical batches, so a same-seed group adds no padding at all;
mixed-seed groups pad to the widest batch of the step (``fused_padding_frac``). Not fused
(run one after the other instead, same results): base models with their own dropout (GPT-2's
defaults: their masks would come from one stream), and LoRA dropout under gradient checkpointing
(the recompute would redraw the masks).

Frozen prefix: the base is frozen, so the blocks below the group's lowest adapted block k never
enter the backward graph, and from the second epoch on their output comes from ``train.prefix``
(as in the sequential engine). Not done yet: running the prefix once for the identical rows of a
same-seed group within a step; rows of a trial whose adapters start higher than the group's lowest
one still get (zero) activation gradients between the two.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from loraplace.core.config import TrainSpec
from loraplace.core.metrics import IGNORE_INDEX, perplexity
from loraplace.data.batches import batches
from loraplace.model.estimate import estimate
from loraplace.placement.resolve import Placement
from loraplace.train import memory as M
from loraplace.train.loss import head_logits, target_positions
from loraplace.train.prefix import PrefixCache, base_randomness, lowest_block, prefix_cache
from loraplace.train.progress import step_bar
from loraplace.train.trial import Setup, Trial, TrialError, generator

log = logging.getLogger("loraplace")

AUTO_MEMORY_SHARE = 0.8  # of free CUDA memory that auto-sized groups may fill (the prefix cache fits in the rest)


# -- how many trials a group holds ------------------------------------------------------------
EXPERTS_UNFUSABLE = ("LoRA on routed experts adds B A to a fused 3-D expert weight inside the experts module (PEFT's "
                     "ParamWrapper), not scale x B A x to a module's output, which is what the fused forward adds")

INT8_UNFUSABLE = ("an LLM.int8() base: in evaluation its fp16 outlier columns are chosen from every row of the batch, "
                  "so one trial's rows would change another's numbers")


def unfusable(placement: Placement) -> str | None:
    """Why ``placement``'s trials cannot train in a fused group (None: they can): its variant's reason, or routed
    experts among its targets."""
    if any(placement.anatomy.layer(n).is_parameter for n in placement.modules):
        return EXPERTS_UNFUSABLE
    return placement.variant.unfusable


def fusable(model: torch.nn.Module, spec: TrainSpec) -> str | None:
    """None when fusing gives the sequential numbers for this model and settings, else why not."""
    why = base_randomness(model)
    if why:
        return why
    if getattr(model, "is_loaded_in_8bit", False):
        return INT8_UNFUSABLE
    if spec.gradient_checkpointing and spec.dropout > 0:
        return "LoRA dropout under gradient checkpointing (the recompute would redraw its masks)"
    return None


def group_size(spec: TrainSpec, model: torch.nn.Module, device: str, placements: list[Placement],
               max_length: int) -> int:
    """Trials per group for these placements: 1 means the sequential engine.

    ``auto``: 1 on CPU (measured on a 2-core CPU: 24 rows instead of 8 cost 29% more per row at
    length 160, and two trials side by side finished no sooner than in turn; BENCHMARKS.md), and
    on CUDA as many trials as ``model.estimate`` says fit in ``AUTO_MEMORY_SHARE`` of free memory at
    ``max_length`` tokens an example (the caller, ``study.executor``, still halves a group that runs
    out of memory).
    """
    n = spec.fuse_trials()
    if len(placements) <= 1:
        return 1
    if n == "auto":
        n = _auto_size(spec, device, placements, max_length) if M.is_cuda(device) else 1
    if n > 1:
        why = fusable(model, spec) or next((u for p in placements if (u := unfusable(p))), None)
        if why:
            log.info("train.fuse: running trials one after the other: %s", why)
            return 1
    return max(1, min(n, len(placements)))


def _auto_size(spec: TrainSpec, device: str, placements: list[Placement], max_length: int) -> int:
    """Trials whose training memory (``model.estimate``: activations, logits, adapters, their gradients and
    AdamW; the largest of the placements) fits in ``AUTO_MEMORY_SHARE`` of free memory beside the loaded base."""
    free = M.free_memory_bytes(device)
    per_trial = max(estimate(p, spec.batch_size, max(1, max_length), spec.dtype, spec.gradient_checkpointing).training_bytes
                    for p in placements)
    return max(1, min(64, int(AUTO_MEMORY_SHARE * free // max(per_trial, 1))))


def plan_groups(tasks: list, size: int) -> list[list]:
    """Groups of at most ``size`` tasks, seed by seed: same-seed trials share batches, so no padding;
    a group spans seeds only where a seed has fewer trials left than the group holds."""
    ordered = sorted(tasks, key=lambda t: t.seed)  # stable: the planned order within a seed stays
    return [ordered[i:i + size] for i in range(0, len(ordered), size)]


# -- the fused forward --------------------------------------------------------------------------
@dataclass
class _Slot:
    trial: Trial
    rows: int  # the trial's real rows in this batch
    width: int  # the trial's real sequence length in this batch


class _Hooks:
    """Forward hooks on every base module some trial adapts; ``slots`` is the current row layout."""

    def __init__(self, model, trials: list[Trial], dropout: float, device):
        self.slots: list[_Slot] = []
        self.dropout, self.gen = dropout, generator(device)
        names = {n for t in trials for n in t.adapters}
        self.handles = [model.get_submodule(n).register_forward_hook(self._hook(n)) for n in sorted(names)]

    def remove(self):
        for h in self.handles:
            h.remove()

    def _drop(self, x, trial: Trial):
        """PEFT's LoRA dropout with the trial's own RNG stream (its masks as in its sequential run)."""
        outer = self.gen.get_state()
        self.gen.set_state(trial.rng)
        try:
            x = F.dropout(x, self.dropout, training=True)
            trial.rng = self.gen.get_state()
        finally:
            self.gen.set_state(outer)
        return x

    def _hook(self, name: str):
        def hook(mod, args, out):
            x = args[0]
            n = len(self.slots)
            stride = x.shape[0] // n  # rows per slot (batch-major layout)
            pieces = []
            for i, slot in enumerate(self.slots):
                o = out[i * stride:(i + 1) * stride]
                ad = slot.trial.adapters.get(name)
                if ad is not None:
                    a, b, scale = ad
                    trim = x.dim() == 3 and (slot.rows < stride or slot.width < x.shape[1])
                    xi = x[i * stride:i * stride + slot.rows, :slot.width] if trim else x[i * stride:(i + 1) * stride]
                    xi = xi.to(a.dtype)
                    if self.dropout > 0 and mod.training:
                        xi = self._drop(xi, slot.trial)
                    delta = F.linear(F.linear(xi, a), b) * scale  # as PEFT: lora_B(lora_A(dropout(x))) * scaling
                    o = _add_rows(o, delta, slot.rows, slot.width) if trim else o + delta
                pieces.append(o)
            return (torch.cat(pieces) if n > 1 else pieces[0]).to(out.dtype)

        return hook


def _add_rows(o: torch.Tensor, delta: torch.Tensor, rows: int, width: int) -> torch.Tensor:
    """o (R, L, H) with delta (rows, width, H) added to its top-left corner, built without in-place writes."""
    top = o[:rows]
    top = torch.cat([top[:, :width] + delta, top[:, width:]], 1) if width < o.shape[1] else top + delta
    return torch.cat([top, o[rows:]]) if rows < o.shape[0] else top


def _stack(parts: list[dict], pad_id: int) -> tuple[dict, list[tuple[int, int]], int]:
    """One batch from the slots' batches: each padded to the widest and to the most rows (pad rows
    are all padding, labels ignored). Returns the batch, (rows, width) per slot and the real tokens."""
    width = max(p["input_ids"].shape[1] for p in parts)
    rows = max(p["input_ids"].shape[0] for p in parts)
    ids, labels, shape = [], [], []
    for p in parts:
        r, w = p["input_ids"].shape
        ids.append(F.pad(p["input_ids"], (0, width - w, 0, rows - r), value=pad_id))
        labels.append(F.pad(p["labels"], (0, width - w, 0, rows - r), value=IGNORE_INDEX))
        shape.append((r, w))
    real = sum(int(p["attention_mask"].sum()) for p in parts)
    return {"input_ids": torch.cat(ids), "labels": torch.cat(labels)}, shape, real


def _fused_nll(model, batch: dict, n: int) -> list[tuple[torch.Tensor, int]]:
    """Per slot (of n, batch-major): summed target NLL and target count, the head on target positions only."""
    select, targets = target_positions(batch["labels"])
    counts = select.view(n, -1).sum(1).tolist()
    logits = head_logits(model, batch["input_ids"], select)  # (sum counts, vocab), slot after slot
    out, start = [], 0
    for c in counts:
        nll = F.cross_entropy(logits[start:start + c].float(), targets[start:start + c], reduction="sum")
        out.append((nll, c))
        start += c
    return out


# -- a group of trials --------------------------------------------------------------------------
def advance(setup: Setup, trials: list[Trial], steps: int, desc: str = "fused",
            cache: PrefixCache | None | str = "new") -> PrefixCache | None:
    """Train the group's live trials ``steps`` more optimizer steps together (a trial whose run ends sooner
    leaves the group there; one whose loss goes non-finite is marked failed and leaves, the others go on).

    ``cache``: the frozen-prefix cache to use; "new" builds one for the group (``train.prefix``), None uses
    none. Returns the cache, so a group advanced in pieces can keep it."""
    spec, model, device = setup.train, setup.model, setup.device
    _refuse_unfusable(trials)
    active = [t for t in trials if not t.done]
    if not active or steps <= 0:
        return None if cache == "new" else cache
    if cache == "new":
        k = lowest_block([t.placement for t in active])
        cache = prefix_cache(model, active[0].placement.anatomy, k, setup.train_set, spec, max(t.total for t in active),
                             device, setup.prefix_cache_bytes)
    # The base is frozen, so autograd records nothing until the first LoRA delta: the blocks below
    # the group's lowest adapted block are outside the backward graph.
    frozen = [(p, p.requires_grad) for p in model.parameters()]
    for p, _ in frozen:
        p.requires_grad_(False)
    hooks = _Hooks(model, active, spec.dropout, device)
    was_training = model.training
    model.train()
    try:
        with M.peak_into(trials, device), step_bar(steps, desc) as bar:
            for t in active:
                t.fused.setdefault("size", len(active))
            t_group = time.perf_counter()
            try:
                with M.activation_checkpointing(model, spec.gradient_checkpointing):
                    for _ in range(steps):
                        active = [t for t in active if not t.done]
                        if not active:
                            break
                        _step(setup, active, hooks, cache)
                        bar.update(1)
            finally:
                wall = time.perf_counter() - t_group
                for t in trials:
                    t.fused["time"] = t.fused.get("time", 0.0) + wall
                    t.prefix_blocks = max(t.prefix_blocks, PrefixCache.blocks_reused(cache))
    finally:
        hooks.remove()
        model.train(was_training)
        for p, flag in frozen:
            p.requires_grad_(flag)
    return cache


def _refuse_unfusable(trials: list[Trial]) -> None:
    """The executor runs unfusable trials sequentially; a direct call must not change their numbers silently."""
    for t in trials:
        why = unfusable(t.placement)
        if why:
            raise TrialError(f"{t.placement.strategy.name} trials cannot be fused: {why}; run them with train.sequential")


def _step(setup: Setup, active: list[Trial], hooks: _Hooks, cache: PrefixCache | None) -> None:
    """One optimizer step of every live trial of the group: their batches stacked, one forward, one backward."""
    t0 = time.perf_counter()
    parts = [t.batch(setup, index=cache is not None) for t in active]
    batch, shape, real = _stack(parts, setup.pad_id)
    for t in active:
        t.fused["slots"] = t.fused.get("slots", 0) + batch["input_ids"].numel()
        t.fused["real"] = t.fused.get("real", 0) + real
    hooks.slots = [_Slot(t, r, w) for t, (r, w) in zip(active, shape)]
    with PrefixCache.around(cache, parts, batch["input_ids"].shape):
        results = _fused_nll(setup.model, batch, len(active))
    total, alive = None, []
    for t, part, (nll, n) in zip(active, parts, results):
        loss = nll / max(n, 1)
        if not t.finite(loss):  # it leaves the group; the others go on
            continue
        alive.append((t, part, loss, nll, n))
        term = loss + t.penalty()  # the variant's penalty (0 for the variants that fuse)
        total = term if total is None else total + term
    if total is not None:
        total.backward()
    for t, part, loss, nll, n in alive:
        t.update(setup, loss.item(), nll.item(), n, part)
    dt = time.perf_counter() - t0
    for t in active:
        t.train_time += dt / len(active)


@torch.inference_mode()
def evaluate(setup: Setup, trials: list[Trial]) -> None:
    """Each live trial's token-weighted eval loss (as ``train.loss.evaluate``), every eval batch run once for all."""
    trials = [t for t in trials if t.error is None]
    if not trials:
        return
    _refuse_unfusable(trials)
    model = setup.model
    hooks = _Hooks(model, trials, 0.0, setup.device)
    was_training = model.training
    model.eval()
    sums, count = [0.0] * len(trials), 0
    t0 = time.perf_counter()
    try:
        for part in batches(setup.eval_set, setup.eval.batch_size, seed=None, pad_id=setup.pad_id):
            r, w = part["input_ids"].shape
            hooks.slots = [_Slot(t, r, w) for t in trials]
            batch = {k: v.repeat(len(trials), 1).to(setup.device) for k, v in part.items() if k != "attention_mask"}
            for i, (nll, n) in enumerate(_fused_nll(model, batch, len(trials))):
                sums[i] += float(nll)
            count += n
    finally:
        hooks.remove()
        model.train(was_training)
    if count == 0:
        raise TrialError("the eval set has no target tokens")
    dt = time.perf_counter() - t0
    for t, s in zip(trials, sums):
        loss = s / count
        t.eval = {"eval_loss": loss, "perplexity": perplexity(loss), "eval_tokens": count, "step": t.step}
        t.eval_time += dt / len(trials)
