"""One trial: apply a placement to the base model, train, evaluate, save the adapter, restore the base.

Usage::

    zero = evaluate(model, eval_set, batch_size=16, pad_id=tok.pad_token_id)   # base model, once per study
    result = run_trial(model, placement, train_set, eval_set, train_spec, eval_spec, seed=0,
                       pad_id=tok.pad_token_id, adapter_dir=Path("adapters/x"))
    result.metrics["eval_loss"], result.curve

The loop is a plain PyTorch loop over the PEFT model. Two things keep it lean:
- right-padded causal batches need no attention mask: a real token never attends to the padding
  after it, so the fast causal kernel runs and the losses are unchanged;
- the output head runs only on positions whose next token is a target (prompt and padding
  positions never reach the 49k-wide vocabulary projection).
"""

from __future__ import annotations

import contextlib
import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from . import metrics as M
from .config import EvalSpec, TrainSpec
from .core import LoraplaceError
from .data import TokenizedSet, batches
from .placement import Placement, PlacementRecord, apply
from .prefix import PrefixCache, lowest_block, prefix_cache
from .store import atomic_dir


class TrialError(LoraplaceError, RuntimeError):
    """A trial failed in a way worth recording (e.g. a non-finite loss); the message is one line."""


@dataclass
class TrialResult:
    metrics: dict
    curve: list[tuple[int, float]]  # (step, token-weighted train loss of that step's batch)
    placement: PlacementRecord  # what was trained, as stored and exported
    adapter_dir: Path | None = None
    notes: list[str] = field(default_factory=list)


# -- loss on target positions only -----------------------------------------------------------
@contextlib.contextmanager
def _head_on(model: torch.nn.Module, select: torch.Tensor):
    """While active, the output head sees only hidden[select] (N, H) and returns (N, vocab)."""
    head = model.get_output_embeddings()
    handle = head.register_forward_pre_hook(lambda mod, args: (args[0][select],) + tuple(args[1:]))
    try:
        yield
    finally:
        handle.remove()


