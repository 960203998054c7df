"""The commands: each parses nothing (``cli.main`` does), imports what it needs, and returns an exit code.

Usage: ``cmd_status(argparse.Namespace(study_dir="studies/x", csv=False, json=False))``
"""

from __future__ import annotations

import json
import logging
import os
import sys

from loraplace.core.text import fmt_bytes, fmt_gflop, fmt_int, lr_text, text_table

log = logging.getLogger("loraplace")


# -- commands ----------------------------------------------------------------------------------
def cmd_inspect(args) -> int:
    from loraplace.cli.render import anatomy_text
    from loraplace.model.anatomy import analyze
    from loraplace.model.loading import skeleton

    anat = analyze(skeleton(args.model))  # config only: no weights, no tokenizer
    print(json.dumps(anat.to_dict(), indent=2) if args.json else anatomy_text(anat))
    return 0


def cmd_plan(args) -> int:
    from loraplace.cli.render import _fixed_table, _rank_text, _table, auto_why, placement_map
    from loraplace.core.config import StudyConfig
    from loraplace.core.names import AUTO, EVA, KAPPA, is_auto, is_random
    from loraplace.model.anatomy import analyze
    from loraplace.model.estimate import estimate
    from loraplace.model.loading import skeleton
    from loraplace.placement.resolve import BUDGET_TOLERANCE, parse_budget
    from loraplace.study.plan import SAME_AUTO, auto_scores, needs_probe, resolve_placements, selected_budget

    cfg = StudyConfig.load(args.config, overrides=args.overrides)
    if args.strategies:
        cfg.strategies = [s for item in args.strategies for s in item.split(",") if s]
    if args.budget:
        cfg.budget = args.budget
    cfg.check()
    anat = analyze(skeleton(args.model or cfg.model))  # config only: no weights, no tokenizer
    skipped = _drop_unplaceable(cfg, anat) if anat.fixed else {}
    probe = _stored_probe(cfg) if needs_probe(cfg) else None
    kappa = _kappa_order(cfg, args.model or cfg.model) if KAPPA in cfg.strategies else None
    eva = _stored_eva(cfg) if EVA in cfg.strategies else None
    if EVA in cfg.strategies and eva is None:
        skipped[EVA] = "resolved from the train data's activations when the study runs (PEFT's EVA); plan shows it then"
        cfg.strategies = [s for s in cfg.strategies if s != EVA]
    placements = resolve_placements(cfg, anat, auto_scores(cfg, probe) if probe else None, kappa, eva)
    t = cfg.train
    from loraplace.train.loss import HEAD_BYTES  # the row groups a trial's step runs in (sequential engine)

    ests = {name: estimate(p, t.batch_size, cfg.data.max_length, t.dtype, t.gradient_checkpointing,
                           quantize=cfg.quantize, head_bytes=HEAD_BYTES)
            for name, p in placements.items()}
    if args.json:
        print(json.dumps({name: {**p.to_dict(), "adapter_bytes": p.adapter_bytes(), "estimate": ests[name].to_dict()}
                          for name, p in placements.items()}, indent=2))
        return 0
    rows = [
        [name, str(len(p.modules)), fmt_int(p.trainable_params), f"{p.trainable_pct:.3f}%", fmt_bytes(p.adapter_bytes()),
         _rank_text(p), fmt_bytes(ests[name].peak_bytes), fmt_bytes(ests[name].cpu_rss_bytes),
         fmt_gflop(ests[name].flops_per_step)]
        for name, p in placements.items()
    ]
    print(f"{anat.model_type}, {anat.n_blocks} blocks, {fmt_int(anat.base_params)} base parameters (adapters excluded)")
    selected = [n for n in placements if is_auto(n) or is_random(n)]  # filled to auto's budget; kappa/eva: matched
    if selected:
        print(f"{', '.join(selected)} filled to {cfg.auto.budget or cfg.budget} = "
              f"{fmt_int(selected_budget(cfg, anat))} trainable parameters (within {BUDGET_TOLERANCE:.0%})")
    if cfg.budget:
        target = (placements[AUTO].trainable_params if cfg.budget == SAME_AUTO
                  else parse_budget(cfg.budget, anat, cfg.train.rank, cfg.define))
        print(f"budget-matched to {cfg.budget} = {fmt_int(target)} trainable parameters (within {BUDGET_TOLERANCE:.0%})")
    print(_table(rows, ["strategy", "modules", "trainable", "of base", "adapter (fp32)", "ranks", "est. peak mem",
                        "est. CPU RSS", "GFLOP/step"], right={1, 2, 3, 4, 6, 7, 8}))
    print(f"\nEstimated peak training memory at batch {t.batch_size} x {cfg.data.max_length} tokens, {t.dtype}"
          f"{f', {cfg.quantize} base' if cfg.quantize else ''}"
          f"{', gradient checkpointing' if t.gradient_checkpointing else ''}, every position a target (upper bound):")
    terms = list(next(iter(ests.values())).terms)
    per_example = {n: (e.terms["activations"] + e.terms["logits"]) / (e.group_rows or t.batch_size) for n, e in ests.items()}
    print(_table([[name, *(fmt_bytes(e.terms[k]) for k in terms), fmt_bytes(e.peak_bytes), fmt_bytes(per_example[name])]
                  for name, e in ests.items()],
                 ["strategy", *terms, "peak", "per example"], right=set(range(1, len(terms) + 3))))
    print("(activations and logits grow with batch size x length: each example of the batch adds 'per example')")
    if cfg.race.at:
        per = {n: e.checkpoint_bytes for n, e in ests.items()}
        every = sum(per.values()) * len(cfg.seeds)
        print(f"\nRacing at {', '.join(map(str, cfg.race.at))} of the steps: each trial keeps a checkpoint between rungs "
              f"(adapters and AdamW state) in {cfg.out}/checkpoints: {fmt_bytes(min(per.values()))}-"
              f"{fmt_bytes(max(per.values()))} a trial, {fmt_bytes(every)} while every trial waits at a rung "
              f"({len(cfg.seeds)} seeds); removed as trials finish or stop"
              + ("" if not cfg.race.keep_checkpoints else " (race.keep_checkpoints=true: kept)"))
    if cfg.tune.active:
        print("\n" + _tuning_plan(cfg, len(placements)))
    for name, why in skipped.items():
        print(f"skipped {name}: {why}")
    for name, p in placements.items():
        if p.allocation is not None:  # AdaLoRA: the table shows what it starts with
            a = p.allocation
            end = (f"about {fmt_int(a['target'])} trainable parameters (the budget)" if a["target"] is not None
                   else f"{a['triplets']} rank-triplets in all ({a['triplets'] // len(p.modules)} per module on average)")
            print(f"note: {name} starts at rank {a['init_r']} on every module ({fmt_int(p.trainable_params)} trainable, "
                  f"with AdaLoRA's singular values); PEFT's AdaLoRA prunes it to {end} by the end of training")
    for note in sorted({n for e in ests.values() for n in e.notes}):
        print(f"note: {note}")
    if anat.fixed:
        print("\nNot adaptable, so no strategy places LoRA there:")
        print(_fixed_table(anat))
    for name, p in placements.items():
        print(f"\n{name}: {p.strategy.description or p.strategy.to_dict()}")
        print(placement_map(p, anat))
        if is_auto(name) and probe is not None:
            print(auto_why(p, probe, cfg.auto.settings(name)[1]))
    return 0


