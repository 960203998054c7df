"""The probe: a short run of a uniform low-rank LoRA on every adaptable module that scores each (block, role).

Usage::

    probe = ensure_probe(cfg, ws, store)     # runs the probe seeds not stored yet, stores them, returns ProbeScores
    probe.mean("lora_drop")                  # full module name -> mean score over probe seeds

Each probe seed puts rank ``probe.rank`` LoRA on every module a strategy can adapt (every block linear whose
role is known: ``all_linear``'s modules; alpha scaled so alpha/r equals the trials'), trains it
``probe.steps`` steps on the study's train split as a trial trains (``train.sequential``, no dropout),
then unwraps it: the base model stays pristine (``train.guard``). Criteria, all "higher = the module
matters more", each a mean over batches:

- ``lora_drop``: ||ΔW x|| = ||B A x|| * alpha/r, the L2 norm over output features at every position whose
  next token is a target, averaged over those positions in a batch, then over ``probe.score_batches`` train
  batches after the probe steps (LoRA-drop, COLING 2025, ranks layers by this output norm).
- ``grad_norm``: ||dL/dB||_F, the Frobenius norm of the loss gradient w.r.t. the module's LoRA B (before
  clipping), averaged over the probe steps (B gets a gradient from the first step; A's is 0 while B is 0).
- ``fisher``: ||dL/dA||^2 + ||dL/dB||^2, the module's summed squared adapter gradients (an empirical Fisher
  estimate over mini-batches), averaged over the probe steps.

A probe is keyed by ``measure.probe_scores.probe_key``, so rerunning reuses stored seeds and adding a seed runs
only that seed. The stored scores are read without torch by ``measure.probe_scores``.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import asdict, replace

import torch

from loraplace.data.batches import batches
from loraplace.placement.peft import lora_layers
from loraplace.placement.resolve import resolve
from loraplace.placement.strategy import get_strategy
from loraplace.measure.probe_scores import CRITERIA, ProbeError, ProbeScores, load, probe_key
from loraplace.train import sequential
from loraplace.train.guard import base_unchanged
from loraplace.train.loss import target_nll, target_positions

log = logging.getLogger("loraplace")


def ensure_probe(cfg, ws, store) -> ProbeScores:
    """Run the probe seeds of ``cfg.probe.seeds`` that the store lacks (``ws``: a ``study.workspace.Workspace``), store
    them, mark this probe as the study's latest (meta ``probe``) and return its scores for those seeds."""
    key = probe_key(cfg)
    done = set(store.get_meta(f"probe:{key}", {"seeds": {}})["seeds"])
    for seed in cfg.probe.seeds:
        if str(seed) in done:
            continue
        log.info("probe seed %d: %d steps of a rank-%d LoRA on every adaptable module", seed, cfg.probe.steps,
                 cfg.probe.rank)
        rows, info = run_probe(ws.setup, ws.anatomy, cfg, seed)
        store.put_probe(key, seed, rows, info)
        log.info("probe seed %d: %.0f s", seed, info["time_s"])
    store.put_meta("probe", {"key": key, "seeds": list(cfg.probe.seeds), "settings": asdict(cfg.probe)})
    return load(store, key).only(cfg.probe.seeds)


def lora_drop(peft_model, batch_list: list[dict], device="cpu") -> dict[str, float]:
    """module -> ||B A x|| * scaling over output features, averaged over target positions per batch, then over
    batches (batches without a target are skipped). Forward hooks on each LoRA B read its output."""
    layers = lora_layers(peft_model)
    sums = {n: 0.0 for n in layers}
    state: dict = {}

    def hook(name, scale):
        def fn(_mod, _args, out):  # out: (batch, seq, out_features) = B A x, before scaling
            sel = state["select"]
            sums[name] += float(out.float().norm(dim=-1)[sel].mean()) * scale
        return fn

    handles = [l.lora_B["default"].register_forward_hook(hook(n, float(l.scaling["default"]))) for n, l in layers.items()]
    was_training = peft_model.training
    peft_model.eval()
    used = 0
    try:
        with torch.inference_mode():
            for batch in batch_list:
                batch = {k: v.to(device) for k, v in batch.items()}
                state["select"] = target_positions(batch["labels"])[0]
                if not state["select"].any():
                    continue
                target_nll(peft_model, batch)
                used += 1
    finally:
        for h in handles:
            h.remove()
        peft_model.train(was_training)
    if used == 0:
        raise ProbeError("no scoring batch has a target token")
    return {n: s / used for n, s in sums.items()}