def target_positions(labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(select (B, T) bool: positions whose next token is a target, targets (N,): those tokens, row-major)."""
    nxt = labels[:, 1:]
    select = torch.zeros_like(labels, dtype=torch.bool)
    select[:, :-1] = nxt != M.IGNORE_INDEX  # position t predicts token t+1
    return select, nxt[nxt != M.IGNORE_INDEX]


def head_logits(model: torch.nn.Module, input_ids: torch.Tensor, select: torch.Tensor) -> torch.Tensor:
    """Logits (N, vocab) of the selected positions only, in row-major order: the head never sees the others."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    with _head_on(base, select):
        return model(input_ids=input_ids, use_cache=False).logits


def target_nll(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, int]:
    """Summed next-token NLL over target tokens (labels != IGNORE_INDEX) and their count."""
    select, targets = target_positions(batch["labels"])
    n = int(targets.numel())
    if n == 0:
        return batch["labels"].new_zeros((), dtype=torch.float32), 0
    logits = head_logits(model, batch["input_ids"], select)  # (N, vocab)
    return F.cross_entropy(logits.float(), targets, reduction="sum"), n


@torch.inference_mode()
def evaluate(model, eval_set: TokenizedSet, batch_size: int, pad_id: int, device="cpu") -> dict:
    """Token-weighted eval loss over every target token of the eval set, and perplexity."""
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    for batch in batches(eval_set, batch_size, seed=None, pad_id=pad_id):
        nll, n = target_nll(model, {k: v.to(device) for k, v in batch.items()})
        total += float(nll)
        count += n
    model.train(was_training)
    if count == 0:
        raise TrialError("the eval set has no target tokens")
    loss = total / count
    return {"eval_loss": loss, "perplexity": M.perplexity(loss), "eval_tokens": count}


# -- training ----------------------------------------------------------------------------------
def total_steps(spec: TrainSpec, n_train: int) -> int:
    if spec.epochs is not None:
        return max(1, math.ceil(spec.epochs * n_train / spec.batch_size))
    return spec.steps


def lr_factor(step: int, total: int, spec: TrainSpec) -> float:
    """Multiplier of the peak lr at a 0-based step: linear warm-up then constant/linear/cosine decay."""
    warm = int(spec.warmup * total) if spec.warmup < 1 else int(spec.warmup)
    if step < warm:
        return (step + 1) / warm
    if spec.schedule == "constant":
        return 1.0
    progress = (step - warm) / max(1, total - warm)
    return 1.0 - progress if spec.schedule == "linear" else 0.5 * (1.0 + math.cos(math.pi * progress))


def _train_batches(train_set: TokenizedSet, spec: TrainSpec, seed: int, pad_id: int, steps: int, index: bool = False):
    """As many batches as steps, epoch after epoch, each epoch in a seed-dependent order (``index``: see batches)."""
    epoch = 0
    while True:
        for batch in batches(train_set, spec.batch_size, seed=seed * 100_003 + epoch, pad_id=pad_id, index=index):
            yield batch
            steps -= 1
            if steps == 0:
                return
        epoch += 1


def train(model, train_set: TokenizedSet, spec: TrainSpec, seed: int, pad_id: int, device="cpu", desc: str = "train",
          prefix: PrefixCache | None = None):
    """Train the trainable parameters of ``model``; returns (curve, stats). ``prefix``: a cache of the frozen
    blocks below the lowest adapter (``prefix.prefix_cache``), used from the second pass over the data on."""
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=spec.lr, weight_decay=spec.weight_decay)
    steps = total_steps(spec, len(train_set.input_ids))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_factor(s, steps, spec))
    model.train()
    curve, tokens, slots, tail = [], 0, 0, []
    bar = tqdm(total=steps, desc=desc, unit="step", leave=False, dynamic_ncols=True, disable=None)
    for step, batch in enumerate(_train_batches(train_set, spec, seed, pad_id, steps, index=prefix is not None), start=1):
        batch = {k: v.to(device) for k, v in batch.items()}
        with PrefixCache.around(prefix, [batch], batch["input_ids"].shape):
            nll, n = target_nll(model, batch)
        loss = nll / max(n, 1)  # token-weighted mean over this batch's targets
        if not torch.isfinite(loss):
            bar.close()
            raise TrialError(f"non-finite train loss ({loss.item()}) at step {step}")
        loss.backward()
        if spec.max_grad_norm > 0:
            torch.nn.utils.clip_grad_norm_(params, spec.max_grad_norm)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        curve.append((step, loss.item()))
        tail.append((nll.item(), n))
        tokens += int(batch["attention_mask"].sum())
        slots += batch["attention_mask"].numel()
        bar.set_postfix(loss=f"{curve[-1][1]:.3f}")
        bar.update(1)
    bar.close()
    return curve, {**train_stats(curve, tail, tokens, slots), "prefix_cached_blocks": PrefixCache.blocks_reused(prefix)}


