"""The memory levers of ``train.memory`` that do not need a GPU."""

from __future__ import annotations

import gc

from loraplace.train.memory import frozen_heap


def test_the_frozen_heap_leaves_what_exists_out_of_collections_and_gives_it_back_afterwards():
    assert gc.get_freeze_count() == 0
    with frozen_heap():
        frozen = gc.get_freeze_count()
        assert frozen > 0  # this process's objects (pytest's, torch's) are out of the collections
        cycle = []
        cycle.append(cycle)  # made while frozen: collected as usual
        del cycle
        assert gc.collect() >= 1
    assert gc.get_freeze_count() == 0


def test_the_frozen_heap_leaves_a_callers_own_freeze_alone():
    gc.freeze()
    try:
        before = gc.get_freeze_count()
        with frozen_heap():
            assert gc.get_freeze_count() == before
        assert gc.get_freeze_count() == before  # not unfrozen: the caller froze them
    finally:
        gc.unfreeze()
