"""From a study config to its trials: every strategy resolved (and budget-matched), every (strategy, seed) keyed.

Usage::

    placements = resolve_placements(cfg, anat)        # strategy -> Placement, errors before any training
    tasks = plan_trials(cfg, placements)              # one TrialTask per strategy and seed, seed-major

A trial is keyed by a hash of what can change its numbers (``trial_id``): the model, the data and eval
settings, the training settings except ``TrainSpec.SAME_NUMBERS``, the strategy, its resolved ranks and
the seed. Changing a shared setting therefore makes new trials instead of silently mixing results.
Torch-free: ``plan`` and the placements it builds read the anatomy only.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING

from loraplace.core.config import StudyConfig
from loraplace.core.identity import digest
from loraplace.core.names import AUTO, EVA, KAPPA, is_auto, is_random, is_selected, random_draw
from loraplace.placement.resolve import Placement, adalora_placement, match_budget, parse_budget, resolve
from loraplace.placement.select import auto_placement, kappa_placement, random_placement
from loraplace.placement.strategy import ADALORA, PlacementError, Strategy, get_strategy, selected_strategy
from loraplace.placement.variants import get_variant
from loraplace.store.db import TUNE
from loraplace.study.race import rung_steps

if TYPE_CHECKING:  # torch-free: the anatomy is only read
    from loraplace.model.anatomy import Anatomy

SAME_AUTO = f"same:{AUTO}"  # budget: match the fixed strategies to auto's trainable count
CHECKPOINTS = "checkpoints"  # inside the study directory: one resumable checkpoint per racing trial
SNAPSHOTS = "snapshots"  # inside the study directory (tune.reuse): a tuning trial's state at its final trial's rungs


@dataclass(frozen=True)
class TrialTask:
    """A trial to run, as plain data (it travels to Ray workers)."""

    trial_id: str  # hash of config
    strategy: str
    seed: int
    ranks: dict[str, int]  # full module name -> rank, as resolved (and budget-matched) by the driver
    adapter_dir: str | None  # where the trained adapter goes; None: not saved
    config: dict = field(default_factory=dict)  # the resolved trial config that trial_id hashes
    desc: str = ""  # progress label, e.g. "[2/12] mlp_only seed 0"
    checkpoint_dir: str | None = None  # where its resumable checkpoint goes (a raced study); None: none is kept
    start: int = 0  # the step its checkpoint is at, where this piece of work begins (0: the start of the run)
    until: int | None = None  # the step this piece of work ends at (None: the end of the run)
    evals_at: tuple[int, ...] = ()  # rung steps to evaluate at on the way (``until`` among them when it is a rung)
    phase: str = "final"  # "tune": a trial of the learning-rate search (study.tune), on the selection split
    lr: float | None = None  # its peak learning rate (None: train.lr)
    races: bool = True  # False: it is evaluated at the recorded rungs but never paused at a racing one
    snapshots: str | None = None  # tune.reuse: where a tuning trial keeps its state at ``snapshots_at`` ...
    snapshots_at: tuple[int, ...] = ()  # ... the steps its final trial is evaluated at (its rungs and its end)
    replay: str | None = None  # a final trial whose training its tuning trial did: read from these snapshots ...
    replay_of: str | None = None  # ... of this tuning trial, evaluated at each rung and the end, not trained again


def resolve_placements(cfg: StudyConfig, anat: Anatomy, scores: dict[str, dict[str, float]] | None = None,
                       kappa: list[str] | None = None, eva=None) -> dict[str, Placement]:
    """Every strategy of the study resolved (and budget-matched when cfg.budget is set).

    ``scores`` (probe criterion -> full module name -> score, mean over probe seeds; ``auto_scores``) places
    ``auto`` and ``auto:...``; they and ``random:K`` fill ``selected_budget``, and ``budget: same:auto``
    matches the others to auto. ``kappa`` (modules by increasing weight condition number,
    ``model.conditioning.kappa_order``) places ``kappa``, at train.rank or matched to the study's budget; ``eva``
    (``measure.eva.EvaInit``, computed for ``fixed_budget``) places ``eva``."""
    t = cfg.train
    kw = dict(rank=t.rank, alpha=t.alpha, alpha_per_rank=t.alpha_per_rank)
    if cfg.quantize is not None:  # before any measurement: a variant that cannot train on the quantized base
        for name in cfg.strategies:
            why = get_variant(get_strategy(name, cfg.define).variant).unquantizable if not is_selected(name) else None
            if why:
                raise PlacementError(f"strategy {name} cannot run with quantize={cfg.quantize}: {why}")
    if any(is_selected(n) for n in cfg.strategies) or cfg.budget == SAME_AUTO:
        return _with_selected(cfg, anat, scores, kappa, eva, kw)
    target = None if cfg.budget is None else parse_budget(cfg.budget, anat, t.rank, cfg.define)
    return {name: fixed_placement(cfg, anat, get_strategy(name, cfg.define), target) for name in cfg.strategies}


def fixed_placement(cfg: StudyConfig, anat: Anatomy, strategy: Strategy, target: int | None) -> Placement:
    """A roles x blocks strategy at train.rank, or matched to ``target``; under AdaLoRA (variant adalora) its
    starting placement, whose final count AdaLoRA's allocation matches to ``target`` while training."""
    t = cfg.train
    kw = dict(rank=t.rank, alpha=t.alpha, alpha_per_rank=t.alpha_per_rank)
    if strategy.variant == ADALORA:
        return adalora_placement(strategy, anat, cfg.adalora, target, **kw)
    return resolve(strategy, anat, **kw) if target is None else match_budget(strategy, anat, target, **kw)


