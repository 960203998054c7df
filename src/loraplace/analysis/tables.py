"""The study's results as a table (terminal, Markdown, HTML) and the plain-text summary the CLI prints.

Usage::

    headers, rows = results_table(a)      # a: analysis.findings.StudyAnalysis; ± = 95% interval across seeds
    print(summary_text(a))                # table, legend, the recommendation, failures
"""

from __future__ import annotations

import math

from loraplace.analysis.findings import StudyAnalysis
from loraplace.analysis.text import NONE, accuracy_cell, interval_cell, paired_cell, retained_cell
from loraplace.core.metrics import QUALITY
from loraplace.core.text import lr_text, text_table

MIB = 2**20  # bytes per MiB


def probe_section(a: StudyAnalysis) -> tuple[str, list[str], str | None]:
    """(verdict text, evidence lines, block x role table of auto.score) for the report; ("", [], None) without a
    probe or an auto trial."""
    if a.verdict is None and a.probe is None:
        return "", [], None
    text = a.verdict.text if a.verdict is not None else "The study has a probe but no finished auto trial."
    evidence = list(a.verdict.evidence) if a.verdict is not None else []
    table = None
    if a.probe is not None:
        crit = a.config.auto.score if a.config is not None else a.probe.criteria[0]
        if crit in a.probe.criteria:
            table = f"{crit} by block and role (mean over probe seeds; ± = seed-to-seed sd as % of the mean)\n" + \
                    a.probe.table(crit)
    return text, evidence, table


def results_table(a: StudyAnalysis) -> tuple[list[str], list[list[str]]]:
    """(headers, rows) of the paper table; ± = half-width of the 95% t-interval across seeds.

    Accuracy columns appear when the trials carry accuracy; retained improvement and † follow
    the analysis metric (``a.metric``)."""
    acc = a.has_accuracy
    headers = ["Strategy", "Seeds", "Trainable params (% of base)", "LR", "Eval loss (nats/tok)", "Perplexity",
               "Δ loss vs baseline"]
    headers += ["Accuracy", "Δ accuracy vs baseline"] if acc else []
    forgets = a.has_forgetting
    headers += ["Forgetting (nats/tok)", "Δ forgetting vs baseline"] if forgets else []
    headers += [f"Retained improvement ({QUALITY[a.metric].label})", "Train time (s)", "Peak memory (MiB)"]
    costs = has_method_cost(a)
    headers += ["Method cost (s)"] if costs else []
    rows = []
    for s in a.strategies:
        params = s.mean("trainable_params")
        name = s.strategy + (" †" if s.strategy in a.pareto_params else "")
        baseline = s.strategy == a.baseline
        if s.stopped is not None:  # racing stopped it: no final quality, only what it cost until then
            rung = interval_cell(s.metrics.get(a.metric), "{:.4f}" if a.metric == "eval_loss" else "{:.3f}")
            row = [name + " (stopped)", str(len(s.seeds)),
                   NONE if math.isnan(params) else f"{params:,.0f}" + (
                       f" ({s.mean('trainable_pct'):.3f}%)" if "trainable_pct" in s.metrics else ""),
                   lr_cell(s), f"stopped at step {s.stopped['step']} ({rung} there)", NONE, NONE]
            row += [NONE, NONE] if acc else []
            row += [NONE, NONE] if forgets else []
            row += ["stopped", interval_cell(s.metrics.get("train_time_s"), "{:.1f}"),
                    interval_cell(s.metrics.get("peak_mem_bytes"), "{:.0f}", MIB)]
            row += [method_cost_cell(a, s)] if costs else []
            rows.append(row)
            continue
        row = [
            name,
            str(len(s.seeds)),
            NONE if math.isnan(params) else f"{params:,.0f}" + (
                f" ({s.mean('trainable_pct'):.3f}%)" if "trainable_pct" in s.metrics else ""),
            lr_cell(s),
            interval_cell(s.eval_loss, "{:.4f}"),
            interval_cell(s.metrics.get("perplexity"), "{:.3f}"),
            "(baseline)" if baseline else paired_cell(s.paired),
        ]
        if acc:
            row += [accuracy_cell(s.accuracy, s.wilson()),
                    "(baseline)" if baseline else paired_cell(s.paired_accuracy, "{:+.1f}", 100, " pp")]
        if forgets:
            row += [interval_cell(s.forgetting, "{:.4f}"), "(baseline)" if baseline else paired_cell(s.paired_forgetting)]
        row += [
            retained_cell(s.retained, baseline),
            interval_cell(s.metrics.get("train_time_s"), "{:.1f}"),
            interval_cell(s.metrics.get("peak_mem_bytes"), "{:.0f}", MIB),
        ]
        row += [method_cost_cell(a, s)] if costs else []
        rows.append(row)
    return headers, rows


def lr_cell(s) -> str:
    """The peak learning rate a strategy's trials trained at (its chosen one in a tuned study)."""
    return NONE if s.lr is None else lr_text(s.lr)


