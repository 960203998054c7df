"""The report from a store with known numbers: files, embedded figures, table values, terminal table,
and a headless-Chromium rendering of report.html (skipped where Chromium is not installed)."""

import base64
import math
import re
import shutil
import subprocess

import pytest
from PIL import Image

from loraplace.analysis import analyze_store
from loraplace.config import StudyConfig
from loraplace.placement import ModuleSpec, PlacementRecord
from loraplace.report import summary_table, summary_text, write_report
from loraplace.store import Store, StoreError

ZS = 3.0  # zero-shot eval loss, nats/token
T975_DF2 = 4.302652729911275  # Student t quantile 0.975, 2 degrees of freedom
NAMES = {"attn.q": "self_attn.q_proj", "attn.v": "self_attn.v_proj", "mlp.up": "mlp.up_proj",
         "mlp.down": "mlp.down_proj"}
# strategy -> (roles, blocks, trainable params, eval loss per seed 0..2, train time s)
PLAN = {
    "all_linear": (list(NAMES), range(6), 48_000, [2.00, 2.02, 2.04], 30.0),
    "attention_only": (["attn.q", "attn.v"], range(6), 24_000, [2.01, 2.03, 2.05], 20.0),
    "top_half": (list(NAMES), range(3, 6), 24_000 // 2, [2.40, 2.45, 2.47], 18.0),
}
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


def make_study(path, seeds=(0, 1, 2), zero_shot=True):
    store = Store.open(path)
    store.put_study_config(StudyConfig(model="tiny-llama", strategies=list(PLAN), seeds=list(seeds)),
                           [f"{name}-{seed}" for seed in seeds for name in PLAN] + ["top_half-9"])
    if zero_shot:
        store.put_meta("zero_shot", {"eval_loss": ZS, "perplexity": math.exp(ZS), "eval_tokens": 1000})
    for name, (roles, blocks, params, losses, time_s) in PLAN.items():
        mods = {f"model.layers.{b}.{NAMES[r]}": ModuleSpec(8, 16.0, r, b) for b in blocks for r in roles}
        placement = PlacementRecord(name, mods, "llama", 6, params, 1_000_000, dropout=0.05)
        for seed in seeds:
            tid = f"{name}-{seed}"
            store.add_pending(tid, name, seed, {})
            store.mark_running(tid)
            loss = losses[seed]
            metrics = {"eval_loss": loss, "perplexity": math.exp(loss), "trainable_params": params,
                       "base_params": 1_000_000, "trainable_pct": params / 1e4, "train_time_s": time_s + seed,
                       "peak_mem_bytes": (500 + seed) * 2**20, "adapter_bytes": params * 4, "n_modules": len(mods)}
            if zero_shot:
                metrics["zero_shot_loss"] = ZS
            curve = [[s, ZS - (ZS - loss) * (1 - math.exp(-s / 5))] for s in range(1, 31)]
            store.mark_done(tid, metrics, curve, placement, {})
    store.add_pending("top_half-9", "top_half", 9, {})
    store.mark_failed("top_half-9", "RuntimeError: out of memory")
    store.close()
    return path


def test_report_files_and_embedded_figures(tmp_path):
    paths = write_report(make_study(tmp_path))
    assert paths["dir"] == tmp_path / "report"
    for key in ("markdown", "html", "pareto", "curves", "placement_map", "costs"):
        assert paths[key].is_file() and paths[key].parent == tmp_path / "report", key
    page = paths["html"].read_text()
    uris = re.findall(r'src="data:image/png;base64,([A-Za-z0-9+/=]+)"', page)
    assert len(uris) == 4
    assert all(base64.b64decode(u)[:8] == b"\x89PNG\r\n\x1a\n" for u in uris)
    assert "http://" not in page and "https://" not in page  # nothing fetched from the network
    assert "<script" not in page and "<link" not in page
    assert "<table" in page and "attention_only" in page
    assert "top_half seed 9 failed: RuntimeError: out of memory" in page

    md = paths["markdown"].read_text()
    assert "![pareto](pareto.png)" in md and "| Strategy | Seeds |" in md
    assert "## Recommendation" in md and "failed: RuntimeError: out of memory" in md


def test_figures_are_not_blank(tmp_path):
    paths = write_report(make_study(tmp_path))
    for key in ("pareto", "curves", "placement_map", "costs"):
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


def test_one_seed_report_says_no_interval(tmp_path):
    paths = write_report(make_study(tmp_path, seeds=(0,)))
    md = paths["markdown"].read_text()
    assert "Cannot decide" in md and "no interval" in md
    assert " ± " not in md.split("## Results")[1].split("## Figures")[0].split("\n\n")[1]  # table rows


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
