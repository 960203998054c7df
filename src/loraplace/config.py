"""Typed study configuration: dataclasses that YAML and ``key=value`` overrides only serialize.

Usage::

    cfg = StudyConfig.load("study.yaml", overrides=["train.lr=1e-4", "seeds=[0,1,2]"])
    cfg.to_yaml()          # the resolved config, saved with the study

The field names are the YAML keys and the CLI override paths (``train.steps=60``). Nothing in
a config is executed: values are parsed with ``yaml.safe_load`` and checked against the field
types; an error names the field, the bad value and what is valid.
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from .core import LoraplaceError


class ConfigError(LoraplaceError, ValueError):
    """A config value is missing, of the wrong type or out of range; the message names the field."""


@dataclass
class DataSpec:
    """Which examples to train and evaluate on, and how to turn them into tokens."""

    source: str = "builtin"  # "builtin", a .json/.jsonl/.csv/.parquet path, or "hub:NAME" (needs the hub)
    format: str = "auto"  # auto (per file) | messages | sharegpt | alpaca | prompt_completion | qa | text
    template: str = "plain"  # plain (documented in data.py) | chat (the model's chat template); conversations always chat
    max_length: int = 256  # tokens per example; longer ones are truncated
    eval_size: float = 64  # eval examples: a count (>= 1) or a fraction (< 1) of all examples; unused with eval_source
    limit: int | None = None  # use at most this many train examples of source (after the seeded shuffle)
    split_seed: int = 0  # fixed across trial seeds, so every trial sees the same eval set
    hub_split: str = "train"  # split name for hub datasets
    eval_source: str | None = None  # a fixed eval set (same kinds as source), used as given; None: split source
    eval_hub_split: str = "test"  # split name for a hub eval_source
    eval_limit: int | None = None  # eval_source: use only its first N examples (file order); None: all

    def check(self) -> None:
        _choice("data.format", self.format, ("auto", "messages", "sharegpt", "alpaca", "prompt_completion", "qa", "text"))
        _choice("data.template", self.template, ("plain", "chat"))
        _positive("data.max_length", self.max_length)
        _positive("data.eval_size", self.eval_size)
        if self.limit is not None:
            _positive("data.limit", self.limit)
        if self.eval_source is not None and not self.eval_source.strip():
            raise ConfigError("data.eval_source: empty; give a file, hub:NAME, or leave it null to split data.source")
        if self.eval_limit is not None:
            _positive("data.eval_limit", self.eval_limit)
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
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    dtype: str = "float32"  # float32 | bfloat16 (bfloat16 is slower on CPUs without AMX)
    threads: int | None = None  # torch CPU threads; None leaves torch's default
    save_adapter: bool = True
    gradient_checkpointing: bool = False  # recompute block activations in the backward: about half the memory, ~10% more time
    fuse: int | str | bool = "auto"  # trials trained together over one base pass: auto | off | N (same results; see fused.py)

    def check(self) -> None:
        _positive("train.lr", self.lr)
        _choice("train.schedule", self.schedule, ("constant", "linear", "cosine"))
        for name in ("warmup", "weight_decay", "max_grad_norm", "dropout"):  # also when built in Python, not parsed
            _finite(f"train.{name}", getattr(self, name))
        if self.warmup < 0:
            raise ConfigError(f"train.warmup: must be >= 0, got {self.warmup}")
        _positive("train.steps", self.steps)
        if self.epochs is not None:
            _positive("train.epochs", self.epochs)
        _positive("train.batch_size", self.batch_size)
        _positive("train.rank", self.rank)
        _positive("train.alpha", self.alpha)
        if not 0 <= self.dropout < 1:
            raise ConfigError(f"train.dropout: must be in [0, 1), got {self.dropout}")
        if self.weight_decay < 0 or self.max_grad_norm < 0:
            raise ConfigError("train.weight_decay and train.max_grad_norm must be >= 0")
        _choice("train.dtype", self.dtype, ("float32", "bfloat16", "float16"))
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

    def check(self) -> None:
        _positive("eval.batch_size", self.batch_size)
        _positive("eval.accuracy_limit", self.accuracy_limit)
        _positive("eval.max_new_tokens", self.max_new_tokens)


PROBE_CRITERIA = ("lora_drop", "grad_norm", "fisher")  # documented in probe.py and docs/results.md


@dataclass
class ProbeSpec:
    """The probe (``loraplace probe``, and ``study`` before placing ``auto``): a short uniform low-rank run on
    every linear module that scores each module; see probe.py."""

    steps: int = 20  # optimizer steps per probe seed (a trial has train.steps)
    rank: int = 4  # uniform LoRA rank of the probe adapter (alpha keeps the trials' alpha/rank scale)
    seeds: list[int] = field(default_factory=lambda: [0, 1])  # probe seeds: the spread and rank correlation need >= 2
    lr: float | None = None  # peak learning rate; None: train.lr
    score_batches: int = 4  # train batches the LoRA-drop norm is averaged over after the probe steps

    def check(self) -> None:
        _positive("probe.steps", self.steps)
        _positive("probe.rank", self.rank)
        _positive("probe.score_batches", self.score_batches)
        if self.lr is not None:
            _positive("probe.lr", self.lr)
        if not self.seeds:
            raise ConfigError("probe.seeds: empty; give at least one seed, e.g. probe.seeds=[0,1]")
        if len(set(self.seeds)) != len(self.seeds):
            raise ConfigError(f"probe.seeds: duplicates in {self.seeds}")


@dataclass
class AutoSpec:
    """Strategy ``auto``: the modules the probe scores highest, at train.rank, until the budget is met."""

    score: str = "lora_drop"  # lora_drop | grad_norm | fisher (the probe's criteria)
    budget: str | None = None  # "same:STRATEGY" or a count; None: the study's budget

    def check(self) -> None:
        _choice("auto.score", self.score, PROBE_CRITERIA)
        if self.budget is not None and str(self.budget).startswith(("same:auto", "same:random")):
            raise ConfigError(f"auto.budget: {self.budget!r} refers to itself; use same:STRATEGY of a fixed strategy "
                              "or a count")


METRIC_CHOICES = ("eval_loss", "accuracy")  # quality measures the analysis can decide on


@dataclass
class AnalysisSpec:
    """How the study's trials are compared (changes no trial: only the summary and the report)."""

    metric: str = "eval_loss"  # eval_loss | accuracy: the quality measure of retained improvement, Pareto fronts, recommendation

    def check(self) -> None:
        _choice("analysis.metric", self.metric, METRIC_CHOICES)


