"""The report from a store with known numbers: files, embedded figures, table values, terminal table,
and a headless-Chromium rendering of report.html (skipped where Chromium is not installed)."""

import base64
import html
import math
import re
import shutil
import subprocess

import pytest
from PIL import Image

from loraplace.analysis.decision import cost_rule
from loraplace.analysis.report import write_report
from loraplace.analysis.from_store import analyze_store
from loraplace.analysis.tables import summary_table, summary_text
from loraplace.store.db import Store, StoreError
from fake_study import ACC, PLAN, T975_DF2, ZA, ZS, make_study  # noqa: F401

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.mark.slow
def test_report_files_and_embedded_figures(tmp_path):
    paths = write_report(make_study(tmp_path))
    assert paths["dir"] == tmp_path / "report"
    figures = ("pareto", "decision", "curves", "placement_map", "costs")
    for key in ("markdown", "html", "tables", "methods", "methods_tex", *figures):
        assert paths[key].is_file() and paths[key].parent == tmp_path / "report", key
    page = paths["html"].read_text()
    uris = re.findall(r'src="data:image/png;base64,([A-Za-z0-9+/=]+)"', page)
    assert len(uris) == len(figures)
    assert all(base64.b64decode(u)[:8] == b"\x89PNG\r\n\x1a\n" for u in uris)
    assert "http://" not in page and "https://" not in page  # nothing fetched from the network
    assert "<script" not in page and "<link" not in page
    assert "<table" in page and "attention_only" in page
    assert "top_half seed 9 failed: RuntimeError: out of memory" in page

    md = paths["markdown"].read_text()
    assert "![pareto](pareto.png)" in md and "| Strategy | Seeds |" in md
    assert "## Recommendation" in md and "failed: RuntimeError: out of memory" in md
    # what "cheaper" meant, right under the recommendation, and in the methods paragraph
    lines = md.splitlines()
    rec = lines.index("## Recommendation")
    assert lines[rec + 2].startswith("**Use ") and lines[rec + 4] == f"*{cost_rule()}*"
    assert f'<p class="cost">{html.escape(cost_rule())}</p>' in page
    assert cost_rule() in paths["methods"].read_text()


@pytest.mark.slow
def test_figures_are_not_blank(tmp_path):
    paths = write_report(make_study(tmp_path))
    for key in ("pareto", "decision", "curves", "placement_map", "costs"):
        im = Image.open(paths[key]).convert("RGB")
        assert im.width >= 800 and im.height >= 400, key
        colours = im.getcolors(maxcolors=1 << 20)
        assert len(colours) > 20, key  # lines, markers, text: not a blank canvas
        white = max(c for c, rgb in colours if rgb == (255, 255, 255))
        assert white < 0.97 * im.width * im.height, key


def test_table_values_by_hand(tmp_path):
    make_study(tmp_path)
    with Store.open(tmp_path, create=False) as store:
        a = analyze_store(store)
    text = summary_table(a)
    lines = text.splitlines()
    assert len({len(line) for line in lines}) == 1  # aligned columns
    assert lines[0].startswith("Strategy") and len(lines) == 2 + 3

    losses = [2.01, 2.03, 2.05]  # attention_only
    mean = sum(losses) / 3
    sd = math.sqrt(sum((x - mean) ** 2 for x in losses) / 2)
    half = T975_DF2 * sd / math.sqrt(3)
    row = next(line for line in lines if line.startswith("attention_only"))
    assert f"{mean:.4f} ± {half:.4f}" in row
    # paired deltas are all exactly +0.01: zero spread, the interval collapses on the mean
    assert "+0.0100" in row
    assert a.recommendation.decided and a.recommendation.strategy == "attention_only"
    assert "top_half" in a.pareto_params and a.config.model == "tiny-llama"
    out = summary_text(a)
    assert "Recommendation: Use attention_only" in out and "top_half seed 9" in out


def test_threshold_override(tmp_path):
    make_study(tmp_path)
    with Store.open(tmp_path, create=False) as store:
        a = analyze_store(store, threshold=0.5)
    # top_half keeps (3-2.40)/(3-2.00)=60%, 55/98=56%, 53/96=55%: above 50%, and it is the cheapest
    assert a.threshold == 0.5 and a.recommendation.strategy == "top_half"


