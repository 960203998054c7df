"""Strategy ``eva``: PEFT's Explained Variance Adaptation, resolved once per study before any trial trains.

Usage::

    init = eva_init(cfg, ws, store, target=2_442_240)   # ranks, A matrices, seconds; kept in the study
    init = load(store)                                  # the same, read back (another process, a Ray worker)

EVA (``peft.tuners.lora.eva.get_eva_state_dict``, PEFT's own code) runs the base model over the study's
train batches, takes an incremental SVD of every adaptable module's inputs (completion tokens only, its
label mask) and gives the module the top right-singular vectors as LoRA A; the rank budget, the sum of the
modules' ranks before redistribution (r0 each), goes to the components that explain the most variance, at
most ``eva.rho`` x r0 per module (a module may get none). B starts at zero, so every seed starts from the
same A; seeds still change the data order and dropout. As PEFT does with ``adjust_scaling_factors``, a
module's alpha is alpha x rank / r0, so its alpha/r stays ``train.alpha`` / r0 (``study.plan.eva_placement``).

Budget: EVA keeps the rank sum, not the parameter count (wide MLP modules cost more per rank). The rank
sum starts as the uniform rank that meets the study's budget on every module (``train.rank`` without a
budget), spread as evenly as integers allow (PEFT's ``rank_pattern``); when EVA's redistribution moves the
count more than 2.5% away, the sum is corrected in proportion and EVA runs again (at most 3 runs, the closest
kept); a count still more than 5% off is a one-line error that says so. The A matrices go to
``eva/KEY/eva.pt`` in the study directory; the ranks and the seconds EVA took (every run: the method's own
cost) to meta ``eva``.
"""

from __future__ import annotations

import contextlib
import io
import logging
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch

from loraplace.core.config import StudyConfig
from loraplace.core.files import atomic_dir
from loraplace.data.batches import batches
from loraplace.data.tokenize import pad_id
from loraplace.placement.resolve import BUDGET_TOLERANCE, lora_params
from loraplace.placement.strategy import PlacementError
from loraplace.store import keys

log = logging.getLogger("loraplace")

META = "eva"
FILE = "eva.pt"  # inside eva/KEY/ in the study directory


@dataclass(frozen=True)
class EvaInit:
    """EVA's result on one model, data and budget: what strategy ``eva`` trains and how it starts."""

    key: str
    base: dict[str, int]  # module -> rank before redistribution (their sum is what EVA redistributes)
    ranks: dict[str, int]  # module -> rank (modules EVA gave no rank are left out)
    weights: dict[str, torch.Tensor]  # module -> A init, (rank, in_features)
    time_s: float  # seconds of EVA's activation passes and SVDs, every attempt


def base_ranks(names: list[str], total: int) -> dict[str, int]:
    """A rank sum ``total`` spread as evenly as integers allow: the first total mod n modules (by name) one more."""
    r, extra = divmod(total, len(names))
    return {n: r + (i < extra) for i, n in enumerate(sorted(names))}


def _run(cfg: StudyConfig, ws, base: dict[str, int]) -> dict[str, torch.Tensor]:
    """PEFT's get_eva_state_dict on the base model at ranks ``base`` before redistribution (its rank budget is
    their sum), over the train set in length-grouped batches of train.batch_size (seed 0)."""
    from peft import EvaConfig, LoraConfig
    from peft.tuners.lora.eva import get_eva_state_dict

    names = sorted(base)
    r = max(set(base.values()), key=list(base.values()).count)
    config = LoraConfig(r=r, lora_alpha=cfg.train.alpha, target_modules=names, init_lora_weights="eva",
                        rank_pattern={n: k for n, k in base.items() if k != r},
                        eva_config=EvaConfig(rho=cfg.eva.rho, tau=cfg.eva.tau))
    data = list(batches(ws.train_set, cfg.train.batch_size, seed=0, pad_id=pad_id(ws.tokenizer)))
    data = [{k: v.to(ws.device) for k, v in b.items()} for b in data]
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):  # its per-batch "skipping SVD" lines
        warnings.simplefilter("ignore")
        state = get_eva_state_dict(ws.model, data, config, show_progress_bar=False)
    return {n: state[n].detach().cpu() for n in names if n in state and state[n].shape[0] > 0}


