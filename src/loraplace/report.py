"""The study report: results table, recommendation and figures as Markdown and self-contained HTML.

Usage::

    from loraplace.report import write_report, summary_text
    paths = write_report("studies/default")     # files in studies/default/report/
    print(paths["html"])

``write_report`` reads the study's store and writes into ``STUDY_DIR/report/``: ``report.md``
(figures linked as sibling PNGs), ``report.html`` (figures embedded as base64 data URIs, inline
CSS: opens offline, can be mailed alone) and the PNGs ``pareto.png``, ``curves.png``,
``placement_map.png``, ``costs.png``, ``accuracy.png`` when the trials carry accuracy and ``probe.png`` (with a probe-verdict
section) when the study ran a probe. ``summary_table`` / ``summary_text`` give the plain-text
table for terminals.
"""

from __future__ import annotations

import base64
import html
import math
from pathlib import Path

from .analysis import LABELS, Interval, StrategyStats, StudyAnalysis, analyze_store
from .core import text_table
from .metrics import METRICS
from .store import Store

REPORT_DIR = "report"  # inside the study directory
MIB = 2**20
CAPTIONS = {
    "pareto": "Eval loss against trainable parameters (log scale) and against train time. Dashed: Pareto "
              "frontier (no other strategy is both cheaper and better); ringed: baseline; dotted: zero-shot loss.",
    "accuracy": "Task accuracy (exact match of the final answer) against trainable parameters (log scale) and against "
                "train time. Dashed: Pareto frontier on accuracy; ringed: baseline; dotted: the base model's "
                "zero-shot accuracy on the same examples. With one seed the bars are 95% Wilson intervals over the "
                "examples.",
    "curves": "Training loss per optimizer step, mean over the seeds that logged each step.",
    "placement_map": "Adapted modules per transformer block and role; colour = LoRA rank, white = not adapted.",
    "costs": "Train time, peak memory (CPU: process RSS high-water mark; CUDA: max allocated) and adapter size.",
    "probe": "Probe scores per transformer block and role, mean over probe seeds; colour = the module's percentile "
             "rank under each criterion (darker = higher); dots: the modules auto adapts.",
}


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


# -- tables ----------------------------------------------------------------------------------------
def _iv(iv: Interval | None, fmt: str, scale: float = 1.0) -> str:
    if iv is None:
        return "—"
    m = fmt.format(iv.mean / scale)
    # no interval (n=1) or a zero-width one (identical across seeds, e.g. parameter counts): mean only
    return m if iv.lo is None or iv.half == 0 else f"{m} ± {fmt.format(iv.half / scale)}"


def _paired_text(a: StudyAnalysis, name: str, which: str, scale: float = 1.0, fmt: str = "{:+.4f}", unit: str = "") -> str:
    """A paired delta vs the baseline (``which``: "paired" or "paired_accuracy"): 'mean ± half*' with its unit."""
    s = a.get(name)
    if name == a.baseline:
        return "(baseline)"
    paired = getattr(s, which, None) if s is not None else None
    if paired is None:
        return "—"
    d = paired.diff
    if d.lo is None:
        return fmt.format(scale * d.mean) + unit
    half = fmt.replace("+", "").format(scale * d.half)  # the same precision, no sign
    return f"{fmt.format(scale * d.mean)} ± {half}{unit}" + ("*" if paired.significant else "")


def _delta(a: StudyAnalysis, name: str) -> str:
    return _paired_text(a, name, "paired")


def _accuracy(s: StrategyStats) -> str:
    """'42.0 ± 3.1%' across seeds; one seed: '42.0% [29.3, 55.9]' (95% Wilson interval over the examples)."""
    acc = s.accuracy
    if acc is None:
        return "—"
    w = s.wilson()
    if w is not None:
        return f"{100 * acc.mean:.1f}% [{100 * w[0]:.1f}, {100 * w[1]:.1f}]"
    if acc.lo is None or acc.half == 0:
        return f"{100 * acc.mean:.1f}%"
    return f"{100 * acc.mean:.1f} ± {100 * acc.half:.1f}%"


def _delta_accuracy(a: StudyAnalysis, name: str) -> str:
    return _paired_text(a, name, "paired_accuracy", scale=100, fmt="{:+.1f}", unit=" pp")


