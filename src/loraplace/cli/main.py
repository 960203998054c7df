"""The ``loraplace`` entry point: the argument parser and the one-line error rule.

Usage: ``main(["status", "studies/smoke"])`` (what ``loraplace status studies/smoke`` runs)
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import warnings

from loraplace import __version__
from loraplace.cli import commands as C
from loraplace.core.errors import LoraplaceError
from loraplace.core.metrics import METRIC_CHOICES
from loraplace.placement.export import FORMATS


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="loraplace", description="Where should the LoRA adapters go? Controlled placement studies.")
    p.add_argument("--version", action="version", version=f"loraplace {__version__}")
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging (loraplace's own messages)")
    sub = p.add_subparsers(dest="command", required=True)

    s = sub.add_parser("inspect", help="show a model's anatomy: blocks x roles, shapes, parameter counts")
    s.add_argument("--model", default="smollm2-135m", help="alias, local HF directory, .gguf file or hub id (default: smollm2-135m)")
    s.add_argument("--json", action="store_true", help="machine-readable output")
    s.set_defaults(func=C.cmd_inspect)

    s = sub.add_parser("plan", help="resolve strategies to modules and ranks, with trainable counts (no training)")
    s.add_argument("--model", default=None, help="model (default: the config's, smollm2-135m)")
    s.add_argument("--strategies", action="append", metavar="S[,S...]",
                   help="strategy names, comma-separated or repeated (default: the study's)")
    s.add_argument("--budget", help="match every strategy to a trainable count: 1e6, 2.5M, or same:STRATEGY")
    s.add_argument("--config", help="study YAML whose model, strategies, definitions and ranks to use")
    s.add_argument("--json", action="store_true", help="machine-readable output")
    s.add_argument("overrides", nargs="*", help="key=value config overrides, e.g. train.rank=8")
    s.set_defaults(func=C.cmd_plan)

    s = sub.add_parser("study", help="run a placement study (strategies x seeds); resumable")
    s.add_argument("items", nargs="*", help="an optional study YAML, then key=value overrides (e.g. seeds=[0,1,2] train.steps=60)")
    s.add_argument("--out", help="study directory (same as out=DIR)")
    s.set_defaults(func=C.cmd_study)

    s = sub.add_parser("probe", help="score every module by a short low-rank run (the scores behind strategy auto)")
    s.add_argument("items", nargs="*", help="an optional study YAML, then key=value overrides (e.g. probe.steps=20)")
    s.add_argument("--all", action="store_true", help="print the table of every criterion, not only auto.score's")
    s.set_defaults(func=C.cmd_probe)

    s = sub.add_parser("status", help="list a study's trials and their state")
    s.add_argument("study_dir")
    g = s.add_mutually_exclusive_group()
    g.add_argument("--csv", action="store_true", help="all trials and metrics as CSV")
    g.add_argument("--json", action="store_true", help="all trials as JSON")
    s.set_defaults(func=C.cmd_status)

    s = sub.add_parser("report", help="write report.md, report.html, tables.tex, methods and figures for a study")
    s.add_argument("study_dir")
    s.add_argument("--threshold", type=float, default=None, help="retained improvement needed for a recommendation (default: the study's, 0.95)")
    s.add_argument("--metric", choices=list(METRIC_CHOICES), default=None,
                   help="quality measure of retained improvement, frontier and recommendation (default: the study's "
                        "analysis.metric, eval_loss)")
    s.add_argument("--format", default="png,pdf", help="figure formats, comma-separated: png, pdf, svg (default: png,pdf; "
                                                       "PNG is always written, the report pages show it)")
    s.set_defaults(func=C.cmd_report)

    s = sub.add_parser("export", help="print a strategy's placement as a config for another tool")
    s.add_argument("study_dir")
    s.add_argument("--strategy", required=True)
    s.add_argument("--format", required=True, choices=list(FORMATS))
    s.set_defaults(func=C.cmd_export)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    # transformers' per-load "Loading weights" bars would drown our own progress bars
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    warnings.filterwarnings("ignore", message="`is_gradient_checkpointing` is deprecated")  # peft on transformers 5
    # loraplace's own messages at INFO (DEBUG with -v); other libraries' only from WARNING up: at INFO, e.g.
    # fontTools logs hundreds of lines per `report` while matplotlib's PDF backend subsets fonts
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    logging.getLogger("loraplace").setLevel(logging.DEBUG if args.verbose else logging.INFO)
    # bitsandbytes.backends.cpu.ops warns at import (peft imports it whenever it is installed) that it cannot fetch
    # a hub kernel for the AVX512-BF16 inference path, which loraplace turns off anyway (model/quantize.py)
    for noisy in ("transformers", "peft", "httpx", "huggingface_hub", "bitsandbytes.backends.cpu.ops"):
        logging.getLogger(noisy).setLevel(logging.ERROR)
    try:
        return args.func(args)
    except LoraplaceError as e:  # every error a user can cause: one line, no traceback
        print(f"loraplace: error: {e}", file=sys.stderr)
        return 2
    except BrokenPipeError:  # e.g. `loraplace status DIR --json | head`
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except KeyboardInterrupt:
        print("loraplace: interrupted (finished trials are kept; rerun to resume)", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
