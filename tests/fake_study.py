"""A study database made by hand, with known numbers: what the analysis and report tests read.

Usage: ``from fake_study import PLAN, ZS, make_study; make_study(tmp_path)``
"""
from __future__ import annotations

import math

from loraplace.core.config import StudyConfig
from loraplace.placement.record import ModuleSpec, PlacementRecord
from loraplace.store import claims
from loraplace.store.db import Store

ZS = 3.0  # zero-shot eval loss, nats/token
T975_DF2 = 4.302652729911275  # Student t quantile 0.975, 2 degrees of freedom
NAMES = {"attn.q": "self_attn.q_proj", "attn.v": "self_attn.v_proj", "mlp.up": "mlp.up_proj",
         "mlp.down": "mlp.down_proj"}
# strategy -> (roles, blocks, trainable params, eval loss per seed 0..2, train time s)
PLAN = {
    "all_linear": (list(NAMES), range(6), 48_000, [2.00, 2.02, 2.04], 30.0),
    "attention_only": (["attn.q", "attn.v"], range(6), 24_000, [2.01, 2.03, 2.05], 20.0),
    "top_half": (list(NAMES), range(3, 6), 24_000 // 2, [2.40, 2.45, 2.47], 18.0),
}


ZA = 0.20  # zero-shot accuracy on the 50 accuracy examples
# accuracy per seed 0..2: attention_only keeps the loss but loses accuracy; top_half the reverse
ACC = {"all_linear": [0.60, 0.62, 0.64], "attention_only": [0.30, 0.32, 0.34], "top_half": [0.62, 0.64, 0.66]}
# forgetting per seed 0..2, nats/token: attention_only (the cheapest that keeps the loss) forgets the most
FORGET = {"all_linear": [0.020, 0.022, 0.024], "attention_only": [0.050, 0.055, 0.060],
          "top_half": [0.010, 0.011, 0.012]}


def make_study(path, seeds=(0, 1, 2), zero_shot=True, accuracy=False, metric=None, forgetting=False,
               max_forgetting=None):
    store = Store.open(path)
    cfg = StudyConfig(model="tiny-llama", strategies=list(PLAN), seeds=list(seeds))
    cfg.eval.accuracy = accuracy or metric == "accuracy"
    if metric:
        cfg.analysis.metric = metric
    cfg.analysis.max_forgetting = max_forgetting
    store.put_study_config(cfg, [f"{name}-{seed}" for seed in seeds for name in PLAN] + ["top_half-9"])
    if zero_shot:
        zero = {"eval_loss": ZS, "perplexity": math.exp(ZS), "eval_tokens": 1000}
        store.put_meta("zero_shot", {**zero, "accuracy": ZA, "accuracy_n": 50} if accuracy else zero)
    for name, (roles, blocks, params, losses, time_s) in PLAN.items():
        mods = {f"model.layers.{b}.{NAMES[r]}": ModuleSpec(8, 16.0, r, b) for b in blocks for r in roles}
        placement = PlacementRecord(name, mods, "llama", 6, params, 1_000_000, dropout=0.05)
        for seed in seeds:
            tid = f"{name}-{seed}"
            store.add_pending(tid, name, seed, {})
            claims.claim(store, tid)
            loss = losses[seed]
            metrics = {"eval_loss": loss, "perplexity": math.exp(loss), "trainable_params": params,
                       "base_params": 1_000_000, "trainable_pct": params / 1e4, "train_time_s": time_s + seed,
                       "peak_mem_bytes": (500 + seed) * 2**20, "adapter_bytes": params * 4, "n_modules": len(mods)}
            if zero_shot:
                metrics["zero_shot_loss"] = ZS
            if accuracy:
                metrics.update(accuracy=ACC[name][seed], accuracy_n=50)
            if forgetting:
                metrics.update(forgetting=FORGET[name][seed], forgetting_loss=1.0 + FORGET[name][seed])
            curve = [[s, ZS - (ZS - loss) * (1 - math.exp(-s / 5))] for s in range(1, 31)]
            store.mark_done(tid, metrics, curve, placement, {})
    store.add_pending("top_half-9", "top_half", 9, {})
    store.mark_failed("top_half-9", "RuntimeError: out of memory")
    store.close()
    return path