def _tuning_plan(cfg, n_strategies: int) -> str:
    """The learning-rate search before it runs: the grid, its trials and rungs, and what it costs against the
    untuned study (in whole-trial lengths: the optimizer steps of one trial = 1)."""
    from loraplace.study.tune import cost, rule_text

    t, c = cfg.tune, cost(cfg.tune, n_strategies, cfg.seeds, races=bool(cfg.race.at))
    grid = ", ".join(lr_text(x) for x in t.grid())
    sel = f"{t.selection:g} examples" if t.selection >= 1 else f"{100 * t.selection:g}% of the training examples"
    lines = [f"Learning-rate search: {len(t.grid())} rates ({grid}) x {n_strategies} strategies x tuning seed(s) "
             f"{', '.join(map(str, t.seeds))} = {c.tuning_trials} tuning trials on the training data less a selection "
             f"split of {sel}; {rule_text(t)}.",
             f"Cost in trial lengths: the search {c.tuning:g} (an exhaustive grid: {c.exhaustive:g}), the study's "
             f"trials {c.final:g}" + (f" less the {c.replayed:g} the search trains (tune.reuse)" if c.replayed else "")
             + (f", the comparison at the baseline's rate at most {c.compare:g}" if t.compare else "")
             + f": at most {c.ratio:.2f}x the untuned study ({c.final:g})"
             + (", plus the selection-split evaluations at the tuning rungs." if t.rungs() else ".")]
    return "\n".join(lines)


def _stored_meta(cfg, key: str):
    """Meta ``key`` of the study in cfg.out; None when there is no study there or it holds none."""
    from loraplace.store.db import DB_NAME, Store

    if not os.path.exists(os.path.join(cfg.out, DB_NAME)):
        return None
    with Store.open(cfg.out, create=False) as store:
        return store.get_meta(key)


