"""Typed study configuration: dataclasses that YAML and ``key=value`` overrides only serialize.

Usage::

    cfg = StudyConfig.load("study.yaml", overrides=["train.lr=1e-4", "seeds=[0,1,2]"])
    cfg.to_yaml()          # the resolved config, saved with the study; StudyConfig.from_dict reads it back

The field names are the YAML keys and the CLI override paths (``train.steps=60``); the comment beside
each field is its documentation (``examples/study.yaml`` lists them all with their defaults). Nothing in
a config is executed: values are parsed with ``yaml.safe_load`` and checked against the field types
(``core.typed``); an error names the field, the bad value and what is valid. The sections of the methods
chosen per study and of AdaLoRA (``probe``, ``auto``, ``kappa``, ``eva``, ``adalora``) are ``core.methods``.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

import yaml

from loraplace.core.methods import AdaLoraSpec, AutoSpec, EvaSpec, KappaSpec, ProbeSpec, check_auto_name
from loraplace.core.metrics import DTYPE_BYTES, METRIC_CHOICES
from loraplace.core.names import AUTO_PREFIX, is_selected
from loraplace.core.typed import (ConfigError, apply_override, build, check_choice, check_finite,  # noqa: F401
                                  check_positive)


@dataclass
class DataSpec:
    """Which examples to train and evaluate on, and how to turn them into tokens."""

    source: str = "builtin"  # "builtin", a .json/.jsonl/.csv/.parquet path, or "hub:NAME" (needs the hub)
    format: str = "auto"  # auto (per file) | messages | sharegpt | alpaca | prompt_completion | qa | text
    template: str = "plain"  # plain (documented in data/examples.py) | chat (the model's chat template); conversations always chat
    max_length: int = 256  # tokens per example; longer ones are truncated
    eval_size: float = 64  # eval examples: a count (>= 1) or a fraction (< 1) of all examples; unused with eval_source
    limit: int | None = None  # use the first N examples of source's seeded shuffle: train + eval when eval is a split of source,
    #                           train only with eval_source
    split_seed: int = 0  # fixed across trial seeds, so every trial sees the same eval set
    hub_split: str = "train"  # split name for hub datasets
    eval_source: str | None = None  # a fixed eval set (same kinds as source), used as given; None: split source
    eval_hub_split: str = "test"  # split name for a hub eval_source
    eval_limit: int | None = None  # eval_source: use only its first N examples (file order); None: all

    def check(self) -> None:
        check_choice("data.format", self.format, ("auto", "messages", "sharegpt", "alpaca", "prompt_completion", "qa", "text"))
        check_choice("data.template", self.template, ("plain", "chat"))
        check_positive("data.max_length", self.max_length)
        check_positive("data.eval_size", self.eval_size)
        if self.limit is not None:
            check_positive("data.limit", self.limit)
        if self.eval_source is not None and not self.eval_source.strip():
            raise ConfigError("data.eval_source: empty; give a file, hub:NAME, or leave it null to split data.source")
        if self.eval_limit is not None:
            check_positive("data.eval_limit", self.eval_limit)
            if self.eval_source is None:
                raise ConfigError("data.eval_limit: applies to data.eval_source, which is not set; "
                                  "use data.eval_size to size a split of data.source")


@dataclass
class TrainSpec:
    """Training settings shared by every trial of a study (strategies change only the placement)."""

    lr: float = 5e-4  # peak learning rate (AdamW)
    schedule: str = "cosine"  # constant | linear | cosine, after warm-up
    warmup: float = 0.1  # warm-up: a fraction of the steps (< 1) or a number of steps (>= 1)
    steps: int = 30  # optimizer steps (ignored when epochs is set)
    epochs: float | None = None  # passes over the train split; overrides steps
    batch_size: int = 8  # examples per step
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0  # gradient clipping; 0 disables
    rank: int = 16  # default LoRA rank
    alpha: float = 32  # LoRA alpha (scale = alpha / r)
    alpha_per_rank: bool = False  # True: a module of rank r gets alpha * r / rank, so every module keeps alpha/rank
    dropout: float = 0.0  # LoRA dropout; PEFT defaults to 0 too, and on CPU the masks cost about 25% of a step
    device: str = "auto"  # auto (cuda if this torch has it, else cpu) | cpu | cuda | cuda:N | mps
    dtype: str = "float32"  # float32 | bfloat16 | float16 (the 16-bit types are slower on CPUs without AMX)
    threads: int | None = None  # torch CPU threads; None leaves torch's default
    save_adapter: bool = True
    gradient_checkpointing: bool = False  # recompute block activations in the backward: about half the memory, ~10% more time
    fuse: int | str | bool = "auto"  # trials trained together over one base pass: auto | off | N (same results; see train/fused.py)

    # Settings that change how a trial runs but not its numbers: left out of its identity (``identity``), so a
    # study can change them halfway. Every other field, including any added later, is part of it.
    SAME_NUMBERS: ClassVar[tuple[str, ...]] = ("threads", "save_adapter", "device", "gradient_checkpointing", "fuse")

    def identity(self) -> dict:
        """The settings that can change a trial's numbers, as plain data (part of its trial id)."""
        return {k: v for k, v in dataclasses.asdict(self).items() if k not in self.SAME_NUMBERS}

    def check(self) -> None:
        check_positive("train.lr", self.lr)
        check_choice("train.schedule", self.schedule, ("constant", "linear", "cosine"))
        for name in ("warmup", "weight_decay", "max_grad_norm", "dropout"):  # also when built in Python, not parsed
            check_finite(f"train.{name}", getattr(self, name))
        if self.warmup < 0:
            raise ConfigError(f"train.warmup: must be >= 0, got {self.warmup}")
        check_positive("train.steps", self.steps)
        if self.epochs is not None:
            check_positive("train.epochs", self.epochs)
        check_positive("train.batch_size", self.batch_size)
        check_positive("train.rank", self.rank)
        check_positive("train.alpha", self.alpha)
        if not 0 <= self.dropout < 1:
            raise ConfigError(f"train.dropout: must be in [0, 1), got {self.dropout}")
        if self.weight_decay < 0 or self.max_grad_norm < 0:
            raise ConfigError("train.weight_decay and train.max_grad_norm must be >= 0")
        check_choice("train.dtype", self.dtype, tuple(DTYPE_BYTES))
        if not (self.device in ("auto", "cpu", "cuda", "mps") or self.device.startswith("cuda:")):
            raise ConfigError(f"train.device: {self.device!r} is not one of auto, cpu, cuda, cuda:N, mps")
        if self.fuse is False:  # YAML reads a bare off as false
            self.fuse = "off"
        self.fuse_trials()

    def fuse_trials(self) -> int | str:
        """train.fuse as "auto" or a number of trials per group (off -> 1)."""
        value = self.fuse
        if value is False:
            return 1
        if isinstance(value, str) and value.strip().lower() in ("auto", "off"):
            return value.strip().lower() if value.strip().lower() == "auto" else 1
        if isinstance(value, str) and value.strip().isdigit():
            value = int(value)
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ConfigError(f"train.fuse: {self.fuse!r} is not one of auto, off or a number of trials >= 1")
        return value


