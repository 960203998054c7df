"""Expand a study into trials (strategies x seeds), skip finished ones, run the rest, store all.

Usage::

    cfg = StudyConfig.load("study.yaml", overrides=["seeds=[0,1,2]"])
    records = run_study(cfg)         # resumable: rerunning skips trials already done

Every trial of a study shares the model, data, split and training settings; a strategy changes
only the placement (and its ranks where the study is budget-matched). A trial is keyed by a
hash of its resolved config, so changing a shared setting makes new trials instead of
silently mixing results.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import platform
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import torch

from . import __version__
from .anatomy import Anatomy
from .answers import STOP_RULE
from .config import ConfigError, StudyConfig
from .executor import run_tasks
from .workspace import TrialTask, Workspace
from .placement import (Placement, PlacementError, auto_placement, get_strategy, is_selected, match_budget, parse_budget,
                        random_placement, resolve)
from .store import Heartbeat, Store, TrialRecord
from .trial import evaluate

log = logging.getLogger("loraplace")


def resolve_placements(cfg: StudyConfig, anat: Anatomy, scores: dict[str, float] | None = None) -> dict[str, Placement]:
    """Every strategy of the study resolved (and budget-matched when cfg.budget is set).

    ``scores`` (full module name -> the probe's ``cfg.auto.score``, mean over probe seeds) places ``auto``;
    ``auto`` and ``random:K`` fill ``selected_budget``, and ``budget: same:auto`` matches the others to auto."""
    t = cfg.train
    kw = dict(rank=t.rank, alpha=t.alpha, alpha_per_rank=t.alpha_per_rank)
    if any(is_selected(n) for n in cfg.strategies) or cfg.budget == "same:auto":
        return _with_selected(cfg, anat, scores, kw)
    strategies = {name: get_strategy(name, cfg.define) for name in cfg.strategies}
    if cfg.budget is None:
        return {name: resolve(s, anat, **kw) for name, s in strategies.items()}
    target = parse_budget(cfg.budget, anat, t.rank, cfg.define)
    return {name: match_budget(s, anat, target, **kw) for name, s in strategies.items()}


def needs_probe(cfg: StudyConfig) -> bool:
    """Whether resolving the study's placements needs probe scores (strategy auto, or budget same:auto)."""
    return "auto" in cfg.strategies or cfg.budget == "same:auto"


def selected_budget(cfg: StudyConfig, anat: Anatomy) -> int:
    """The trainable count ``auto`` and ``random:K`` are filled to: ``auto.budget``, else the study's budget."""
    spec = cfg.auto.budget if cfg.auto.budget is not None else cfg.budget
    if spec is None or spec == "same:auto":
        raise PlacementError("strategies auto and random:K need a budget: set auto.budget (e.g. same:attention_only "
                             "or 1.5M), or the study's budget to a count or same:STRATEGY")
    if is_selected(str(spec)[5:]) and str(spec).startswith("same:"):
        raise PlacementError(f"budget {spec!r}: only same:auto or same:<fixed strategy> is possible")
    return parse_budget(spec, anat, cfg.train.rank, cfg.define)


def _with_selected(cfg: StudyConfig, anat: Anatomy, scores: dict[str, float] | None, kw: dict) -> dict[str, Placement]:
    target = selected_budget(cfg, anat)
    out: dict[str, Placement] = {}
    if needs_probe(cfg):
        if not scores:
            raise PlacementError("strategy auto needs probe scores: run `loraplace probe` with the study's config "
                                 "(`loraplace study` runs it itself)")
        out["auto"] = auto_placement(anat, scores, target, **kw)
    for name in cfg.strategies:
        if name.startswith("random:") and is_selected(name):
            out[name] = random_placement(anat, int(name[7:]), target, **kw)
    if cfg.budget == "same:auto":
        fixed_target = out["auto"].trainable_params
    elif cfg.budget is not None:
        fixed_target = parse_budget(cfg.budget, anat, cfg.train.rank, cfg.define)
    else:
        fixed_target = None
    for name in cfg.strategies:
        if name not in out:
            s = get_strategy(name, cfg.define)
            out[name] = resolve(s, anat, **kw) if fixed_target is None else match_budget(s, anat, fixed_target, **kw)
    return {name: out[name] for name in cfg.strategies}


def _canonical(obj):
    """Integral floats become ints: a default of 32 and an override of 32.0 are the same setting."""
    if isinstance(obj, dict):
        return {k: _canonical(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_canonical(v) for v in obj]
    if isinstance(obj, float) and obj.is_integer():
        return int(obj)
    return obj


def trial_id(config: dict) -> str:
    return hashlib.sha256(json.dumps(_canonical(config), sort_keys=True).encode()).hexdigest()[:16]


def plan_trials(cfg: StudyConfig, placements: dict[str, Placement]) -> list[TrialTask]:
    """Every (strategy, seed) trial, keyed by a hash of what can change its numbers."""
    shared = cfg.to_dict()
    same_numbers = ("threads", "save_adapter", "device", "gradient_checkpointing", "fuse")  # not part of a trial's identity
    train = {k: v for k, v in shared["train"].items() if k not in same_numbers}
    out = []
    for seed in cfg.seeds:  # seed-major order: every strategy gets seed 0 before any gets seed 1
        for name, p in placements.items():
            config = {
                "model": cfg.model,
                "data": shared["data"],
                "train": train,
                "eval": shared["eval"],
                "strategy": name,
                "definition": p.strategy.to_dict(),
                "ranks": p.modules,
                "seed": seed,
            }
            tid = trial_id(config)
            adapter_dir = str(Path(cfg.out) / "adapters" / f"{name}-s{seed}-{tid[:8]}") if cfg.train.save_adapter else None
            out.append(TrialTask(tid, name, seed, p.modules, adapter_dir, config))
    return out


def environment(device: str) -> dict:
    import peft
    import transformers

    env = {
        "loraplace": __version__,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "peft": peft.__version__,
        "platform": platform.platform(),
        "device": device,
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
    }
    if device.startswith("cuda"):
        env["gpu"] = torch.cuda.get_device_name(torch.device(device))
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=Path(__file__).parent, capture_output=True, text=True, timeout=5
        )
        if commit.returncode == 0:
            env["git_commit"] = commit.stdout.strip()
    except (OSError, subprocess.SubprocessError):
        pass
    return env


def _claimable(t: TrialRecord) -> bool:
    return t.status == "pending" or t.claim_is_dead()


def run_study(cfg: StudyConfig, model_and_tokenizer=None) -> list[TrialRecord]:
    """Run every unfinished trial of the study; returns all trial records of the study."""
    if cfg.baseline not in cfg.strategies:  # deltas and retained improvement would have no reference
        raise ConfigError(f"baseline: {cfg.baseline!r} is not among strategies {cfg.strategies}; "
                          f"add it to strategies or set baseline= to one of them")
    tracker = None
    if cfg.track:  # before anything loads or is written: a missing package is a one-line error at once
        from .tracking import open_tracker  # MLflow / W&B load only when asked for

        tracker = open_tracker(cfg)
    store = Store.open(cfg.out)
    ws = Workspace.build(cfg, model_and_tokenizer)
    anat, train_set, eval_set = ws.anatomy, ws.train_set, ws.eval_set
    scores = None
    if needs_probe(cfg):  # auto's module set comes from the probe: run it (or reuse it) before placing
        from .probe import ensure_probe

        selected_budget(cfg, anat)  # a missing budget fails before minutes of probing
        scores = ensure_probe(cfg, ws, store).mean(cfg.auto.score)
    placements = resolve_placements(cfg, anat, scores)  # every strategy error surfaces before any training
    planned = plan_trials(cfg, placements)
    store.put_study_config(cfg, [p.trial_id for p in planned])
    store.write_file("config.yaml", cfg.to_yaml())  # rerun with: loraplace study OUT/config.yaml
    store.put_meta("anatomy", {"model_type": anat.model_type, "n_blocks": anat.n_blocks, "base_params": anat.base_params,
                               "roles": list(anat.roles_present())})
    store.put_meta("data", {"source": cfg.data.source, "eval_source": cfg.data.eval_source,
                            "train_examples": len(train_set.input_ids), "eval_examples": len(eval_set.input_ids),
                            "eval_tokens": eval_set.n_target_tokens, "dropped": train_set.dropped + eval_set.dropped})
    for p in planned:
        store.add_pending(p.trial_id, p.strategy, p.seed, p.config)
    store.requeue_failed([p.trial_id for p in planned])  # a rerun tries failed trials again
    store.reset_interrupted()  # only trials whose process is gone; another live process keeps its own

    # The base model's loss on the same eval set, once per study (and per eval set).
    zkey = trial_id({"model": cfg.model, "data": cfg.to_dict()["data"], "eval_bs": cfg.eval.batch_size})
    zero = store.get_meta("zero_shot")
    if not zero or zero.get("key") != zkey:
        log.info("evaluating the base model (zero-shot) on %d eval examples", len(eval_set.input_ids))
        zero = {**evaluate(ws.model, eval_set, cfg.eval.batch_size, ws.tokenizer.pad_token_id, ws.device), "key": zkey}
        store.put_meta("zero_shot", zero)
    scored = ws.accuracy_examples
    if cfg.eval.accuracy and not scored:
        log.warning("eval.accuracy is on but no eval example has a checkable answer; skipping accuracy")
    # ... and its accuracy on the trials' accuracy examples, kept beside it; its own key, so a change of
    # the examples or of the generation settings recomputes it (and only it).
    akey = trial_id({"zero_shot_key": zkey, "accuracy_limit": cfg.eval.accuracy_limit,
                     "max_new_tokens": cfg.eval.max_new_tokens, "stop": STOP_RULE})
    if scored and zero.get("accuracy_key") != akey:
        log.info("measuring the base model's accuracy (zero-shot) on %d examples", len(scored))
        zero = {**zero, **ws.accuracy(ws.model),
                "accuracy_key": akey}
        store.put_meta("zero_shot", zero)

    env = environment(ws.device)
    done = sum(store.get(p.trial_id).status == "done" for p in planned)
    if done:
        log.info("%d of %d trials already done; running the other %d", done, len(planned), len(planned) - done)

    with Heartbeat(cfg.out) as heartbeat:

        def claim(tid: str) -> bool:  # other processes on this directory skip what this one claims
            if not store.claim(tid):
                log.info("trial %s is done or held by another process; skipping it", tid)
                return False
            heartbeat.add(tid)
            return True

        try:
            # Passes until nothing is left to claim: a trial whose process died while this one ran
            # (or was skipped because it was held then) is picked up by the next pass.
            while True:
                todo = [p for p in planned if _claimable(store.get(p.trial_id))]
                if not todo:
                    break
                tasks = [replace(t, desc=f"[{i}/{len(todo)}] {t.strategy} seed {t.seed}") for i, t in enumerate(todo, start=1)]
                ran = 0
                for task, result, error in run_tasks(cfg, ws, tasks, on_start=claim):
                    ran += 1
                    if error is not None:
                        store.mark_failed(task.trial_id, error, env=env)
                        log.error("%s failed: %s", task.desc, error)
                    else:
                        rel = str(result.adapter_dir.relative_to(cfg.out)) if result.adapter_dir else None
                        store.mark_done(task.trial_id, result.metrics, result.curve, result.placement, env, rel)
                        m = result.metrics
                        print(
                            f"{task.desc}: eval loss {m['eval_loss']:.4f} (zero-shot {zero['eval_loss']:.4f}), "
                            f"{m['trainable_params']:,} trainable, {m['train_time_s']:.0f} s",
                            file=sys.stderr,
                        )
                    heartbeat.discard(task.trial_id)
                    if tracker is not None:  # after the store has it: tracking only mirrors the store
                        tracker.log_trial(store.get(task.trial_id))
                if not ran:
                    break
        finally:
            store.release(heartbeat.held)  # stopped early (an exception, Ctrl-C): the next run takes them
            if tracker is not None:
                tracker.close()
    records = [store.get(p.trial_id) for p in planned]
    elsewhere = sum(r.status == "running" for r in records)
    if elsewhere:
        log.info("%d trial(s) still running in other processes (see `loraplace status %s`)", elsewhere, cfg.out)
    store.close()
    return records
