"""Fused trials: a group of trials trains in one pass over the shared frozen base, with the same numbers.

Usage::

    size = group_size(cfg, ws, len(tasks))           # train.fuse: auto | off | N
    for group in plan_groups(tasks, size):
        for task, result, error in run_group(ws, group):
            ...                                       # as executor.run_tasks yields

How: the group's batches (one per trial, each from its own seed) are stacked along the batch
dimension, trial after trial. Every base linear layer computes its frozen product once over all
rows; a forward hook then adds ``scale_t * B_t A_t x_t`` on trial t's contiguous row slice for
each trial t that adapts that module (a module t does not adapt adds nothing for t). The loss is
each trial's own token-weighted mean over its targets; the sum of those is backpropagated once.
Adapter parameters are disjoint and rows never mix (right padding, causal attention, row-wise
norms), so each trial's gradients are the ones it gets alone. Everything else stays per trial:
the adapter initialisation (taken from the PEFT wrapping the sequential engine builds), AdamW,
the learning-rate schedule, gradient clipping by its own norm, LoRA-dropout masks (each trial
keeps its own RNG stream), non-finite-loss detection (a failing trial leaves the group, the
others go on), evaluation, and the saved PEFT adapter (the trained tensors are put back into a
PEFT wrapping and saved by ``save_pretrained``).

Trials of the same seed draw identical batches, so a same-seed group adds no padding at all;
mixed-seed groups pad to the widest batch of the step (``fused_padding_frac``). Not fused
(run one after the other instead, same results): base models with their own dropout (GPT-2's
defaults: their masks would come from one stream), and LoRA dropout under gradient checkpointing
(the recompute would redraw the masks).

Frozen prefix: the base is frozen, so the blocks below the group's lowest adapted block k never
enter the backward graph, and from the second epoch on their output comes from ``prefix.PrefixCache``
(as in the sequential engine). Not done yet: running the prefix once for the identical rows of a
same-seed group within a step; rows of a trial whose adapters start higher than the group's lowest
one still get (zero) activation gradients between the two.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from . import metrics as M
from .config import EvalSpec, StudyConfig, TrainSpec
from .data import TokenizedSet, batches
from .placement import Placement, apply
from .prefix import PrefixCache, base_randomness, lowest_block, prefix_cache
from .trial import (TrialError, TrialResult, _checkpointing, _save_adapter, _train_batches, head_logits, lr_factor,
                    target_positions, total_steps, train_stats, trial_result)

log = logging.getLogger("loraplace")


# -- how many trials a group holds ------------------------------------------------------------
def fusable(model: torch.nn.Module, spec: TrainSpec) -> str | None:
    """None when fusing gives the sequential numbers for this model and settings, else why not."""
    why = base_randomness(model)
    if why:
        return why
    if spec.gradient_checkpointing and spec.dropout > 0:
        return "LoRA dropout under gradient checkpointing (the recompute would redraw its masks)"
    return None


def group_size(cfg: StudyConfig, model: torch.nn.Module, device: str, n_tasks: int, max_length: int | None = None) -> int:
    """Trials per group for this study: 1 means the sequential engine.

    ``auto``: 1 on CPU (measured on a 2-core CPU: 24 rows instead of 8 cost 29% more per row at
    length 160, and two trials side by side finished no sooner than in turn; BENCHMARKS.md), and
    on CUDA as many trials as an activation estimate says fit in free memory (``run_group``
    still halves a group that runs out of memory).
    """
    n = cfg.train.fuse_trials()
    if n_tasks <= 1:
        return 1
    if n == "auto":
        n = _auto_size(cfg, model, device, max_length or cfg.data.max_length) if str(device).startswith("cuda") else 1
    if n > 1:
        why = fusable(model, cfg.train)
        if why:
            log.info("train.fuse: running trials one after the other: %s", why)
            return 1
    return max(1, min(n, n_tasks))


def _auto_size(cfg: StudyConfig, model, device: str, max_length: int) -> int:
    """Trials whose activations fit in 80% of free CUDA memory (about 34 bytes a token a block per
    hidden unit in 16-bit, twice that in fp32, for a decoder block without stored attention scores)."""
    free = M.free_memory_bytes(device)
    hidden = model.get_input_embeddings().embedding_dim
    blocks = getattr(model.config, "num_hidden_layers", None) or 12
    elt = torch.finfo(getattr(torch, cfg.train.dtype)).bits // 8
    tokens = cfg.train.batch_size * max_length
    per_trial = 34 * hidden * blocks * tokens * elt / 2 + tokens * model.get_output_embeddings().weight.shape[0] * 4
    if cfg.train.gradient_checkpointing:
        per_trial /= blocks / 2
    return max(1, min(64, int(0.8 * free // max(per_trial, 1))))


def plan_groups(tasks: list, size: int) -> list[list]:
    """Groups of at most ``size`` tasks, seed by seed: same-seed trials share batches, so no padding;
    a group spans seeds only where a seed has fewer trials left than the group holds."""
    ordered = sorted(tasks, key=lambda t: t.seed)  # stable: the planned order within a seed stays
    return [ordered[i:i + size] for i in range(0, len(ordered), size)]


# -- one trial inside a group -----------------------------------------------------------------
@dataclass
class _Member:
    placement: Placement
    seed: int
    adapters: dict[str, tuple[torch.Tensor, torch.Tensor, float]]  # module -> (A (r, in), B (out, r), scale)
    params: list[torch.Tensor]
    rng: torch.Tensor | None  # this trial's LoRA-dropout RNG state
    opt: torch.optim.Optimizer = None
    sched: object = None
    batches: object = None
    curve: list = field(default_factory=list)
    tail: list = field(default_factory=list)
    tokens: int = 0
    slots: int = 0
    train_time: float = 0.0  # its share of the group's step times
    eval_time: float = 0.0
    error: str | None = None
    eval: dict | None = None


def _generator(device) -> torch.Generator:
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.default_generators[device.index if device.index is not None else torch.cuda.current_device()]
    return torch.default_generator


def _adapted(peft_model, name: str):
    """The PEFT LoRA layer that wraps base module ``name``."""
    return peft_model.get_base_model().get_submodule(name)


def _extract(model, placement: Placement, seed: int, spec: TrainSpec, device) -> _Member:
    """The trial's initial adapters exactly as the sequential engine makes them (same seed, same PEFT call)."""
    torch.manual_seed(seed)
    peft_model = apply(model, placement, dropout=spec.dropout)
    try:
        order = [n for n, _ in model.named_modules() if n in placement.modules]  # model order, as model.parameters()
        adapters, params = {}, []
        for name in order:
            layer = _adapted(peft_model, name)
            a = layer.lora_A["default"].weight.detach().clone().requires_grad_(True)
            b = layer.lora_B["default"].weight.detach().clone().requires_grad_(True)
            adapters[name] = (a, b, float(layer.scaling["default"]))
            params += [a, b]
        rng = _generator(device).get_state() if spec.dropout > 0 else None
    finally:
        peft_model.unload()
    return _Member(placement, seed, adapters, params, rng)