def results_table(a: StudyAnalysis) -> tuple[list[str], list[list[str]]]:
    """(headers, rows) of the paper table; ± = half-width of the 95% t-interval across seeds.

    Accuracy columns appear when the trials carry accuracy; retained improvement and † follow
    the analysis metric (``a.metric``)."""
    acc = a.has_accuracy
    headers = ["Strategy", "Seeds", "Trainable params (% of base)", "Eval loss (nats/tok)", "Perplexity",
               "Δ loss vs baseline"]
    headers += ["Accuracy", "Δ accuracy vs baseline"] if acc else []
    headers += [f"Retained improvement ({LABELS[a.metric]})", "Train time (s)", "Peak memory (MiB)"]
    rows = []
    for s in a.strategies:
        params = s.mean("trainable_params")
        name = s.strategy + (" †" if s.strategy in a.pareto_params else "")
        row = [
            name,
            str(len(s.seeds)),
            "—" if math.isnan(params) else f"{params:,.0f}" + (
                f" ({s.mean('trainable_pct'):.3f}%)" if "trainable_pct" in s.metrics else ""),
            _iv(s.eval_loss, "{:.4f}"),
            _iv(s.metrics.get("perplexity"), "{:.3f}"),
            _delta(a, s.strategy),
        ]
        row += [_accuracy(s), _delta_accuracy(a, s.strategy)] if acc else []
        row += [
            "100% (ref.)" if s.strategy == a.baseline and s.retained is not None else "—" if s.retained is None else (
                f"{100 * s.retained.mean:.1f}%" if s.retained.lo is None
                else f"{100 * s.retained.mean:.1f} ± {100 * s.retained.half:.1f}%"),
            _iv(s.metrics.get("train_time_s"), "{:.1f}"),
            _iv(s.metrics.get("peak_mem_bytes"), "{:.0f}", MIB),
        ]
        rows.append(row)
    return headers, rows


def table_notes(a: StudyAnalysis) -> list[str]:
    notes = ["± is the half-width of the 95% Student-t interval across seeds; a value without ± had one "
             "seed, for which no interval exists, or was identical in every seed.",
             "Δ loss vs baseline: paired by seed, strategy minus baseline (positive = worse); * = the interval "
             "excludes 0 (paired t-test p < 0.05).",
             "Retained improvement: (zero-shot loss − strategy loss) / (zero-shot loss − baseline loss), per seed."
             if a.metric == "eval_loss" else
             "Retained improvement: (strategy accuracy − zero-shot accuracy) / (baseline accuracy − zero-shot "
             "accuracy), per seed.",
             f"† = on the Pareto frontier of trainable parameters vs {LABELS[a.metric]}."]
    if a.has_accuracy:
        n = a.zero_shot_accuracy_n or next(
            (int(s.mean("accuracy_n")) for s in a.strategies if "accuracy_n" in s.metrics), None)
        on = f" on the same {n} examples in every trial" if n else " on the same examples in every trial"
        notes.append(f"Accuracy: exact match of the generated final answer (greedy){on}; Δ accuracy in percentage "
                     "points, paired by seed, strategy minus baseline (positive = better). With one seed, [lo, hi] "
                     "is the 95% Wilson interval over the examples: how far the number could move on other "
                     "examples of the task.")
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
    legend = (f"± 95% t-interval across seeds; Δ paired by seed (* significant); † on the params/{LABELS[a.metric]} "
              "Pareto frontier" + ("; accuracy [lo, hi]: 95% Wilson interval (one seed)" if a.has_accuracy else ""))
    parts = [summary_table(a), legend, "", f"Decided on: {_metric_text(a)}",
             "Recommendation: " + a.recommendation.text]
    if a.verdict is not None:
        parts.append("Probe verdict: " + a.verdict.text)
    if a.failed:
        failures = "; ".join(f"{f.strategy} seed {f.seed}: {f.error}" for f in a.failed)
        parts.append(f"Failed trials ({len(a.failed)}): {failures}")
    if a.unfinished:
        parts.append(f"Unfinished trials ({len(a.unfinished)}) are not counted.")
    return "\n".join(parts)


def _metric_text(a: StudyAnalysis) -> str:
    """Which measure the retained improvement, fronts and recommendation used, and how to switch."""
    other = "accuracy" if a.metric == "eval_loss" else "eval_loss"
    switch = f"; `loraplace report DIR --metric {other}` decides on {LABELS[other]}" if a.has_accuracy else ""
    return f"{LABELS[a.metric]} (analysis.metric={a.metric}){switch}"