@dataclass
class EvalSpec:
    """How trials are evaluated."""

    batch_size: int = 16
    accuracy: bool = False  # generation exact match of the final answer (question/answer data)
    accuracy_limit: int = 50  # eval examples used for accuracy (generation is slow)
    max_new_tokens: int = 200
    forgetting: bool = True  # measure what the adapter changed about the base model (measure/forgetting.py)
    forgetting_source: str = "base"  # base (text the base model samples) | a data file (loss on every token) | hub:NAME[:CONFIG]
    forgetting_size: int = 16  # sequences of the forgetting set
    forgetting_length: int = 64  # tokens per sequence (sampled from the base; a file's longer ones are cut)

    # Measurements on the trained adapter that do not change a trial's other numbers: left out of its identity,
    # and measured again on a trial's saved adapter when they change (measure/forgetting.py).
    SAME_NUMBERS: ClassVar[tuple[str, ...]] = ("forgetting", "forgetting_source", "forgetting_size", "forgetting_length")

    def identity(self) -> dict:
        """The evaluation settings that can change a trial's numbers (part of its trial id)."""
        return {k: v for k, v in dataclasses.asdict(self).items() if k not in self.SAME_NUMBERS}

    def check(self) -> None:
        check_positive("eval.batch_size", self.batch_size)
        check_positive("eval.accuracy_limit", self.accuracy_limit)
        check_positive("eval.max_new_tokens", self.max_new_tokens)
        check_positive("eval.forgetting_size", self.forgetting_size)
        check_positive("eval.forgetting_length", self.forgetting_length)
        if self.forgetting_length < 2:
            raise ConfigError("eval.forgetting_length: must be >= 2 (the first token of a sequence is never predicted)")
        if not str(self.forgetting_source).strip():
            raise ConfigError("eval.forgetting_source: empty; give base, a data file, or hub:NAME")


