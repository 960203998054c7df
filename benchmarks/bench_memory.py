"""Benchmark: `plan`'s peak-memory estimate against the memory a real training run takes.

Usage::

    python benchmarks/bench_memory.py                                  # 4x128 and 8x256, all_linear + top_half
    python benchmarks/bench_memory.py --settings 4x128 --strategies all_linear --steps 3
    python benchmarks/bench_memory.py --device cuda                    # torch.cuda.max_memory_allocated
    python benchmarks/bench_memory.py --malloc-mmap-threshold 131072   # glibc: no retained free memory

Each (setting, strategy) runs in a fresh process, one after the other (a process that has already
trained keeps freed memory in its allocator, which would hide the next run's peak). The process
loads the embedded SmolLM2-135M, wraps it with the strategy's placement and trains ``--steps``
steps with the sequential engine (``loraplace.train.sequential.start`` and ``advance``, no frozen-prefix
cache) on random token rows of exactly max length (every next token a target, so the batch shape is
B x L with no padding).

- CPU: the RSS high-water mark (VmHWM, reset through /proc/self/clear_refs after the model is
  loaded, its weights read once and one no-grad forward run: safetensors weights are memory-mapped
  and enter RSS only when first read) minus the RSS at that moment: what training adds to the loaded
  process. The estimate's counterparts: ``training_bytes`` (the tensors: its peak minus the base
  weights, which the baseline holds) and, for glibc's default allocator, ``cpu_rss_bytes`` minus the
  weights (``GLIBC_RSS_FACTOR`` x ``training_bytes``).
- CUDA: ``torch.cuda.max_memory_allocated`` over the training steps, weights included, against
  the estimate's ``peak_bytes``.

glibc's malloc raises its mmap threshold after the first large free (up to 32 MiB), so later
activation-sized blocks come from the heap and stay in RSS after they are freed: with the default
allocator, RSS keeps memory that no tensor holds any more. ``--malloc-mmap-threshold N`` runs the
children with ``MALLOC_MMAP_THRESHOLD_=N`` (a fixed threshold: large blocks go back to the OS when
freed), so RSS follows the live tensors: compare with the tensor estimate then.

Memory figures are not distorted by other processes on the machine (times would be).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import subprocess
import sys
import time

import torch


def _status_kb(key: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{key} not in /proc/self/status (Linux only)")


def one(batch: int, length: int, strategy: str, steps: int, device: str, dtype: str, ckpt: bool) -> dict:
    """One measurement in this process (call in a fresh one)."""
    from loraplace.core.config import EvalSpec, TrainSpec
    from loraplace.core.metrics import IGNORE_INDEX
    from loraplace.data.tokenize import TokenizedSet
    from loraplace.model.anatomy import analyze
    from loraplace.model.estimate import estimate
    from loraplace.model.loading import load
    from loraplace.placement.resolve import resolve
    from loraplace.placement.strategy import get_strategy
    from loraplace.train import sequential
    from loraplace.train.trial import Setup, TrialError

    model, tok = load("smollm2-135m", dtype=getattr(torch, dtype), device=device)
    anat = analyze(model)
    placement = resolve(get_strategy(strategy), anat, rank=16, alpha=32)
    g = torch.Generator().manual_seed(0)
    rows = torch.randint(10, model.config.vocab_size, (batch * steps, length), generator=g).tolist()
    data = TokenizedSet(input_ids=rows, labels=[[IGNORE_INDEX] + r[1:] for r in rows])
    spec = TrainSpec(steps=steps, batch_size=batch, rank=16, dtype=dtype, gradient_checkpointing=ckpt)
    # no eval set (nothing is evaluated); no frozen-prefix cache (one pass over the rows would not use it anyway)
    setup = Setup(model, data, None, spec, EvalSpec(), pad_id=tok.pad_token_id, device=device, prefix_cache_bytes=0)
    est = estimate(placement, batch, length, dtype, ckpt, target_frac=(length - 1) / length)

    # Weights loaded from safetensors are memory-mapped and only enter RSS when first read: read them all (and
    # warm up the kernels with one no-grad forward) so that the baseline holds the loaded model.
    with torch.no_grad():
        for p in model.parameters():
            p.sum()
        model(input_ids=torch.tensor([rows[0][:8]], device=device))
    gc.collect()
    if device.startswith("cuda"):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    base_kb = _status_kb("VmRSS")
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # VmHWM := current RSS
    trial = sequential.start(setup, placement, seed=0)  # the adapters and AdamW, inside the measurement
    # advance turns activation checkpointing on for the steps when spec.gradient_checkpointing is set
    with trial.attached(setup):
        t0 = time.perf_counter()
        sequential.advance(setup, [trial], steps, desc=f"{strategy} {batch}x{length}")
        wall = time.perf_counter() - t0
    if trial.error is not None:
        raise TrialError(trial.error)
    out = {"batch": batch, "length": length, "strategy": strategy, "steps": steps, "dtype": dtype,
           "gradient_checkpointing": ckpt, "device": device, "train_s": round(wall, 1),
           "rss_baseline_bytes": base_kb * 1024, "rss_above_baseline_bytes": (_status_kb("VmHWM") - base_kb) * 1024,
           "est_training_bytes": est.training_bytes, "est_peak_bytes": est.peak_bytes,
           "est_cpu_rss_above_bytes": est.cpu_rss_bytes - est.terms["weights"], "est_terms": est.terms}
    if device.startswith("cuda"):
        out["cuda_max_allocated_bytes"] = int(torch.cuda.max_memory_allocated())
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--settings", default="4x128,8x256", help="comma-separated BATCHxLENGTH")
    ap.add_argument("--strategies", default="all_linear,top_half")
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--gradient-checkpointing", action="store_true")
    ap.add_argument("--malloc-mmap-threshold", type=int, help="glibc MALLOC_MMAP_THRESHOLD_ for the runs (bytes)")
    ap.add_argument("--one", help=argparse.SUPPRESS)  # BATCHxLENGTH:STRATEGY, run in this process
    ap.add_argument("--json", help="also write the results to this file")
    args = ap.parse_args()
    if args.one:
        setting, strategy = args.one.split(":")
        b, l = map(int, setting.split("x"))
        print(json.dumps(one(b, l, strategy, args.steps, args.device, args.dtype, args.gradient_checkpointing)))
        return

    results = []
    for setting in args.settings.split(","):
        for strategy in args.strategies.split(","):
            cmd = [sys.executable, __file__, "--one", f"{setting}:{strategy}", "--steps", str(args.steps),
                   "--device", args.device, "--dtype", args.dtype]
            if args.gradient_checkpointing:
                cmd.append("--gradient-checkpointing")
            env = dict(os.environ)
            if args.malloc_mmap_threshold:
                env["MALLOC_MMAP_THRESHOLD_"] = str(args.malloc_mmap_threshold)
            proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
            if proc.returncode:
                sys.exit(f"{setting} {strategy} failed:\n{proc.stderr[-2000:]}")
            results.append(json.loads(proc.stdout.strip().splitlines()[-1]))
            r = results[-1]
            print(f"{setting} {strategy}: measured {r['rss_above_baseline_bytes'] / 2**20:,.0f} MiB above baseline, "
                  f"estimated {r['est_training_bytes'] / 2**20:,.0f} MiB", file=sys.stderr)

    print(f"\n{platform.node()} ({platform.machine()}, {torch.get_num_threads()} threads), torch {torch.__version__}, "
          f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, {args.dtype}, {args.steps} steps"
          f"{', gradient checkpointing' if args.gradient_checkpointing else ''}, "
          f"MALLOC_MMAP_THRESHOLD_={args.malloc_mmap_threshold or 'unset (glibc default)'}\n")
    cuda = args.device.startswith("cuda")
    head = ("| B x L | strategy | RSS above baseline (MiB) | tensor estimate (MiB) | error | CPU RSS estimate (MiB) "
            "| error |")
    head += " CUDA max allocated (MiB) | estimate peak (MiB) | error |" if cuda else ""
    print(head)
    print("|---|---|---:|---:|---:|---:|---:|" + ("---:|---:|---:|" if cuda else ""))
    for r in results:
        m, e = r["rss_above_baseline_bytes"], r["est_training_bytes"]
        c = r["est_cpu_rss_above_bytes"]
        line = (f"| {r['batch']}x{r['length']} | {r['strategy']} | {m / 2**20:,.0f} | {e / 2**20:,.0f} | "
                f"{100 * (e - m) / m:+.1f}% | {c / 2**20:,.0f} | {100 * (c - m) / m:+.1f}% |")
        if cuda:
            c, p = r["cuda_max_allocated_bytes"], r["est_peak_bytes"]
            line += f" {c / 2**20:,.0f} | {p / 2**20:,.0f} | {100 * (p - c) / c:+.1f}% |"
        print(line)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)


if __name__ == "__main__":
    main()
