"""A study from start to end: plan its trials, skip finished ones, run the rest, store every outcome.

Usage::

    cfg = StudyConfig.load("study.yaml", overrides=["seeds=[0,1,2]"])
    records = run_study(cfg)         # resumable: rerunning skips trials already done

Every trial of a study shares the model, data, split and training settings; a strategy changes
only the placement (and its ranks where the study is budget-matched). The base model's own loss (and
accuracy) on the eval set is measured once per study and eval set (meta ``zero_shot``), not per trial.
"""

from __future__ import annotations

import logging
import os
import platform
import shutil
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch

from loraplace import __version__
from loraplace.core.config import ConfigError, StudyConfig
from loraplace.core.names import EVA, KAPPA
from loraplace.data.answers import STOP_RULE
from loraplace.store import claims
from loraplace.study.executor import run_tasks
from loraplace.measure import forgetting
from loraplace.study import race
from loraplace.study.plan import auto_scores, fixed_budget, needs_probe, plan_trials, resolve_placements, segment, selected_budget, trial_id
from loraplace.store.db import DONE, PAUSED, RUNNING, STOPPED, Store, TrialRecord
from loraplace.study.workspace import Workspace
from loraplace.train.loss import evaluate
from loraplace.train.memory import pick_device

log = logging.getLogger("loraplace")


def environment(device: str) -> dict:
    """Package versions, platform, device and git commit, stored with every trial."""
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


def zero_shot(cfg: StudyConfig, ws: Workspace, store: Store) -> dict:
    """The base model's loss on the eval set (and accuracy on the accuracy examples), measured once per study
    and kept in meta ``zero_shot`` under keys of what they depend on, so a change of the eval set (or of the
    accuracy examples or generation settings) measures again only what changed."""
    zkey = trial_id({"model": cfg.model, "data": cfg.to_dict()["data"], "eval_bs": cfg.eval.batch_size})
    zero = store.get_meta("zero_shot")
    if not zero or zero.get("key") != zkey:
        log.info("evaluating the base model (zero-shot) on %d eval examples", len(ws.eval_set.input_ids))
        zero = {**evaluate(ws.model, ws.eval_set, cfg.eval.batch_size, ws.tokenizer.pad_token_id, ws.device), "key": zkey}
        store.put_meta("zero_shot", zero)
    scored = ws.accuracy_examples
    if cfg.eval.accuracy and not scored:
        log.warning("eval.accuracy is on but no eval example has a checkable answer; skipping accuracy")
    akey = trial_id({"zero_shot_key": zkey, "accuracy_limit": cfg.eval.accuracy_limit,
                     "max_new_tokens": cfg.eval.max_new_tokens, "stop": STOP_RULE})
    if scored and zero.get("accuracy_key") != akey:
        log.info("measuring the base model's accuracy (zero-shot) on %d examples", len(scored))
        zero = {**zero, **ws.accuracy(ws.model), "accuracy_key": akey}
        store.put_meta("zero_shot", zero)
    return zero


def kappa_order_of(cfg: StudyConfig, ws: Workspace, store: Store) -> list[str]:
    """The adaptable modules by increasing weight condition number (PEFT's KappaTune), computed once per model and
    kept in meta ``kappa`` with the seconds the SVDs took (the method's own cost)."""
    import peft

    from loraplace.model.conditioning import kappa_order

    key = trial_id({"model": cfg.model, "kappa": "find_kappa_target_modules", "peft": peft.__version__})
    meta = store.get_meta("kappa")
    if not meta or meta.get("key") != key:
        order, seconds = kappa_order(ws.model, ws.anatomy)
        meta = {"key": key, "order": order, "time_s": seconds}
        store.put_meta("kappa", meta)
        log.info("kappa: condition numbers of %d modules (PEFT's find_kappa_target_modules) in %.1f s", len(order), seconds)
    return list(meta["order"])