def train_stats(curve: list, tail: list[tuple[float, int]], tokens: int, slots: int) -> dict:
    """A training run's metrics: tail holds (summed NLL, target count) per step; tokens / slots: real and
    padded token slots fed to the model."""
    last = tail[-max(1, len(tail) // 10):]
    return {
        "steps": len(curve),
        "train_tokens": tokens,
        "padding_frac": 1.0 - tokens / max(slots, 1),
        "train_loss_final": sum(s for s, _ in last) / max(1, sum(n for _, n in last)),
    }


# -- the trial ---------------------------------------------------------------------------------
def run_trial(
    base_model,
    placement: Placement,
    train_set: TokenizedSet,
    eval_set: TokenizedSet,
    train_spec: TrainSpec,
    eval_spec: EvalSpec,
    seed: int,
    pad_id: int,
    device="cpu",
    adapter_dir: Path | None = None,
    accuracy_fn=None,
    desc: str = "train",
    prefix_cache_bytes: int | None = None,
) -> TrialResult:
    """Wrap, train, evaluate, save; the base model is unwrapped again whatever happens.
    ``prefix_cache_bytes``: cap on the frozen-prefix cache (None: a share of free memory; 0: none)."""
    torch.manual_seed(seed)  # adapter init (lora_A) and dropout
    M.reset_peak_memory(device)
    steps = total_steps(train_spec, len(train_set.input_ids))
    prefix = prefix_cache(base_model, placement.anatomy, lowest_block([placement]), train_set, train_spec, steps, device,
                          prefix_cache_bytes)  # before wrapping: LoRA dropout is not the base's own randomness
    peft_model = apply(base_model, placement, dropout=train_spec.dropout)
    if train_spec.gradient_checkpointing:  # non-reentrant: the frozen embeddings need no grad hook
        _checkpointing(base_model, True)
    try:
        t0 = time.perf_counter()
        curve, stats = train(peft_model, train_set, train_spec, seed, pad_id, device, desc=desc, prefix=prefix)
        train_time = time.perf_counter() - t0
        t0 = time.perf_counter()
        ev = evaluate(peft_model, eval_set, eval_spec.batch_size, pad_id, device)
        if accuracy_fn is not None:
            ev.update(accuracy_fn(peft_model))  # accuracy, accuracy_n
        eval_time = time.perf_counter() - t0
        if not math.isfinite(ev["eval_loss"]):
            raise TrialError(f"non-finite eval loss ({ev['eval_loss']})")
        peak = M.peak_memory_bytes(device)
        saved = _save_adapter(peft_model, adapter_dir) if adapter_dir is not None else None
    finally:
        peft_model.unload()  # removes the LoRA layers without merging: the base stays pristine
        if train_spec.gradient_checkpointing:
            _checkpointing(base_model, False)
    return trial_result(placement, ev, stats, curve, train_time, eval_time, peak, saved, train_spec.dropout)


def trial_result(p: Placement, ev: dict, stats: dict, curve: list, train_time: float, eval_time: float, peak: int,
                 saved: Path | None, dropout: float, **extra) -> TrialResult:
    """A trial's TrialResult from its measurements, as every engine (sequential or fused) records it.

    ev: evaluate()'s figures (and accuracy); stats: train()'s (steps, train_tokens, padding_frac, ...);
    times in s; peak in bytes; saved: the adapter directory, or None; extra: engine-specific metrics."""
    metrics = {
        **ev,
        **stats,
        "trainable_params": p.trainable_params,
        "base_params": p.anatomy.base_params,
        "trainable_pct": p.trainable_pct,
        "n_modules": len(p.modules),
        "adapter_bytes": M.adapter_bytes(saved) if saved else p.adapter_bytes(),
        "train_time_s": train_time,
        "eval_time_s": eval_time,
        "tokens_per_s": stats["train_tokens"] / train_time if train_time > 0 else 0.0,
        "peak_mem_bytes": peak,
        "train_flops": M.train_flops(p.anatomy.base_params, p.trainable_params, stats["train_tokens"]),
        **extra,
    }
    return TrialResult(metrics=metrics, curve=curve, placement=p.record(dropout=dropout), adapter_dir=saved)


def _checkpointing(model, on: bool) -> None:
    """Activation checkpointing on/off; transformers 5.x renamed the gradient_checkpointing_* methods."""
    if hasattr(model, "activation_checkpointing_enable"):
        if on:
            model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
            # transformers also makes the embeddings' output require grad (for reentrant checkpointing): that
            # puts the frozen blocks below the lowest adapter into the backward, recomputed for nothing.
            # Non-reentrant checkpointing reaches the LoRA weights without it.
            if hasattr(model, "disable_input_require_grads"):
                model.disable_input_require_grads()
        else:
            model.activation_checkpointing_disable()
    elif on:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    else:
        model.gradient_checkpointing_disable()


def _save_adapter(peft_model, target: Path) -> Path:
    """Save in PEFT format, all or nothing (see ``store.atomic_dir``)."""
    with atomic_dir(target) as tmp:
        peft_model.save_pretrained(tmp)
    return Path(target)
