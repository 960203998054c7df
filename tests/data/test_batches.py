"""Batching: right padding, seeded order covering every example, drop_last, row names, length grouping."""

from __future__ import annotations

import pytest
import torch

from loraplace.core.config import DataSpec
from loraplace.core.metrics import IGNORE_INDEX
from loraplace.data.batches import batches, padding_fraction
from loraplace.data.sources import load_examples
from loraplace.data.tokenize import TokenizedSet
from toys import GSM8K
from data_toys import needs_gsm8k


# -- batches --------------------------------------------------------------------------------------------
def fake_set(lengths) -> TokenizedSet:
    return TokenizedSet([[i + 1] * n for i, n in enumerate(lengths)], [[IGNORE_INDEX] + [7] * (n - 1) for n in lengths])


def test_batches_pad_right_and_mask_padding():
    ts = fake_set([3, 5, 2])
    (b,) = batches(ts, 4, seed=None, pad_id=0, group_by_length=False)
    assert b["input_ids"].tolist() == [[1, 1, 1, 0, 0], [2, 2, 2, 2, 2], [3, 3, 0, 0, 0]]
    assert b["attention_mask"].tolist() == [[1, 1, 1, 0, 0], [1] * 5, [1, 1, 0, 0, 0]]
    assert b["labels"][0].tolist() == [IGNORE_INDEX, 7, 7, IGNORE_INDEX, IGNORE_INDEX]
    assert all(t.dtype == torch.long for t in b.values())
    (b,) = batches(ts, 4, seed=None, pad_id=0)  # eval with grouping: longest first, no randomness
    assert b["input_ids"][:, 0].tolist() == [2, 1, 3]


def order(ts, seed, **kw):
    return [b["input_ids"][:, 0].tolist() for b in batches(ts, 8, seed=seed, pad_id=0, **kw)]


@pytest.mark.parametrize("group", [True, False])
def test_batches_are_deterministic_per_seed_and_cover_every_example(group):
    ts = fake_set([(i * 37) % 50 + 1 for i in range(1000)])
    a = order(ts, 0, group_by_length=group)
    assert a == order(ts, 0, group_by_length=group)
    assert a != order(ts, 1, group_by_length=group)
    assert sorted(sum(a, [])) == list(range(1, 1001))
    kept = order(ts, 0, group_by_length=group, drop_last=True)
    assert len(kept) == 125 and all(len(b) == 8 for b in kept)


def test_drop_last_drops_only_the_short_batch():
    ts = fake_set([4] * 20)
    full = order(ts, 3)
    assert sorted(map(len, full)) == [4, 8, 8]
    assert order(ts, 3, drop_last=True) == [b for b in full if len(b) == 8]


def test_batches_can_name_each_rows_example():
    ts = fake_set([(i * 37) % 50 + 1 for i in range(40)])  # example i's tokens are all i + 1
    plain = list(batches(ts, 8, seed=2, pad_id=0))
    named = list(batches(ts, 8, seed=2, pad_id=0, index=True))
    assert all("index" not in b for b in plain)
    for p, b in zip(plain, named, strict=True):
        assert all(torch.equal(p[k], b[k]) for k in p)
        assert (b["index"] + 1).tolist() == b["input_ids"][:, 0].tolist()


def test_padding_fraction_matches_the_batches():
    ts = fake_set([(i * 37) % 50 + 1 for i in range(200)])
    for group in (True, False):
        bs = list(batches(ts, 8, seed=5, pad_id=0, group_by_length=group))
        real = sum(int(b["attention_mask"].sum()) for b in bs)
        slots = sum(b["attention_mask"].numel() for b in bs)
        assert padding_fraction(ts, 8, 5, group) == pytest.approx(1 - real / slots)


@needs_gsm8k
def test_length_grouping_cuts_padding_on_gsm8k_lengths():
    ex = load_examples(DataSpec(source=str(GSM8K / "train.jsonl")))
    lengths = [len(e.prompt + e.completion) // 4 for e in ex]  # about one token per 4 characters
    grouped = padding_fraction(lengths, 8, seed=0)
    shuffled = padding_fraction(lengths, 8, seed=0, group_by_length=False)
    assert shuffled > 0.2 and grouped < 0.05 and grouped < shuffled / 5
