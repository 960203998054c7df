"""Profile (CPU): where a training step's time goes, loraplace vs the HF Trainer + PEFT script, by op category.

Usage::

    python benchmarks/profile_step.py                       # GSM8K rows 0-7 (one step of 8), all_linear; quiet machine
    python benchmarks/profile_step.py --trainer-first       # the other order (first-touch costs move with it)

The workload of ``bench_trial.py`` (embedded SmolLM2-135M, max length 256, r16, LoRA dropout 0.05,
batch 8), cut to ``--rows`` rows. Five steps (40 rows) under the profiler ran out of 24 GB of
memory here, so the default is one step. Each side trains once unprofiled (warm-up), then once more under
``torch.profiler``. Every aten op's self CPU time goes into one category (matmul, attention, LoRA
dropout, log-softmax + loss, optimizer, other element-wise and copies). The table gives seconds and
ms per 1,000 real (non-padding) tokens, and the matmuls' achieved GFLOP/s from the profiler's FLOP
counts. Self times add up to somewhat less than wall time: the profiler leaves out Python and
dispatch overhead between ops.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections import defaultdict
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_trial import reference_setup, trainer_run  # noqa: E402

from loraplace.core.config import EvalSpec, TrainSpec  # noqa: E402
from loraplace.placement.resolve import resolve  # noqa: E402
from loraplace.placement.strategy import get_strategy  # noqa: E402
from loraplace.train import sequential  # noqa: E402
from loraplace.train.trial import Setup, TrialError  # noqa: E402

CATEGORIES = (  # first match wins; matched against the aten op name
    ("matmul", ("aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm")),
    ("attention", ("scaled_dot_product", "flash_attention", "_efficient_attention")),
    ("LoRA dropout", ("bernoulli", "dropout")),
    ("log-softmax + loss", ("log_softmax", "nll_loss", "cross_entropy")),
    ("optimizer", ("_foreach", "addcdiv", "lerp", "_fused_adamw")),
)


CATEGORIES_REST = "other element-wise and copies"


def category(name: str) -> str:
    for cat, keys in CATEGORIES:
        if any(k in name for k in keys):
            return cat
    return CATEGORIES_REST


def profiled(fn) -> tuple[dict[str, float], float, float, list[tuple[float, str]]]:
    """(self CPU seconds per category, matmul GFLOP, wall seconds, the largest ops of the last category)."""
    with profile(activities=[ProfilerActivity.CPU], with_flops=True) as prof:
        t0 = time.perf_counter()
        fn()
        wall = time.perf_counter() - t0
    cats: dict[str, float] = defaultdict(float)
    gflop, other = 0.0, []
    for e in prof.key_averages():
        if not e.key.startswith("aten::"):
            continue
        cats[category(e.key)] += e.self_cpu_time_total / 1e6
        if category(e.key) == CATEGORIES_REST:
            other.append((e.self_cpu_time_total / 1e6, e.key))
        if category(e.key) == "matmul":
            gflop += (e.flops or 0) / 1e9
    return dict(cats), gflop, wall, sorted(other, reverse=True)[:6]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=8)
    ap.add_argument("--strategy", default="all_linear")
    ap.add_argument("--trainer-first", action="store_true", help="profile the Trainer side first")
    args = ap.parse_args()
    setup = reference_setup(args.rows)
    if setup is None:
        return 1
    model, tok, anat, ts, _ = setup
    steps = (len(ts.input_ids) + 7) // 8
    tspec = TrainSpec(lr=2e-4, steps=steps, batch_size=8, warmup=0, schedule="constant", rank=16, alpha=32,
                      dropout=0.05)
    placement = resolve(get_strategy(args.strategy), anat, rank=16, alpha=32)
    pad = tok.pad_token_id
    real = sum(ts.lengths)
    # no eval set (nothing is evaluated); no frozen-prefix cache (one pass over the rows would not use it anyway)
    lp_setup = Setup(model, ts, None, tspec, EvalSpec(), pad_id=pad, prefix_cache_bytes=0)

    def ours():  # start (seeded adapter init, AdamW), train every step, unwrap: as in a trial, without its evaluation
        trial = sequential.start(lp_setup, placement, seed=0)
        sequential.advance(lp_setup, [trial], steps)
        if trial.error is not None:
            raise TrialError(trial.error)

    def theirs():
        _, peft_model = trainer_run(model, placement, ts, tspec, pad, seed=0)
        peft_model.unload()

    rows = {}
    sides = [("loraplace", ours), ("Trainer + PEFT", theirs)]
    for name, fn in sides[::-1] if args.trainer_first else sides:
        fn()  # warm-up: allocator, kernels, first-call costs
        rows[name] = profiled(fn)
        print(f"{name}: {rows[name][2]:.1f} s wall", file=sys.stderr, flush=True)

    cats = [c for c, _ in CATEGORIES] + [CATEGORIES_REST]
    print(f"\n{args.strategy}, {len(ts.input_ids)} GSM8K rows, {steps} steps of batch 8, {real:,} real tokens, "
          f"torch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}\n")
    print("| category | " + " | ".join(f"{n} (s)" for n in rows) + " | " + " | ".join(f"{n} (ms / 1k tokens)" for n in rows) + " |")
    print("|---|" + "---:|" * (2 * len(rows)))
    for c in cats:
        print(f"| {c} | " + " | ".join(f"{r[0].get(c, 0):.1f}" for r in rows.values()) + " | "
              + " | ".join(f"{1e6 * r[0].get(c, 0) / real:.0f}" for r in rows.values()) + " |")
    print("| sum of self times | " + " | ".join(f"{sum(r[0].values()):.1f}" for r in rows.values()) + " | "
          + " | ".join(f"{1e6 * sum(r[0].values()) / real:.0f}" for r in rows.values()) + " |")
    print("| wall | " + " | ".join(f"{r[2]:.1f}" for r in rows.values()) + " | "
          + " | ".join(f"{1e6 * r[2] / real:.0f}" for r in rows.values()) + " |")
    for n, (c, gflop, _, top) in rows.items():
        print(f"\n{n}: matmuls {gflop:,.0f} GFLOP in {c.get('matmul', 0):.1f} s = "
              f"{gflop / max(c.get('matmul', 1e-9), 1e-9):.0f} GFLOP/s; largest other ops: "
              + ", ".join(f"{k} {t:.1f} s" for t, k in top))
    return 0


if __name__ == "__main__":
    sys.exit(main())