def _restore(model, member: _Member, spec: TrainSpec):
    """A PEFT wrapping of the base holding the member's trained tensors (caller unloads it)."""
    peft_model = apply(model, member.placement, dropout=spec.dropout)
    with torch.no_grad():
        for name, (a, b, _) in member.adapters.items():
            layer = _adapted(peft_model, name)
            layer.lora_A["default"].weight.copy_(a)
            layer.lora_B["default"].weight.copy_(b)
    return peft_model


# -- the fused forward --------------------------------------------------------------------------
@dataclass
class _Slot:
    member: _Member
    rows: int  # the trial's real rows in this batch
    width: int  # the trial's real sequence length in this batch


class _Hooks:
    """Forward hooks on every base module some member adapts; ``slots`` is the current row layout."""

    def __init__(self, model, members: list[_Member], dropout: float, device):
        self.slots: list[_Slot] = []
        self.dropout, self.gen = dropout, _generator(device)
        names = {n for m in members for n in m.adapters}
        self.handles = [model.get_submodule(n).register_forward_hook(self._hook(n)) for n in sorted(names)]

    def remove(self):
        for h in self.handles:
            h.remove()

    def _drop(self, x, member: _Member):
        """PEFT's LoRA dropout with the member's own RNG stream (its masks as in its sequential run)."""
        outer = self.gen.get_state()
        self.gen.set_state(member.rng)
        try:
            x = F.dropout(x, self.dropout, training=True)
            member.rng = self.gen.get_state()
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
                ad = slot.member.adapters.get(name)
                if ad is not None:
                    a, b, scale = ad
                    trim = x.dim() == 3 and (slot.rows < stride or slot.width < x.shape[1])
                    xi = x[i * stride:i * stride + slot.rows, :slot.width] if trim else x[i * stride:(i + 1) * stride]
                    xi = xi.to(a.dtype)
                    if self.dropout > 0 and mod.training:
                        xi = self._drop(xi, slot.member)
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
        labels.append(F.pad(p["labels"], (0, width - w, 0, rows - r), value=M.IGNORE_INDEX))
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