@pytest.mark.slow
def test_one_seed_report_says_no_interval(tmp_path):
    paths = write_report(make_study(tmp_path, seeds=(0,)))
    md = paths["markdown"].read_text()
    assert "Cannot decide" in md and "no interval" in md
    assert " ± " not in md.split("## Results")[1].split("## Figures")[0].split("\n\n")[1]  # table rows


@pytest.mark.slow
def test_no_zero_shot(tmp_path):
    paths = write_report(make_study(tmp_path, zero_shot=False))
    md = paths["markdown"].read_text()
    assert "Zero-shot eval loss:** not recorded" in md and "zero-shot loss of the base model is unknown" in md


def test_missing_study_raises(tmp_path):
    with pytest.raises(StoreError):
        write_report(tmp_path / "nothing")
    assert not (tmp_path / "nothing" / "report").exists()


def test_report_renders_in_chromium(tmp_path):
    if CHROMIUM is None:
        pytest.skip("chromium not installed: `apt-get install -y chromium` enables the report-rendering test")
    paths = write_report(make_study(tmp_path / "study"))
    shot = tmp_path / "shot.png"
    flags = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
             "--disable-background-networking", "--disable-component-update", "--disable-sync",
             f"--user-data-dir={tmp_path / 'profile'}"]
    url = paths["html"].resolve().as_uri()
    subprocess.run(flags + [f"--screenshot={shot}", "--window-size=1200,2000", url],
                   capture_output=True, timeout=120)
    assert shot.is_file(), "chromium wrote no screenshot"
    im = Image.open(shot).convert("RGB")
    assert im.size == (1200, 2000)
    colours = im.getcolors(maxcolors=1 << 22)
    assert len(colours) > 100  # text, table rules and figure antialiasing
    non_white = sum(c for c, rgb in colours if sum(rgb) < 720)
    assert non_white > 0.03 * 1200 * 2000
    # the Pareto figure sits in the first 2000 px: its bluish-green markers (#009E73) prove the
    # embedded PNG was decoded and drawn (the page's CSS uses no green)
    green = sum(c for c, (r, g, b) in colours if r < 60 and 130 < g < 180 and 90 < b < 140)
    assert green > 30
    dom = subprocess.run(flags + ["--dump-dom", url], capture_output=True, text=True, timeout=120).stdout
    assert dom.count("<tr") >= 4 and "attention_only" in dom  # header + one row per strategy


def test_study_without_finished_trials(tmp_path):
    store = Store.open(tmp_path)
    store.add_pending("x", "all_linear", 0, {})
    store.mark_failed("x", "boom")
    store.close()
    paths = write_report(tmp_path)
    md = paths["markdown"].read_text()
    assert "no finished trial" in md and "all_linear seed 0 failed: boom" in md
    assert all(paths[k].is_file() for k in ("pareto", "curves", "placement_map", "costs"))


