"""Benchmark: one loraplace trial vs the usual HF Trainer + PEFT script, same work, same numbers.

Usage::

    python benchmarks/bench_trial.py                       # GSM8K rows 0-127, 3 strategies
    python benchmarks/bench_trial.py --rows 64 --strategies all_linear

Both sides train the embedded SmolLM2-135M on the same GSM8K rows (max length 256, batch 8,
one epoch, r16, alpha 32, lr 2e-4, AdamW, no warm-up, constant lr, loss on answer tokens only)
and are evaluated by the same token-weighted eval loss on the same held-out rows. The Trainer
side is the script people usually write: random batches with dynamic padding, the attention
mask passed, logits for every position. Times are wall-clock in this process, one after the
other; compare the ratios, not absolute seconds across machines or runs.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch

from loraplace.core.config import DataSpec, EvalSpec, StudyConfig, TrainSpec
from loraplace.data.batches import padding_fraction
from loraplace.data.sources import load_examples
from loraplace.data.tokenize import tokenize
from loraplace.model.anatomy import analyze
from loraplace.model.loading import load
from loraplace.placement.peft import apply
from loraplace.placement.resolve import resolve
from loraplace.placement.strategy import get_strategy
from loraplace.study.executor import run_group, run_one
from loraplace.study.plan import plan_trials, resolve_placements, segment
from loraplace.study.workspace import Workspace
from loraplace.train.loss import evaluate

GSM8K = Path(__file__).resolve().parents[2] / "shared" / "data" / "gsm8k"


def reference_setup(rows: int, eval_rows: int = 0, max_length: int = 256):
    """(model, tokenizer, anatomy, train set, eval set) of the reference workload: the embedded model and
    GSM8K train rows 0..rows-1 and test rows 0..eval_rows-1 (None if 0); None (saying why) where GSM8K is absent."""
    if not GSM8K.is_dir():
        print(f"GSM8K not found at {GSM8K}: this benchmark needs ../shared/data/gsm8k beside the checkout")
        return None
    model, tok = load("smollm2-135m")
    spec = DataSpec(max_length=max_length)
    train_set, eval_set = (tokenize(load_examples(DataSpec(source=str(GSM8K / f"{split}.jsonl")))[:n], tok, spec)
                           if n else None for split, n in (("train", rows), ("test", eval_rows)))
    return model, tok, analyze(model), train_set, eval_set


def study_trials(model, tokenizer, train_set, eval_set, train: TrainSpec, ev: EvalSpec, strategies: list[str],
                 seeds: list[int], fuse: bool = False, device: str = "cpu", prefix_cache_bytes: int | None = None) -> dict:
    """(strategy, seed) -> its TrialResult (or the error text a study stores), each trial run as a study runs it
    (``study.executor``): one after the other, or all as one fused group (``fuse``). Built-in strategies at
    ``train.rank`` / ``train.alpha``; no adapter saved and no rung evaluation (``race.record=[]``): the work the
    Trainer script does."""
    cfg = StudyConfig.from_dict({"strategies": list(strategies), "baseline": strategies[0], "seeds": list(seeds),
                                 "race": {"record": []}, "eval": {"forgetting": False}})
    cfg.train, cfg.eval = replace(train, save_adapter=False), ev
    ws = Workspace(cfg, model, tokenizer, analyze(model), train_set, eval_set, [], device,
                   prefix_cache_bytes=prefix_cache_bytes)
    todo = [segment(t, 0, ws.setup.total_steps, cfg.race) for t in plan_trials(cfg, resolve_placements(cfg, ws.anatomy))]
    done = run_group(ws, todo) if fuse else [run_one(ws, t) for t in todo]
    return {(o.task.strategy, o.task.seed): o.result if o.result is not None else o.error for o in done}


def trainer_run(model, placement, train_set, spec: TrainSpec, pad_id: int, seed: int):
    """The usual script: Trainer + PEFT + a padding collator. Returns (train wall time in s, PEFT model)."""
    from transformers import Trainer, TrainingArguments

    class Rows(torch.utils.data.Dataset):
        def __len__(self):
            return len(train_set.input_ids)

        def __getitem__(self, i):
            return {"input_ids": train_set.input_ids[i], "labels": train_set.labels[i]}

    def collate(rows):
        width = max(len(r["input_ids"]) for r in rows)
        ids = torch.tensor([r["input_ids"] + [pad_id] * (width - len(r["input_ids"])) for r in rows])
        labels = torch.tensor([r["labels"] + [-100] * (width - len(r["labels"])) for r in rows])
        mask = torch.tensor([[1] * len(r["input_ids"]) + [0] * (width - len(r["input_ids"])) for r in rows])
        return {"input_ids": ids, "attention_mask": mask, "labels": labels}

    torch.manual_seed(seed)
    peft_model = apply(model, placement, dropout=spec.dropout)
    args = TrainingArguments(
        output_dir="/tmp/loraplace-bench-trainer", per_device_train_batch_size=spec.batch_size, num_train_epochs=1,
        learning_rate=spec.lr, lr_scheduler_type="constant", warmup_steps=0, weight_decay=0.0,
        max_grad_norm=spec.max_grad_norm, logging_steps=1000, save_strategy="no", report_to="none",
        use_cpu=not torch.cuda.is_available(), seed=seed, dataloader_num_workers=0, disable_tqdm=True,
    )
    trainer = Trainer(model=peft_model, args=args, train_dataset=Rows(), data_collator=collate)
    t0 = time.perf_counter()
    trainer.train()
    elapsed = time.perf_counter() - t0
    return elapsed, peft_model


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=128, help="GSM8K train rows to train on (from row 0)")
    ap.add_argument("--eval-rows", type=int, default=64, help="GSM8K test rows to evaluate on")
    ap.add_argument("--strategies", nargs="+", default=["all_linear", "attention_only", "mlp_only"])
    ap.add_argument("--json", help="also write the figures to this file")
    args = ap.parse_args()
    setup = reference_setup(args.rows, args.eval_rows)
    if setup is None:
        return 1
    model, tok, anat, train_set, eval_set = setup
    steps = (len(train_set.input_ids) + 7) // 8
    train = TrainSpec(lr=2e-4, steps=steps, batch_size=8, warmup=0, schedule="constant", rank=16, alpha=32, dropout=0.05)
    pad = tok.pad_token_id
    print(f"GSM8K rows 0-{args.rows - 1}: {steps} steps of batch 8; padding share random {padding_fraction(train_set, 8, 0, False):.1%}, "
          f"length-grouped {padding_fraction(train_set, 8, 0, True):.1%}", flush=True)
    results = []
    for name in args.strategies:
        p = resolve(get_strategy(name), anat, rank=16, alpha=32)
        r = study_trials(model, tok, train_set, eval_set, train, EvalSpec(), [name], [0])[(name, 0)]
        t_lp, loss_lp = r.metrics["train_time_s"], r.metrics["eval_loss"]
        t_hf, peft_model = trainer_run(model, p, train_set, train, pad, seed=0)
        loss_hf = evaluate(peft_model, eval_set, 16, pad)["eval_loss"]
        peft_model.unload()
        row = {"strategy": name, "loraplace_s": t_lp, "trainer_s": t_hf, "speedup": t_hf / t_lp,
               "loraplace_eval_loss": loss_lp, "trainer_eval_loss": loss_hf}
        results.append(row)
        print(f"{name:15s} loraplace {t_lp:6.1f} s  trainer {t_hf:6.1f} s  speed-up x{t_hf / t_lp:.2f}  "
              f"eval loss {loss_lp:.4f} vs {loss_hf:.4f}", flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
