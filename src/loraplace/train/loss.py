"""The loss on target positions only: next-token NLL where labels are targets, and the token-weighted eval loss.

Usage::

    nll, n = target_nll(model, batch)                 # summed NLL over target tokens, their count
    evaluate(model, eval_set, batch_size=16, pad_id=0)   # {"eval_loss", "perplexity", "eval_tokens"}

Three things keep it lean:
- right-padded causal batches need no attention mask: a real token never attends to the padding
  after it, so the fast causal kernel runs and the losses are unchanged;
- the output head runs only on positions whose next token is a target (prompt and padding
  positions never reach the vocabulary projection);
- a batch whose head logits would pass ``HEAD_BYTES`` (target tokens x vocabulary x 4 bytes: Gemma's 262k entries
  take 1 MiB a token) runs as consecutive groups of its rows (``row_groups``): the same summed loss, gradients
  accumulated over the groups, within float rounding of other batch shapes.
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F

from loraplace.core import metrics as M
from loraplace.data.batches import batches
from loraplace.data.tokenize import TokenizedSet
from loraplace.train.trial import TrialError


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


HEAD_BYTES = 512 * 2**20  # most head logits (float32) one forward computes; SmolLM2's 49k vocabulary stays whole to 2,730 targets


def vocab_size(model: torch.nn.Module) -> int:
    """Entries of the model's output head (a PEFT wrapping's base's)."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return int(base.get_output_embeddings().weight.shape[0])


def targets_per_row(labels: torch.Tensor) -> torch.Tensor:
    """(B,) each row's target tokens: the positions ``target_positions`` selects, counted per row."""
    return (labels[:, 1:] != M.IGNORE_INDEX).sum(1)


def row_groups(batch: dict[str, torch.Tensor], vocab: int, budget: int | None = None) -> list[dict[str, torch.Tensor]]:
    """``batch`` as consecutive groups of its rows whose head logits (targets x ``vocab`` x 4 bytes) stay within
    ``budget`` (``HEAD_BYTES``; a row alone may exceed it), each cut to its longest row; ``[batch]`` itself when it
    fits whole."""
    budget = HEAD_BYTES if budget is None else budget
    per_row = targets_per_row(batch["labels"]).tolist()
    limit = max(1, budget // (4 * vocab))  # target tokens per group
    if sum(per_row) <= limit:
        return [batch]
    bounds, start, acc = [], 0, 0
    for i, n in enumerate(per_row):
        if acc and acc + n > limit:
            bounds.append((start, i))
            start, acc = i, 0
        acc += n
    bounds.append((start, len(per_row)))
    groups = []
    for a, b in bounds:
        width = int(batch["attention_mask"][a:b].sum(1).max())  # right-padded: the columns past it are padding
        groups.append({k: v[a:b, :width] if v.dim() == 2 else v[a:b] for k, v in batch.items()})
    return groups


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
    vocab = vocab_size(model)
    for batch in batches(eval_set, batch_size, seed=None, pad_id=pad_id):
        for group in row_groups(batch, vocab):  # one group unless the head's logits would pass HEAD_BYTES
            nll, n = target_nll(model, {k: v.to(device) for k, v in group.items()})
            total += float(nll)
            count += n
    model.train(was_training)
    if count == 0:
        raise TrialError("the eval set has no target tokens")
    loss = total / count
    return {"eval_loss": loss, "perplexity": M.perplexity(loss), "eval_tokens": count}
