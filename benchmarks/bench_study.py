"""Benchmark (CPU): a whole study (3 strategies, one seed) by loraplace sequential, loraplace fused
and the HF Trainer + PEFT script trial after trial, in one run.

Usage::

    python benchmarks/bench_study.py                      # the reference workload (BENCHMARKS.md); quiet machine
    python benchmarks/bench_study.py --rows 16 --eval-rows 8 --max-length 64   # a quick check that it runs
    python benchmarks/bench_study.py --rows 48 --eval-rows 16 --epochs 3 --strategies top_half --seeds 0 1 \
        --engines sequential sequential-nocache fused fused-nocache   # the frozen-prefix cache, with and without

The reference workload of ``bench_trial.py``: the embedded SmolLM2-135M, GSM8K train rows 0-127
(max length 256), batch 8, one epoch (16 steps), r16 / alpha 32 / LoRA dropout 0.05, lr 2e-4
constant, loss on answer tokens only, evaluated by the token-weighted eval loss on GSM8K test
rows 0-63. Whole-study wall time = training and evaluation of every trial, one after the other
(the fused engine: all of them as one group). The fused engine gives the sequential engine's
numbers (tests/train/test_fused.py), so its eval losses must match the sequential ones to ~1e-4;
the Trainer's differ by its batch order (about 1%, see BENCHMARKS.md).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_trial import reference_setup, study_trials, trainer_run  # noqa: E402

from loraplace.core.config import EvalSpec, TrainSpec  # noqa: E402
from loraplace.data.batches import padding_fraction  # noqa: E402
from loraplace.placement.resolve import resolve  # noqa: E402
from loraplace.placement.strategy import get_strategy  # noqa: E402
from loraplace.train.loss import evaluate  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=128, help="GSM8K train rows (from row 0)")
    ap.add_argument("--eval-rows", type=int, default=64, help="GSM8K test rows to evaluate on")
    ap.add_argument("--max-length", type=int, default=256)
    ap.add_argument("--strategies", nargs="+", default=["all_linear", "attention_only", "mlp_only"])
    ap.add_argument("--engines", nargs="+", default=["sequential", "fused", "hf"],
                    choices=["sequential", "sequential-nocache", "fused", "fused-nocache", "hf"],
                    help="*-nocache: without the frozen-prefix cache")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0], help="a trial per strategy and seed")
    ap.add_argument("--epochs", type=int, default=1, help="passes over the train rows")
    ap.add_argument("--json", help="also write the figures to this file")
    args = ap.parse_args()
    setup = reference_setup(args.rows, args.eval_rows, args.max_length)
    if setup is None:
        return 1
    model, tok, anat, train_set, eval_set = setup
    steps = args.epochs * ((len(train_set.input_ids) + 7) // 8)
    train = TrainSpec(lr=2e-4, steps=steps, batch_size=8, warmup=0, schedule="constant", rank=16, alpha=32,
                      dropout=0.05)
    ev = EvalSpec()
    pad = tok.pad_token_id
    trials = [(s, seed) for s in args.strategies for seed in args.seeds]
    names = [f"{s}/{seed}" if len(args.seeds) > 1 else s for s, seed in trials]
    placements = [resolve(get_strategy(s), anat, rank=16, alpha=32) for s, _ in trials]
    seeds = [seed for _, seed in trials]
    print(f"{len(placements)} trials, {steps} steps of batch 8 each; length-grouped padding "
          f"{padding_fraction(train_set, 8, args.seeds[0], True):.1%}; torch threads {torch.get_num_threads()}", flush=True)
    out = {"rows": args.rows, "eval_rows": args.eval_rows, "steps": steps, "strategies": args.strategies,
           "seeds": args.seeds, "threads": torch.get_num_threads()}
    for engine in args.engines:
        t0 = time.perf_counter()
        if engine.startswith(("sequential", "fused")):  # as a study runs them (study.executor)
            by_trial = study_trials(model, tok, train_set, eval_set, train, ev, args.strategies, args.seeds,
                                    fuse=engine.startswith("fused"),
                                    prefix_cache_bytes=0 if engine.endswith("-nocache") else None)
            rs = [by_trial[t] for t in trials]
            failed = [r for r in rs if isinstance(r, str)]
            if failed:
                raise SystemExit(f"{engine}: {failed[0]}")
        if engine.startswith("sequential"):
            print(f"{engine}: frozen blocks served from the prefix cache: {rs[0].metrics['prefix_cached_blocks']}")
            losses = [r.metrics["eval_loss"] for r in rs]
            train_s = sum(r.metrics["train_time_s"] for r in rs)
        elif engine.startswith("fused"):
            losses = [r.metrics["eval_loss"] for r in rs]
            train_s = rs[0].metrics["group_train_time_s"]
            print(f"{engine}: frozen blocks served from the prefix cache: {rs[0].metrics['prefix_cached_blocks']}")
        else:
            losses, train_s = [], 0.0
            for p, seed in zip(placements, seeds):
                t, peft_model = trainer_run(model, p, train_set, train, pad, seed=seed)
                losses.append(evaluate(peft_model, eval_set, ev.batch_size, pad)["eval_loss"])
                peft_model.unload()
                train_s += t
        wall = time.perf_counter() - t0
        out[engine] = {"study_s": wall, "train_s": train_s, "eval_loss": dict(zip(names, losses))}
        print(f"{engine:10s} study {wall:7.1f} s (training {train_s:7.1f} s)  eval loss "
              + "  ".join(f"{s} {v:.4f}" for s, v in zip(names, losses)), flush=True)
    for engine in ("sequential", "fused"):
        if engine in out and "hf" in out:
            out[f"{engine}_speedup_vs_hf"] = out["hf"]["study_s"] / out[engine]["study_s"]
            print(f"{engine} vs Trainer script: x{out[f'{engine}_speedup_vs_hf']:.2f} whole-study wall time")
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
