"""AdaLoRA: PEFT's SVD-form adapters whose rank allocator prunes rank-triplets while training, ending at the budget.

Usage::

    state = AdaLoRA().start(trial, init_time)              # the allocator's state, the trial's ``variant_state``
    AdaLoRA().after_step(trial, setup)                     # PEFT's update_and_allocate, after AdamW's step
    loss = nll / n + AdaLoRA().penalty(trial)              # PEFT's orthogonality penalty
    AdaLoRA().trained(trial)                               # the ranks it kept, once it fixed them

A placement of this variant carries ``allocation`` (``placement.resolve.adalora_placement``): the starting rank,
the schedule and the count it ends at. PEFT's ``AdaLoraModel`` owns a ``RankAllocator`` whose state (importance
EMAs per adapter tensor, the rank pattern) lives on the wrapping; a trial is wrapped anew for every piece of work
(evaluation, rung, restore from a checkpoint), so the state lives in the trial and is handed to PEFT's allocator
for each call of PEFT's ``update_and_allocate``. The schedule is PEFT's (cubic from ``init_r`` to the target, fixed
at ``total - tfinal``); with a study budget the final triplet budget is the one (found by bisection over PEFT's own
``mask_to_budget``) whose trainable count is nearest the budget, since triplets of different modules cost
different numbers of parameters. PEFT adds its orthogonality penalty inside ``AdaLoraModel.forward`` only when the
model computes the loss from labels; loraplace computes the loss on target positions itself (``train.loss``), so
``penalty`` adds the same term (tested equal to PEFT's). Stored and exported as plain LoRA at the ranks it kept.
"""

from __future__ import annotations

import json
import time
import warnings
from dataclasses import replace
from pathlib import Path

from loraplace.placement.strategy import ADALORA, PlacementError
from loraplace.placement.variants import Variant

E_KEY = ".lora_E."  # in a parameter name: AdaLoRA's singular values of a module