@dataclass
class AnalysisSpec:
    """How the study's trials are compared (changes no trial: only the summary and the report)."""

    metric: str = "eval_loss"  # eval_loss | accuracy: the quality measure of retained improvement, Pareto fronts, recommendation
    max_forgetting: float | None = None  # nats/token: strategies that forget more (mean over seeds) are not recommended

    def check(self) -> None:
        check_choice("analysis.metric", self.metric, METRIC_CHOICES)
        if self.max_forgetting is not None:
            check_finite("analysis.max_forgetting", self.max_forgetting)
            if self.max_forgetting < 0:
                raise ConfigError(f"analysis.max_forgetting: must be >= 0 nats/token, got {self.max_forgetting}")


def check_fractions(name: str, values: list[float]) -> None:
    """Rung fractions: each in (0, 1), none twice."""
    for v in values:
        check_finite(name, v)
        if not 0 < v < 1:
            raise ConfigError(f"{name}: {v} is not a fraction of the steps in (0, 1), e.g. {name}=[0.25,0.5]")
    if len(set(values)) != len(values):
        raise ConfigError(f"{name}: duplicates in {values}")


@dataclass
class RaceSpec:
    """Racing (study/race.py): every trial is evaluated at rungs, fractions of its steps; at the racing rungs
    (``at``) the strategies that cannot become the study's answer stop, the others go on from their
    checkpoints. Changes no trial's numbers: the schedule is always the whole run's."""

    at: list[float] = field(default_factory=list)  # racing rungs, fractions of a trial's steps in (0, 1); []: no racing
    record: list[float] = field(default_factory=lambda: [0.25, 0.5])  # rungs evaluated in every study, raced or not
    eval_limit: int | None = 16  # rung evaluations score the first N eval examples (null: all; the end always all)
    confidence: float = 0.95  # one-sided level of the upper bound on retained improvement a stop needs
    slack: float = 0.3  # catch-up allowed for (retained improvement): the bar is threshold - slack x (1 - fraction)^2
    keep_checkpoints: bool = False  # keep each trial's last checkpoint (checkpoints/) after it finishes or stops

    def check(self) -> None:
        check_fractions("race.at", self.at)
        check_fractions("race.record", self.record)
        if self.eval_limit is not None:
            check_positive("race.eval_limit", self.eval_limit)
        if not 0.5 <= self.confidence < 1:
            raise ConfigError(f"race.confidence: must be in [0.5, 1), got {self.confidence}")
        check_finite("race.slack", self.slack)
        if not 0 <= self.slack < 1:
            raise ConfigError(f"race.slack: must be in [0, 1), got {self.slack}")

    def rungs(self) -> list[float]:
        """Every fraction at which trials are evaluated: the racing rungs and the recorded ones, in order."""
        return sorted(set(self.at) | set(self.record))


