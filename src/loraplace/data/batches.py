"""Right-padded batches of a tokenized set, for training (seeded, length-grouped) and evaluation.

Usage::

    for batch in batches(ts, 8, seed=0, pad_id=pad):   # {"input_ids", "attention_mask", "labels"} (B, T)
        ...
    for batch in train_batches(ts, 8, seed=0, pad_id=pad, steps=5, start=17): ...   # a trial's steps 17-21 (0-based)

A trial's training data is epoch after epoch of ``batches`` seeded by ``seed * 100_003 + epoch``; every
epoch has the same number of batches, so a step number alone says where in the data a trial is.
"""

from __future__ import annotations

import random
from typing import Iterator, Sequence

import torch

from loraplace.core.metrics import IGNORE_INDEX
from loraplace.data.examples import DataError
from loraplace.data.tokenize import TokenizedSet


def batch_indices(lengths: Sequence[int], batch_size: int, seed: int | None, group_by_length: bool = True,
                  drop_last: bool = False) -> list[list[int]]:
    """The example indices of each batch, in order (see ``batches``)."""
    if batch_size < 1:
        raise DataError(f"batch_size must be >= 1, got {batch_size}")
    order = list(range(len(lengths)))
    rng = None if seed is None else random.Random(seed)
    if rng is not None:
        rng.shuffle(order)
    mega = 50 * batch_size if rng is not None else max(len(order), 1)  # unseeded: sort the whole set
    groups = []
    for s in range(0, len(order), mega):
        chunk = sorted(order[s:s + mega], key=lambda i: -lengths[i]) if group_by_length else order[s:s + mega]
        groups += [chunk[j:j + batch_size] for j in range(0, len(chunk), batch_size)]
    if rng is not None and group_by_length:
        rng.shuffle(groups)  # no long-to-short curriculum
    return [g for g in groups if len(g) == batch_size] if drop_last else groups


def batches(ts: TokenizedSet, batch_size: int, seed: int | None, pad_id: int, group_by_length: bool = True,
            drop_last: bool = False, index: bool = False) -> Iterator[dict[str, torch.Tensor]]:
    """Right-padded batches ``{"input_ids", "attention_mask", "labels"}`` (labels IGNORE_INDEX on padding),
    with ``index`` also ``"index"`` (B,): each row's position in ``ts``.

    ``seed`` set: shuffle with it; with ``group_by_length``, sort each mega-chunk of 50 batches by length
    and shuffle the batch order (about 2% padding on GSM8K instead of about 30%). ``seed=None`` (eval):
    no randomness; dataset order, or longest first with ``group_by_length``. Same seed, same batches.
    """
    for group in batch_indices(ts.lengths, batch_size, seed, group_by_length, drop_last):
        yield collate(ts, group, pad_id, index)


def collate(ts: TokenizedSet, group: Sequence[int], pad_id: int, index: bool = False) -> dict[str, torch.Tensor]:
    """One right-padded batch of the examples ``group`` (indices into ``ts``); ``index`` adds their indices."""
    if pad_id is None:
        raise DataError("batches: pad_id is None; pass tokenizer.pad_token_id or eos_token_id")
    width = max(len(ts.input_ids[i]) for i in group)
    ids = torch.full((len(group), width), pad_id, dtype=torch.long)
    labels = torch.full((len(group), width), IGNORE_INDEX, dtype=torch.long)
    mask = torch.zeros((len(group), width), dtype=torch.long)
    for row, i in enumerate(group):
        n = len(ts.input_ids[i])
        ids[row, :n] = torch.tensor(ts.input_ids[i])
        labels[row, :n] = torch.tensor(ts.labels[i])
        mask[row, :n] = 1
    batch = {"input_ids": ids, "attention_mask": mask, "labels": labels}
    if index:
        batch["index"] = torch.tensor(list(group), dtype=torch.long)
    return batch


def epoch_order(lengths: Sequence[int], batch_size: int, seed: int, epoch: int) -> list[list[int]]:
    """The batches (example indices) of a trial's ``epoch``-th pass over its train set (0-based), shuffled
    with seed ``seed * 100_003 + epoch``."""
    return batch_indices(lengths, batch_size, seed * 100_003 + epoch)


def batches_per_epoch(lengths: Sequence[int], batch_size: int) -> int:
    """Batches in one pass over a set: the same for every epoch and seed (only the last batch may be short)."""
    return len(batch_indices(lengths, batch_size, None))


def train_batches(ts: TokenizedSet, batch_size: int, seed: int, pad_id: int, steps: int, start: int = 0,
                  index: bool = False) -> Iterator[dict[str, torch.Tensor]]:
    """A trial's batches for steps ``start`` .. ``start + steps - 1`` (0-based), epoch after epoch
    (``epoch_order``); ``index``: see ``batches``."""
    per_epoch = batches_per_epoch(ts.lengths, batch_size)
    epoch, order = None, []
    for step in range(start, start + steps):
        e, j = divmod(step, per_epoch)
        if e != epoch:
            epoch, order = e, epoch_order(ts.lengths, batch_size, seed, e)
        yield collate(ts, order[j], pad_id, index)


def padding_fraction(ts: TokenizedSet | Sequence[int], batch_size: int, seed: int | None = 0,
                     group_by_length: bool = True, drop_last: bool = False) -> float:
    """Share of padding among the token slots of ``batches`` with these settings (a set or its lengths)."""
    lengths = ts.lengths if isinstance(ts, TokenizedSet) else list(ts)
    slots = real = 0
    for g in batch_indices(lengths, batch_size, seed, group_by_length, drop_last):
        slots += len(g) * max(lengths[i] for i in g)
        real += sum(lengths[i] for i in g)
    return 1 - real / slots if slots else 0.0