def _count(anat, weights: dict[str, torch.Tensor]) -> int:
    return sum(lora_params(anat.layer(n), w.shape[0]) for n, w in weights.items())


ATTEMPTS = 3  # EVA runs at most, correcting the rank sum in proportion to the count's miss


def eva_init(cfg: StudyConfig, ws, store, target: int | None) -> EvaInit:
    """EVA on this study (read back when the study already has it for these settings); ``target``: the
    trainable count to meet (None: train.rank on every module, EVA's own rank sum)."""
    key = keys.key("eva", cfg, device=ws.device, target=target)
    stored = load(store, key)
    if stored is not None:
        return stored
    anat = ws.anatomy
    names = anat.adaptable()
    width = sum(lora_params(anat.layer(n), 1) for n in names)  # parameters per unit of uniform rank
    total = len(names) * (cfg.train.rank if target is None else max(1, round(target / width)))
    t0 = time.perf_counter()
    log.info("eva: SVD of every module's inputs over %d train examples, rank sum %d over %d modules (rho %g)",
             len(ws.train_set.input_ids), total, len(names), cfg.eva.rho)
    best = None  # (miss, count, base ranks, EVA's A matrices)
    for _ in range(ATTEMPTS if target is not None else 1):
        base = base_ranks(names, total)
        weights = _run(cfg, ws, base)
        count = _count(anat, weights)
        miss = 0 if target is None else abs(count - target)
        if best is None or miss < best[0]:
            best = (miss, count, base, weights)
        if target is None or miss <= BUDGET_TOLERANCE * target / 2:
            break
        again = max(len(names), round(total * target / count))  # at least rank 1 a module before redistribution
        if again == total:
            break
        log.info("eva: its ranks train %d parameters, %+.0f%% from the budget: again with rank sum %d", count,
                 100 * (count / target - 1), again)
        total = again
    seconds = time.perf_counter() - t0
    _, count, base, weights = best
    if target is not None and abs(count - target) > BUDGET_TOLERANCE * target:
        raise PlacementError(f"budget {target:,}: EVA's redistribution trains {count:,} parameters (more than "
                             f"{BUDGET_TOLERANCE:.0%} away; it keeps the rank sum, and wider modules cost more per rank): "
                             "set eva.rho=1 (no redistribution) or another budget")
    ranks = {n: int(w.shape[0]) for n, w in sorted(weights.items())}
    init = EvaInit(key, base, ranks, weights, seconds)
    with atomic_dir(Path(store.directory) / "eva" / key) as tmp:
        torch.save(weights, Path(tmp) / FILE)
    store.put_meta(META, {"key": key, "base": base, "ranks": ranks, "time_s": seconds, "count": count, "target": target})
    log.info("eva: %d modules, ranks %d-%d, %d trainable parameters, in %.1f s", len(ranks), min(ranks.values()),
             max(ranks.values()), count, seconds)
    return init


def load(store, key: str | None = None) -> EvaInit | None:
    """The study's stored EVA result (of ``key``, else whatever it holds); None when there is none."""
    meta = store.get_meta(META)
    if not meta or (key is not None and meta.get("key") != key):
        return None
    path = Path(store.directory) / "eva" / meta["key"] / FILE
    if not path.is_file():
        return None
    weights = torch.load(path, map_location="cpu", weights_only=True)
    ranks = {n: int(r) for n, r in meta["ranks"].items()}
    base = {n: int(r) for n, r in meta["base"].items()}
    return EvaInit(meta["key"], base, ranks, weights, float(meta["time_s"]))
