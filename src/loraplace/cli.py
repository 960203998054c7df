"""Command line: a thin layer over the public API.

Usage::

    loraplace inspect [--model M] [--json]
    loraplace plan [--model M] [--strategies S,S,...] [--budget B] [--json] [key=value ...]
    loraplace study [CONFIG.yaml] [key=value ...]
    loraplace probe [CONFIG.yaml] [key=value ...] [--all]
    loraplace status STUDY_DIR [--csv | --json]
    loraplace report STUDY_DIR
    loraplace export STUDY_DIR --strategy S --format peft|axolotl|llamafactory|torchtune
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import warnings

from . import __version__
from .core import LoraplaceError, text_table


# -- text rendering of anatomy and placements ----------------------------------------------------
def _fmt_int(n: int) -> str:
    return f"{n:,}"


def _fmt_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} GB"


def _table(rows: list[list[str]], header: list[str], right: set[int] = frozenset()) -> str:
    return text_table(header, rows, set(right))


def anatomy_text(anat) -> str:
    roles = list(anat.roles_present())
    # Blocks with identical (role -> shape) are grouped into ranges, as most models repeat one block.
    groups: list[tuple[list[int], tuple]] = []
    for b in range(anat.n_blocks):
        sig = tuple(
            (r, tuple(f"{l.in_features}x{l.out_features}" for l in anat.layers if l.block == b and l.role == r)) for r in roles
        )
        if groups and groups[-1][1] == sig:
            groups[-1][0].append(b)
        else:
            groups.append(([b], sig))
    rows = []
    for blocks, sig in groups:
        label = str(blocks[0]) if len(blocks) == 1 else f"{blocks[0]}-{blocks[-1]}"
        rows.append([label] + [",".join(shapes) or "-" for _, shapes in sig])
    out = [
        f"{anat.model_type}: {anat.n_blocks} blocks at {anat.blocks_path}, {_fmt_int(anat.base_params)} base parameters",
        "",
        "Shapes (in x out) by block and role:",
        _table(rows, ["blocks", *roles]),
        "",
        "Totals by role:",
    ]
    by_role, params = anat.by_role(), anat.role_params()
    total_rows = [
        [r, str(len(by_role[r])), _fmt_int(params[r]), f"{100 * params[r] / anat.base_params:.1f}%"] for r in roles
    ]
    other = [l for l in anat.layers if l.role == "other"]
    if other:
        total_rows.append(["other", str(len(other)), _fmt_int(sum(l.params for l in other)), ""])
    out.append(_table(total_rows, ["role", "modules", "params", "of base"], right={1, 2, 3}))
    if anat.fixed:
        out += ["", "Inside the blocks but not adaptable (LoRA wraps nn.Linear/Conv1D layers; placements leave these out):"]
        out.append(_fixed_table(anat))
    if anat.outside:
        out += ["", "Outside the blocks (never adapted by default):"]
        out.append(_table([[l.name, l.role, l.kind, f"{l.in_features}x{l.out_features}", _fmt_int(l.params),
                            f"tied to {l.tied_to} (counted once)" if l.tied_to else ""] for l in anat.outside],
                          ["module", "role", "kind", "shape", "params", ""], right={4}))
    return "\n".join(out)


def _fixed_table(anat) -> str:
    rows = []
    for role, params in anat.fixed_params().items():
        fs = [f for f in anat.fixed if f.role == role]
        shapes = " + ".join("x".join(map(str, sh)) for sh in fs[0].shapes)
        rows.append([role, fs[0].kind, str(len(fs)), shapes, _fmt_int(params),
                     f"{100 * params / anat.base_params:.1f}%", fs[0].reason])
    return _table(rows, ["role", "module", "modules", "shapes", "params", "of base", "why not adapted"], right={2, 4, 5})


_RANK_SYMBOLS = "#abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ"


def placement_map(placement, anat) -> str:
    """Roles x blocks grid: a symbol per distinct rank where adapted (legend below), '.' where not."""
    roles = list(anat.roles_present())
    where = {(anat.layer(n).role, anat.layer(n).block): r for n, r in placement.modules.items()}
    ranks = sorted(set(placement.modules.values()))
    symbol = {r: ("#" if len(ranks) == 1 else _RANK_SYMBOLS[1 + i % 52]) for i, r in enumerate(ranks)}
    width = max(len(r) for r in roles)
    lines = [" " * width + "  blocks 0" + (f"..{anat.n_blocks - 1}" if anat.n_blocks > 1 else "")]
    for role in roles:
        cells = ["." if (role, b) not in where else symbol[where[(role, b)]] for b in range(anat.n_blocks)]
        lines.append(f"{role.ljust(width)}  {''.join(cells)}")
    legend = ", ".join(f"{symbol[r]} rank {r}" for r in ranks)
    return "\n".join(lines + [f"{' ' * width}  ({legend}; . not adapted)"])


# -- commands ----------------------------------------------------------------------------------
def cmd_inspect(args) -> int:
    from .anatomy import analyze
    from .models import skeleton

    anat = analyze(skeleton(args.model))  # config only: no weights, no tokenizer
    print(json.dumps(anat.to_dict(), indent=2) if args.json else anatomy_text(anat))
    return 0


def cmd_plan(args) -> int:
    from .anatomy import analyze
    from .config import StudyConfig
    from .estimate import estimate
    from .models import skeleton
    from .placement import is_selected, parse_budget
    from .study import needs_probe, resolve_placements, selected_budget

    cfg = StudyConfig.load(args.config, overrides=args.overrides)
    if args.strategies:
        cfg.strategies = [s for item in args.strategies for s in item.split(",") if s]
    if args.budget:
        cfg.budget = args.budget
    cfg.check()
    anat = analyze(skeleton(args.model or cfg.model))  # config only: no weights, no tokenizer
    skipped = _drop_unplaceable(cfg, anat) if anat.fixed else {}
    probe = _stored_probe(cfg) if needs_probe(cfg) else None
    placements = resolve_placements(cfg, anat, probe.mean(cfg.auto.score) if probe else None)
    t = cfg.train
    ests = {name: estimate(p, t.batch_size, cfg.data.max_length, t.dtype, t.gradient_checkpointing)
            for name, p in placements.items()}
    if args.json:
        print(json.dumps({name: {**p.to_dict(), "adapter_bytes": p.adapter_bytes(), "estimate": ests[name].to_dict()}
                          for name, p in placements.items()}, indent=2))
        return 0
    rows = [
        [name, str(len(p.modules)), _fmt_int(p.trainable_params), f"{p.trainable_pct:.3f}%", _fmt_bytes(p.adapter_bytes()),
         _rank_text(p), _fmt_bytes(ests[name].peak_bytes), _fmt_bytes(ests[name].cpu_rss_bytes),
         _fmt_gflop(ests[name].flops_per_step)]
        for name, p in placements.items()
    ]
    print(f"{anat.model_type}, {anat.n_blocks} blocks, {_fmt_int(anat.base_params)} base parameters (adapters excluded)")
    selected = [n for n in placements if is_selected(n)]
    if selected:
        print(f"{', '.join(selected)} filled to {cfg.auto.budget or cfg.budget} = "
              f"{_fmt_int(selected_budget(cfg, anat))} trainable parameters (within 5%)")
    if cfg.budget:
        target = (placements["auto"].trainable_params if cfg.budget == "same:auto"
                  else parse_budget(cfg.budget, anat, cfg.train.rank, cfg.define))
        print(f"budget-matched to {cfg.budget} = {_fmt_int(target)} trainable parameters (within 5%)")
    print(_table(rows, ["strategy", "modules", "trainable", "of base", "adapter (fp32)", "ranks", "est. peak mem",
                        "est. CPU RSS", "GFLOP/step"], right={1, 2, 3, 4, 6, 7, 8}))
    print(f"\nEstimated peak training memory at batch {t.batch_size} x {cfg.data.max_length} tokens, {t.dtype}"
          f"{', gradient checkpointing' if t.gradient_checkpointing else ''}, every position a target (upper bound):")
    terms = list(next(iter(ests.values())).terms)
    per_example = {n: (e.terms["activations"] + e.terms["logits"]) / t.batch_size for n, e in ests.items()}
    print(_table([[name, *(_fmt_bytes(e.terms[k]) for k in terms), _fmt_bytes(e.peak_bytes), _fmt_bytes(per_example[name])]
                  for name, e in ests.items()],
                 ["strategy", *terms, "peak", "per example"], right=set(range(1, len(terms) + 3))))
    print("(activations and logits grow with batch size x length: each example of the batch adds 'per example')")
    for name, why in skipped.items():
        print(f"skipped {name}: {why}")
    for note in sorted({n for e in ests.values() for n in e.notes}):
        print(f"note: {note}")
    if anat.fixed:
        print("\nNot adaptable, so no strategy places LoRA there:")
        print(_fixed_table(anat))
    for name, p in placements.items():
        print(f"\n{name}: {p.strategy.description or p.strategy.to_dict()}")
        print(placement_map(p, anat))
        if name == "auto" and probe is not None:
            print(auto_why(p, probe, cfg.auto.score))
    return 0


def _stored_probe(cfg):
    """The probe matching cfg, from the study directory cfg.out; a one-line error when it is not there."""
    from .placement import PlacementError
    from .probe import load, probe_key
    from .store import DB_NAME, Store

    key = probe_key(cfg)
    hint = (f"strategy auto needs the probe's scores, and {cfg.out} holds none for these settings: run "
            f"`loraplace probe` with the same config and out= first (`loraplace study` runs it itself)")
    if not os.path.exists(os.path.join(cfg.out, DB_NAME)):
        raise PlacementError(hint)
    with Store.open(cfg.out, create=False) as store:
        probe = load(store, key)
    if probe is None or not set(cfg.probe.seeds) <= set(probe.seeds):
        raise PlacementError(hint)
    return probe.only(cfg.probe.seeds)


def auto_why(placement, probe, criterion: str, top: int = 5) -> str:
    """Why auto chose what it chose: the score cut-off, the best chosen and the best left-out modules."""
    mean = probe.mean(criterion)
    order = sorted(mean, key=lambda n: (-mean[n], n))
    chosen = [n for n in order if n in placement.modules]
    left = [n for n in order if n not in placement.modules]
    lines = [f"auto chose {len(chosen)} of {len(order)} modules by {criterion} (mean over probe seeds "
             f"{', '.join(map(str, probe.seeds))}); lowest chosen score {mean[chosen[-1]]:.4g}"
             + (f", highest left out {mean[left[0]]:.4g}" if left else "")
             + (" (a higher-scored module is left out when it does not fit the rest of the budget)"
                if left and mean[left[0]] > mean[chosen[-1]] else "")]
    lines += [f"  chosen   {mean[n]:10.4g}  {n}" for n in chosen[:top]]
    lines += [f"  left out {mean[n]:10.4g}  {n}" for n in left[:top]]
    return "\n".join(lines)


def cmd_probe(args) -> int:
    from .config import StudyConfig
    from .workspace import Workspace
    from .probe import ensure_probe
    from .store import Store

    config_path, overrides = _config_and_overrides(args.items)
    cfg = StudyConfig.load(config_path, overrides=overrides)
    ws = Workspace.build(cfg)
    with Store.open(cfg.out) as store:
        probe = ensure_probe(cfg, ws, store)
    criteria = [cfg.auto.score] + [c for c in probe.criteria if c != cfg.auto.score]
    print(f"Probe {probe.key}: rank {cfg.probe.rank}, {cfg.probe.steps} steps per seed, seeds "
          f"{', '.join(map(str, probe.seeds))}, {probe.time_s:.0f} s in all (stored in {cfg.out}/study.db)")
    for c in criteria if args.all else criteria[:1]:
        print(f"\n{c} by block and role (mean over probe seeds; ± = seed-to-seed sd as % of the mean):")
        print(probe.table(c))
    print()
    for c in criteria:
        print(probe.summary(c))
    return 0


def _config_and_overrides(items: list[str]) -> tuple[str | None, list[str]]:
    """[CONFIG.yaml] then key=value items, as ``study`` and ``probe`` take them."""
    config_path, overrides = None, []
    for item in items:
        if "=" in item:
            overrides.append(item)
        elif config_path is None:
            config_path = item
        else:
            raise _config_error(f"more than one config file given ({config_path}, {item}); use key=value for overrides")
    return config_path, overrides


def _fmt_gflop(flops: float) -> str:
    g = flops / 1e9
    return f"{g:,.0f}" if g >= 10 else f"{g:.2g}"


def _drop_unplaceable(cfg, anat) -> dict[str, str]:
    """On a model with unadaptable block weights (MoE experts), strategies that match nothing are left out of the
    plan, with the reason, instead of failing it; if none is left, the first reason is the error."""
    from .placement import PlacementError, get_strategy, is_selected, resolve

    skipped = {}
    for name in list(cfg.strategies):
        if is_selected(name):  # auto / random:K choose among the adaptable modules themselves
            continue
        try:
            resolve(get_strategy(name, cfg.define), anat, rank=cfg.train.rank)
        except PlacementError as e:
            skipped[name] = str(e)
    if len(skipped) == len(cfg.strategies):
        raise PlacementError(next(iter(skipped.values())))
    cfg.strategies = [s for s in cfg.strategies if s not in skipped]
    if cfg.baseline in skipped:
        cfg.baseline = cfg.strategies[0]
    return skipped


def _rank_text(p) -> str:
    ranks = sorted(set(p.modules.values()))
    return str(ranks[0]) if len(ranks) == 1 else f"{ranks[0]}-{ranks[-1]}"


def cmd_study(args) -> int:
    from .config import StudyConfig
    from .study import run_study

    config_path, overrides = _config_and_overrides(args.items)
    if args.out:
        overrides.append(f"out={args.out}")
    cfg = StudyConfig.load(config_path, overrides=overrides)
    records = run_study(cfg)
    print(_summary(cfg.out))
    failed = [r for r in records if r.status == "failed"]
    print(f"\nStudy stored in {cfg.out}/study.db; `loraplace report {cfg.out}` writes the report.")
    return 1 if failed and len(failed) == len(records) else 0


def _config_error(msg: str):
    from .config import ConfigError

    return ConfigError(msg)


def _summary(study_dir: str, threshold: float | None = None, metric: str | None = None) -> str:
    from .analysis import analyze_store
    from .report import summary_text
    from .store import Store

    with Store.open(study_dir, create=False) as store:
        return summary_text(analyze_store(store, threshold=threshold, metric=metric))


def cmd_status(args) -> int:
    from .store import Store

    with Store.open(args.study_dir, create=False) as store:
        if args.csv:
            sys.stdout.write(store.export_csv())
            return 0
        if args.json:
            print(store.export_json())
            return 0
        rows, gone = [], 0
        for t in store.trials():
            m = t.metrics
            rows.append([t.strategy, str(t.seed), t.status, f"{m['eval_loss']:.4f}" if "eval_loss" in m else "",
                         f"{m['train_time_s']:.0f} s" if "train_time_s" in m else "", t.trial_id, _holder(t),
                         (t.error or "")[:70]])
            gone += t.claim_is_dead()
        if not rows:
            print(f"{args.study_dir}: no trials yet")
            return 0
        print(_table(rows, ["strategy", "seed", "status", "eval loss", "train time", "trial", "held by", "error"],
                     right={1, 3, 4}))
        counts = {s: sum(r[2] == s for r in rows) for s in ("done", "failed", "running", "pending")}
        print("\n" + ", ".join(f"{n} {s}" for s, n in counts.items() if n))
        if gone:
            print(f"{gone} running trial(s) belong to a process that is gone; the next `loraplace study` reruns them.")
    return 0


def _holder(t) -> str:
    """Who runs a running trial: ``pid@host, beat 4 s ago`` (``gone`` when that process is dead)."""
    if t.status != "running":
        return ""
    if not t.owner:
        return "gone (no owner)"
    age = t.heartbeat_age_s()
    return f"{t.owner}, beat {age:.0f} s ago" + (" (gone)" if t.claim_is_dead() else "")


def cmd_report(args) -> int:
    from .report import write_report

    paths = write_report(args.study_dir, threshold=args.threshold, metric=args.metric)
    from .tracking import log_report  # imports MLflow only if the study is tracked

    log_report(args.study_dir, paths)
    print(_summary(args.study_dir, args.threshold, args.metric))
    print()
    for kind, path in paths.items():
        print(f"{kind}: {path}")
    return 0


def cmd_export(args) -> int:
    from .export import export, placement_for
    from .store import Store

    with Store.open(args.study_dir, create=False) as store:
        placement = placement_for(store, args.strategy)
    print(export(placement, args.format))
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="loraplace", description="Where should the LoRA adapters go? Controlled placement studies.")
    p.add_argument("--version", action="version", version=f"loraplace {__version__}")
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = p.add_subparsers(dest="command", required=True)

    s = sub.add_parser("inspect", help="show a model's anatomy: blocks x roles, shapes, parameter counts")
    s.add_argument("--model", default="smollm2-135m", help="alias, local HF directory, .gguf file or hub id (default: smollm2-135m)")
    s.add_argument("--json", action="store_true", help="machine-readable output")
    s.set_defaults(func=cmd_inspect)

    s = sub.add_parser("plan", help="resolve strategies to modules and ranks, with trainable counts (no training)")
    s.add_argument("--model", default=None, help="model (default: the config's, smollm2-135m)")
    s.add_argument("--strategies", action="append", metavar="S[,S...]",
                   help="strategy names, comma-separated or repeated (default: the study's)")
    s.add_argument("--budget", help="match every strategy to a trainable count: 1e6, 2.5M, or same:STRATEGY")
    s.add_argument("--config", help="study YAML whose model, strategies, definitions and ranks to use")
    s.add_argument("--json", action="store_true", help="machine-readable output")
    s.add_argument("overrides", nargs="*", help="key=value config overrides, e.g. train.rank=8")
    s.set_defaults(func=cmd_plan)

    s = sub.add_parser("study", help="run a placement study (strategies x seeds); resumable")
    s.add_argument("items", nargs="*", help="an optional study YAML, then key=value overrides (e.g. seeds=[0,1,2] train.steps=60)")
    s.add_argument("--out", help="study directory (same as out=DIR)")
    s.set_defaults(func=cmd_study)

    s = sub.add_parser("probe", help="score every module by a short low-rank run (the scores behind strategy auto)")
    s.add_argument("items", nargs="*", help="an optional study YAML, then key=value overrides (e.g. probe.steps=20)")
    s.add_argument("--all", action="store_true", help="print the table of every criterion, not only auto.score's")
    s.set_defaults(func=cmd_probe)

    s = sub.add_parser("status", help="list a study's trials and their state")
    s.add_argument("study_dir")
    g = s.add_mutually_exclusive_group()
    g.add_argument("--csv", action="store_true", help="all trials and metrics as CSV")
    g.add_argument("--json", action="store_true", help="all trials as JSON")
    s.set_defaults(func=cmd_status)

    s = sub.add_parser("report", help="write report.md, report.html and figures for a study")
    s.add_argument("study_dir")
    s.add_argument("--threshold", type=float, default=None, help="retained improvement needed for a recommendation (default: the study's, 0.95)")
    s.add_argument("--metric", choices=["eval_loss", "accuracy"], default=None,
                   help="quality measure of retained improvement, frontier and recommendation (default: the study's "
                        "analysis.metric, eval_loss)")
    s.set_defaults(func=cmd_report)

    s = sub.add_parser("export", help="print a strategy's placement as a config for another tool")
    s.add_argument("study_dir")
    s.add_argument("--strategy", required=True)
    s.add_argument("--format", required=True, choices=["peft", "axolotl", "llamafactory", "torchtune"])
    s.set_defaults(func=cmd_export)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    # transformers' per-load "Loading weights" bars would drown our own progress bars
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    warnings.filterwarnings("ignore", message="`is_gradient_checkpointing` is deprecated")  # peft on transformers 5
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, format="%(message)s")
    for noisy in ("transformers", "peft", "httpx", "huggingface_hub"):
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