def run_probe(setup, anat, cfg, seed: int) -> tuple[list[tuple], dict]:
    """One probe seed on ``setup.model`` (a ``train.trial.Setup``; the base is left pristine): rows
    (block, role, module, criterion, score) and info."""
    p, t = cfg.probe, cfg.train
    spec = replace(t, steps=p.steps, epochs=None, lr=p.lr if p.lr is not None else t.lr, dropout=0.0)
    setup = replace(setup, train=spec, accuracy=None)
    device = setup.device
    t0 = time.perf_counter()
    placement = resolve(get_strategy("all_linear"), anat, rank=p.rank, alpha=t.alpha * p.rank / t.rank)
    with base_unchanged(setup.model, f"probe seed {seed}"):
        trial = sequential.start(setup, placement, seed)  # adapter init and data order, as a trial of this seed
        with trial.attached(setup) as peft_model:
            layers = lora_layers(peft_model)
            grad_sum = {n: torch.zeros((), dtype=torch.float64, device=device) for n in layers}
            fisher_sum = {n: torch.zeros((), dtype=torch.float64, device=device) for n in layers}
            steps = {n: 0 for n in layers}
            step_grads: dict = {}  # (module, "A" | "B") -> this step's gradient so far (float64), before clipping
            handles = []

            def on_grad(name, which):
                def fn(g):  # fires once per backward: once per row group of a step (train.loss.row_groups)
                    key, g = (name, which), g.detach().double()
                    step_grads[key] = g if key not in step_grads else step_grads[key] + g
                return fn

            def on_step(_opt, _args, _kwargs):  # the step's gradient is complete (and clipped, which we do not use)
                for (name, which), g in step_grads.items():
                    if which == "B":
                        grad_sum[name] += g.norm()
                        steps[name] += 1
                    fisher_sum[name] += g.pow(2).sum()
                step_grads.clear()

            for n, layer in layers.items():
                handles.append(layer.lora_B["default"].weight.register_hook(on_grad(n, "B")))
                handles.append(layer.lora_A["default"].weight.register_hook(on_grad(n, "A")))
            handles.append(trial.opt.register_step_pre_hook(on_step))
            try:
                sequential.advance(setup, [trial], p.steps, desc=f"probe seed {seed}")
            finally:
                for h in handles:
                    h.remove()
            if trial.error is not None:
                raise ProbeError(f"probe seed {seed}: {trial.error}")
            scoring = []
            for batch in batches(setup.train_set, t.batch_size, seed=0, pad_id=setup.pad_id):  # the same for every seed
                scoring.append(batch)
                if len(scoring) == p.score_batches:
                    break
            drop = lora_drop(peft_model, scoring, device)
    curve = trial.curve
    scores = {
        "lora_drop": drop,
        "grad_norm": {n: float(grad_sum[n]) / max(steps[n], 1) for n in layers},
        "fisher": {n: float(fisher_sum[n]) / max(steps[n], 1) for n in layers},
    }
    bad = [(c, n) for c, v in scores.items() for n, x in v.items() if not math.isfinite(x)]
    if bad:
        raise ProbeError(f"probe seed {seed}: non-finite {bad[0][0]} score for {bad[0][1]}")
    rows = [(anat.layer(n).block, anat.layer(n).role, n, c, scores[c][n]) for n in sorted(layers) for c in CRITERIA]
    info = {"time_s": time.perf_counter() - t0, "steps": len(curve), "rank": p.rank, "modules": len(layers),
            "train_loss_first": curve[0][1] if curve else None, "train_loss_last": curve[-1][1] if curve else None}
    return rows, info
