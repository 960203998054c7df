"""The study report: results table, recommendation and figures as Markdown and self-contained HTML.

Usage::

    from loraplace.analysis.report import write_report
    paths = write_report("studies/default")     # files in studies/default/report/
    print(paths["html"])

``write_report`` reads the study's store and writes into ``STUDY_DIR/report/``: ``report.md``
(figures linked as sibling PNGs), ``report.html`` (figures embedded as base64 data URIs, inline
CSS: opens offline, can be mailed alone) and the PNGs ``pareto.png``, ``curves.png``,
``placement_map.png``, ``costs.png``, ``accuracy.png`` when the trials carry accuracy and ``probe.png``
(with a probe-verdict section) when the study ran a probe.
"""

from __future__ import annotations

import base64
import html
from pathlib import Path

from loraplace.analysis import figures
from loraplace.analysis.findings import StudyAnalysis
from loraplace.analysis.from_store import analyze_store
from loraplace.analysis.latex import tables_tex
from loraplace.analysis.methods import methods
from loraplace.analysis.tables import metric_text, probe_section, results_table, table_notes
from loraplace.core.metrics import METRICS, QUALITY
from loraplace.store.db import Store

REPORT_DIR = "report"  # inside the study directory


CAPTIONS = {
    "pareto": "Eval loss against trainable parameters (log scale) and against train time. Dashed: Pareto "
              "frontier (no other strategy is both cheaper and better); ringed: baseline; dotted: zero-shot loss; "
              "hollow: a strategy racing stopped, at its value where it stopped.",
    "accuracy": "Task accuracy (exact match of the final answer) against trainable parameters (log scale) and against "
                "train time. Dashed: Pareto frontier on accuracy; ringed: baseline; dotted: the base model's "
                "zero-shot accuracy on the same examples. With one seed the bars are 95% Wilson intervals over the "
                "examples.",
    "curves": "Training loss per optimizer step, mean over the seeds that logged each step.",
    "lr": "The learning-rate search: each strategy's loss on the selection split (training examples held out, never "
          "the eval set) at the end of training, against the peak learning rate (log scale), mean and 95% interval "
          "over the tuning seeds; star: the chosen rate; hollow: a rate halving stopped, at its value there; x on the "
          "axis: a rate that diverged. An optimum at an edge of the grid may lie outside it.",
    "decision": "What the recommendation rests on: each strategy's difference from the baseline and the share of the "
                "baseline's improvement it keeps, both paired by seed, with 95% intervals across the seeds; dashed: the "
                "threshold. The paired intervals are much narrower than the per-strategy intervals of the Pareto figure, "
                "because seed-to-seed variation that every strategy shares cancels.",
    "forgetting": "What each strategy learns (zero-shot minus eval loss, or accuracy gain) against what it forgets "
                  "(its loss minus the base model's on the forgetting set), 95% intervals across seeds; dashed: the "
                  "strategies no other beats on both.",
    "placement_map": "Adapted modules per transformer block and role; colour = LoRA rank, white = not adapted.",
    "costs": "Train time, peak memory (CPU: process RSS high-water mark; CUDA: max allocated) and adapter size.",
    "probe": "Probe scores per transformer block and role, mean over probe seeds; colour = the module's percentile "
             "rank under each criterion (darker = higher); dots: the modules auto adapts.",
}


# -- documents -------------------------------------------------------------------------------------
def _context(a: StudyAnalysis) -> list[tuple[str, str]]:
    cfg = a.config
    zs = "not recorded" if a.zero_shot_loss is None else f"{a.zero_shot_loss:.4f} nats/token"
    seeds = (cfg.seeds if cfg else None) or sorted({sd for s in a.strategies for sd in s.seeds})
    ctx = [("Model", cfg.model if cfg else "?"), ("Dataset", cfg.data.source if cfg else "?"),
           ("Baseline", a.baseline),
           ("Seeds", ", ".join(map(str, seeds))), ("Threshold", f"{100 * a.threshold:.0f}% retained improvement"),
           ("Quality metric (retained improvement, frontier, recommendation)", metric_text(a)),
           ("Zero-shot eval loss", zs)]
    if a.has_accuracy:
        n = a.zero_shot_accuracy_n
        za = "not recorded" if a.zero_shot_accuracy is None else (
            f"{100 * a.zero_shot_accuracy:.1f}%" + (f" of {n} examples" if n else ""))
        ctx.append(("Zero-shot accuracy", za))
    f = a.forgetting_info
    if f:
        on = "text sampled from the base model" if f.get("source") == "base" else str(f.get("source"))
        ctx.append(("Forgetting set", f"{on}: {f.get('size')} sequences of up to {f.get('length')} tokens, "
                                      f"{f.get('tokens', 0):,} scored tokens; base model loss {f.get('base_loss', 0):.4f} "
                                      "nats/token"))
    if a.least_forgetting:
        ctx.append(("Forgets least", a.least_forgetting))
    return ctx + [
            (f"Pareto frontier (params, {QUALITY[a.metric].label})", ", ".join(a.pareto_params) or "—"),
            (f"Pareto frontier (train time, {QUALITY[a.metric].label})", ", ".join(a.pareto_time) or "—")]