def study_strategy(cfg: StudyConfig, name: str) -> Strategy:
    """Strategy ``name`` as this study defines it (``define``; auto's allocation and score from ``auto``)."""
    if name == KAPPA:
        return selected_strategy(name, top_p=cfg.kappa.top_p)
    if name == EVA:
        return selected_strategy(name, rho=cfg.eva.rho)
    return selected_strategy(name, *cfg.auto.settings(name)) if is_auto(name) else get_strategy(name, cfg.define)


def needs_probe(cfg: StudyConfig) -> bool:
    """Whether resolving the study's placements needs probe scores (strategy auto, or budget same:auto)."""
    return any(is_auto(n) for n in cfg.strategies) or cfg.budget == SAME_AUTO


def auto_scores(cfg: StudyConfig, probe) -> dict[str, dict[str, float]]:
    """The probe's mean scores for every criterion the study's auto strategies use (``resolve_placements``)."""
    names = [n for n in cfg.strategies if is_auto(n)] + ([AUTO] if cfg.budget == SAME_AUTO else [])
    return {c: probe.mean(c) for c in dict.fromkeys(cfg.auto.settings(n)[1] for n in names)}


def selected_budget(cfg: StudyConfig, anat: Anatomy) -> int:
    """The trainable count ``auto`` and ``random:K`` are filled to: ``auto.budget``, else the study's budget."""
    spec = cfg.auto.budget if cfg.auto.budget is not None else cfg.budget
    if spec is None or spec == SAME_AUTO:
        raise PlacementError("strategies auto and random:K need a budget: set auto.budget (e.g. same:attention_only "
                             "or 1.5M), or the study's budget to a count or same:STRATEGY")
    if is_selected(str(spec)[5:]) and str(spec).startswith("same:"):
        raise PlacementError(f"budget {spec!r}: only same:auto or same:<fixed strategy> is possible")
    return parse_budget(spec, anat, cfg.train.rank, cfg.define)


def fixed_budget(cfg: StudyConfig, anat: Anatomy) -> int | None:
    """The trainable count the study's budget names for strategies that are not auto or random:K (None: no
    budget); ``same:auto`` is known only once auto is placed (``resolve_placements``)."""
    if cfg.budget is None:
        return None
    if cfg.budget == SAME_AUTO:
        raise PlacementError("strategy eva needs its budget before auto is placed: give the study's budget as a count "
                             "or same:STRATEGY of a fixed strategy")
    return parse_budget(cfg.budget, anat, cfg.train.rank, cfg.define)


def eva_placement(cfg: StudyConfig, anat: Anatomy, eva) -> Placement:
    """Strategy eva at the ranks and initialisation of ``eva`` (``measure.eva.EvaInit``, or anything with its
    ``ranks`` and ``base``). Alphas as PEFT's adjust_scaling_factors sets them: alpha x rank after / rank before
    redistribution, so alpha/r stays what it was."""
    t = cfg.train
    alphas = {n: float(t.alpha * r / eva.base[n]) for n, r in eva.ranks.items()}
    return resolve(study_strategy(cfg, EVA), anat, rank=t.rank, alpha=t.alpha, alpha_per_rank=t.alpha_per_rank,
                   ranks=eva.ranks, alphas=alphas, init="eva")


def _with_selected(cfg: StudyConfig, anat: Anatomy, scores: dict[str, dict[str, float]] | None,
                   kappa: list[str] | None, eva, kw: dict) -> dict[str, Placement]:
    out: dict[str, Placement] = {}
    autos = [n for n in cfg.strategies if is_auto(n)]
    if cfg.budget == SAME_AUTO and AUTO not in autos:
        autos.append(AUTO)  # the count the fixed strategies are matched to
    if autos or any(is_random(n) for n in cfg.strategies):
        target = selected_budget(cfg, anat)
    for name in autos:
        allocate, score = cfg.auto.settings(name)
        if not scores or score not in scores:
            raise PlacementError(f"strategy {name} needs probe scores ({score}): run `loraplace probe` with the "
                                 "study's config (`loraplace study` runs it itself)")
        out[name] = auto_placement(anat, scores[score], target, allocate=allocate, name=name, score=score, **kw)
    for name in cfg.strategies:
        if is_random(name):
            out[name] = random_placement(anat, random_draw(name), target, **kw)
    if cfg.budget == SAME_AUTO:
        fixed_target = out[AUTO].trainable_params
    elif cfg.budget is not None:
        fixed_target = parse_budget(cfg.budget, anat, cfg.train.rank, cfg.define)
    else:
        fixed_target = None
    if KAPPA in cfg.strategies:
        if kappa is None:
            raise PlacementError("strategy kappa needs the base weights' condition numbers: `loraplace study` "
                                 "computes them (seconds); `loraplace plan` reads them from the study or the weights")
        out[KAPPA] = kappa_placement(anat, kappa, cfg.kappa.top_p, fixed_target, **kw)
    if EVA in cfg.strategies:
        if eva is None:
            raise PlacementError("strategy eva is resolved from the train data's activations: `loraplace study` runs "
                                 "EVA before training; `loraplace plan` shows it once a study stored it")
        out[EVA] = eva_placement(cfg, anat, eva)
    for name in cfg.strategies:
        if name not in out:
            out[name] = fixed_placement(cfg, anat, get_strategy(name, cfg.define), fixed_target)
    return {name: out[name] for name in cfg.strategies}


