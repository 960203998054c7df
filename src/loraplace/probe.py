"""The probe: a short run of a uniform low-rank LoRA on every linear module that scores each (block, role).

Usage::

    probe = ensure_probe(cfg, ws, store)     # runs the probe seeds not stored yet, stores them, returns ProbeScores
    probe.mean("lora_drop")                  # full module name -> mean score over probe seeds
    print(probe.table("lora_drop"))          # block x role, with the seed-to-seed spread
    probe.rank_correlation("lora_drop")      # Spearman rho of the module ordering between probe seeds

Each probe seed wraps the base model with rank ``probe.rank`` LoRA on every linear module of every block
(alpha scaled so alpha/r equals the trials'), trains it ``probe.steps`` steps on the study's train split with
the trials' loop (``trial.train``), then unloads it: the base model stays pristine (checked). Criteria, all
"higher = the module matters more", each a mean over batches:

- ``lora_drop``: ||ΔW x|| = ||B A x|| * alpha/r, the L2 norm over output features at every position whose
  next token is a target, averaged over those positions in a batch, then over ``probe.score_batches`` train
  batches after the probe steps (LoRA-drop, COLING 2025, ranks layers by this output norm).
- ``grad_norm``: ||dL/dB||_F, the Frobenius norm of the loss gradient w.r.t. the module's LoRA B (before
  clipping), averaged over the probe steps (B gets a gradient from the first step; A's is 0 while B is 0).
- ``fisher``: ||dL/dA||^2 + ||dL/dB||^2, the module's summed squared adapter gradients (an empirical Fisher
  estimate over mini-batches), averaged over the probe steps.

A probe is keyed by a hash of the model, the data settings, the probe settings (seeds aside) and the training
settings it borrows, so rerunning reuses stored seeds and adding a seed runs only that seed. This module
imports torch only inside the functions that train, so the report can read probe scores without it.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import time
from dataclasses import asdict, dataclass, replace

from .config import PROBE_CRITERIA
from .core import LoraplaceError, role_rank, text_table

CRITERIA = PROBE_CRITERIA  # lora_drop, grad_norm, fisher: defined in the module docstring
log = logging.getLogger("loraplace")


class ProbeError(LoraplaceError, RuntimeError):
    """The probe could not score the modules (non-finite scores, a changed base model)."""


@dataclass
class ProbeScores:
    """The stored scores of one probe: rows (seed, block, role, module, criterion, score) and per-seed info."""

    key: str
    rows: list[tuple]
    info: dict  # meta ``probe:<key>``: {"seeds": {"0": {"time_s", "steps", "rank", ...}}}

    @property
    def seeds(self) -> list[int]:
        return sorted({r[0] for r in self.rows})

    @property
    def criteria(self) -> list[str]:
        return [c for c in CRITERIA if any(r[4] == c for r in self.rows)]

    @property
    def time_s(self) -> float:
        """Wall time of every stored probe seed together (s)."""
        return sum(float(v.get("time_s", 0.0)) for v in self.info.get("seeds", {}).values())

    def only(self, seeds) -> "ProbeScores":
        """The scores of these probe seeds only."""
        keep = {int(s) for s in seeds}
        return ProbeScores(self.key, [r for r in self.rows if r[0] in keep],
                           {**self.info, "seeds": {k: v for k, v in self.info.get("seeds", {}).items() if int(k) in keep}})

    def layout(self) -> dict[str, tuple[int, str]]:
        """module -> (block, role)."""
        return {r[3]: (r[1], r[2]) for r in self.rows}

    def per_seed(self, criterion: str) -> dict[int, dict[str, float]]:
        out: dict[int, dict[str, float]] = {}
        for seed, _, _, module, crit, score in self.rows:
            if crit == criterion:
                out.setdefault(seed, {})[module] = score
        if not out:
            raise ProbeError(f"probe {self.key} has no {criterion!r} scores; it has: {', '.join(self.criteria)}")
        return out

    def mean(self, criterion: str) -> dict[str, float]:
        """module -> mean score over the probe seeds."""
        seeds = self.per_seed(criterion)
        modules = set.intersection(*(set(v) for v in seeds.values()))
        return {m: sum(v[m] for v in seeds.values()) / len(seeds) for m in sorted(modules)}

    def spread(self, criterion: str) -> dict[str, float] | None:
        """module -> standard deviation across probe seeds (ddof=1); None with one seed."""
        seeds = self.per_seed(criterion)
        if len(seeds) < 2:
            return None
        mean = self.mean(criterion)
        return {m: math.sqrt(sum((v[m] - mu) ** 2 for v in seeds.values()) / (len(seeds) - 1)) for m, mu in mean.items()}

    def rank_correlation(self, criterion: str) -> list[tuple[int, int, float]]:
        """(seed a, seed b, Spearman rho of the modules' scores) for every pair of probe seeds."""
        seeds = self.per_seed(criterion)
        modules = sorted(set.intersection(*(set(v) for v in seeds.values())))
        keys = sorted(seeds)
        return [(a, b, spearman([seeds[a][m] for m in modules], [seeds[b][m] for m in modules]))
                for i, a in enumerate(keys) for b in keys[i + 1:]]

    def summary(self, criterion: str) -> str:
        """One line: seeds, mean rank correlation across seed pairs, median relative spread."""
        rho = [r for _, _, r in self.rank_correlation(criterion)]
        spread, mean = self.spread(criterion), self.mean(criterion)
        parts = [f"{criterion}: {len(self.per_seed(criterion))} probe seed(s)"]
        if rho:
            parts.append(f"Spearman rho across seeds {sum(rho) / len(rho):.3f} (min {min(rho):.3f}, {len(rho)} pair(s))")
        if spread:
            rel = sorted(spread[m] / mean[m] for m in mean if mean[m] > 0)
            if rel:
                parts.append(f"median seed-to-seed spread {100 * rel[len(rel) // 2]:.1f}% of the mean")
        return "; ".join(parts)

    def table(self, criterion: str) -> str:
        """Block x role table of the mean score (3 significant digits) and the seed-to-seed sd as % of it."""
        mean, spread, layout = self.mean(criterion), self.spread(criterion), self.layout()
        roles = sorted({r for _, r in layout.values()}, key=role_rank)
        cell = {layout[m]: f"{v:.3g}" + (f" ±{100 * spread[m] / v:.0f}%" if spread and v > 0 else "")
                for m, v in mean.items()}
        blocks = sorted({b for b, _ in layout.values()})
        rows = [[str(b)] + [cell.get((b, r), "-") for r in roles] for b in blocks]
        return text_table(["block", *roles], rows)


def spearman(a: list[float], b: list[float]) -> float:
    """Spearman rank correlation (average ranks for ties); NaN when either side is constant."""
    def ranks(x: list[float]) -> list[float]:
        order = sorted(range(len(x)), key=lambda i: x[i])
        out = [0.0] * len(x)
        i = 0
        while i < len(order):
            j = i
            while j + 1 < len(order) and x[order[j + 1]] == x[order[i]]:
                j += 1
            for k in range(i, j + 1):
                out[order[k]] = (i + j) / 2
            i = j + 1
        return out

    ra, rb = ranks(a), ranks(b)
    n = len(ra)
    ma, mb = sum(ra) / n, sum(rb) / n
    cov = sum((x - ma) * (y - mb) for x, y in zip(ra, rb))
    va, vb = sum((x - ma) ** 2 for x in ra), sum((y - mb) ** 2 for y in rb)
    return cov / math.sqrt(va * vb) if va > 0 and vb > 0 else math.nan


def probe_key(cfg) -> str:
    """Hash of what can change a probe's scores: model, data, probe settings (not its seeds), training settings."""
    t = cfg.train
    settings = {
        "model": cfg.model,
        "data": asdict(cfg.data),
        "probe": {k: v for k, v in asdict(cfg.probe).items() if k != "seeds"},
        "train": {k: getattr(t, k) for k in ("lr", "schedule", "warmup", "batch_size", "weight_decay", "max_grad_norm",
                                             "rank", "alpha", "dtype")},
    }
    return hashlib.sha256(json.dumps(settings, sort_keys=True, default=str).encode()).hexdigest()[:16]


def load(store, key: str | None = None) -> ProbeScores | None:
    """The stored probe ``key`` (every stored seed), or by default the latest one run in this study directory
    (the seeds that run asked for); None when there is none."""
    seeds = None
    if key is None:
        latest = store.get_meta("probe")
        if not latest:
            return None
        key, seeds = latest["key"], latest.get("seeds")
    rows = store.probe_rows(key)
    if not rows:
        return None
    scores = ProbeScores(key, rows, store.get_meta(f"probe:{key}", {"seeds": {}}))
    return scores.only(seeds) if seeds else scores


def ensure_probe(cfg, ws, store) -> ProbeScores:
    """Run the probe seeds of ``cfg.probe.seeds`` that the store lacks (``ws``: an ``workspace.Workspace``), store
    them, mark this probe as the study's latest (meta ``probe``) and return its scores for those seeds."""
    key = probe_key(cfg)
    done = set(store.get_meta(f"probe:{key}", {"seeds": {}})["seeds"])
    for seed in cfg.probe.seeds:
        if str(seed) in done:
            continue
        log.info("probe seed %d: %d steps of a rank-%d LoRA on every linear module", seed, cfg.probe.steps,
                 cfg.probe.rank)
        rows, info = run_probe(ws.model, ws.anatomy, ws.train_set, cfg, seed, ws.tokenizer.pad_token_id, ws.device)
        store.put_probe(key, seed, rows, info)
        log.info("probe seed %d: %.0f s", seed, info["time_s"])
    store.put_meta("probe", {"key": key, "seeds": list(cfg.probe.seeds), "settings": asdict(cfg.probe)})
    return load(store, key).only(cfg.probe.seeds)


# -- running one probe seed (imports torch) ------------------------------------------------------
def lora_modules(peft_model) -> dict[str, object]:
    """Full base-model module name -> its PEFT LoRA layer."""
    from peft.tuners.lora import LoraLayer

    prefix = "base_model.model."
    return {name[len(prefix):] if name.startswith(prefix) else name: mod for name, mod in peft_model.named_modules()
            if isinstance(mod, LoraLayer) and "default" in mod.lora_A}


def lora_drop(peft_model, batch_list: list[dict], device="cpu") -> dict[str, float]:
    """module -> ||B A x|| * scaling over output features, averaged over target positions per batch, then over
    batches (batches without a target are skipped). Forward hooks on each LoRA B read its output."""
    import torch

    from .trial import target_nll, target_positions

    layers = lora_modules(peft_model)
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


def run_probe(model, anat, train_set, cfg, seed: int, pad_id: int, device="cpu") -> tuple[list[tuple], dict]:
    """One probe seed on ``model`` (left pristine): rows (block, role, module, criterion, score) and info."""
    import torch

    from .data import batches
    from .workspace import weights_fingerprint
    from .placement import apply, get_strategy, resolve
    from .trial import train

    p, t = cfg.probe, cfg.train
    before = weights_fingerprint(model)
    t0 = time.perf_counter()
    torch.manual_seed(seed)  # adapter init (lora_A) and data order, as a trial of this seed
    placement = resolve(get_strategy("all_linear"), anat, rank=p.rank, alpha=t.alpha * p.rank / t.rank)
    peft_model = apply(model, placement, dropout=0.0)
    try:
        layers = lora_modules(peft_model)
        grad_sum = {n: torch.zeros((), dtype=torch.float64, device=device) for n in layers}
        fisher_sum = {n: torch.zeros((), dtype=torch.float64, device=device) for n in layers}
        steps = {n: 0 for n in layers}
        handles = []

        def on_b(name):
            def fn(g):  # fires once per backward, before clipping
                grad_sum[name] += g.detach().double().norm()
                fisher_sum[name] += g.detach().double().pow(2).sum()
                steps[name] += 1
            return fn

        def on_a(name):
            def fn(g):
                fisher_sum[name] += g.detach().double().pow(2).sum()
            return fn

        for n, layer in layers.items():
            handles.append(layer.lora_B["default"].weight.register_hook(on_b(n)))
            handles.append(layer.lora_A["default"].weight.register_hook(on_a(n)))
        spec = replace(t, steps=p.steps, epochs=None, lr=p.lr if p.lr is not None else t.lr, dropout=0.0)
        try:
            curve, _ = train(peft_model, train_set, spec, seed, pad_id, device, desc=f"probe seed {seed}")
        finally:
            for h in handles:
                h.remove()
        scoring = []
        for batch in batches(train_set, t.batch_size, seed=0, pad_id=pad_id):  # the same batches for every seed
            scoring.append(batch)
            if len(scoring) == p.score_batches:
                break
        drop = lora_drop(peft_model, scoring, device)
    finally:
        peft_model.unload()  # removes the LoRA layers without merging
    if weights_fingerprint(model) != before:
        from .workspace import BaseWeightsChanged

        raise BaseWeightsChanged(f"base weights changed during probe seed {seed}: refusing to continue")
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