@dataclass
class TuneSpec:
    """The learning-rate search (study/tune.py): every strategy trained at each rate of the grid on the training data
    less a selection split, evaluated on that split (never the eval set), the clearly worse rates of a strategy
    stopped at the tuning rungs (successive halving); each strategy's final trials then train at its best rate
    (``reuse``: on the search's data, so a tuning seed's trial at that rate is that seed's final trial)."""

    lr: list[float] = field(default_factory=list)  # the grid of peak learning rates; []: no search (train.lr for all)
    lr_range: list[float] | None = None  # [low, high]: instead of lr, `points` rates evenly spaced on a log scale
    points: int = 5  # rates in lr_range
    selection: float = 64  # examples of the training data held out to choose on: a count (>= 1) or a fraction (< 1)
    seeds: list[int] = field(default_factory=lambda: [0])  # tuning seeds: a rate's selection loss is their mean
    at: list[float] = field(default_factory=lambda: [0.25, 0.5])  # tuning rungs (fractions of the steps); []: the whole grid
    keep: float = 0.5  # share of a strategy's rates still in the search that go on at each tuning rung ...
    min_keep: int = 2  # ... but at least this many
    record: list[float] = field(default_factory=lambda: [0.25, 0.5])  # rungs evaluated in every tuning trial
    eval_limit: int | None = 16  # tuning rungs score the first N selection examples (null: all; the end always all)
    compare: bool = True  # also train every strategy at the baseline's chosen rate ("Does the learning rate change the answer?")
    reuse: bool = True  # final trials train on the search's data, so a tuning seed's trial at the chosen rate is that
    #                     seed's final trial (replayed from its snapshots, not trained again); false: the whole training data

    def grid(self) -> list[float]:
        """The rates searched, ascending: ``lr``, or ``points`` log-spaced rates over ``lr_range`` (3 significant
        digits)."""
        if self.lr_range:
            lo, hi = self.lr_range
            n = self.points
            return [float(f"{lo * (hi / lo) ** (i / (n - 1)):.3g}") for i in range(n)] if n > 1 else [float(lo)]
        return sorted(float(x) for x in self.lr)

    @property
    def active(self) -> bool:
        return bool(self.grid())

    def rungs(self) -> list[float]:
        """Every fraction at which tuning trials are evaluated on the selection split."""
        return sorted(set(self.at) | set(self.record))

    def check(self) -> None:
        for v in self.lr:
            check_positive("tune.lr", v)
        if len(set(self.lr)) != len(self.lr):
            raise ConfigError(f"tune.lr: duplicates in {self.lr}")
        if self.lr_range is not None:
            if self.lr:
                raise ConfigError("tune.lr_range: give either tune.lr (the rates) or tune.lr_range (and tune.points), not both")
            if len(self.lr_range) != 2 or not 0 < self.lr_range[0] < self.lr_range[1]:
                raise ConfigError(f"tune.lr_range: expected [low, high] with 0 < low < high, got {self.lr_range}")
            check_positive("tune.points", self.points)
        check_positive("tune.selection", self.selection)
        if not self.seeds:
            raise ConfigError("tune.seeds: empty; give at least one tuning seed, e.g. tune.seeds=[0]")
        if len(set(self.seeds)) != len(self.seeds):
            raise ConfigError(f"tune.seeds: duplicates in {self.seeds}")
        check_fractions("tune.at", self.at)
        check_fractions("tune.record", self.record)
        if not 0 < self.keep <= 1:
            raise ConfigError(f"tune.keep: must be a share in (0, 1], got {self.keep}")
        check_positive("tune.min_keep", self.min_keep)
        if self.eval_limit is not None:
            check_positive("tune.eval_limit", self.eval_limit)


DEFAULT_STRATEGIES = ["all_linear", "attention_only", "mlp_only", "top_half"]
QUANTIZE_MODES = ("nf4", "fp4", "int8")  # bitsandbytes bases (model/quantize.py): QLoRA's NF4, FP4, LLM.int8()