@pytest.mark.slow
def test_accuracy_columns_and_the_metric_decides(tmp_path):
    make_study(tmp_path, accuracy=True)
    with Store.open(tmp_path, create=False) as store:
        by_loss, by_acc = analyze_store(store), analyze_store(store, metric="accuracy")
    assert by_loss.recommendation.strategy == "attention_only"  # the study config's metric: eval_loss
    # on accuracy attention_only keeps (0.30-0.20)/(0.60-0.20) = 25%; top_half keeps 105% and is cheapest
    assert by_acc.recommendation.strategy == "top_half" and "in accuracy" in by_acc.recommendation.text
    lines = summary_table(by_acc).splitlines()
    assert "Accuracy" in lines[0] and "Δ accuracy vs baseline" in lines[0] and "Retained improvement (accuracy)" in lines[0]
    row = next(line for line in lines if line.startswith("attention_only"))
    half = T975_DF2 * 0.02 / math.sqrt(3)  # accuracies 0.30, 0.32, 0.34: sd 0.02
    assert f"32.0 ± {100 * half:.1f}%" in row
    assert "  -30.0 " in row  # paired: 0.30-0.60, 0.32-0.62, 0.34-0.64
    r = [0.10 / 0.40, 0.12 / 0.42, 0.14 / 0.44]  # retained: (acc - 0.20) / (acc_baseline - 0.20)
    rm = sum(r) / 3
    rhalf = T975_DF2 * math.sqrt(sum((x - rm) ** 2 for x in r) / 2) / math.sqrt(3)
    assert f"{100 * rm:.1f} ± {100 * rhalf:.1f}%" in row
    out = summary_text(by_acc)
    assert "Decided on: accuracy (analysis.metric=accuracy)" in out and "Recommendation: Use top_half" in out

    paths = write_report(tmp_path, metric="accuracy")
    md = paths["markdown"].read_text()
    assert "analysis.metric=accuracy" in md and "**Zero-shot accuracy:** 20.0% of 50 examples" in md
    assert "Use top_half" in md and "![accuracy](accuracy.png)" in md
    assert paths["accuracy"].is_file() and paths["accuracy"].parent == tmp_path / "report"
    page = paths["html"].read_text()
    shown = [k for k, v in paths.items() if str(v).endswith(".png")]
    assert len(re.findall(r'src="data:image/png;base64,', page)) == len(shown) == 6 and "Δ accuracy vs baseline" in page
    im = Image.open(paths["accuracy"]).convert("RGB")
    colours = im.getcolors(maxcolors=1 << 20)
    assert len(colours) > 20 and max(c for c, rgb in colours if rgb == (255, 255, 255)) < 0.97 * im.width * im.height


def test_study_config_metric_and_one_seed_wilson(tmp_path):
    make_study(tmp_path, seeds=(0,), accuracy=True, metric="accuracy")
    with Store.open(tmp_path, create=False) as store:
        a = analyze_store(store)
    assert a.metric == "accuracy" and a.zero_shot_accuracy == ZA
    row = next(line for line in summary_table(a).splitlines() if line.startswith("attention_only"))
    # 0.30 on 50 examples: Wilson centre (0.30 + z²/100) / (1 + z²/50) = 0.314270,
    # half z / (1 + z²/50) * sqrt(0.30 * 0.70 / 50 + z²/10000) = 0.123233, z = 1.959964
    assert "30.0% [19.1, 43.8]" in row
    assert "Wilson" in summary_text(a)


@pytest.mark.slow
def test_accuracy_metric_on_a_study_without_accuracy_is_one_line(tmp_path, capsys):
    from loraplace.cli import main

    make_study(tmp_path)
    assert main(["report", str(tmp_path), "--metric", "accuracy"]) == 2
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("loraplace: error:")]
    assert len(lines) == 1 and "analysis.metric=accuracy" in lines[0] and "Traceback" not in err
    assert not (tmp_path / "report").exists()
    assert main(["report", str(tmp_path)]) == 0  # eval_loss still works, and no accuracy figure is drawn
    assert not (tmp_path / "report" / "accuracy.png").exists() and "Accuracy" not in capsys.readouterr().out


def test_zero_shot_accuracy_over_other_examples_is_not_used(tmp_path):
    make_study(tmp_path, accuracy=True)
    with Store.open(tmp_path, create=False) as store:
        store.put_meta("zero_shot", {"eval_loss": ZS, "accuracy": ZA, "accuracy_n": 40})  # trials: 50 examples
        a = analyze_store(store, metric="accuracy")
    assert a.zero_shot_accuracy is None and a.get("top_half").retained is None
    assert any("over 40 examples but the trials' over 50" in n for n in a.notes)
    assert not a.recommendation.decided and "zero-shot accuracy of the base model is unknown" in a.recommendation.text


def test_figure_styles_stay_distinct_past_eight_strategies():
    from loraplace.analysis.style import styles

    names = [f"s{i}" for i in range(20)]
    st = styles(names)
    assert len({(v["color"], v["marker"]) for v in st.values()}) == 20
    assert [st[n]["marker"] for n in names[:8]] == [styles(names[:8])[n]["marker"] for n in names[:8]]  # unchanged
