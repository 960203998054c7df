"""Placement: strategy -> explicit module names and ranks, PEFT lands exactly there, budgets match."""

from __future__ import annotations

import pytest
from tiny_models import ARCH_NAMES, build

from loraplace.core.roles import ROLE_GROUPS
from loraplace.model.anatomy import analyze
from loraplace.placement.peft import apply, lora_layers
from loraplace.placement.resolve import match_budget, parse_budget, resolve
from loraplace.placement.strategy import BUILTIN, PlacementError, Strategy, get_strategy, parse_blocks


def _lora_modules(peft_model) -> dict[str, int]:
    return {n: layer.r["default"] for n, layer in lora_layers(peft_model).items()}


def _strategies_for(anat) -> list[Strategy]:
    """Built-ins that apply to this architecture (qv_only needs separate q and v)."""
    present = set(anat.roles_present())
    out = [s for n, s in BUILTIN.items() if (n != "qv_only" or {"attn.q", "attn.v"} <= present)
           and s.variant != "adalora"]  # placed by AdaLoRA while training: tests/placement/variants/test_adalora.py
    out.append(Strategy("mixed", "all", "0", rank={"attn": 2, "mlp": 3}))
    return out


@pytest.mark.parametrize("arch", ARCH_NAMES)
def test_peft_adapts_exactly_the_resolved_modules(arch):
    model = build(arch)
    anat = analyze(model)
    for strategy in _strategies_for(anat):
        p = resolve(strategy, anat, rank=4, alpha=8)
        peft_model = apply(model, p)
        assert _lora_modules(peft_model) == p.modules, (arch, strategy.name)
        trainable = sum(t.numel() for t in peft_model.parameters() if t.requires_grad)
        by_hand = sum(r * (anat.layer(n).in_features + anat.layer(n).out_features) for n, r in p.modules.items())
        assert trainable == by_hand == p.trainable_params
        assert p.anatomy.base_params == anat.base_params  # adapters never counted in the base
        peft_model.unload()
        assert not _has_lora(model), "unload must leave the base model without LoRA layers"


def _has_lora(model) -> bool:
    from peft.tuners.lora import LoraLayer

    return any(isinstance(m, LoraLayer) for m in model.modules())


def test_gpt2_attention_only_excludes_mlp_c_proj():
    anat = analyze(build("gpt2"))
    p = resolve(get_strategy("attention_only"), anat)
    assert all(".attn." in n for n in p.modules)
    assert {anat.layer(n).role for n in p.modules} == {"attn.qkv", "attn.o"}
    mlp = resolve(get_strategy("mlp_only"), anat)
    assert any(n.endswith("mlp.c_proj") for n in mlp.modules) and not any(".attn." in n for n in mlp.modules)


def test_rank_pattern_keyed_by_full_names_and_per_role_ranks():
    model = build("llama")
    anat = analyze(model)
    p = resolve(Strategy("r", "all", rank={"attn": 2, "mlp.down": 5, "mlp": 3}), anat, rank=4, alpha=8, alpha_per_rank=True)
    for n, r in p.modules.items():
        role = anat.layer(n).role
        assert r == (2 if role.startswith("attn") else 5 if role == "mlp.down" else 3)
        assert p.alphas[n] == 8 * r / 4
    cfg = p.record().lora_config()
    assert set(cfg.target_modules) == set(p.modules)  # explicit full names, no suffixes
    assert cfg.rank_pattern and all(k in p.modules and p.modules[k] != cfg.r for k in cfg.rank_pattern)
    peft_model = apply(model, p)
    from peft.tuners.lora import LoraLayer

    scaling = {n[len("base_model.model."):]: m.scaling["default"] for n, m in peft_model.named_modules() if isinstance(m, LoraLayer)}
    assert all(abs(scaling[n] - p.alphas[n] / r) < 1e-9 for n, r in p.modules.items())
    peft_model.unload()