def _stored_eva(cfg):
    """EVA's ranks as the study in cfg.out stored them (None when it has none); no tensors are read."""
    from types import SimpleNamespace

    meta = _stored_meta(cfg, "eva")
    if not meta:
        return None
    return SimpleNamespace(ranks={n: int(r) for n, r in meta["ranks"].items()},
                           base={n: int(r) for n, r in meta["base"].items()})


def _kappa_order(cfg, model: str) -> list[str]:
    """Strategy kappa's order: from the study directory when a study stored it, else from the model's weights."""
    meta = _stored_meta(cfg, "kappa")
    if meta:
        return list(meta["order"])
    from loraplace.model.anatomy import analyze
    from loraplace.model.conditioning import kappa_order
    from loraplace.model.loading import load

    log.info("kappa: loading %s's weights for their condition numbers (a study stores them)", model)
    weights, _ = load(model)
    order, seconds = kappa_order(weights, analyze(weights))
    log.info("kappa: %d condition numbers in %.1f s", len(order), seconds)
    return order


def _stored_probe(cfg):
    """The probe matching cfg, from the study directory cfg.out; a one-line error when it is not there."""
    from loraplace.placement.strategy import PlacementError
    from loraplace.measure.probe_scores import load, probe_key
    from loraplace.store.db import DB_NAME, Store

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


def cmd_probe(args) -> int:
    from loraplace.core.config import StudyConfig
    from loraplace.measure.probe import ensure_probe
    from loraplace.store.db import Store
    from loraplace.study.workspace import Workspace

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


def _drop_unplaceable(cfg, anat) -> dict[str, str]:
    """On a model with unadaptable block weights (MoE experts), strategies that match nothing are left out of the
    plan, with the reason, instead of failing it; if none is left, the first reason is the error."""
    from dataclasses import replace

    from loraplace.core.names import is_selected
    from loraplace.placement.resolve import resolve
    from loraplace.placement.strategy import PlacementError, get_strategy

    skipped = {}
    for name in list(cfg.strategies):
        if is_selected(name):  # auto / random:K choose among the adaptable modules themselves
            continue
        try:
            resolve(replace(get_strategy(name, cfg.define), variant="lora"), anat, rank=cfg.train.rank)  # its modules
        except PlacementError as e:
            skipped[name] = str(e)
    if len(skipped) == len(cfg.strategies):
        raise PlacementError(next(iter(skipped.values())))
    cfg.strategies = [s for s in cfg.strategies if s not in skipped]
    if cfg.baseline in skipped:
        cfg.baseline = cfg.strategies[0]
    return skipped


def cmd_study(args) -> int:
    from loraplace.core.config import StudyConfig
    from loraplace.study.run import run_study
    from loraplace.store.db import FAILED

    config_path, overrides = _config_and_overrides(args.items)
    if args.out:
        overrides.append(f"out={args.out}")
    cfg = StudyConfig.load(config_path, overrides=overrides)
    records = run_study(cfg)
    print(_summary(cfg.out))
    failed = [r for r in records if r.status == FAILED]
    print(f"\nStudy stored in {cfg.out}/study.db; `loraplace report {cfg.out}` writes the report.")
    return 1 if failed and len(failed) == len(records) else 0


def _config_error(msg: str):
    from loraplace.core.config import ConfigError

    return ConfigError(msg)


def _summary(study_dir: str, threshold: float | None = None, metric: str | None = None) -> str:
    from loraplace.analysis.from_store import analyze_store
    from loraplace.analysis.tables import summary_text
    from loraplace.store.db import Store

    with Store.open(study_dir, create=False) as store:
        return summary_text(analyze_store(store, threshold=threshold, metric=metric))


def cmd_status(args) -> int:
    from loraplace.store.claims import claim_is_dead
    from loraplace.store.results import export_csv, export_json
    from loraplace.store.db import DONE, FAILED, PAUSED, PENDING, RUNNING, STATUSES, STOPPED, TUNE, Store

    with Store.open(args.study_dir, create=False) as store:
        trials = store.trials()
    if args.csv:
        sys.stdout.write(export_csv(trials))
        return 0
    if args.json:
        print(export_json(trials))
        return 0
    rows, gone = [], 0
    for t in trials:
        m = t.metrics
        rows.append([t.strategy, str(t.seed), t.phase, "" if t.lr is None else lr_text(t.lr), t.status,
                     "" if t.step is None else str(t.step),
                     _loss_text(t),
                     f"{m['train_time_s']:.0f} s" if "train_time_s" in m else "", t.trial_id, _holder(t),
                     (t.error or "")[:70]])
        gone += claim_is_dead(t)
    if not rows:
        print(f"{args.study_dir}: no trials yet")
        return 0
    print(text_table(["strategy", "seed", "phase", "lr", "status", "step", "loss", "train time", "trial", "held by",
                      "error"], rows, {1, 3, 5, 6, 7}))
    if any(t.phase == TUNE for t in trials):
        print("loss: on the eval set for final trials, on the selection split for tune trials (its last evaluation)")
    counts = {s: sum(t.status == s for t in trials) for s in (DONE, STOPPED, FAILED, RUNNING, PAUSED, PENDING)}
    assert set(counts) == set(STATUSES)
    print("\n" + ", ".join(f"{n} {s}" for s, n in counts.items() if n))
    if gone:
        print(f"{gone} running trial(s) belong to a process that is gone; the next `loraplace study` reruns them.")
    return 0


