"""Benchmark and findings: forgetting per strategy in finished studies, on the base-model set and on a text file.

Usage::

    python benchmarks/bench_forgetting.py studies/bench-race/default-full --pydoc-text /tmp/pydoc.jsonl \\
        --json forgetting_default.json     # or --text FILE: your own general or in-house corpus

For each study directory: resumes the study (every trial is done, so nothing trains) first with
``eval.forgetting_source=base`` and then with the text file, which measures forgetting on each set from the
saved adapters (``measure.forgetting.backfill``); prints per strategy the forgetting (mean and 95% interval across
seeds, nats/token), its paired delta against the baseline, the improvement over the base model, and the cost
(the set's build time, the mean forgetting pass per trial). The study directory is left holding the last
source's measure.
"""

from __future__ import annotations

import argparse
import json
import random
import re

from loraplace.analysis.from_store import analyze_store
from loraplace.core.config import StudyConfig
from loraplace.study.run import run_study
from loraplace.store.db import DONE, Store


def measure(study_dir: str, source: str) -> dict:
    with Store.open(study_dir, create=False) as store:
        saved = store.study_config()
    cfg = StudyConfig.from_dict({**saved.to_dict(), "out": study_dir})
    cfg.eval.forgetting, cfg.eval.forgetting_source = True, source
    run_study(cfg)
    with Store.open(study_dir, create=False) as store:
        a = analyze_store(store)
        meta = {k: v for k, v in (store.get_meta("forgetting") or {}).items() if k != "sequences"}
        done = [t for t in store.current_trials() if t.status == DONE]
        times = [t.metrics.get("forgetting_time_s") for t in done]
        per_seed = {}
        for t in done:
            if "forgetting" in t.metrics:
                per_seed.setdefault(t.strategy, {})[int(t.seed)] = float(t.metrics["forgetting"])
    rows = {}
    for s in a.strategies:
        if s.forgetting is None:
            continue
        q = s.metrics[a.metric]
        rows[s.strategy] = {
            "trainable_params": s.mean("trainable_params"),
            "forgetting": [s.forgetting.mean, s.forgetting.half],
            "forgetting_per_seed": per_seed.get(s.strategy, {}),
            "delta_vs_baseline": None if s.paired_forgetting is None else
            [s.paired_forgetting.diff.mean, s.paired_forgetting.diff.half, bool(s.paired_forgetting.significant)],
            "improvement": a.zero_shot - q.mean if a.metric == "eval_loss" else q.mean - a.zero_shot,
            "retained": None if s.retained is None else [s.retained.mean, s.retained.half],
        }
    times = [t for t in times if t is not None]
    return {"source": source, "set": meta, "forgetting_time_s_mean": sum(times) / len(times) if times else None,
            "strategies": rows, "least_forgetting": a.least_forgetting}


def pydoc_text(path: str, size: int = 64, seed: int = 0) -> str:
    """Write ``size`` prose paragraphs of Python's own documentation (``pydoc_data.topics``, shipped with
    CPython, PSF licence) as a jsonl of ``{"text": ...}``: general technical English at hand offline, not a
    domain any study trains on. Prose only: paragraphs of at least 300 characters with no indented (code or
    grammar) lines and no reST markup lines."""
    from pydoc_data.topics import topics

    paras = []
    for name in sorted(topics):
        for para in re.split(r"\n\s*\n", topics[name]):
            lines = para.split("\n")
            if any(ln.startswith(" ") or set(ln.strip()) <= set("*=-") for ln in lines):
                continue
            text = " ".join(ln.strip() for ln in lines)
            if len(text) >= 300:
                paras.append(text)
    random.Random(seed).shuffle(paras)
    with open(path, "w") as f:
        for text in paras[:size]:
            f.write(json.dumps({"text": text}) + "\n")
    return path


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("studies", nargs="+", help="finished study directories (with saved adapters)")
    p.add_argument("--text", default=None, help="a general text file for the file measure (e.g. jsonl with 'text')")
    p.add_argument("--pydoc-text", default=None, metavar="PATH",
                   help="write a general-English file from Python's documentation prose here and use it as --text")
    p.add_argument("--json", default=None)
    args = p.parse_args()
    if args.pydoc_text:
        args.text = pydoc_text(args.pydoc_text)
    out = {}
    for d in args.studies:
        out[d] = [measure(d, "base")]
        if args.text:
            out[d].append(measure(d, args.text))
    print(json.dumps(out, indent=2))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=2)


if __name__ == "__main__":
    main()
