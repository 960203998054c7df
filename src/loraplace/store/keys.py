"""What each value a study caches depends on, and the one function that turns that into the value's key.

Usage::

    key("zero_shot", cfg, device=ws.device)              # 16 hex digits: meta zero_shot's "key"
    key("eva", cfg, device=ws.device, target=2_442_240)  # a value the config does not hold is passed by name
    "train.dtype" in depends("zero_shot")                # True: the config fields (and "device") it depends on

A study keeps values measured once (meta ``zero_shot``, ``kappa``, ``eva``, ``forgetting``, ``race``, the probe's
scores) under a key, ``core.identity.digest`` of what can change the value: a rerun reuses a value whose key
matches and measures again when a dependency changed. ``KINDS`` is the table of those dependencies: config
settings (a section or a field), values the caller passes (``extra``: not settings, e.g. PEFT's version), and
``CONDITIONS`` of the base model's numbers: ``train.dtype`` (the weights' precision), ``quantize`` (a bitsandbytes
base) and the device type (cpu, cuda or mps, from the resolved device: the kernels, and the random streams
sampling draws from).

Keys stored before dtype and device entered stay valid: a condition at the value every earlier key was made
under (dtype float32, device cpu, no quantization) is left out of the hashed data, so only a 16-bit or GPU measurement gets a key
of its own. The hashed data keep the names and shapes they were first stored with (the probe's even its
non-canonical numbers), which is why the names differ from kind to kind. Torch-free.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from loraplace.core.config import StudyConfig, TrainSpec
from loraplace.core.errors import LoraplaceError
from loraplace.core.identity import digest

KEY_PREFIX = "key:"  # a source "key:KIND" hashes the key of another kind (its dependencies come along)
DEVICE = "device"  # the resolved device's type: a condition, not a setting (train.device may say auto)
# Conditions of the base model's numbers: name -> (where its value comes from, the value every key stored before it
# entered was made under). Hashed under the name, unless at that earlier value.
CONDITIONS = {"dtype": ("train.dtype", "float32"), DEVICE: (DEVICE, "cpu"), "quantize": ("quantize", None)}
# Training settings the probe sets itself (probe.steps, no epochs, no dropout, one alpha/rank for every module).
PROBE_OWN = ("steps", "epochs", "dropout", "alpha_per_rank")


class CacheKeyError(LoraplaceError, TypeError):
    """A key asked for with an unknown kind or without a value it depends on."""


@dataclass(frozen=True)
class Kind:
    """What one kind of cached value depends on."""

    settings: dict  # hashed name -> a config path (a section, "train"; a field, "eval.batch_size"), a tuple of
    #                 field paths (hashed as {field: value}), or "key:KIND"
    without: tuple[str, ...] = ()  # fields left out of the sections named in ``settings``
    extra: tuple[str, ...] = ()  # values the caller passes by name, hashed under that name
    fixed: dict = field(default_factory=dict)  # constants hashed as first stored
    conditions: tuple[str, ...] = ()  # names in CONDITIONS
    plain_numbers: bool = True  # core.identity.digest's canonical numbers (False: the probe's stored form)


BASE = ("dtype", DEVICE, "quantize")  # a measurement of the base model: its weights' precision (and bitsandbytes
#                                        quantization) and the device's kernels


KINDS: dict[str, Kind] = {
    # the base model's loss on the eval set (meta zero_shot "key"; measure/zero_shot.py)
    "zero_shot": Kind({"model": "model", "data": "data", "eval_bs": "eval.batch_size"}, conditions=BASE),
    # the base model's accuracy (meta zero_shot "accuracy_key"): greedy generation on the zero-shot's eval set
    "accuracy": Kind({"zero_shot_key": "key:zero_shot", "accuracy_limit": "eval.accuracy_limit",
                      "max_new_tokens": "eval.max_new_tokens"}, extra=("stop",)),
    # the weights' condition numbers by PEFT's function (meta kappa; measure/kappa.py)
    "kappa": Kind({"model": "model"}, extra=("peft",), fixed={"kappa": "find_kappa_target_modules"}, conditions=BASE),
    # the forgetting set and the base model's loss on it (meta forgetting; measure/forgetting.py): its dtype was
    # hashed from the start; the device draws the samples
    "forgetting": Kind({"model": "model", "source": "eval.forgetting_source", "size": "eval.forgetting_size",
                        "length": "eval.forgetting_length", "dtype": "train.dtype"}, extra=("seed",),
                       conditions=(DEVICE, "quantize")),
    # EVA's ranks and A matrices from the base model's activations (meta eva; measure/eva.py)
    "eva": Kind({"model": "model", "data": "data", "batch_size": "train.batch_size", "eva": "eva",
                 "rank": "train.rank", "alpha": "train.alpha"}, extra=("target",), conditions=BASE),
    # the probe's scores (table probe_scores; measure/probe_scores.py): a short training run, keyed like a trial
    # (the trials' training identity, dtype included) less what the probe sets itself; like a trial's id, not by
    # the device
    "probe": Kind({"model": "model", "data": "data", "probe": "probe", "train": "train"},
                  without=("probe.seeds", *(f"train.{k}" for k in TrainSpec.SAME_NUMBERS + PROBE_OWN)),
                  conditions=("quantize",), plain_numbers=False),
    # racing's decisions (meta race; study/race.py): the trials (each id holds its own settings) and the rules
    "race": Kind({"race": ("race.at", "race.confidence", "race.slack"), "threshold": "threshold",
                  "metric": "analysis.metric", "baseline": "baseline"}, extra=("trials",)),
    # the learning-rate search's halving decisions (meta tune_race; study/tune.py): its trials and its rule
    "tune_race": Kind({"tune": ("tune.at", "tune.keep", "tune.min_keep")}, extra=("trials",)),
}


def device_type(device: str) -> str:
    """cpu, cuda or mps of a resolved device string ("cuda:1" -> "cuda")."""
    return str(device).split(":", 1)[0]


def key(kind: str, cfg: StudyConfig, device: str | None = None, **extra) -> str:
    """16 hex digits: the key of a ``kind`` value of study ``cfg`` measured on ``device`` (the resolved device,
    needed by the kinds that depend on it), with the ``extra`` values the kind names."""
    spec = _kind(kind)
    if set(extra) != set(spec.extra):
        raise CacheKeyError(f"key {kind!r}: needs the values {sorted(spec.extra)}, got {sorted(extra)}")
    view = cfg.to_dict()
    data = {name: _value(view, source, spec.without, cfg, device) for name, source in spec.settings.items()}
    data.update(spec.fixed)
    data.update(extra)
    for name in spec.conditions:
        source, earlier = CONDITIONS[name]
        if source == DEVICE and device is None:
            raise CacheKeyError(f"key {kind!r}: depends on the device; pass device=")
        value = device_type(device) if source == DEVICE else _value(view, source, (), cfg, device)
        if value != earlier:
            data[name] = value
    return digest(data, plain_numbers=spec.plain_numbers)


def depends(kind: str) -> tuple[str, ...]:
    """The config fields (``section.field`` or a top-level field) a ``kind`` key depends on, sorted, and ``device``
    where the resolved device's type enters; ``KINDS[kind].extra`` are the values the caller passes."""
    spec, out = _kind(kind), set()
    sections = {f.name: f.default_factory for f in dataclasses.fields(StudyConfig)
                if dataclasses.is_dataclass(f.default_factory)}
    for source in spec.settings.values():
        for path in (source if isinstance(source, tuple) else (source,)):
            if path.startswith(KEY_PREFIX):
                out |= set(depends(path[len(KEY_PREFIX):]))
            elif path in sections:
                out |= {f"{path}.{f.name}" for f in dataclasses.fields(sections[path])} - set(spec.without)
            else:
                out.add(path)
    out |= {CONDITIONS[name][0] for name in spec.conditions}
    return tuple(sorted(out))


def _kind(kind: str) -> Kind:
    if kind not in KINDS:
        raise CacheKeyError(f"key {kind!r}: not a kind of cached value; one of {', '.join(KINDS)}")
    return KINDS[kind]


def _value(view: dict, source, without: tuple[str, ...], cfg: StudyConfig, device: str | None):
    """The plain data a source names in ``view`` (``cfg.to_dict()``)."""
    if isinstance(source, tuple):
        return {path.rsplit(".", 1)[-1]: _value(view, path, without, cfg, device) for path in source}
    if source.startswith(KEY_PREFIX):
        return key(source[len(KEY_PREFIX):], cfg, device)
    head, _, rest = source.partition(".")
    value = view[head] if not rest else view[head][rest]
    if isinstance(value, dict) and not rest:  # a section, less the fields left out
        value = {k: v for k, v in value.items() if f"{head}.{k}" not in without}
    return value
