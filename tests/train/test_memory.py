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


def test_the_frozen_heap_leaves_a_callers_own_freeze_alone(monkeypatch):
    gc.freeze()  # the caller's own (its count drifts as frozen objects die, so the calls are what is checked)
    try:
        calls = []
        monkeypatch.setattr(gc, "freeze", lambda: calls.append("freeze"))
        monkeypatch.setattr(gc, "unfreeze", lambda: calls.append("unfreeze"))
        with frozen_heap():
            pass
        assert calls == []  # neither frozen again nor unfrozen at the end
    finally:
        monkeypatch.undo()
        gc.unfreeze()