def run_study(cfg: StudyConfig, model_and_tokenizer=None) -> list[TrialRecord]:
    """Run every unfinished trial of the study; returns all trial records of the study."""
    if cfg.baseline not in cfg.strategies:  # deltas and retained improvement would have no reference
        raise ConfigError(f"baseline: {cfg.baseline!r} is not among strategies {cfg.strategies}; "
                          f"add it to strategies or set baseline= to one of them")
    pick_device(cfg.train.device)  # a device this torch lacks is a one-line error before anything is written
    tracker = None
    if cfg.track:  # before anything loads or is written: a missing package is a one-line error at once
        from loraplace.study.tracking import open_tracker  # MLflow / W&B load only when asked for

        tracker = open_tracker(cfg)
    store = Store.open(cfg.out)
    ws = Workspace.build(cfg, model_and_tokenizer)
    anat, train_set, eval_set = ws.anatomy, ws.train_set, ws.eval_set
    scores = None
    if needs_probe(cfg):  # auto's module set comes from the probe: run it (or reuse it) before placing
        from loraplace.measure.probe import ensure_probe

        selected_budget(cfg, anat)  # a missing budget fails before minutes of probing
        scores = auto_scores(cfg, ensure_probe(cfg, ws, store))
    kappa = kappa_order_of(cfg, ws, store) if KAPPA in cfg.strategies else None
    if EVA in cfg.strategies:  # its ranks come from the data: resolved (or read back) before planning
        from loraplace.measure.eva import eva_init

        ws.eva = eva_init(cfg, ws, store, fixed_budget(cfg, anat))
    placements = resolve_placements(cfg, anat, scores, kappa, ws.eva)  # every strategy error surfaces before any training
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
    claims.requeue_failed(store, [p.trial_id for p in planned])  # a rerun tries failed trials again
    claims.reset_interrupted(store)  # only trials whose process is gone; another live process keeps its own
    zero = zero_shot(cfg, ws, store)
    ws.forgetting = forgetting.forgetting_set(cfg, ws, store)  # once per study: every trial scores these tokens

    env = environment(ws.device)
    total = ws.setup.total_steps
    metric_zero = zero.get("accuracy") if cfg.analysis.metric == "accuracy" else zero.get("eval_loss")
    restart_race(store, cfg)
    done = sum(store.get(p.trial_id).status == DONE for p in planned)
    if done:
        log.info("%d of %d trials already done; running the other %d", done, len(planned), len(planned) - done)

    with claims.Heartbeat(cfg.out) as heartbeat:

        def claim(tid: str) -> bool:  # other processes on this directory skip what this one claims
            if not claims.claim(store, tid):
                log.info("trial %s is done or held by another process; skipping it", tid)
                return False
            heartbeat.add(tid)
            return True

        try:
            # Passes until nothing is left to claim: a trial whose process died while this one ran
            # (or was skipped because it was held then) is picked up by the next pass; in a raced study, a pass
            # ends at a rung, the rung is decided, and the survivors go on from their checkpoints.
            while True:
                for d in race.decide_ready(store, cfg, total, metric_zero):
                    _say_decision(d)
                todo = [(p, rec) for p in planned if claims.claimable(rec := store.get(p.trial_id))]
                if not todo:
                    if any(store.get(p.trial_id).status in (RUNNING, PAUSED) for p in planned):
                        time.sleep(WAIT_S)  # another process holds a trial this rung (or the rest) waits for
                        continue
                    break
                tasks = [replace(segment(t, _resume_step(rec), total, cfg.race),
                                 desc=f"[{i}/{len(todo)}] {t.strategy} seed {t.seed}")
                         for i, (t, rec) in enumerate(todo, start=1)]
                ran = 0
                for outcome in run_tasks(cfg, ws, tasks, on_start=claim):
                    ran += 1
                    _record(cfg, store, outcome, env, zero)
                    heartbeat.discard(outcome.task.trial_id)
                    if tracker is not None and outcome.paused is None:  # tracking mirrors the store's outcomes
                        tracker.log_trial(store.get(outcome.task.trial_id))
                if not ran:
                    break
            if tracker is not None:
                for p in planned:  # stopped trials: their outcome is the race's decision
                    rec = store.get(p.trial_id)
                    if rec.status == STOPPED:
                        tracker.log_trial(rec)
            for tid in forgetting.backfill(cfg, ws, store, ws.forgetting):  # finished under other settings
                if tracker is not None:
                    tracker.remeasured(store.get(tid))
        finally:
            claims.release(store, heartbeat.held)  # stopped early (an exception, Ctrl-C): the next run takes them
            if tracker is not None:
                tracker.close()
    if not cfg.race.keep_checkpoints:
        for p in planned:
            rec = store.get(p.trial_id)
            if rec.status in (DONE, STOPPED) and p.checkpoint_dir and Path(p.checkpoint_dir).exists():
                shutil.rmtree(p.checkpoint_dir, ignore_errors=True)
    records = [store.get(p.trial_id) for p in planned]
    elsewhere = sum(r.status == RUNNING for r in records)
    if elsewhere:
        log.info("%d trial(s) still running in other processes (see `loraplace status %s`)", elsewhere, cfg.out)
    store.close()
    return records


