"""AdaLoRA inside a trial: PEFT's rank allocator kept across wrappings, its final budget matched, its penalty.

Usage::

    state = new_state()                                       # the allocator's state, kept by the Trial
    allocate(state, peft_model, placement, step, total)       # after AdamW's step, before zero_grad
    loss = nll / n + orth_penalty(params, weight)             # what is backpropagated
    kept_placement(placement, state)                          # the ranks AdaLoRA kept, once it fixed them

PEFT's ``AdaLoraModel`` owns a ``RankAllocator`` whose state (importance EMAs per adapter tensor, the rank
pattern) lives on the wrapping; a Trial is wrapped anew for every piece of work (evaluation, rung, restore from a
checkpoint), so the state lives in the Trial and is handed to PEFT's allocator for each call of PEFT's
``update_and_allocate``. The schedule is PEFT's (cubic from ``init_r`` to the target, fixed at
``total - tfinal``); with a study budget the final triplet budget is the one (found by bisection over PEFT's own
``mask_to_budget``) whose trainable count is nearest the budget, since triplets of different modules cost
different numbers of parameters. PEFT adds its orthogonality penalty inside ``AdaLoraModel.forward`` only when
the model computes the loss from labels; loraplace computes the loss on target positions itself
(``train.loss``), so ``orth_penalty`` adds the same term (tested equal to PEFT's).
"""

from __future__ import annotations

from dataclasses import replace

import torch

from loraplace.placement.resolve import Placement
from loraplace.placement.strategy import PlacementError

E_KEY = ".lora_E."  # in a parameter name: AdaLoRA's singular values of a module


def new_state() -> dict:
    """The allocator's state at step 0: importance EMAs (parameter name -> tensor) and no rank pattern yet."""
    return {"ipt": {}, "avg": {}, "unc": {}, "pattern": None}


def final_step(placement: Placement, total: int) -> int:
    """The optimizer step after which AdaLoRA's allocation is fixed: ``total - tfinal``."""
    return total - placement.allocation["tfinal"]


def allocate(state: dict, peft_model, placement: Placement, step: int, total: int) -> int | None:
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


def _nearest_budget(model, alloc, placement: Placement, target: int) -> int:
    """The number of triplets PEFT's ``mask_to_budget`` keeps whose trainable count is nearest ``target``; E is
    restored after each trial mask, so only the final call of ``update_and_allocate`` masks."""
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


def kept_placement(placement: Placement, state: dict) -> Placement:
    """The placement AdaLoRA ends with: each module at the ranks its pattern keeps (modules it pruned to 0
    drop out), alphas rescaled so alpha/r is AdaLoRA's scale alpha/init_r (what a LoRA export needs)."""
    init_r = placement.allocation["init_r"]
    ranks = {name.split(E_KEY)[0]: sum(bool(k) for k in keep) for name, keep in state["pattern"].items()}
    modules = {n: r for n, r in sorted(ranks.items()) if r > 0}
    if set(modules) - set(placement.modules):
        raise PlacementError(f"AdaLoRA's rank pattern names modules outside the placement: {sorted(set(modules) - set(placement.modules))[:2]}")
    alphas = {n: placement.alphas[n] * r / init_r for n, r in modules.items()}
    return replace(placement, modules=modules, alphas=alphas)


def orth_penalty(params: dict[str, torch.Tensor], weight: float) -> torch.Tensor | float:
    """AdaLoRA's regulariser as PEFT's ``AdaLoraModel.forward`` adds it: ``weight`` x the mean over every A
    (r, in) and B (out, r) of ||A A^T - I||_F and ||B^T B - I||_F."""
    terms = []
    for name, p in params.items():
        if ".lora_A." in name or ".lora_B." in name:
            cov = p @ p.T if ".lora_A." in name else p.T @ p
            terms.append(torch.linalg.matrix_norm(cov - torch.eye(cov.shape[0], dtype=cov.dtype, device=cov.device)))
    return weight * torch.stack(terms).mean() if terms and weight > 0 else 0.0