class AdaLoRA(Variant):
    name, label, methods_label = ADALORA, "AdaLoRA", "AdaLoRA"
    scale = "alpha/init_r (its starting rank, whatever it keeps)"
    switches = {}  # exported as plain LoRA at the ranks it kept
    unfusable = "AdaLoRA's adapters are SVD triplets that PEFT's allocator prunes between steps, not the fused B A"

    def extra_params(self, layer, rank: int) -> int:
        return rank  # the singular values E, one per rank

    def check(self, strategy, allocation: dict | None) -> None:
        if allocation is None:
            raise PlacementError(f"strategy {strategy.name!r} runs PEFT's AdaLoRA, which allocates rank while "
                                 "training: resolve it with adalora_placement, or through the study")

    def export_note(self, strategy: str, kept: dict[int, dict], exported: dict) -> str | None:
        seed = next(s for s, m in kept.items() if m == exported)
        differ = len({json.dumps(m, sort_keys=True) for m in kept.values()}) > 1
        return (f"{strategy} was trained with PEFT's AdaLoRA, which pruned rank while training; this config is plain "
                f"LoRA at the ranks it kept in seed {seed}"
                + (" (other seeds kept other ranks: see the report's placement map)" if differ else "")
                + ". To rerun AdaLoRA itself: AdaLoraConfig(init_r=..., target_r=..., tinit=..., tfinal=..., deltaT=..., "
                "total_step=...) with the adalora settings in the study's config.yaml, calling "
                "model.base_model.update_and_allocate(step) after every optimizer step")

    def methods(self, strategies: list, config) -> str | None:
        c = config.adalora
        share = max(s.mean("method_time_s", 0.0) / max(s.mean("train_time_s", 0.0), 1e-9) for s in strategies)
        start = c.init_r if config.budget is None else f"scaled from {c.init_r}:{c.target_r}"
        return (f"{', '.join(f'`{s.strategy}`' for s in strategies)} trained PEFT's AdaLoRA: SVD-form adapters started "
                f"at rank {start} on every module and pruned by PEFT's sensitivity scores (EMA {c.beta1:g}/{c.beta2:g}, "
                f"every {c.delta_t} step(s) after {c.tinit}, fixed {c.tfinal} step(s) before the end, orthogonality "
                f"penalty {c.orth_reg_weight:g})"
                + (", the final rank-triplet budget chosen so the count meets the study's budget" if config.budget
                   else "") + "; each trial stores the ranks it kept (they differ by seed; the placement map shows the "
                f"first seed's); the allocation took up to {100 * share:.1f}% of a trial's training time.")

    def peft_config(self, placement, dropout: float, total_steps: int | None, initialise: bool):
        """PEFT's ``AdaLoraConfig``: explicit module names, one starting rank, the schedule in optimizer steps of a
        ``total_steps`` run."""
        from peft import AdaLoraConfig

        a = placement.allocation
        if not total_steps or a["tinit"] + 2 > total_steps - a["tfinal"]:
            raise PlacementError(f"strategy {placement.strategy.name!r}: AdaLoRA's schedule (adalora.tinit {a['tinit']}, "
                                 f"tfinal {a['tfinal']}) leaves no step to allocate in a {total_steps}-step run")
        record = placement.record(dropout)
        return AdaLoraConfig(
            target_modules=record.names(), init_r=a["init_r"], target_r=max(1, a["triplets"] // len(placement.modules)),
            lora_alpha=record.alpha, lora_dropout=dropout, tinit=a["tinit"], tfinal=a["tfinal"], deltaT=a["delta_t"],
            beta1=a["beta1"], beta2=a["beta2"], orth_reg_weight=a["orth_reg_weight"], total_step=total_steps,
            fan_in_fan_out=record.fan_in_fan_out, bias="none", task_type="CAUSAL_LM")

    # -- a trial's life -----------------------------------------------------------------------------------------
    def start(self, trial, init_time: float) -> dict:
        """Importance EMAs (parameter name -> tensor), no rank pattern yet, and the s its allocation took."""
        return {"ipt": {}, "avg": {}, "unc": {}, "pattern": None, "time": 0.0}

    def after_step(self, trial, setup) -> str | None:
        """PEFT's allocation after this step (it reads the step's gradients, so before zero_grad); a final count
        off the budget fails the trial."""
        from loraplace.placement.resolve import BUDGET_TOLERANCE  # placement.resolve imports this package

        state = trial.variant_state
        t0 = time.perf_counter()
        with trial.attached(setup) as peft_model:
            count = allocate(state, peft_model, trial.placement, trial.step + 1, trial.total)
        state["time"] += time.perf_counter() - t0
        target = trial.placement.allocation["target"]
        if count is not None and target is not None and abs(count - target) > BUDGET_TOLERANCE * target:
            return (f"AdaLoRA's final allocation trains {count:,} parameters, more than {BUDGET_TOLERANCE:.0%} from "
                    f"the budget {target:,}")
        return None

    def penalty(self, trial):
        return orth_penalty(trial.params, trial.placement.allocation["orth_reg_weight"])

    def trained(self, trial):
        """The starting placement until AdaLoRA fixes its allocation, then the ranks it kept."""
        if trial.step < final_step(trial.placement, trial.total):
            return trial.placement
        return kept_placement(trial.placement, trial.variant_state)

    def save_adapter(self, trial, peft_model, target: str | Path) -> Path:
        with warnings.catch_warnings():  # modules pruned to rank 0 save empty A/B: not a shard
            warnings.filterwarnings("ignore", message=".*LoRA tensor.*invalid shape")
            return super().save_adapter(trial, peft_model, target)

    def state_dict(self, state: dict) -> dict:
        return {"allocator": {k: state[k] for k in ("ipt", "avg", "unc", "pattern")}, "method_time": state["time"]}

    def load_state(self, saved: dict, device) -> dict:
        a = saved.get("allocator") or self.start(None, 0.0)  # importance EMAs and rank pattern, on the trial's device
        return {**{k: {n: t.to(device) for n, t in a[k].items()} for k in ("ipt", "avg", "unc")},
                "pattern": a["pattern"], "time": saved.get("method_time", 0.0)}

    def method_time(self, state: dict) -> float:
        return state["time"]  # PEFT's rank allocation between steps (part of train_time_s)


def final_step(placement, total: int) -> int:
    """The optimizer step after which AdaLoRA's allocation is fixed: ``total - tfinal``."""
    return total - placement.allocation["tfinal"]


def allocate(state: dict, peft_model, placement, step: int, total: int) -> int | None:
    """PEFT's ``update_and_allocate`` after optimizer step ``step`` (1-based: steps done, this one included),
    with the trial's allocator state; at the final step, the triplet budget whose count is nearest the placement's
    target. Returns the final trainable count at the final step, else None."""
    model = peft_model.base_model  # AdaLoraModel
    alloc, conf = model.rankallocator, model.peft_config["default"]
    alloc.ipt, alloc.exp_avg_ipt, alloc.exp_avg_unc = state["ipt"], state["avg"], state["unc"]
    conf.rank_pattern = state["pattern"]
    alloc.target_bgt = placement.allocation["triplets"]
    target = placement.allocation["target"]
    final = step == final_step(placement, total)
    if final and target is not None:
        alloc.target_bgt = _nearest_budget(model, alloc, placement, target)
    model.update_and_allocate(step)
    state.update(ipt=alloc.ipt, avg=alloc.exp_avg_ipt, unc=alloc.exp_avg_unc, pattern=conf.rank_pattern)
    return kept_placement(placement, state).trainable_params if final else None


def _nearest_budget(model, alloc, placement, target: int) -> int:
    """The number of triplets PEFT's ``mask_to_budget`` keeps whose trainable count is nearest ``target``; E is
    restored after each trial mask, so only the final call of ``update_and_allocate`` masks."""
    import torch

    params = dict(model.model.named_parameters())
    saved = {n: p.detach().clone() for n, p in params.items() if E_KEY in n}

    def count(budget: int) -> int:
        pattern = alloc.mask_to_budget(model.model, budget)
        with torch.no_grad():
            for n, t in saved.items():
                params[n].copy_(t)
        return kept_placement(placement, {"pattern": pattern}).trainable_params

    lo, hi = 1, alloc.init_bgt - 1  # mask_to_budget prunes at least one triplet
    while lo < hi:  # the smallest budget reaching the target (the count grows with the budget)
        mid = (lo + hi) // 2
        lo, hi = (mid + 1, hi) if count(mid) < target else (lo, mid)
    return min((b for b in (lo - 1, lo) if b >= 1), key=lambda b: abs(count(b) - target))


def kept_placement(placement, state: dict):
    """The placement AdaLoRA ends with: each module at the ranks its pattern keeps (modules it pruned to 0
    drop out), alphas rescaled so alpha/r is AdaLoRA's scale alpha/init_r (what a LoRA export needs)."""
    init_r = placement.allocation["init_r"]
    ranks = {name.split(E_KEY)[0]: sum(bool(k) for k in keep) for name, keep in state["pattern"].items()}
    modules = {n: r for n, r in sorted(ranks.items()) if r > 0}
    if set(modules) - set(placement.modules):
        raise PlacementError(f"AdaLoRA's rank pattern names modules outside the placement: {sorted(set(modules) - set(placement.modules))[:2]}")
    alphas = {n: placement.alphas[n] * r / init_r for n, r in modules.items()}
    return replace(placement, modules=modules, alphas=alphas)


def orth_penalty(params: dict, weight: float):
    """AdaLoRA's regulariser as PEFT's ``AdaLoraModel.forward`` adds it: ``weight`` x the mean over every A
    (r, in) and B (out, r) of ||A A^T - I||_F and ||B^T B - I||_F."""
    import torch

    terms = []
    for name, p in params.items():
        if ".lora_A." in name or ".lora_B." in name:
            cov = p @ p.T if ".lora_A." in name else p.T @ p
            terms.append(torch.linalg.matrix_norm(cov - torch.eye(cov.shape[0], dtype=cov.dtype, device=cov.device)))
    return weight * torch.stack(terms).mean() if terms and weight > 0 else 0.0
