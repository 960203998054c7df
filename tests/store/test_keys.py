"""The keys of a study's cached values: each changes with exactly what its value depends on, and keys stored before
dtype and device entered keep their values."""

from __future__ import annotations

import copy
import dataclasses

import pytest

from loraplace.core.config import StudyConfig
from loraplace.core.identity import digest
from loraplace.store.keys import KINDS, CacheKeyError, depends, device_type, key

EXTRA = {"stop": "a stopping rule", "peft": "0.21.0", "seed": 0, "target": 2_442_240, "trials": ["a1", "b2"]}


def _key(kind: str, cfg: StudyConfig, device: str = "cpu", **change) -> str:
    extra = {name: change.get(name, EXTRA[name]) for name in KINDS[kind].extra}
    return key(kind, cfg, device=device, **extra)


def _fields(cfg: StudyConfig) -> list[str]:
    """Every setting of the config, as ``section.field`` or a top-level field."""
    out = []
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        out += [f"{f.name}.{g.name}" for g in dataclasses.fields(value)] if dataclasses.is_dataclass(value) else [f.name]
    return out


def _other(value):
    """A value of the same kind that differs (the config is not checked: keys only read it)."""
    if isinstance(value, bool):
        return not value
    if isinstance(value, (int, float)):
        return value + 1.5
    if isinstance(value, str):
        return value + "x"
    if value is None:
        return 7
    if isinstance(value, list):
        return value + [0.75]
    if isinstance(value, dict):
        return {**value, "x": {"roles": "attn"}}
    raise AssertionError(f"no other value for {value!r}")


def _changed(cfg: StudyConfig, path: str) -> StudyConfig:
    out = copy.deepcopy(cfg)
    owner, name = (getattr(out, path.split(".")[0]), path.split(".")[1]) if "." in path else (out, path)
    setattr(owner, name, _other(getattr(owner, name)))
    return out


@pytest.mark.parametrize("kind", sorted(KINDS))
def test_a_key_changes_with_each_setting_it_depends_on_and_with_no_other(kind):
    cfg = StudyConfig()
    before = _key(kind, cfg)
    for path in _fields(cfg):
        assert (_key(kind, _changed(cfg, path)) != before) == (path in depends(kind)), path
    for name in KINDS[kind].extra:  # the values the caller passes
        assert _key(kind, cfg, **{name: _other(EXTRA[name])}) != before, name


@pytest.mark.parametrize("kind", sorted(KINDS))
def test_dtype_and_device_type_enter_where_the_value_depends_on_them(kind):
    cfg, bf16 = StudyConfig(), StudyConfig.from_dict({"train": {"dtype": "bfloat16"}})
    assert (_key(kind, bf16) != _key(kind, cfg)) == ("train.dtype" in depends(kind))
    on_device = "device" in depends(kind)
    for device in ("cuda", "cuda:1", "mps"):
        assert (_key(kind, cfg, device=device) != _key(kind, cfg)) == on_device, device
    assert _key(kind, cfg, device="cuda:0") == _key(kind, cfg, device="cuda:1")  # the type, not the index
    assert _key(kind, bf16, device="cuda") != _key(kind, bf16) or not on_device


def test_the_base_model_measurements_depend_on_dtype_and_device():
    """What the issue asked: a bfloat16 or GPU rerun measures the base model again."""
    for kind in ("zero_shot", "accuracy", "kappa", "eva", "forgetting"):
        assert {"train.dtype", "device"} <= set(depends(kind)), kind
    # the probe is keyed like a trial (its training identity holds the dtype, a trial's id has no device)
    assert "train.dtype" in depends("probe") and "device" not in depends("probe")
    assert device_type("cuda:3") == "cuda" and device_type("cpu") == "cpu"


def _as_first_stored(kind: str, cfg: StudyConfig) -> str:
    """The keys as every version before ``store.keys`` wrote them (float32 on a CPU): existing study directories
    hold these values, so they are the specification."""
    d, t, e = cfg.to_dict(), cfg.train, cfg.eval
    zkey = digest({"model": cfg.model, "data": d["data"], "eval_bs": e.batch_size})
    return {
        "zero_shot": zkey,
        "accuracy": digest({"zero_shot_key": zkey, "accuracy_limit": e.accuracy_limit,
                            "max_new_tokens": e.max_new_tokens, "stop": EXTRA["stop"]}),
        "kappa": digest({"model": cfg.model, "kappa": "find_kappa_target_modules", "peft": EXTRA["peft"]}),
        "forgetting": digest({"model": cfg.model, "source": e.forgetting_source, "size": e.forgetting_size,
                              "length": e.forgetting_length, "seed": EXTRA["seed"], "dtype": t.dtype}),
        "eva": digest({"model": cfg.model, "data": d["data"], "batch_size": t.batch_size, "eva": d["eva"],
                       "target": EXTRA["target"], "rank": t.rank, "alpha": t.alpha}),
        "probe": digest({"model": cfg.model, "data": d["data"],
                         "probe": {k: v for k, v in d["probe"].items() if k != "seeds"},
                         "train": {k: v for k, v in t.identity().items()
                                   if k not in ("steps", "epochs", "dropout", "alpha_per_rank")}},
                        plain_numbers=False),
        "race": digest({"trials": EXTRA["trials"], "race": {k: d["race"][k] for k in ("at", "confidence", "slack")},
                        "threshold": cfg.threshold, "metric": cfg.analysis.metric, "baseline": cfg.baseline}),
        # first stored with the learning-rate search (no earlier form to keep)
        "tune_race": digest({"trials": EXTRA["trials"], "tune": {k: d["tune"][k] for k in ("at", "keep", "min_keep")}}),
    }[kind]


@pytest.mark.parametrize("kind", sorted(KINDS))
def test_keys_stored_before_dtype_and_device_entered_keep_their_values(kind):
    for cfg in (StudyConfig(), StudyConfig.from_dict({"model": "tiny", "data": {"limit": 80}, "train": {"alpha": 16.0},
                                                      "eval": {"batch_size": 4}, "eva": {"rho": 1.5}})):
        assert _key(kind, cfg) == _as_first_stored(kind, cfg)


def test_a_key_without_what_it_needs_is_a_one_line_error():
    cfg = StudyConfig()
    with pytest.raises(CacheKeyError, match="depends on the device"):
        key("zero_shot", cfg)
    with pytest.raises(CacheKeyError, match=r"needs the values \['target'\], got \[\]"):
        key("eva", cfg, device="cpu")
    with pytest.raises(CacheKeyError, match="got \\['seed', 'size'\\]"):
        key("forgetting", cfg, device="cpu", seed=0, size=3)
    with pytest.raises(CacheKeyError, match="not a kind of cached value"):
        key("zero-shot", cfg, device="cpu")