def _metric_defs(a: StudyAnalysis) -> list[tuple[str, str, str]]:
    used = {k for s in a.strategies for k in s.metrics}
    return [(k, unit or "—", meaning) for k, (unit, meaning) in METRICS.items() if k in used]


def _rate_sections(a: StudyAnalysis) -> list[tuple[str, list[str]]]:
    """The learning-rate search and its comparison at the baseline's rate, as (title, sentences); none untuned."""
    out = []
    if a.tuning is not None:
        out.append(("Learning rate", a.tuning.lines))
    if a.lr_comparison is not None:
        out.append(("Does the learning rate change the answer?", a.lr_comparison.lines))
    return out


def _problems(a: StudyAnalysis) -> list[str]:
    out = [f"{f.strategy} seed {f.seed} failed: {f.error}" for f in a.failed]
    out += [f"{f.strategy} seed {f.seed} is {f.status} (not counted)" for f in a.unfinished]
    return out + a.notes


def render_markdown(a: StudyAnalysis, figs: dict[str, Path]) -> str:
    rec = a.recommendation
    md = ["# LoRA placement study report", ""]
    md += [f"- **{k}:** {v}" for k, v in _context(a)] + ["", "## Recommendation", "",
                                                              ("**" + rec.text + "**"), ""]
    md += [f"*{rec.cost}*", ""] if rec.cost else []
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
    for title, lines in _rate_sections(a):
        md += [f"## {title}", ""] + [f"- {x}" for x in lines] + [""]
    if a.racing is not None:
        md += ["## Racing" if a.racing.raced else "## Would racing have been safe?", ""]
        md += [f"- {x}" for x in a.racing.lines] + [""]
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
.rec p.cost{font-size:.9em;font-weight:400;color:#444}
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
            f"<p>{e(rec.text)}</p>"] + ([f'<p class="cost">{e(rec.cost)}</p>'] if rec.cost else [])
    out += ["<ul>"] + [f"<li>{e(x)}</li>" for x in rec.evidence] + ["</ul></div>"]
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
    for title, lines in _rate_sections(a):
        out += [f"<h2>{e(title)}</h2>", "<ul>"] + [f"<li>{e(x)}</li>" for x in lines] + ["</ul>"]
    if a.racing is not None:
        out += [f"<h2>{'Racing' if a.racing.raced else 'Would racing have been safe?'}</h2>", "<ul>"]
        out += [f"<li>{e(x)}</li>" for x in a.racing.lines] + ["</ul>"]
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


def write_report(study_dir: str | Path, threshold: float | None = None, metric: str | None = None,
                 formats: tuple[str, ...] = ("png", "pdf")) -> dict[str, Path]:
    """Analyse the study in study_dir and write STUDY_DIR/report/: report.md, report.html, tables.tex (booktabs),
    methods.md and methods.tex (the methods paragraph), and every figure in each of ``formats`` (PNG always:
    the Markdown and HTML show it).

    threshold: retained-improvement share for the recommendation; None = the study config's
    (default 0.95). metric: eval_loss or accuracy; None = the study's analysis.metric. Returns
    {"dir", "markdown", "html", "tables", "methods", "methods_tex", figure name: its PNG path, ...}.
    Raises store.StoreError when study_dir has no study database, config.ConfigError when
    metric=accuracy and no finished trial has an accuracy."""
    study_dir = Path(study_dir)
    with Store.open(study_dir, create=False) as store:
        a = analyze_store(store, threshold, metric)
        methods_md, methods_tex = methods(a, store)
    out = study_dir / REPORT_DIR
    figs = figures.draw_all(a, out, tuple(dict.fromkeys(("png", *formats))))
    paths = {"dir": out, "markdown": out / "report.md", "html": out / "report.html", "tables": out / "tables.tex",
             "methods": out / "methods.md", "methods_tex": out / "methods.tex"}
    paths["markdown"].write_text(render_markdown(a, figs), encoding="utf-8")
    paths["html"].write_text(render_html(a, figs), encoding="utf-8")
    paths["tables"].write_text(tables_tex(a), encoding="utf-8")
    paths["methods"].write_text(methods_md, encoding="utf-8")
    paths["methods_tex"].write_text(methods_tex, encoding="utf-8")
    return {**paths, **figs}