# -- documents -------------------------------------------------------------------------------------
def _context(a: StudyAnalysis) -> list[tuple[str, str]]:
    cfg = a.config
    zs = "not recorded" if a.zero_shot_loss is None else f"{a.zero_shot_loss:.4f} nats/token"
    seeds = (cfg.seeds if cfg else None) or sorted({sd for s in a.strategies for sd in s.seeds})
    ctx = [("Model", cfg.model if cfg else "?"), ("Dataset", cfg.data.source if cfg else "?"),
           ("Baseline", a.baseline),
           ("Seeds", ", ".join(map(str, seeds))), ("Threshold", f"{100 * a.threshold:.0f}% retained improvement"),
           ("Quality metric (retained improvement, frontier, recommendation)", _metric_text(a)),
           ("Zero-shot eval loss", zs)]
    if a.has_accuracy:
        n = a.zero_shot_accuracy_n
        za = "not recorded" if a.zero_shot_accuracy is None else (
            f"{100 * a.zero_shot_accuracy:.1f}%" + (f" of {n} examples" if n else ""))
        ctx.append(("Zero-shot accuracy", za))
    return ctx + [
            (f"Pareto frontier (params, {LABELS[a.metric]})", ", ".join(a.pareto_params) or "—"),
            (f"Pareto frontier (train time, {LABELS[a.metric]})", ", ".join(a.pareto_time) or "—")]


def _metric_defs(a: StudyAnalysis) -> list[tuple[str, str, str]]:
    used = {k for s in a.strategies for k in s.metrics}
    return [(k, unit or "—", meaning) for k, (unit, meaning) in METRICS.items() if k in used]


def _problems(a: StudyAnalysis) -> list[str]:
    out = [f"{f.strategy} seed {f.seed} failed: {f.error}" for f in a.failed]
    out += [f"{f.strategy} seed {f.seed} is {f.status} (not counted)" for f in a.unfinished]
    return out + a.notes


def render_markdown(a: StudyAnalysis, figs: dict[str, Path]) -> str:
    rec = a.recommendation
    md = ["# LoRA placement study report", ""]
    md += [f"- **{k}:** {v}" for k, v in _context(a)] + ["", "## Recommendation", "",
                                                              ("**" + rec.text + "**"), ""]
    md += ["Evidence:", ""] + [f"- {e}" for e in rec.evidence] + ["", "## Results", ""]
    headers, rows = results_table(a)
    md += ["| " + " | ".join(headers) + " |", "|" + "|".join(["---"] + ["---:"] * (len(headers) - 1)) + "|"]
    md += ["| " + " | ".join(r) + " |" for r in rows] + [""] + [f"- {n}" for n in table_notes(a)] + [""]
    verdict, evidence, ptable = probe_section(a)
    if verdict:
        md += ["## Probe verdict: auto vs random at equal budget", "", f"**{verdict}**", ""]
        md += [f"- {x}" for x in evidence] + [""]
        if ptable:
            md += ["```", ptable, "```", ""]
    md += ["## Figures", ""]
    for name, path in figs.items():
        md += [f"![{name}]({path.name})", "", f"*{CAPTIONS.get(name, name)}*", ""]
    problems = _problems(a)
    if problems:
        md += ["## Failed trials and notes", ""] + [f"- {p}" for p in problems] + [""]
    md += ["## Metric definitions", "", "| Metric | Unit | Meaning |", "|---|---|---|"]
    md += [f"| {k} | {u} | {m} |" for k, u, m in _metric_defs(a)]
    return "\n".join(md) + "\n"


CSS = """
body{font-family:system-ui,-apple-system,'Segoe UI',Helvetica,Arial,sans-serif;max-width:1200px;margin:24px auto;
padding:0 16px;color:#1a1a1a;line-height:1.45}
h1{font-size:1.7em;margin-bottom:.3em}h2{border-bottom:1px solid #ccc;padding-bottom:4px;margin-top:1.6em}
dl.ctx{display:grid;grid-template-columns:max-content auto;gap:2px 16px}dl.ctx dt{font-weight:600}dl.ctx dd{margin:0}
.rec{border-left:6px solid #0072B2;background:#eef5fb;padding:10px 16px;margin:12px 0}
.rec.undecided{border-left-color:#D55E00;background:#fdf1ea}.rec p{font-size:1.1em;font-weight:600;margin:.3em 0}
.scroll{overflow-x:auto}table{border-collapse:collapse;font-size:.88em;margin:8px 0}
th,td{border:1px solid #bbb;padding:4px 8px}th{background:#f0f0f0}td:first-child{white-space:nowrap}
td.num{text-align:right;font-variant-numeric:tabular-nums;white-space:nowrap}
tr.base td{font-weight:600}figure{margin:18px 0}figure img{max-width:100%;border:1px solid #ddd}
figcaption{font-size:.92em;color:#444}.notes{font-size:.9em;color:#333}
"""