DEFAULT_STRATEGIES = ["all_linear", "attention_only", "mlp_only", "top_half"]


@dataclass
class StudyConfig:
    """A whole study: one model, one dataset, strategies x seeds, shared settings."""

    model: str = "smollm2-135m"  # alias, local HF directory, .gguf file, or hub id
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
    executor: str = "local"  # local (this process, one trial at a time) | ray (Ray workers)
    ray_address: str | None = None  # executor=ray: a cluster address; None starts Ray here (or uses RAY_ADDRESS)
    cpus_per_trial: float = 2  # executor=ray: CPUs (and torch threads) per trial
    gpus_per_trial: float = 0  # executor=ray: GPUs per trial (set 1 with train.device=cuda)
    probe: ProbeSpec = field(default_factory=ProbeSpec)  # the probe behind strategy auto
    auto: AutoSpec = field(default_factory=AutoSpec)  # strategy auto: which probe score, which budget
    analysis: AnalysisSpec = field(default_factory=AnalysisSpec)
    max_retries: int = 1  # executor=ray: reruns of a trial whose worker died, before it is recorded as failed
    track: str | None = None  # experiment tracking besides the store: mlflow | wandb (needs that package)
    tracking_uri: str | None = None  # track=mlflow: tracking server or store; None: sqlite:///OUT/mlflow.db

    def check(self) -> None:
        self.data.check()
        self.train.check()
        self.eval.check()
        self.analysis.check()
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
        _choice("executor", self.executor, ("local", "ray"))
        _positive("cpus_per_trial", self.cpus_per_trial)
        _finite("gpus_per_trial", self.gpus_per_trial)
        if self.max_retries < 0:
            raise ConfigError(f"max_retries: must be >= 0, got {self.max_retries}")
        if self.track is not None:
            _choice("track", self.track, ("mlflow", "wandb"))
        _finite("threshold", self.threshold)
        if self.gpus_per_trial < 0:
            raise ConfigError(f"gpus_per_trial: must be >= 0, got {self.gpus_per_trial}")
        if not 0 < self.threshold <= 1.5:
            raise ConfigError(f"threshold: must be in (0, 1.5], got {self.threshold}")
        self.probe.check()
        self.auto.check()
        reserved = [n for n in self.define if n == "auto" or (n.startswith("random:") and n[7:].isdigit())]
        if reserved:
            raise ConfigError(f"define.{reserved[0]}: auto and random:K are built from the probe and the budget; "
                              "choose another name")

    # -- serialization -------------------------------------------------------------------------
    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)

    @classmethod
    def from_dict(cls, data: dict) -> "StudyConfig":
        cfg = _build(cls, data, "")
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
            _apply_override(data, item)
        return cls.from_dict(data)