@pytest.mark.parametrize(
    "spec,expected",
    [
        ("all", list(range(8))),
        ("first:3", [0, 1, 2]),
        ("last:2", [6, 7]),
        ("top:25%", [6, 7]),
        ("bottom:50%", [0, 1, 2, 3]),
        ("middle:2", [3, 4]),
        ("every:2", [0, 2, 4, 6]),
        ("every:3:1", [1, 4, 7]),
        ("2-4", [2, 3, 4]),
        ("0,5,7", [0, 5, 7]),
        ("last:0.5", [4, 5, 6, 7]),
    ],
)
def test_block_specs(spec, expected):
    assert parse_blocks(spec, 8) == expected


@pytest.mark.parametrize(
    "spec,message",
    [("9", "out of range"), ("first:12", "out of range"), ("every:0", "K must be"), ("lots", "not understood"), ("0-99", "out of range")],
)
def test_bad_block_specs_name_the_value(spec, message):
    with pytest.raises(PlacementError, match=message):
        parse_blocks(spec, 8)


def test_bad_strategies_give_clear_errors():
    anat = analyze(build("gpt2"))
    with pytest.raises(PlacementError, match="unknown strategy 'nope'.*all_linear"):
        get_strategy("nope")
    with pytest.raises(PlacementError, match="unknown role 'attn.x'"):
        resolve(Strategy("s", "attn.x"), anat)
    with pytest.raises(PlacementError, match="matches no module.*attn.qkv"):
        resolve(get_strategy("qv_only"), anat)  # GPT-2 has fused qkv: no separate q or v
    with pytest.raises(PlacementError, match="must be in 1-"):
        resolve(get_strategy("all_linear"), anat, rank=0)
    with pytest.raises(PlacementError, match="must be in 1-48"):
        resolve(get_strategy("all_linear"), anat, rank=49)  # hidden 48: no rank above min(in, out)
    with pytest.raises(PlacementError, match="rank key 'attn.z'"):
        resolve(Strategy("s", rank={"attn.z": 2}), anat)


def test_user_strategy_from_yaml_vocabulary():
    s = get_strategy("mine", {"mine": {"roles": ["attn.q", "attn.v"], "blocks": [0, 1], "rank": 2}})
    anat = analyze(build("llama"))
    p = resolve(s, anat)
    assert {anat.layer(n).role for n in p.modules} == {"attn.q", "attn.v"} and set(p.modules.values()) == {2}
    with pytest.raises(PlacementError, match="unknown key 'layers'"):
        get_strategy("bad", {"bad": {"layers": 3}})


@pytest.mark.parametrize("arch", ["llama", "gpt2", "gpt_neox", "phi3"])
def test_budget_matching_lands_within_five_percent(arch):
    anat = analyze(build(arch))
    target = resolve(get_strategy("all_linear"), anat, rank=8).trainable_params
    for name in ("attention_only", "mlp_only", "top_half", "every_other"):
        p = match_budget(get_strategy(name), anat, target, rank=8)
        assert abs(p.trainable_params - target) <= 0.05 * target, (arch, name, p.trainable_params, target)
    assert parse_budget("same:all_linear", anat, 8) == target
    assert parse_budget("2.5k", anat, 8) == 2500


def test_unreachable_budget_is_refused():
    anat = analyze(build("llama"))
    with pytest.raises(PlacementError, match="unreachable"):
        match_budget(get_strategy("qv_only"), anat, target=10**9)
    with pytest.raises(PlacementError, match="unreachable"):
        match_budget(get_strategy("all_linear"), anat, target=3)
    with pytest.raises(PlacementError, match="expected a parameter count"):
        parse_budget("lots", anat, 8)


def test_role_groups_cover_attention_and_mlp():
    assert set(ROLE_GROUPS["attn"]) >= {"attn.q", "attn.qkv", "attn.o"}
    assert set(ROLE_GROUPS["mlp"]) >= {"mlp.up", "mlp.down"}
