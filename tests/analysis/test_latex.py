"""Paper-ready output: tables.tex whose every number is the analysis's, that compiles with only booktabs; the
figures as vector PDF beside the PNG, from the same figure; a methods paragraph taken from the store."""

from __future__ import annotations

import re
import shutil
import subprocess

import pytest
from fake_study import PLAN, ZS, make_study

from loraplace.analysis import figures
from loraplace.analysis.latex import escape, params
from loraplace.analysis.report import write_report
from loraplace.analysis.from_store import analyze_store
from loraplace.core.text import lr_text
from loraplace.store.db import Store

PDFLATEX = shutil.which("pdflatex")
BOOKTABS = PDFLATEX and subprocess.run(["kpsewhich", "booktabs.sty"], capture_output=True, text=True).stdout.strip()


def _rows(tex: str, label: str) -> dict[str, list[str]]:
    """The body rows of the table labelled ``label``: first cell (LaTeX-escaped name) -> the other cells."""
    table = tex[:tex.index(f"\\label{{{label}}}")].rsplit("\\begin{table}", 1)[1]
    body = table.split("\\midrule", 1)[1].split("\\bottomrule", 1)[0]
    rows = [[c.strip() for c in line.rstrip("\\ ").split("&")] for line in body.strip().splitlines()]
    return {r[0]: r[1:] for r in rows}


def _numbers(cell: str) -> list[float]:
    return [float(x) for x in re.findall(r"[-+]?\d+\.\d+|[-+]?\d+", cell.replace("{,}", ""))]


@pytest.mark.slow
def test_every_number_in_tables_tex_is_the_analysis(tmp_path):
    paths = write_report(make_study(tmp_path, accuracy=True))
    tex = paths["tables"].read_text()
    assert "\\toprule" in tex and "\\midrule" in tex and "\\bottomrule" in tex
    with Store.open(tmp_path, create=False) as store:
        a = analyze_store(store)
    results = _rows(tex, "tab:loraplace-results")
    header = tex.split("\\toprule", 1)[1].split("\\\\", 1)[0]
    cols = [c.strip() for c in header.split("&")][1:]
    assert cols[:4] == ["Params", "LR", "Eval loss", "Accuracy (\\%)"] and "Retained (\\%)" in cols
    assert set(results) == {escape(s.strategy) for s in a.strategies}
    best_loss = min(a.strategies, key=lambda s: s.eval_loss.mean).strategy
    for s in a.strategies:
        row = dict(zip(cols, results[escape(s.strategy)]))
        assert row["Params"] == params(s.mean("trainable_params"))
        assert _numbers(row["Eval loss"]) == [round(s.eval_loss.mean, 4), round(s.eval_loss.half, 4)]
        assert _numbers(row["Accuracy (\\%)"]) == [round(100 * s.accuracy.mean, 1), round(100 * s.accuracy.half, 1)]
        assert ("\\mathbf" in row["Eval loss"]) == (s.strategy == best_loss)  # lower loss is better
        if s.strategy == a.baseline:
            assert row["Retained (\\%)"] == "100 (ref.)"
        else:
            assert _numbers(row["Retained (\\%)"]) == [round(100 * s.retained.mean, 1), round(100 * s.retained.half, 1)]
    deltas = _rows(tex, "tab:loraplace-deltas")
    assert escape(a.baseline) not in deltas
    for s in a.strategies:
        if s.strategy == a.baseline:
            continue
        cell = deltas[escape(s.strategy)][0]
        assert _numbers(cell.replace("^{\\dagger}", ""))[:2] == [round(s.paired.diff.mean, 4), round(s.paired.diff.half, 4)]
        assert ("\\dagger" in cell) == bool(s.paired.significant)
    assert "top\\_half" in tex and "top_half" not in tex.replace("top\\_half", "")  # names escaped for LaTeX
    assert "\\label{tab:loraplace-results}" in tex and "$^{\\dagger}$: the interval excludes 0" in tex


@pytest.mark.skipif(not BOOKTABS, reason="no TeX engine with booktabs here (e.g. apt-get install texlive-latex-recommended)")
def test_tables_and_methods_compile_in_a_minimal_document(tmp_path):
    paths = write_report(make_study(tmp_path / "study"))
    doc = tmp_path / "paper.tex"
    doc.write_text("\\documentclass{article}\n\\usepackage{booktabs}\n\\begin{document}\n"
                   f"\\input{{{paths['methods_tex']}}}\n\\input{{{paths['tables']}}}\n\\end{{document}}\n")
    proc = subprocess.run([PDFLATEX, "-interaction=nonstopmode", "-halt-on-error", doc.name], cwd=tmp_path,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout[-3000:]
    pdf = tmp_path / "paper.pdf"
    assert pdf.read_bytes().startswith(b"%PDF")
    if shutil.which("pdfinfo"):  # poppler-utils: the page count read back
        info = subprocess.run(["pdfinfo", str(pdf)], capture_output=True, text=True).stdout
        assert int(re.search(r"Pages:\s+(\d+)", info).group(1)) >= 1


@pytest.mark.slow
def test_figures_are_also_vector_pdfs_of_the_same_figure(tmp_path, monkeypatch):
    saved = []
    real = figures.Figure.savefig

    def spy(fig, path, **kw):
        saved.append((id(fig), str(path).rsplit(".", 1)[1]))
        return real(fig, path, **kw)

    monkeypatch.setattr(figures.Figure, "savefig", spy)
    paths = write_report(make_study(tmp_path), formats=("pdf", "svg"))
    names = ["pareto", "decision", "curves", "placement_map", "costs"]
    for name in names:
        for fmt in ("png", "pdf", "svg"):
            assert (tmp_path / "report" / f"{name}.{fmt}").is_file(), (name, fmt)
        assert paths[name].suffix == ".png"
        pdf = (tmp_path / "report" / f"{name}.pdf").read_bytes()
        assert pdf.startswith(b"%PDF") and len(re.findall(rb"/Type\s*/Page[^s]", pdf)) == 1  # one page
        assert b"/FontFile2" in pdf  # TrueType fonts embedded (pdf.fonttype 42)
    by_fig: dict[int, set[str]] = {}
    for fig, fmt in saved:
        by_fig.setdefault(fig, set()).add(fmt)
    assert len(by_fig) == len(names) and all(f == {"png", "pdf", "svg"} for f in by_fig.values())  # one figure each


@pytest.mark.slow
def test_methods_paragraph_is_read_from_the_store(tmp_path):
    paths = write_report(make_study(tmp_path))
    md = paths["methods"].read_text()
    with Store.open(tmp_path, create=False) as store:
        cfg = store.study_config()
    assert f"{cfg.train.steps} optimizer steps of {cfg.train.batch_size} examples" in md
    assert f"peak learning rate {lr_text(cfg.train.lr)}, shared by every strategy and not tuned" in md and "3 seeds (0, 1, 2)" in md
    assert f"(the base model's: {ZS:.4f} nats/token)" in md
    for name, (_, _, n, _, _) in PLAN.items():
        assert f"`{name}` ({n:,} trainable parameters" in md
    tex = paths["methods_tex"].read_text()
    assert "\\texttt{all\\_linear}" in tex and "`" not in tex


def test_bad_figure_format_is_one_line(tmp_path, capsys):
    from loraplace.cli import main

    make_study(tmp_path)
    assert main(["report", str(tmp_path), "--format", "png,gif"]) == 2
    assert "--format: gif is not a figure format; choose from png, pdf, svg" in capsys.readouterr().err
