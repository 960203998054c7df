"""The typed study config: YAML and key=value overrides only serialize it; types are checked and coerced."""

from __future__ import annotations

import pytest

from loraplace.core.config import ConfigError, StudyConfig
from loraplace.core.errors import LoraplaceError
from toys import REPO


def test_defaults_round_trip_through_yaml_and_dict(tmp_path):
    cfg = StudyConfig.load()
    assert cfg == StudyConfig() and cfg.train.rank == 16 and cfg.seeds == [0, 1, 2]
    path = tmp_path / "study.yaml"
    path.write_text(cfg.to_yaml())
    assert StudyConfig.load(path) == cfg
    assert StudyConfig.from_dict(cfg.to_dict()) == cfg


@pytest.mark.parametrize("override, path, value", [
    ("train.lr=1e-4", ("train", "lr"), 1e-4),            # YAML reads 1e-4 as a string: coerced to float
    ("train.alpha=32", ("train", "alpha"), 32.0),         # an int where a float is expected
    ("train.steps=60.0", ("train", "steps"), 60),         # an integral float where an int is expected
    ("seeds=0", ("seeds",), [0]),                         # a scalar where a list is expected
    ("strategies=all_linear", ("strategies",), ["all_linear"]),
    ("'seeds=[3, 4]'", ("seeds",), [3, 4]),
    ("data.limit=null", ("data", "limit"), None),         # Optional fields take null
    ("model=123", ("model",), "123"),                     # numbers where a string is expected
    ("train.epochs=1.5", ("train", "epochs"), 1.5),
])
def test_overrides_are_coerced_to_the_field_types(override, path, value):
    cfg = StudyConfig.load(overrides=[override.strip("'")])
    node = cfg
    for p in path:
        node = getattr(node, p)
    assert node == value and type(node) is type(value)


@pytest.mark.parametrize("override, message", [
    ("train.steps=1.5", "train.steps: expected an integer, got 1.5"),
    ("train.gradient_checkpointing=yes please", "expected true or false"),
    ("train.lr=fast", "train.lr: expected a number"),
    ("seeds={a: 1}", "seeds: expected a list"),
    ("train.rnk=8", "train.rnk: unknown setting; valid:"),
    ("data=3", "data: expected a mapping"),
    ("train.dtype=float8", "train.dtype: 'float8' is not one of"),
    ("seeds=[0, 0]", "seeds: duplicates"),
    ("noequals", "expected key=value"),
    ("train.steps.x=1", "train.steps: expected an integer"),
    ("auto.budget=same:auto", "auto.budget: 'same:auto' names a strategy placed per study"),
    ("auto.budget=same:random:2", "auto.budget: 'same:random:2' names a strategy placed per study"),
])
def test_bad_values_name_the_field(override, message):
    with pytest.raises(ConfigError, match=message.replace("[", r"\[").replace("{", r"\{")) as err:
        StudyConfig.load(overrides=[override])
    assert "\n" not in str(err.value)
    assert isinstance(err.value, LoraplaceError)  # the CLI's one error class


def test_auto_budget_may_name_a_fixed_strategy_or_a_count():
    """The check that refuses a placed-per-study strategy (above) leaves the budgets auto can be filled to."""
    for budget in ("same:attention_only", "same:my_fixed", "1.5M", "250000"):
        assert StudyConfig.load(overrides=[f"auto.budget={budget}"]).auto.budget == budget


def test_yaml_file_errors(tmp_path):
    with pytest.raises(ConfigError, match="config file .*missing.yaml"):
        StudyConfig.load(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("train: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        StudyConfig.load(bad)
    bad.write_text("- a list\n")
    with pytest.raises(ConfigError, match="expected a mapping of settings"):
        StudyConfig.load(bad)


def test_overrides_win_over_the_file(tmp_path):
    path = tmp_path / "s.yaml"
    path.write_text("train:\n  steps: 10\n  lr: 0.001\nseeds: [5]\n")
    cfg = StudyConfig.load(path, overrides=["train.steps=20"])
    assert (cfg.train.steps, cfg.train.lr, cfg.seeds) == (20, 0.001, [5])


EXAMPLES = sorted((REPO / "examples").glob("*.yaml"))


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.name)
def test_every_shipped_config_loads_means_what_it_says_and_resolves(path):
    """Each example's every setting is read as written (nothing silently dropped or coerced to another value),
    and its strategies resolve on the embedded model's structure (from its config alone), budget-matched ones
    within the tolerance; those that need the probe (auto) say so, and their budget and random draws resolve."""
    import yaml

    from loraplace.model.anatomy import analyze
    from loraplace.model.loading import ModelError, skeleton
    from loraplace.placement.resolve import BUDGET_TOLERANCE
    from loraplace.study.plan import needs_probe, resolve_placements, selected_budget

    written = yaml.safe_load(path.read_text())
    cfg = StudyConfig.load(path)
    resolved = cfg.to_dict()

    def same(a, b, where):
        if isinstance(a, dict):
            for k, v in a.items():
                same(v, b[k], f"{where}.{k}")
        else:
            assert b == a or (isinstance(a, (int, float)) and float(b) == float(a)), (where, a, b)

    same(written, resolved, path.name)
    try:
        anat = analyze(skeleton(cfg.model))
    except ModelError as e:
        pytest.skip(f"the embedded model is not installed: {e}")
    from loraplace.core.names import EVA, KAPPA, is_auto

    # placed from the probe's scores, the weights or the data: shown by tests/study/test_probe.py, test_eva.py and
    # tests/model/test_conditioning.py; here their budget and every other strategy resolve
    data_driven = {s for s in cfg.strategies if is_auto(s) or s in (KAPPA, EVA)}
    if needs_probe(cfg):
        target = selected_budget(cfg, anat)
        fixed = StudyConfig.from_dict({**resolved, "strategies": [s for s in cfg.strategies if s not in data_driven],
                                       "budget": cfg.auto.budget or cfg.budget})
        placements = resolve_placements(fixed, anat)
    else:
        placements = resolve_placements(cfg, anat)
        target = None if cfg.budget is None else placements[cfg.baseline].trainable_params
    assert set(placements) == set(cfg.strategies) - data_driven
    if target is not None:
        ends = [p.allocation["target"] if p.allocation else p.trainable_params for p in placements.values()]
        assert all(abs(n - target) <= BUDGET_TOLERANCE * target for n in ends)  # AdaLoRA: the count it ends at


def test_study_yaml_lists_every_setting():
    """examples/study.yaml promises every setting with its default: every key of the config is in it."""
    import yaml

    path = next(p for p in EXAMPLES if p.name == "study.yaml")
    written = yaml.safe_load(path.read_text())

    def keys(d, prefix=""):
        return {prefix + k for k in d} | {x for k, v in d.items() if isinstance(v, dict) and k != "define"
                                          for x in keys(v, prefix + k + ".")}

    assert keys(StudyConfig().to_dict()) <= keys(written)
