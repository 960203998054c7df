"""The progress bar of a piece of training, the same on both engines (``train.sequential``, ``train.fused``).

Usage::

    with step_bar(10, "train") as bar:       # on a terminal only (tqdm's disable=None), gone when done
        bar.update(1)
"""

from __future__ import annotations

from tqdm.auto import tqdm


def step_bar(steps: int, desc: str) -> tqdm:
    """A bar over ``steps`` optimizer steps labelled ``desc`` (a context manager: closed on leaving)."""
    return tqdm(total=steps, desc=desc, unit="step", leave=False, dynamic_ncols=True, disable=None)
