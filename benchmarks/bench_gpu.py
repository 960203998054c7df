"""Benchmark (GPU): a 12-trial placement study fused vs sequential vs the HF Trainer + PEFT script.

Usage::

    PYTHONPATH=$PWD/src python benchmarks/bench_gpu.py --json $OUT/bench_gpu.json    # on the device machine
    PYTHONPATH=$PWD/src python benchmarks/bench_gpu.py --smoke                        # CPU, tiny, seconds: the script works

Models are random-init (real weights cannot travel to the device machine): the SmolLM2-135M
architecture and a ~1.2B Llama-3.2-1B-shaped config, bf16 weights (LoRA tensors fp32, as PEFT
keeps them). Data: synthetic rows shaped like GSM8K under the reference settings (prompt 40-150
tokens, answer 20-100 tokens, so lengths ~60-250), batch 8, ``--steps`` steps, r16 / alpha 32,
lr 2e-4 constant, no dropout. The study: 4 strategies (all_linear, attention_only, mlp_only,
top_half) x 3 seeds = 12 trials.

Per model and engine, the whole-study wall time (training and evaluation of every trial) and the
achieved FLOP/s: model FLOPs of the real (unpadded) tokens, ``4 * block_params + 6 * lora_params``
per token (frozen weights: forward and activation gradients; LoRA: also weight gradients) plus
``4 * vocab * hidden`` per target token for the output head, attention scores excluded (a lower
bound), divided by the training wall time, against the H200's dense bf16 peak (~790 TFLOP/s, an
assumption: pass ``--peak``). The same useful-FLOP count is used for every engine, so the Trainer's
extra work (padding, full-width logits) shows as lower utilisation.

The Trainer script runs ``--hf-trials`` of the 12 trials (default 4: one per strategy, seed 0;
trials of other seeds cost the same) and its study time is extrapolated to 12, labelled so in the
output. A time guard (``--budget`` s) skips what would not finish; the JSON is rewritten after
every measurement, so a timed-out run still leaves its numbers.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_trial import study_trials  # noqa: E402

from loraplace.core.config import EvalSpec, TrainSpec  # noqa: E402
from loraplace.core.metrics import IGNORE_INDEX  # noqa: E402
from loraplace.data.tokenize import TokenizedSet  # noqa: E402
from loraplace.model.anatomy import analyze  # noqa: E402
from loraplace.placement.resolve import resolve  # noqa: E402
from loraplace.placement.strategy import get_strategy  # noqa: E402
from loraplace.train.loss import evaluate  # noqa: E402

STRATEGIES = ["all_linear", "attention_only", "mlp_only", "top_half"]
SEEDS = [0, 1, 2]
CONFIGS = {  # LlamaConfig kwargs
    "smollm2-135m-arch": dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
                              num_key_value_heads=3, vocab_size=49152, max_position_embeddings=2048,
                              tie_word_embeddings=True, rope_theta=100000.0),
    "llama-1b-arch": dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
                          num_key_value_heads=8, vocab_size=128256, max_position_embeddings=2048,
                          tie_word_embeddings=True, rope_theta=500000.0),
    # --smoke: tiny, so the whole script runs on a CPU in seconds
    "tiny-arch": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=256, max_position_embeddings=512, tie_word_embeddings=True),
}
PAD = 0


def build(name: str, dtype, device):
    import transformers as T

    cfg = T.LlamaConfig(**CONFIGS[name], bos_token_id=1, eos_token_id=2, pad_token_id=PAD)
    torch.manual_seed(0)
    with torch.device(device):
        model = T.AutoModelForCausalLM.from_config(cfg, dtype=dtype)
    return model


def synthetic(n: int, vocab: int, seed: int, scale: float = 1.0) -> TokenizedSet:
    """Rows shaped like GSM8K: a prompt of 40-150 tokens, an answer of 20-100 (``scale`` shrinks both)."""
    rng = random.Random(seed)
    ids, labels = [], []
    for _ in range(n):
        p, c = max(2, int(rng.randint(40, 150) * scale)), max(1, int(rng.randint(20, 100) * scale))
        row = [1] + [rng.randrange(3, vocab) for _ in range(p + c - 1)]
        ids.append(row)
        labels.append([IGNORE_INDEX] * p + row[p:])
    return TokenizedSet(ids, labels)


def useful_flops(model, placement, train_set: TokenizedSet, steps: int, batch: int) -> float:
    """Model FLOPs of one trial's real tokens (see the module docstring); every row is seen once an epoch."""
    emb = model.get_input_embeddings().weight
    block_params = sum(p.numel() for n, p in model.named_parameters() if ".layers." in n)
    rows = min(steps * batch, len(train_set))
    tokens = sum(len(train_set.input_ids[i]) for i in range(rows)) * steps * batch / rows
    targets = sum(sum(t != IGNORE_INDEX for t in train_set.labels[i]) for i in range(rows)) * steps * batch / rows
    return 4 * block_params * tokens + 6 * placement.trainable_params * tokens + 4 * emb.numel() * targets