@dataclass
class StudyConfig:
    """A whole study: one model, one dataset, strategies x seeds, shared settings."""

    model: str = "smollm2-135m"  # alias, local HF directory, .gguf file, or hub id
    quantize: str | None = None  # nf4 | fp4 | int8: a frozen bitsandbytes base (the quant extra); null: float (train.dtype)
    data: DataSpec = field(default_factory=DataSpec)
    train: TrainSpec = field(default_factory=TrainSpec)
    eval: EvalSpec = field(default_factory=EvalSpec)
    strategies: list[str] = field(default_factory=lambda: list(DEFAULT_STRATEGIES))
    define: dict[str, dict] = field(default_factory=dict)  # user strategies, same vocabulary as built-ins
    baseline: str = "all_linear"  # the reference for deltas and retained improvement
    budget: str | None = None  # "same:STRATEGY" or a parameter count: budget-match every strategy
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2])
    out: str = "studies/default"  # study directory (database, adapters, report)
    threshold: float = 0.95  # retained improvement a cheaper strategy must keep to be recommended
    executor: str = "local"  # local (this process: one trial at a time, or fused groups, see train.fuse) | ray (Ray workers)
    ray_address: str | None = None  # executor=ray: a cluster address; None starts Ray here (or uses RAY_ADDRESS)
    cpus_per_trial: float = 2  # executor=ray: CPUs (and torch threads) per trial
    gpus_per_trial: float = 0  # executor=ray: GPUs per trial (set 1 with train.device=cuda)
    probe: ProbeSpec = field(default_factory=ProbeSpec)  # the probe behind strategy auto
    auto: AutoSpec = field(default_factory=AutoSpec)  # strategy auto: which probe score, which budget
    kappa: KappaSpec = field(default_factory=KappaSpec)  # strategy kappa: the share of modules it adapts
    eva: EvaSpec = field(default_factory=EvaSpec)  # strategy eva: PEFT's EVA redistribution and SVD settings
    adalora: AdaLoraSpec = field(default_factory=AdaLoraSpec)  # variant adalora: PEFT's AdaLoRA ranks and schedule
    analysis: AnalysisSpec = field(default_factory=AnalysisSpec)
    race: RaceSpec = field(default_factory=RaceSpec)  # racing: stop strategies early that cannot become the answer
    tune: TuneSpec = field(default_factory=TuneSpec)  # the learning-rate search: each strategy at its own best rate
    max_retries: int = 1  # executor=ray: reruns of a trial whose worker died, before it is recorded as failed
    track: str | None = None  # experiment tracking besides the store: mlflow | wandb (needs that package)
    tracking_uri: str | None = None  # mlflow: tracking server or store (None: sqlite:///OUT/mlflow.db); wandb: the project

    def check(self) -> None:
        self.data.check()
        self.train.check()
        self.eval.check()
        self.analysis.check()
        self.race.check()
        self.tune.check()
        if self.analysis.metric == "accuracy" and not self.eval.accuracy:
            raise ConfigError("analysis.metric=accuracy needs eval.accuracy=true (accuracy is not measured otherwise)")
        if not self.strategies:
            raise ConfigError("strategies: empty; name at least one strategy")
        if len(set(self.strategies)) != len(self.strategies):
            raise ConfigError(f"strategies: duplicates in {self.strategies}")
        if not self.seeds:
            raise ConfigError("seeds: empty; give at least one seed, e.g. seeds=[0]")
        if len(set(self.seeds)) != len(self.seeds):
            raise ConfigError(f"seeds: duplicates in {self.seeds}")
        if self.quantize is not None:
            check_choice("quantize", self.quantize, QUANTIZE_MODES)
        check_choice("executor", self.executor, ("local", "ray"))
        check_positive("cpus_per_trial", self.cpus_per_trial)
        check_finite("gpus_per_trial", self.gpus_per_trial)
        if self.max_retries < 0:
            raise ConfigError(f"max_retries: must be >= 0, got {self.max_retries}")
        if self.track is not None:
            check_choice("track", self.track, ("mlflow", "wandb"))
        check_finite("threshold", self.threshold)
        if self.gpus_per_trial < 0:
            raise ConfigError(f"gpus_per_trial: must be >= 0, got {self.gpus_per_trial}")
        if not 0 < self.threshold <= 1.5:
            raise ConfigError(f"threshold: must be in (0, 1.5], got {self.threshold}")
        self.probe.check()
        self.auto.check()
        self.kappa.check()
        self.eva.check()
        self.adalora.check()
        for name in self.strategies:
            if name.startswith(AUTO_PREFIX):
                check_auto_name(name)
        reserved = [n for n in self.define if is_selected(n)]
        if reserved:
            raise ConfigError(f"define.{reserved[0]}: auto, kappa, eva and random:K are chosen per model and budget; "
                              "choose another name")

    # -- serialization -------------------------------------------------------------------------
    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)

    @classmethod
    def from_dict(cls, data: dict) -> "StudyConfig":
        cfg = build(cls, data, "")
        cfg.check()
        return cfg

    @classmethod
    def load(cls, path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> "StudyConfig":
        """Read a YAML file (or start from the defaults) and apply ``key=value`` overrides."""
        data: dict = {}
        if path is not None:
            try:
                text = Path(path).read_text()
            except OSError as e:
                raise ConfigError(f"config file {path}: {e.strerror}") from None
            try:
                data = yaml.safe_load(text) or {}
            except yaml.YAMLError as e:
                raise ConfigError(f"config file {path}: not valid YAML ({str(e).splitlines()[0]})") from None
            if not isinstance(data, dict):
                raise ConfigError(f"config file {path}: expected a mapping of settings at the top level")
        for item in overrides:
            apply_override(data, item)
        return cls.from_dict(data)