def has_method_cost(a: StudyAnalysis) -> bool:
    """Whether any strategy's placement cost something beside training (the table's "Method cost" column)."""
    return bool(a.choice_cost) or any("method_time_s" in s.metrics for s in a.strategies)


def method_cost_cell(a: StudyAnalysis, s) -> str:
    """AdaLoRA's allocation or PiSSA's SVDs per trial, or the once-per-study cost of choosing the placement."""
    if "method_time_s" in s.metrics:
        return interval_cell(s.metrics["method_time_s"], "{:.1f}") + " per trial"
    if s.strategy in a.choice_cost:
        return f"{a.choice_cost[s.strategy]:.1f} once"
    return ""


def table_notes(a: StudyAnalysis) -> list[str]:
    notes = ["± is the half-width of the 95% Student-t interval across seeds; a value without ± had one "
             "seed, for which no interval exists, or was identical in every seed.",
             "Δ loss vs baseline: paired by seed, strategy minus baseline (positive = worse); * = the interval "
             "excludes 0 (paired t-test p < 0.05).",
             "Retained improvement: (zero-shot loss − strategy loss) / (zero-shot loss − baseline loss), per seed."
             if a.metric == "eval_loss" else
             "Retained improvement: (strategy accuracy − zero-shot accuracy) / (baseline accuracy − zero-shot "
             "accuracy), per seed.",
             f"† = on the Pareto frontier of trainable parameters vs {QUALITY[a.metric].label}."]
    if a.has_accuracy:
        n = a.zero_shot_accuracy_n or next(
            (int(s.mean("accuracy_n")) for s in a.strategies if "accuracy_n" in s.metrics), None)
        on = f" on the same {n} examples in every trial" if n else " on the same examples in every trial"
        notes.append(f"Accuracy: exact match of the generated final answer (greedy){on}; Δ accuracy in percentage "
                     "points, paired by seed, strategy minus baseline (positive = better). With one seed, [lo, hi] "
                     "is the 95% Wilson interval over the examples: how far the number could move on other "
                     "examples of the task.")
    if a.has_forgetting:
        info = a.forgetting_info or {}
        on = ("text sampled from the base model (an estimate of KL(base || adapted) per token)"
              if info.get("source", "base") == "base" else f"{info.get('source')} (the rise in loss on that text)")
        notes.append(f"Forgetting: the adapted model's mean loss per token minus the base model's, on {on}"
                     + (f", {info['tokens']:,} tokens, the same for every trial" if info.get("tokens") else "")
                     + "; 0 = unchanged. Δ forgetting: paired by seed, strategy minus baseline (positive = forgets more).")
    if has_method_cost(a):
        notes.append("Method cost: seconds spent choosing or allocating the placement beside training: once per study "
                     "for the probe (auto strategies share it), the weights' condition numbers (kappa) and EVA's "
                     "activation SVDs (eva); per trial for AdaLoRA's rank allocation (inside its train time) and "
                     "PiSSA's SVD of every adapted weight (at its start).")
    if a.zero_shot is None:
        what = "accuracy" if a.metric == "accuracy" else "loss"
        notes.append(f"No zero-shot {what} was recorded, so retained improvement is not available.")
    return notes


def summary_table(a: StudyAnalysis) -> str:
    """Plain-text table with aligned columns, for the terminal."""
    headers, rows = results_table(a)
    return text_table(headers, rows)


def summary_text(a: StudyAnalysis) -> str:
    """Table, recommendation and failures, as the CLI prints them."""
    legend = (f"± 95% t-interval across seeds; Δ paired by seed (* significant); † on the params/{QUALITY[a.metric].label} "
              "Pareto frontier" + ("; accuracy [lo, hi]: 95% Wilson interval (one seed)" if a.has_accuracy else ""))
    parts = [summary_table(a), legend, "", f"Decided on: {metric_text(a)}",
             "Recommendation: " + a.recommendation.text]
    if a.least_forgetting:
        parts.append("Forgetting: " + a.least_forgetting)
    if a.verdict is not None:
        parts.append("Probe verdict: " + a.verdict.text)
    if a.tuning is not None:
        parts += ["Learning rate: " + line.removeprefix("Learning rate: ") for line in a.tuning.lines]
    if a.lr_comparison is not None:
        parts += ["Learning rate and the answer: " + line for line in a.lr_comparison.lines]
    if a.racing is not None:
        parts += ["Racing: " + line for line in a.racing.lines]
    if a.failed:
        failures = "; ".join(f"{f.strategy} seed {f.seed}: {f.error}" for f in a.failed)
        parts.append(f"Failed trials ({len(a.failed)}): {failures}")
    if a.unfinished:
        parts.append(f"Unfinished trials ({len(a.unfinished)}) are not counted.")
    return "\n".join(parts)


def metric_text(a: StudyAnalysis) -> str:
    """Which measure the retained improvement, fronts and recommendation used, and how to switch."""
    other = "accuracy" if a.metric == "eval_loss" else "eval_loss"
    switch = f"; `loraplace report DIR --metric {other}` decides on {QUALITY[other].label}" if a.has_accuracy else ""
    return f"{QUALITY[a.metric].label} (analysis.metric={a.metric}){switch}"