def trial_id(config: dict) -> str:
    """16 hex digits identifying a trial (or any result) by the settings in ``config``."""
    return digest(config)


def trial_config(cfg: StudyConfig, name: str, p: Placement, seed: int, lr: float | None = None,
                 search_data: int | None = None) -> dict:
    """What can change a trial's numbers, as plain data (its id is the hash): the model, the data and eval settings,
    the training settings (``lr``: its own peak learning rate instead of train.lr), the strategy, its resolved ranks
    and the seed; ``search_data``: it trains on the training data less the selection split of that many examples
    (a final trial of a study with ``tune.reuse``, as its tuning trials do)."""
    train = cfg.train.identity()
    if lr is not None:
        train = {**train, "lr": float(lr)}
    config = {
        "model": cfg.model,
        "data": cfg.to_dict()["data"],
        "train": train,
        "eval": cfg.eval.identity(),
        "strategy": name,
        "definition": p.strategy.to_dict(),
        "ranks": p.modules,
        "seed": seed,
    }
    if p.init != "default":  # EVA's A matrices and alphas (their key says from what they were computed)
        config["init"] = {"kind": p.init, "alphas": p.alphas}
    if p.allocation is not None:  # AdaLoRA's settings and the count it ends at
        config["allocation"] = p.allocation
    if cfg.quantize is not None:  # a bitsandbytes base (only then: the ids of float trials stay what they were)
        config["quantize"] = cfg.quantize
    if search_data is not None:  # less data than an untuned study's trial at this rate: another id
        config["train_data"] = {"less_selection": int(search_data)}
    return config


def search_data(cfg: StudyConfig, n_selection: int) -> int | None:
    """The selection split's size when the study's final trials train on the search's data (``tune.reuse`` in a
    tuned study), else None: they train on the whole training data."""
    return int(n_selection) if cfg.tune.active and cfg.tune.reuse else None


def final_steps(cfg: StudyConfig, total: int) -> tuple[int, ...]:
    """The steps a final trial that does not race is evaluated at: its recorded rungs and its end."""
    return tuple(sorted(set(rung_steps(cfg.race.rungs(), total)) | {total}))


def plan_trials(cfg: StudyConfig, placements: dict[str, Placement], rates: dict[str, float] | None = None,
                search: int | None = None) -> list[TrialTask]:
    """Every (strategy, seed) trial, keyed by a hash of what can change its numbers; ``rates`` (strategy -> peak
    learning rate, the learning-rate search's choice) replaces train.lr for the strategies it names; ``search``
    (``search_data``): they train on the training data less a selection split of that many examples."""
    out = []
    for seed in cfg.seeds:  # seed-major order: every strategy gets seed 0 before any gets seed 1
        for name, p in placements.items():
            lr = (rates or {}).get(name)
            config = trial_config(cfg, name, p, seed, lr, search)
            tid = trial_id(config)
            label = f"{name}-s{seed}-{tid[:8]}"
            adapter_dir = str(Path(cfg.out) / "adapters" / label) if cfg.train.save_adapter else None
            checkpoint_dir = str(Path(cfg.out) / CHECKPOINTS / label) if cfg.race.at else None
            out.append(TrialTask(tid, name, seed, p.modules, adapter_dir, config, checkpoint_dir=checkpoint_dir,
                                 lr=lr))
    return out


def rung_spec(cfg: StudyConfig, task: TrialTask):
    """The rungs a task's trial races and is evaluated at: ``tune`` for a trial of the learning-rate search,
    ``race`` for the study's own (both have ``at`` and ``rungs()``), without its racing rungs for a trial that does
    not race (the comparison at the baseline's rate)."""
    if task.phase == TUNE:
        return cfg.tune
    return cfg.race if task.races else replace(cfg.race, at=[])


def segment(task: TrialTask, start: int, total: int, race) -> TrialTask:
    """The next piece of work of a trial whose checkpoint is at ``start`` (0: none): to the next racing rung
    (``race.at``), or to the end, evaluating at every rung (``race.record`` and ``race.at``) on the way."""
    racing = rung_steps(race.at, total)
    until = next((s for s in racing if s > start), total)
    evals = tuple(s for s in rung_steps(race.rungs(), total) if start < s <= until)
    return replace(task, start=start, until=until, evals_at=evals)