# -- helpers of this module: building dataclasses from plain data with type checks ------------
def _choice(name: str, value, valid: tuple) -> None:
    if value not in valid:
        raise ConfigError(f"{name}: {value!r} is not one of {', '.join(map(str, valid))}")


def _finite(name: str, value) -> None:
    if not math.isfinite(value):
        raise ConfigError(f"{name}: expected a finite number, got {value}")


def _positive(name: str, value) -> None:
    if value is None or not math.isfinite(value) or value <= 0:
        raise ConfigError(f"{name}: must be > 0, got {value}")


def _apply_override(data: dict, item: str) -> None:
    if "=" not in item:
        raise ConfigError(f"override {item!r}: expected key=value, e.g. train.lr=1e-4")
    key, raw = item.split("=", 1)
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError:
        value = raw
    node = data
    parts = key.strip().split(".")
    for p in parts[:-1]:
        node = node.setdefault(p, {})
        if not isinstance(node, dict):
            raise ConfigError(f"override {item!r}: {p} is not a section")
    node[parts[-1]] = value


def _build(cls, data, prefix: str):
    if not isinstance(data, dict):
        raise ConfigError(f"{prefix.rstrip('.') or 'config'}: expected a mapping, got {data!r}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise ConfigError(f"{prefix}{unknown[0]}: unknown setting; valid: {', '.join(sorted(names))}")
    kwargs = {}
    for f in dataclasses.fields(cls):
        if f.name in data:
            kwargs[f.name] = _coerce(hints[f.name], data[f.name], prefix + f.name)
    return cls(**kwargs)


def _coerce(tp, value, name: str):
    origin = typing.get_origin(tp)
    if dataclasses.is_dataclass(tp):
        return _build(tp, value, name + ".")
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for a in args:
            if a is type(None):
                continue
            try:
                return _coerce(a, value, name)
            except ConfigError as e:
                errors.append(str(e))
        raise errors[0] if len(errors) == 1 else ConfigError(f"{name}: {value!r} has the wrong type ({tp})")
    if origin is list:
        (item,) = typing.get_args(tp)
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            value = [value]  # seeds=0 means [0]; strategies=all_linear means [all_linear]
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{name}: expected a list, got {value!r}")
        return [_coerce(item, v, f"{name}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{name}: expected a mapping, got {value!r}")
        return dict(value)
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{name}: expected true or false, got {value!r}")
    if tp is float:
        number = None
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            number = float(value)
        elif isinstance(value, str):
            try:
                number = float(value)  # yaml reads "1e-4" as a string
            except ValueError:
                pass
        if number is None:
            raise ConfigError(f"{name}: expected a number, got {value!r}")
        if not math.isfinite(number):  # nan or inf: every trial would fail one by one
            raise ConfigError(f"{name}: expected a finite number, got {value!r}")
        return number
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise ConfigError(f"{name}: expected an integer, got {value!r}")
    if tp is str:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
        raise ConfigError(f"{name}: expected a string, got {value!r}")
    return value