# -- training and evaluation of a group -----------------------------------------------------------
def train_group(model, members: list[_Member], train_set: TokenizedSet, spec: TrainSpec, pad_id: int, device="cpu",
                desc: str = "fused", prefix_cache_bytes: int | None = None) -> dict:
    """Train every member together; a member whose loss goes non-finite gets ``error`` and leaves.
    Returns group stats (fused padding share, wall time, blocks served from the prefix cache).
    ``prefix_cache_bytes``: cap on the prefix cache (None: a share of free memory; 0: no cache)."""
    steps = total_steps(spec, len(train_set.input_ids))
    k = lowest_block([m.placement for m in members])
    cache = prefix_cache(model, members[0].placement.anatomy, k, train_set, spec, steps, device, prefix_cache_bytes)
    for m in members:
        m.opt = torch.optim.AdamW(m.params, lr=spec.lr, weight_decay=spec.weight_decay)
        m.sched = torch.optim.lr_scheduler.LambdaLR(m.opt, lambda s: lr_factor(s, steps, spec))
        m.batches = _train_batches(train_set, spec, m.seed, pad_id, steps, index=cache is not None)
    # The base is frozen, so autograd records nothing until the first LoRA delta: the blocks below
    # the group's lowest adapted block are outside the backward graph.
    frozen = [(p, p.requires_grad) for p in model.parameters()]
    for p, _ in frozen:
        p.requires_grad_(False)
    hooks = _Hooks(model, members, spec.dropout, device)
    was_training = model.training
    model.train()
    active, slots, real = list(members), 0, 0
    bar = tqdm(total=steps, desc=desc, unit="step", leave=False, dynamic_ncols=True, disable=None)
    t_group = time.perf_counter()
    try:
        for step in range(1, steps + 1):
            t0 = time.perf_counter()
            parts = [next(m.batches) for m in active]
            batch, shape, tokens = _stack(parts, pad_id)
            slots += batch["input_ids"].numel()
            real += tokens
            hooks.slots = [_Slot(m, r, w) for m, (r, w) in zip(active, shape)]
            batch = {k: v.to(device) for k, v in batch.items()}
            with PrefixCache.around(cache, parts, batch["input_ids"].shape):
                results = _fused_nll(model, batch, len(active))
            total, alive = None, []
            for m, part, (nll, n) in zip(active, parts, results):
                loss = nll / max(n, 1)
                if not torch.isfinite(loss):
                    m.error = f"non-finite train loss ({loss.item()}) at step {step}"
                    continue
                alive.append(m)
                total = loss if total is None else total + loss
                m.curve.append((step, loss.item()))
                m.tail.append((nll.item(), n))
                m.tokens += int(part["attention_mask"].sum())
                m.slots += part["attention_mask"].numel()
            if total is not None:
                total.backward()
            for m in alive:
                if spec.max_grad_norm > 0:
                    torch.nn.utils.clip_grad_norm_(m.params, spec.max_grad_norm)
                m.opt.step()
                m.sched.step()
                m.opt.zero_grad(set_to_none=True)
            dt = time.perf_counter() - t0
            for m in active:
                m.train_time += dt / len(active)
            active = alive
            bar.update(1)
            if not active:
                break
    finally:
        bar.close()
        hooks.remove()
        model.train(was_training)
        for p, flag in frozen:
            p.requires_grad_(flag)
    for m in members:
        m.opt = m.sched = m.batches = None  # AdamW state goes with the group
    return {"fused_padding_frac": 1.0 - real / max(slots, 1), "group_train_time_s": time.perf_counter() - t_group,
            "prefix_cached_blocks": PrefixCache.blocks_reused(cache)}