def _img_uri(path: Path) -> str:
    return "data:image/png;base64," + base64.b64encode(Path(path).read_bytes()).decode("ascii")


def render_html(a: StudyAnalysis, figs: dict[str, Path]) -> str:
    e = html.escape
    rec = a.recommendation
    out = ["<!DOCTYPE html>", '<html lang="en"><head><meta charset="utf-8">',
           "<title>LoRA placement study report</title>", f"<style>{CSS}</style></head><body>",
           "<h1>LoRA placement study report</h1>", '<dl class="ctx">']
    out += [f"<dt>{e(k)}</dt><dd>{e(v)}</dd>" for k, v in _context(a)] + ["</dl>"]
    out += ["<h2>Recommendation</h2>", f'<div class="rec{"" if rec.decided else " undecided"}">',
            f"<p>{e(rec.text)}</p>", "<ul>"] + [f"<li>{e(x)}</li>" for x in rec.evidence] + ["</ul></div>"]
    headers, rows = results_table(a)
    out += ["<h2>Results</h2>", '<div class="scroll"><table><thead><tr>']
    out += [f"<th>{e(h)}</th>" for h in headers] + ["</tr></thead><tbody>"]
    for s, r in zip(a.strategies, rows):
        cls = ' class="base"' if s.strategy == a.baseline else ""
        cells = [f"<td>{e(r[0])}</td>"] + [f'<td class="num">{e(c)}</td>' for c in r[1:]]
        out.append(f"<tr{cls}>" + "".join(cells) + "</tr>")
    out += ["</tbody></table></div>", '<ul class="notes">'] + [f"<li>{e(n)}</li>" for n in table_notes(a)] + ["</ul>"]
    verdict, evidence, ptable = probe_section(a)
    if verdict:
        out += ["<h2>Probe verdict: auto vs random at equal budget</h2>", '<div class="rec">', f"<p>{e(verdict)}</p>",
                "<ul>"] + [f"<li>{e(x)}</li>" for x in evidence] + ["</ul></div>"]
        if ptable:
            out.append(f'<div class="scroll"><pre>{e(ptable)}</pre></div>')
    out.append("<h2>Figures</h2>")
    for name, path in figs.items():
        out.append(f'<figure><img alt="{e(name)}" src="{_img_uri(path)}">'
                   f"<figcaption>{e(CAPTIONS.get(name, name))}</figcaption></figure>")
    problems = _problems(a)
    if problems:
        out += ["<h2>Failed trials and notes</h2>", "<ul>"] + [f"<li>{e(p)}</li>" for p in problems] + ["</ul>"]
    out += ["<h2>Metric definitions</h2>",
            "<table><thead><tr><th>Metric</th><th>Unit</th><th>Meaning</th></tr></thead><tbody>"]
    out += [f"<tr><td>{e(k)}</td><td>{e(u)}</td><td>{e(m)}</td></tr>" for k, u, m in _metric_defs(a)]
    out += ["</tbody></table>", "</body></html>"]
    return "\n".join(out) + "\n"


def write_report(study_dir: str | Path, threshold: float | None = None, metric: str | None = None) -> dict[str, Path]:
    """Analyse the study in study_dir and write STUDY_DIR/report/{report.md, report.html, *.png}.

    threshold: retained-improvement share for the recommendation; None = the study config's
    (default 0.95). metric: eval_loss or accuracy; None = the study's analysis.metric. Returns
    {"dir", "markdown", "html", "pareto", ["accuracy",] "curves", "placement_map", "costs"}, plus "probe" when the study
    has probe scores.
    Raises store.StoreError when study_dir has no study database, config.ConfigError when
    metric=accuracy and no finished trial has an accuracy."""
    study_dir = Path(study_dir)
    with Store.open(study_dir, create=False) as store:
        a = analyze_store(store, threshold, metric)
    out = study_dir / REPORT_DIR
    from . import figures  # matplotlib loads only when figures are drawn

    figs = figures.draw_all(a, out)
    md, page = out / "report.md", out / "report.html"
    md.write_text(render_markdown(a, figs), encoding="utf-8")
    page.write_text(render_html(a, figs), encoding="utf-8")
    return {"dir": out, "markdown": md, "html": page, **figs}