WAIT_S = 2.0  # how often a process with nothing to claim looks again while others hold what a rung waits for


def _resume_step(rec: TrialRecord) -> int:
    """Where a claimed trial's work starts, as the store knows it (the worker checks its checkpoint)."""
    return int(rec.step) if rec.checkpoint_path and rec.step else 0


def _record(cfg: StudyConfig, store: Store, outcome, env: dict, zero: dict) -> None:
    """Store one outcome: done, failed, or paused at a rung (racing)."""
    task = outcome.task
    if outcome.error is not None:
        store.mark_failed(task.trial_id, outcome.error, env=env)
        log.error("%s failed: %s", task.desc, outcome.error)
        return
    if outcome.paused is not None:
        pause = outcome.paused
        rel = str(Path(task.checkpoint_dir).relative_to(cfg.out))
        store.mark_paused(task.trial_id, pause.step, pause.evals, rel, pause.curve, pause.metrics, pause.placement)
        ev = dict(pause.evals).get(pause.step, {})
        print(f"{task.desc}: at step {pause.step} of its run, eval loss {ev.get('eval_loss', float('nan')):.4f}; "
              "waiting for the rung's decision", file=sys.stderr)
        return
    result = outcome.result
    rel = str(result.adapter_dir.relative_to(cfg.out)) if result.adapter_dir else None
    store.mark_done(task.trial_id, result.metrics, result.curve, result.placement, env, rel, result.evals,
                    result.measured)
    m = result.metrics
    print(f"{task.desc}: eval loss {m['eval_loss']:.4f} (zero-shot {zero['eval_loss']:.4f}), "
          f"{m['trainable_params']:,} trainable, {m['train_time_s']:.0f} s", file=sys.stderr)


def _say_decision(d) -> None:
    stopped = ", ".join(d.stopped) or "none"
    print(f"race: at step {d.step} ({100 * d.fraction:.0f}% of the steps) stopped {stopped}", file=sys.stderr)
    for name, why in d.stopped.items():
        log.info("race: %s %s", name, why)


def restart_race(store: Store, cfg: StudyConfig) -> None:
    """A study run again with other racing settings (or other trials) races anew: its trials stopped or paused
    under the old decisions go back to pending, from their checkpoints where those are kept."""
    meta = store.get_meta("race")
    if not meta or meta.get("key") == race.race_key(cfg, store.trial_ids()):
        return
    ids = [t.trial_id for t in store.current_trials() if t.status in (STOPPED, PAUSED)]
    claims.requeue(store, ids)
    store.put_meta("race", {"key": race.race_key(cfg, store.trial_ids()), "decisions": []})
