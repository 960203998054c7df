"""Benchmark (CPU): training step time and RSS peak under glibc's allocator settings.

Usage (run each alone, alternating, on a quiet machine; the environment variable is the A/B switch)::

    python benchmarks/bench_allocator.py                                 # glibc's default allocator
    MALLOC_MMAP_THRESHOLD_=131072 python benchmarks/bench_allocator.py   # every block over 128 KiB mmapped

7 steps of 8 GSM8K train rows at max length 256 (all_linear r16, AdamW) on the embedded SmolLM2-135M;
prints each step's seconds, their mean after the first, and the RSS high-water mark above the baseline
taken after the weights were read. Needs ../shared/data/gsm8k beside the checkout.
"""
import json
import os
import time
from pathlib import Path

import torch

from loraplace.core.config import DataSpec
from loraplace.data.batches import batches
from loraplace.data.sources import load_examples
from loraplace.data.tokenize import tokenize
from loraplace.model.anatomy import analyze
from loraplace.model.loading import load
from loraplace.placement.peft import apply
from loraplace.placement.resolve import resolve
from loraplace.placement.strategy import get_strategy
from loraplace.train import memory as M
from loraplace.train.loss import target_nll

model, tok = load("smollm2-135m")
for p in model.parameters():
    float(p.detach().abs().sum())  # read the mmapped weights before the baseline
GSM8K = Path(__file__).resolve().parents[2] / "shared" / "data" / "gsm8k"
spec = DataSpec(source=str(GSM8K / "train.jsonl"), max_length=256)
ts = tokenize(load_examples(spec)[:96], tok, spec)
p = resolve(get_strategy("all_linear"), analyze(model), rank=16, alpha=32)
peft = apply(model, p)
opt = torch.optim.AdamW([q for q in peft.parameters() if q.requires_grad], lr=1e-4)
M.reset_peak_memory("cpu")
base = M.peak_memory_bytes("cpu")
times = []
for i, b in enumerate(batches(ts, 8, seed=0, pad_id=tok.pad_token_id)):
    if i == 7: break
    t0 = time.perf_counter()
    nll, n = target_nll(peft, b)
    (nll / n).backward(); opt.step(); opt.zero_grad(set_to_none=True)
    times.append(time.perf_counter() - t0)
print(json.dumps({"env": os.environ.get("MALLOC_MMAP_THRESHOLD_"), "step_s": times,
                  "mean_s_after_first": sum(times[1:]) / len(times[1:]),
                  "peak_above_base_mib": (M.peak_memory_bytes("cpu") - base) / 2**20}))