@torch.inference_mode()
def evaluate_group(model, members: list[_Member], eval_set: TokenizedSet, batch_size: int, pad_id: int, device="cpu"):
    """Each member's token-weighted eval loss (as ``trial.evaluate``), every eval batch run once for all."""
    if not members:
        return
    hooks = _Hooks(model, members, 0.0, device)
    was_training = model.training
    model.eval()
    sums, count = [0.0] * len(members), 0
    t0 = time.perf_counter()
    try:
        for part in batches(eval_set, batch_size, seed=None, pad_id=pad_id):
            r, w = part["input_ids"].shape
            hooks.slots = [_Slot(m, r, w) for m in members]
            batch = {k: v.repeat(len(members), 1).to(device) for k, v in part.items() if k != "attention_mask"}
            for i, (nll, n) in enumerate(_fused_nll(model, batch, len(members))):
                sums[i] += float(nll)
            count += n
    finally:
        hooks.remove()
        model.train(was_training)
    if count == 0:
        raise TrialError("the eval set has no target tokens")
    dt = time.perf_counter() - t0
    for m, s in zip(members, sums):
        loss = s / count
        m.eval = {"eval_loss": loss, "perplexity": M.perplexity(loss), "eval_tokens": count}
        m.eval_time += dt / len(members)


def run_fused_trials(
    base_model, placements: list[Placement], seeds: list[int], train_set: TokenizedSet, eval_set: TokenizedSet,
    train_spec: TrainSpec, eval_spec: EvalSpec, pad_id: int, device="cpu", adapter_dirs: list | None = None,
    accuracy_fn=None, desc: str = "fused", prefix_cache_bytes: int | None = None,
) -> list[TrialResult | TrialError]:
    """``trial.run_trial`` for several trials at once: a TrialResult per trial, or the TrialError it failed with.

    ``train_time_s`` / ``eval_time_s`` of a fused trial are its equal share of each group step
    (so a study's trials still sum to its wall time; they do not tell strategies apart);
    ``group_train_time_s`` is the group's whole training wall time and ``fused_trials`` its size.
    ``peak_mem_bytes`` is the group's peak; ``prefix_cached_blocks`` the frozen blocks whose output was
    reused from the prefix cache (0: none; ``prefix_cache_bytes`` caps the cache, see ``train_group``).
    """
    adapter_dirs = adapter_dirs or [None] * len(placements)
    M.reset_peak_memory(device)
    members = [_extract(base_model, p, s, train_spec, device) for p, s in zip(placements, seeds)]
    if train_spec.gradient_checkpointing:
        _checkpointing(base_model, True)
    try:
        stats = train_group(base_model, members, train_set, train_spec, pad_id, device, desc=desc,
                            prefix_cache_bytes=prefix_cache_bytes)
        done = [m for m in members if m.error is None]
        evaluate_group(base_model, done, eval_set, eval_spec.batch_size, pad_id, device)
    finally:
        if train_spec.gradient_checkpointing:
            _checkpointing(base_model, False)
    peak = M.peak_memory_bytes(device)
    out: list[TrialResult | TrialError] = []
    for m, target in zip(members, adapter_dirs):
        if m.error is not None:
            out.append(TrialError(m.error))
            continue
        try:
            out.append(_finish(base_model, m, train_spec, stats, len(members), peak, target, accuracy_fn))
        except TrialError as e:
            out.append(e)
    return out


