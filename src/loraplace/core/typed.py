"""Building typed dataclasses from plain data (YAML, ``key=value`` overrides) with one-line errors.

Usage::

    spec = build(TrainSpec, {"lr": "1e-4"}, "train.")     # TrainSpec(lr=0.0001, ...)
    apply_override(data, "train.steps=60")                 # data["train"]["steps"] = 60

Values are parsed with ``yaml.safe_load`` (nothing is executed) and checked against the field types;
an error names the field, the bad value and what is valid. ``check_*`` are the range checks the
config's sections share.
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing

import yaml

from loraplace.core.errors import LoraplaceError


class ConfigError(LoraplaceError, ValueError):
    """A config value is missing, of the wrong type or out of range; the message names the field."""


def check_choice(name: str, value, valid: tuple) -> None:
    """``value`` is one of ``valid``, else a ConfigError naming the field and the choices."""
    if value not in valid:
        raise ConfigError(f"{name}: {value!r} is not one of {', '.join(map(str, valid))}")


def check_finite(name: str, value) -> None:
    if not math.isfinite(value):
        raise ConfigError(f"{name}: expected a finite number, got {value}")


def check_positive(name: str, value) -> None:
    """A finite number > 0."""
    if value is None or not math.isfinite(value) or value <= 0:
        raise ConfigError(f"{name}: must be > 0, got {value}")


def apply_override(data: dict, item: str) -> None:
    """Set ``a.b.c=value`` (value parsed as YAML) inside the plain-data config ``data``."""
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


def build(cls, data, prefix: str):
    """A ``cls`` dataclass from a mapping; unknown keys and wrong types are ConfigErrors named ``prefix + key``."""
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
            kwargs[f.name] = coerce(hints[f.name], data[f.name], prefix + f.name)
    return cls(**kwargs)


def coerce(tp, value, name: str):
    """``value`` as type ``tp`` (dataclasses, unions, lists, dicts, bool, float, int, str), or a ConfigError."""
    origin = typing.get_origin(tp)
    if dataclasses.is_dataclass(tp):
        return build(tp, value, name + ".")
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for a in args:
            if a is type(None):
                continue
            try:
                return coerce(a, value, name)
            except ConfigError as e:
                errors.append(str(e))
        raise errors[0] if len(errors) == 1 else ConfigError(f"{name}: {value!r} has the wrong type ({tp})")
    if origin is list:
        (item,) = typing.get_args(tp)
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            value = [value]  # seeds=0 means [0]; strategies=all_linear means [all_linear]
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{name}: expected a list, got {value!r}")
        return [coerce(item, v, f"{name}[{i}]") for i, v in enumerate(value)]
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
