"""A study's analysis from its open database: ``analysis.study.analyze`` over the latest config's trials, with
what the store adds (config, zero-shot values, forgetting set, probe, placement costs, racing, the probe verdict).

Usage::

    with Store.open("studies/smoke", create=False) as store:
        a = analyze_store(store)            # StudyAnalysis; threshold= and metric= override the study's
    a.recommendation.text, a.racing.lines, a.verdict.text

Reads only; torch-free, like the read-only commands that call it (``report``, the study's summary).
"""

from __future__ import annotations

from dataclasses import replace

from loraplace.analysis.findings import StudyAnalysis
from loraplace.analysis.racing import racing
from loraplace.analysis.study import analyze, reanalyze
from loraplace.analysis.tuning import compare, final_trials, summarize, trials_at, untuned_note
from loraplace.analysis.verdict import probe_verdict
from loraplace.core.config import StudyConfig
from loraplace.core.names import AUTO, EVA, KAPPA, is_auto
from loraplace.measure.probe_scores import load as load_probe
from loraplace.store.db import DONE, Store
from loraplace.study.race import decisions


def choice_cost(strategies: list[str], probe, store: Store) -> dict[str, float]:
    """Seconds each data-driven strategy's placement cost once per study, from the store: the probe's seeds for
    ``auto`` (every auto strategy shares them), the condition numbers for ``kappa``, every EVA run for ``eva``."""
    out = {}
    for name in strategies:
        if is_auto(name) and probe is not None:
            out[name] = probe.time_s
        elif name in (KAPPA, EVA) and (meta := store.get_meta(name)):
            out[name] = float(meta.get("time_s", 0.0))
    return out


def analyze_store(store: Store, threshold: float | None = None, metric: str | None = None) -> StudyAnalysis:
    """``analyze`` over an open ``store.db.Store``; threshold None = the study config's, metric None = the study
    config's ``analysis.metric``.

    Only the trials of the study's latest config count: a directory reused with other settings
    keeps its older trials in the database, but they are never mixed into the statistics.
    """
    cfg = store.study_config() or StudyConfig()  # a store without a config (never run): the defaults
    zero = store.get_meta("zero_shot")
    trials = store.current_trials()
    zero = zero if isinstance(zero, dict) else {}
    zero_acc, stale = zero.get("accuracy"), None
    ns = {int(t.metrics["accuracy_n"]) for t in trials if t.status == DONE and "accuracy_n" in t.metrics}
    if zero_acc is not None and ns and zero.get("accuracy_n") not in ns:
        stale = (f"The stored zero-shot accuracy is over {zero.get('accuracy_n')} examples but the trials' over "
                 f"{', '.join(map(str, sorted(ns)))}; it is not used (rerun `loraplace study` to measure it again).")
        zero_acc = None
    forgetting = store.get_meta("forgetting")
    if forgetting:  # forgetting measured on another set (other settings) is not comparable: left out
        trials = [t if t.measured.get("forgetting") == forgetting["key"] else
                  replace(t, metrics={k: v for k, v in t.metrics.items() if not k.startswith("forgetting")})
                  for t in trials]
    tune = store.get_meta("tune")
    everything, trials = trials, final_trials(trials, tune)  # the answer rests on each strategy's chosen rate
    a = analyze(trials, cfg.baseline, zero.get("eval_loss"), cfg.threshold if threshold is None else float(threshold),
                order=cfg.strategies, metric=cfg.analysis.metric if metric is None else metric,
                zero_shot_accuracy=zero_acc, max_forgetting=cfg.analysis.max_forgetting)
    a.tuning = summarize(everything, tune, a.metric)
    if a.tuning is None and len(a.strategies) > 1:
        a.recommendation.text += untuned_note(cfg.train.lr, str(store.directory))
    base_lr = a.tuning.chosen(cfg.baseline) if a.tuning is not None else None
    if base_lr is not None:
        shared = trials_at(everything, base_lr)
        at_rate = reanalyze(a, shared) if any(t.strategy != cfg.baseline for t in shared) else None
        a.lr_comparison = compare(a, at_rate, base_lr, cfg.strategies)
    if forgetting:
        a.forgetting_info = {k: v for k, v in forgetting.items() if k != "sequences"}
    a.config = cfg
    a.zero_shot_accuracy_n = zero.get("accuracy_n") if zero_acc is not None else None
    if stale:
        a.notes.append(stale)
    a.probe = load_probe(store)
    a.choice_cost = choice_cost(cfg.strategies, a.probe, store)
    a.racing = racing(a, trials, decisions(store))
    autos = sorted((n for n in cfg.strategies if is_auto(n)), key=lambda n: n != AUTO)  # auto itself first
    name = autos[0] if autos else AUTO
    a.verdict = probe_verdict(trials, a.zero_shot, reference="all_linear" if a.get("all_linear") else cfg.baseline,
                              probe=a.probe, criterion=cfg.auto.settings(name)[1], metric=a.metric, name=name)
    return a