def _loss_text(t) -> str:
    """A trial's loss for the status table: its final one, else its last rung's (a stopped or paused trial)."""
    if "eval_loss" in t.metrics:
        return f"{t.metrics['eval_loss']:.4f}"
    rungs = [(step, ev["eval_loss"]) for step, ev in sorted(dict(t.evals).items()) if "eval_loss" in ev]
    return f"{rungs[-1][1]:.4f} (step {rungs[-1][0]})" if rungs else ""


def _holder(t) -> str:
    """Who runs a running trial: ``pid@host, beat 4 s ago`` (``gone`` when that process is dead)."""
    from loraplace.store.claims import claim_is_dead
    from loraplace.store.db import RUNNING

    if t.status != RUNNING:
        return ""
    if not t.owner:
        return "gone (no owner)"
    age = t.heartbeat_age_s()
    return f"{t.owner}, beat {age:.0f} s ago" + (" (gone)" if claim_is_dead(t) else "")


def cmd_report(args) -> int:
    from loraplace.analysis.report import write_report

    formats = tuple(f.strip().lower() for f in args.format.split(",") if f.strip())
    paths = write_report(args.study_dir, threshold=args.threshold, metric=args.metric, formats=formats)
    from loraplace.study.tracking import log_report  # imports MLflow only if the study is tracked

    log_report(args.study_dir, paths)
    print(_summary(args.study_dir, args.threshold, args.metric))
    print()
    for kind, path in paths.items():
        print(f"{kind}: {path}")
    return 0


def cmd_export(args) -> int:
    from loraplace.analysis.tuning import final_trials
    from loraplace.placement.export import export
    from loraplace.placement.variants import get_variant
    from loraplace.store.results import placement_for
    from loraplace.store.db import DONE, Store

    with Store.open(args.study_dir, create=False) as store:
        tune = store.get_meta("tune")
        trials = final_trials(store.current_trials(), tune)  # a tuned study: each strategy's trials at its rate
        placement = placement_for(trials, args.strategy)
        eva = store.get_meta("eva") if placement.init == "eva" else None
    done = [t for t in trials if t.strategy == args.strategy and t.status == DONE]  # placement_for found one
    lr, config = done[0].lr, done[0].config  # every trial of a strategy shares its rate, base and dtype
    quantize = config.get("quantize")
    print(export(placement, args.format, lr, quantize))
    if quantize and args.format == "peft":  # a LoraConfig does not load the base
        from loraplace.model.quantize import loading_text

        how = loading_text(quantize, config.get("train", {}).get("dtype") or "float32")
        print(f"note: the study trained on a base quantized to {quantize}; load it as it did: {how}, then "
              "get_peft_model with this config", file=sys.stderr)
    if lr is not None and (tune or args.format == "peft"):
        how = "chosen for it by the study's learning-rate search" if tune else "the study's shared train.lr"
        where = "in this config" if args.format != "peft" else "(a LoraConfig has no learning rate: set it in your trainer)"
        print(f"note: {args.strategy} trained at peak learning rate {lr_text(lr)}, {how}; {where}", file=sys.stderr)
    kept = {t.seed: t.placement.get("modules") for t in trials if t.strategy == args.strategy and t.status == DONE}
    note = get_variant(placement.variant).export_note(args.strategy, kept, placement.to_dict()["modules"])
    if note:  # e.g. AdaLoRA's: the ranks one seed kept, trained as its SVD triplets
        print(f"note: {note}", file=sys.stderr)
    if eva:  # the config rebuilds the modules and ranks; EVA's A matrices come from the data
        base = sorted(set(eva["base"].values()))
        print(f"note: {args.strategy}'s A matrices started from PEFT's EVA on the study's train data (rank sum "
              f"{sum(eva['base'].values())}: rank {'-'.join(map(str, base))} on each of {len(eva['base'])} modules before "
              f"redistribution, eva.rho as in the study's config.yaml). To reproduce: LoraConfig(r=..., target_modules="
              "<every linear of every block>, init_lora_weights='eva', eva_config=EvaConfig(rho=...)) then "
              "peft.initialize_lora_eva_weights(model, dataloader); the study's trained adapters (adapters/) hold the "
              "result", file=sys.stderr)
    return 0