def _finish(base_model, m: _Member, spec: TrainSpec, group: dict, size: int, peak: int, target,
            accuracy_fn) -> TrialResult:
    """Accuracy (generation), the non-finite eval check and the saved adapter of one member, as run_trial."""
    ev = dict(m.eval)
    if not math.isfinite(ev["eval_loss"]):  # a failed trial: no accuracy to generate, no adapter to save
        raise TrialError(f"non-finite eval loss ({ev['eval_loss']})")
    saved = None
    if accuracy_fn is not None or target is not None:
        peft_model = _restore(base_model, m, spec)
        try:
            if accuracy_fn is not None:
                t0 = time.perf_counter()
                ev.update(accuracy_fn(peft_model))  # accuracy, accuracy_n
                m.eval_time += time.perf_counter() - t0
            saved = _save_adapter(peft_model, Path(target)) if target is not None else None
        finally:
            peft_model.unload()
    stats = train_stats(m.curve, m.tail, m.tokens, m.slots)
    return trial_result(m.placement, ev, stats, m.curve, m.train_time, m.eval_time, peak, saved, spec.dropout,
                        fused_trials=size, fused_padding_frac=group["fused_padding_frac"],
                        group_train_time_s=group["group_train_time_s"],
                        prefix_cached_blocks=group["prefix_cached_blocks"])


# -- a group of study tasks ---------------------------------------------------------------------
def run_group(ws, tasks: list) -> list[tuple]:
    """Outcomes ``(task, result, error)`` of a group of TrialTasks, fused on ``ws``'s model.

    Out of CUDA memory: the group is split in halves and each half run again (a single trial
    runs on the sequential engine), so no trial is lost.
    """
    from .executor import RECORDED, failure, run_one
    from .workspace import BaseWeightsChanged, free_memory, weights_fingerprint

    if len(tasks) == 1:
        return [run_one(ws, tasks[0])]
    cfg, before = ws.cfg, weights_fingerprint(ws.model)
    try:
        placements = [ws.placement(t) for t in tasks]
    except RECORDED:  # a placement that cannot be built fails on its own, as in the sequential engine
        return [o for t in tasks for o in run_group(ws, [t])]
    accuracy_fn = ws.accuracy_fn()
    try:
        results = run_fused_trials(
            ws.model, placements, [t.seed for t in tasks], ws.train_set, ws.eval_set, cfg.train, cfg.eval,
            pad_id=ws.tokenizer.pad_token_id, device=ws.device,
            adapter_dirs=[Path(t.adapter_dir) if t.adapter_dir else None for t in tasks],
            accuracy_fn=accuracy_fn,
            desc=f"{tasks[0].desc.split(']')[0]}] fused x{len(tasks)}" if tasks[0].desc else f"fused x{len(tasks)}",
        )
    except torch.cuda.OutOfMemoryError:
        half = len(tasks) // 2
        log.warning("fused group of %d ran out of CUDA memory; running it as groups of %d and %d",
                    len(tasks), half, len(tasks) - half)
        free_memory(ws.device)
        return run_group(ws, tasks[:half]) + run_group(ws, tasks[half:])
    finally:
        free_memory(ws.device)
        if weights_fingerprint(ws.model) != before:
            raise BaseWeightsChanged(f"base weights changed during a fused group ({tasks[0].trial_id}...): refusing to continue")
    return [(t, r, None) if isinstance(r, TrialResult) else (t, None, failure(r)) for t, r in zip(tasks, results)]