def sync(device):
    if str(device).startswith("cuda"):
        torch.cuda.synchronize()


def hf_trial(model, placement, train_set, spec: TrainSpec, seed: int, device):
    from bench_trial import trainer_run

    sync(device)
    t0 = time.perf_counter()
    train_s, peft_model = trainer_run(model, placement, train_set, spec, PAD, seed)
    ev = evaluate(peft_model, EVAL_SET, 16, PAD, device)
    peft_model.unload()
    sync(device)
    return time.perf_counter() - t0, train_s, ev["eval_loss"]


def main() -> int:
    global EVAL_SET
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="+", default=["smollm2-135m-arch", "llama-1b-arch"])
    ap.add_argument("--engines", nargs="+", default=["fused", "sequential", "hf"])
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--hf-trials", type=int, default=4, help="Trainer trials actually run (extrapolated to 12)")
    ap.add_argument("--peak", type=float, default=790e12, help="dense bf16 peak FLOP/s of the GPU")
    ap.add_argument("--budget", type=float, default=480, help="seconds; later measurements are skipped past this")
    ap.add_argument("--json", help="write the results here (rewritten after every measurement)")
    ap.add_argument("--smoke", action="store_true", help="tiny model on CPU, 3 steps: check the script runs")
    args = ap.parse_args()
    device = "cuda" if torch.cuda.is_available() and not args.smoke else "cpu"
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    if args.smoke:
        args.models, args.steps, args.hf_trials = ["tiny-arch"], 3, 1
    if device == "cpu" and not args.smoke:
        print("no CUDA device: run with --smoke to check the script on a CPU")
        return 1
    start = time.perf_counter()
    out = {"device": torch.cuda.get_device_name() if device == "cuda" else "cpu", "torch": torch.__version__,
           "steps": args.steps, "batch_size": args.batch_size, "peak_flops": args.peak, "models": {}}

    def save():
        if args.json:
            Path(args.json).write_text(json.dumps(out, indent=2))

    spec = TrainSpec(lr=2e-4, steps=args.steps, batch_size=args.batch_size, warmup=0, schedule="constant", rank=16,
                     alpha=32, dropout=0.0, save_adapter=False, fuse="auto")
    ev_spec = EvalSpec(batch_size=16)
    for name in args.models:
        t_build = time.perf_counter()
        model = build(name, dtype, device)
        vocab = model.get_input_embeddings().weight.shape[0]
        scale = 0.1 if args.smoke else 1.0
        train_set = synthetic(args.steps * args.batch_size, vocab, 1, scale)
        EVAL_SET = synthetic(8 if args.smoke else 64, vocab, 2, scale)
        anat = analyze(model)
        placements = {s: resolve(get_strategy(s), anat, rank=16, alpha=32) for s in STRATEGIES}
        trials = [(s, seed) for seed in SEEDS for s in STRATEGIES]
        flops = sum(useful_flops(model, placements[s], train_set, args.steps, args.batch_size) for s, _ in trials)
        res = out["models"][name] = {"params": anat.base_params, "trials": len(trials), "study_flops": flops,
                                     "build_s": time.perf_counter() - t_build}
        tok = SimpleNamespace(pad_token_id=PAD)  # synthetic rows: the padding id is all a study reads of a tokenizer
        # warm-up (CUDA context, cuBLAS, kernels): one short trial, not timed
        study_trials(model, tok, synthetic(16, vocab, 3, scale), EVAL_SET, replace(spec, steps=2), ev_spec,
                     ["all_linear"], [0], device=device)
        print(f"{name}: {anat.base_params / 1e6:.0f}M params, {len(trials)} trials, {flops / 1e12:.1f} TFLOP "
              f"of useful work", flush=True)
        for engine in args.engines:
            if time.perf_counter() - start > args.budget:
                res[engine] = {"skipped": f"time budget of {args.budget:.0f} s spent"}
                print(f"  {engine}: skipped (time budget)", flush=True)
                save()
                continue
            if device == "cuda":
                torch.cuda.reset_peak_memory_stats()
            sync(device)
            t0 = time.perf_counter()
            if engine == "fused":  # the 12 trials as one group, as the study's executor runs a group
                by_trial = study_trials(model, tok, train_set, EVAL_SET, spec, ev_spec, STRATEGIES, SEEDS, fuse=True,
                                        device=device)
                results = [by_trial[t] for t in trials]
                sync(device)
                wall = time.perf_counter() - t0
                bad = [r for r in results if isinstance(r, str)]
                train_s = results[0].metrics["group_train_time_s"] if not bad else float("nan")
                losses = {f"{s} s{seed}": r.metrics["eval_loss"] for (s, seed), r in zip(trials, results) if not bad}
                row = {"study_s": wall, "train_s": train_s, "failed": bad, "eval_loss": losses,
                       "fused_padding_frac": results[0].metrics.get("fused_padding_frac") if not bad else None}
            elif engine == "sequential":
                losses, train_s = {}, 0.0
                by_trial = study_trials(model, tok, train_set, EVAL_SET, spec, ev_spec, STRATEGIES, SEEDS, device=device)
                for s, seed in trials:
                    r = by_trial[(s, seed)]
                    losses[f"{s} s{seed}"], train_s = r.metrics["eval_loss"], train_s + r.metrics["train_time_s"]
                sync(device)
                row = {"study_s": time.perf_counter() - t0, "train_s": train_s, "eval_loss": losses}
            else:  # the Trainer + PEFT script, trial after trial
                run = trials[: args.hf_trials]
                walls, trains, losses = [], [], {}
                for s, seed in run:
                    w, tr, loss = hf_trial(model, placements[s], train_set, spec, seed, device)
                    walls.append(w)
                    trains.append(tr)
                    losses[f"{s} s{seed}"] = loss
                k = len(trials) / len(run)
                row = {"study_s": sum(walls) * k, "train_s": sum(trains) * k, "eval_loss": losses,
                       "extrapolated_from_trials": len(run)}
            row["peak_mem_gib"] = torch.cuda.max_memory_allocated() / 2**30 if device == "cuda" else None
            row["achieved_flops"] = flops / row["train_s"] if row["train_s"] and row["train_s"] == row["train_s"] else 0.0
            row["peak_share"] = row["achieved_flops"] / args.peak
            res[engine] = row
            print(f"  {engine:10s} study {row['study_s']:7.1f} s  train {row['train_s']:7.1f} s  "
                  f"{row['achieved_flops'] / 1e12:6.1f} TFLOP/s ({row['peak_share']:.1%} of peak)"
                  + (f"  [extrapolated from {row['extrapolated_from_trials']} trials]" if engine == "hf" else ""),
                  flush=True)
            save()
        for engine in ("sequential", "hf"):
            if "study_s" in res.get(engine, {}) and "study_s" in res.get("fused", {}):
                res[f"fused_speedup_vs_{engine}"] = res[engine]["study_s"] / res["fused"]["study_s"]
                print(f"  fused vs {engine}: x{res[f'fused_speedup_vs_{engine}']:.2f} whole-study wall time", flush=True)
        save()
        del model
        if device == "cuda":
            torch.cuda.empty_cache()
    print(f"total {time.perf_counter() - start:.0f} s", flush=True)
    return 0


EVAL_SET: TokenizedSet | None = None

if __name__ == "__main__":
    sys.exit(main())
