"""Routed experts as placement roles: counted as PEFT counts them, passed to PEFT by full parameter name, verified
after wrapping, exported exactly (or refused in one line), on tiny random-init Mixtral, Qwen2-MoE and Qwen3-MoE."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest
import yaml
from tiny_models import MOE_NAMES, build

from loraplace.model.anatomy import analyze
from loraplace.placement.export import ExportError, export
from loraplace.placement.peft import apply, lora_layers, verify
from loraplace.placement.record import PlacementRecord
from loraplace.placement.resolve import lora_params, match_budget, resolve
from loraplace.placement.select import kappa_placement, random_placement
from loraplace.placement.strategy import BUILTIN, PlacementError, Strategy, get_strategy

EXPERT_ROLES = {"mlp.experts.gate_up", "mlp.experts.down"}  # what transformers 5 stores for all three families
# PEFT 0.21 checks rank/alpha_pattern keys against the adapted modules only, so it warns that a parameter's key "did
# not match" although it applies it (the ranks below are checked); placement.peft.apply silences the same false alarm.
pytestmark = pytest.mark.filterwarnings("ignore:The following (rank|alpha)_pattern keys did not match:RuntimeWarning")


def _peft_count(peft_model) -> int:
    return sum(p.numel() for p in peft_model.parameters() if p.requires_grad)


def _by_definition(model, placement) -> int:
    """LoRA's count from the model's own tensors: r x (in + out) on a module's (out, in) weight; on a fused expert
    parameter (experts, a, b), rank r on each expert: r x experts x (a + b), whichever of a, b is the input."""
    total = 0
    for name, r in placement.modules.items():
        if placement.anatomy.layer(name).is_parameter:
            e, a, b = model.get_parameter(name).shape
            total += r * e * (a + b)
        else:
            out, inn = model.get_submodule(name).weight.shape
            total += r * (inn + out)
    return total


def _placements(anat) -> list:
    """Built-ins, per-role ranks (the mlp.experts group wins over mlp), experts of one block, budget-matched ones and
    a random module set with experts among its candidates."""
    strategies = [s for s in BUILTIN.values() if s.variant == "lora" and (s.name != "qv_only" or "attn.q" in anat.roles_present())]
    strategies += [Strategy("mixed", "attn.q+attn.v+mlp", rank={"attn": 2, "mlp.experts": 3, "mlp.experts.down": 5,
                                                                "mlp": 7}),
                   Strategy("experts_top", "mlp.experts", "1", rank=6)]
    out = [resolve(s, anat, rank=4, alpha=8) for s in strategies]
    target = resolve(get_strategy("all_linear"), anat, rank=8).trainable_params
    out += [match_budget(get_strategy(n), anat, target, rank=8) for n in ("attention_only", "mlp_only")]
    out.append(random_placement(anat, draw=1, target=target // 3, rank=4))
    return out


@pytest.mark.parametrize("arch", MOE_NAMES)
def test_expert_placements_count_exactly_what_peft_creates(arch):
    model = build(arch)
    anat = analyze(model)
    assert EXPERT_ROLES <= set(anat.roles_present())
    for p in _placements(anat):
        by_definition = _by_definition(model, p)
        peft_model = apply(model, p)  # verify() inside: the same modules, parameters and ranks
        assert {n: l.r["default"] for n, l in lora_layers(peft_model).items()} == p.modules, p.strategy.name
        assert _peft_count(peft_model) == p.trainable_params == by_definition, p.strategy.name
        peft_model.unload()
        assert analyze(model) == anat  # unwrapped: no LoRA left behind
    mixed = next(p for p in _placements(anat) if p.strategy.name == "mixed")
    ranks = {anat.layer(n).role: r for n, r in mixed.modules.items()}
    assert ranks["mlp.experts.gate_up"] == 3 and ranks["mlp.experts.down"] == 5 and ranks["attn.q"] == 2
    mlp = resolve(get_strategy("mlp_only"), anat)
    assert EXPERT_ROLES <= {anat.layer(n).role for n in mlp.modules}  # the mlp group includes the experts


def test_budget_matching_spreads_rank_over_experts_and_attention():
    anat = analyze(build("mixtral"))
    target = resolve(get_strategy("all_linear"), anat, rank=16).trainable_params
    p = match_budget(get_strategy("mlp_only"), anat, target, rank=16)
    assert abs(p.trainable_params - target) <= 0.05 * target
    expert = next(anat.layer(n) for n in p.modules)
    assert lora_params(expert, 3) == 3 * expert.experts * (expert.in_features + expert.out_features)
    assert min(p.modules.values()) > 16  # the experts alone must carry attention's share of the budget too


def test_lora_config_names_expert_parameters_in_full_and_modules_apart():
    model = build("qwen2_moe")
    anat = analyze(model)
    rec = resolve(Strategy("m", "attn.v+mlp", rank={"mlp.experts.down": 2}), anat, rank=4, alpha=8).record(dropout=0.0)
    kw = rec.lora_kwargs()
    params = dict(model.named_parameters())
    assert kw["target_parameters"] == rec.parameters() and all(params[n].dim() == 3 for n in kw["target_parameters"])
    assert {anat.layer(n).role for n in kw["target_parameters"]} == EXPERT_ROLES
    assert kw["target_modules"] and not set(kw["target_modules"]) & set(kw["target_parameters"])
    assert {anat.layer(n).role for n in kw["target_modules"]} == {"attn.v", "mlp.gate", "mlp.up", "mlp.down"}  # shared
    assert kw["rank_pattern"] == {n: 2 for n in rec.modules if n.endswith("experts.down_proj")}  # keyed by full name
    assert PlacementRecord.from_dict(json.loads(json.dumps(rec.to_dict()))) == rec
    dense = resolve(get_strategy("all_linear"), analyze(build("llama")), rank=4).record().lora_kwargs()
    assert "target_parameters" not in dense  # a dense model's config (and so its trials' ids) is what it was


def test_verify_checks_the_wrapped_expert_parameters():
    from peft import LoraConfig, get_peft_model

    model = build("mixtral")
    p = resolve(get_strategy("mlp_only"), analyze(model), rank=4, alpha=8)
    kw = p.record(dropout=0.0).lora_kwargs()
    one = kw["target_parameters"][0]
    for change, message in (({"rank_pattern": {one: 2}}, "rank 2, expected 4"),
                            ({"target_parameters": kw["target_parameters"][1:]}, "missing")):
        peft_model = get_peft_model(model, LoraConfig(**{**kw, **change}))
        with pytest.raises(PlacementError, match=message):
            verify(peft_model, p)
        peft_model.unload()


def test_what_peft_cannot_train_on_experts_is_refused_in_one_line():
    model = build("mixtral")
    anat = analyze(model)
    with pytest.raises(PlacementError, match="LoRA dropout 0.1 cannot apply to routed experts") as err:
        apply(model, resolve(get_strategy("mlp_only"), anat), dropout=0.1)
    assert "\n" not in str(err.value)
    assert analyze(model) == anat  # refused before PEFT touched the model
    with pytest.raises(PlacementError, match="variant dora cannot train routed experts"):
        resolve(Strategy("d", "all", variant="dora"), anat)
    assert resolve(Strategy("d", "attn", variant="dora"), anat).modules  # DoRA on attention stays possible
    rs = resolve(Strategy("r", "mlp", variant="rslora"), anat, rank=4, alpha=8)
    peft_model = apply(model, rs)  # rsLoRA: PEFT scales a parameter's adapter by alpha / sqrt(r) as a module's
    assert {l.scaling["default"] for l in lora_layers(peft_model).values()} == {8 / 4 ** 0.5}
    peft_model.unload()


def test_kappa_refuses_experts_that_peft_ranks_apart():
    from loraplace.model.conditioning import kappa_order

    model = build("mixtral")
    anat = analyze(model)
    order, _ = kappa_order(model, anat)  # PEFT's KappaTune: modules in one order, expert parameters in another
    with pytest.raises(PlacementError, match="KappaTune ranks routed experts .* apart from the modules") as err:
        kappa_placement(anat, order, top_p=0.2, target=None)
    assert "\n" not in str(err.value)


# -- exports ------------------------------------------------------------------------------------------------------
def _record(arch: str, strategy: Strategy, rank: int = 4):
    model = build(arch)
    return resolve(strategy, analyze(model), rank=rank, alpha=2 * rank, alpha_per_rank=True).record(dropout=0.0)


def _rebuilt(arch: str, lora_config_kwargs: dict) -> tuple[dict, int]:
    """{name: (r, alpha)} and the trainable count of what PEFT builds from these LoraConfig arguments on a fresh model."""
    from peft import LoraConfig, get_peft_model

    peft_model = get_peft_model(build(arch, seed=1), LoraConfig(**lora_config_kwargs))
    return ({n: (l.r["default"], l.lora_alpha["default"]) for n, l in lora_layers(peft_model).items()},
            _peft_count(peft_model))


def _expected(rec: PlacementRecord) -> dict:
    return {n: (m.rank, m.alpha) for n, m in rec.modules.items()}


@pytest.mark.parametrize("arch", MOE_NAMES)
def test_peft_export_rebuilds_the_studied_placement(arch):
    rec = _record(arch, Strategy("mixed", "attn+mlp.experts", "1", rank={"attn.k": 2, "mlp.experts.gate_up": 6}))
    cfg = json.loads(export(rec, "peft"))
    assert cfg.pop("peft_type") == "LORA" and cfg["target_parameters"] == rec.parameters()
    assert _rebuilt(arch, cfg) == (_expected(rec), rec.trainable_params)


def _axolotl_to_peft(cfg: dict) -> dict:
    """What axolotl's _build_peft_lora_config hands to LoraConfig (axolotl 067b021, loaders/adapter.py)."""
    return {"r": cfg["lora_r"], "lora_alpha": cfg["lora_alpha"], "lora_dropout": cfg["lora_dropout"],
            "target_modules": cfg["lora_target_modules"] or [], "target_parameters": cfg.get("lora_target_parameters") or [],
            "layers_to_transform": cfg.get("peft_layers_to_transform"), "bias": "none", "task_type": "CAUSAL_LM"}


@pytest.mark.parametrize("strategy, modules", [
    (Strategy("all_linear", "all"), ["q_proj", "k_proj", "v_proj", "o_proj"]),
    (Strategy("top", "all", "1"), ["q_proj", "k_proj", "v_proj", "o_proj"]),  # a block subset: layers_to_transform
    (Strategy("experts", "mlp.experts"), []),
])
def test_axolotl_export_targets_experts_by_full_parameter_name(strategy, modules):
    rec = _record("mixtral", strategy)
    cfg = yaml.safe_load(export(rec, "axolotl"))
    assert cfg["lora_target_modules"] == modules and cfg["lora_target_parameters"] == rec.parameters()
    assert cfg.get("peft_layers_to_transform") == ([1] if strategy.blocks == "1" else None)
    assert _rebuilt("mixtral", _axolotl_to_peft(cfg)) == (_expected(rec), rec.trainable_params)


@pytest.mark.parametrize("fmt, tool", [("llamafactory", "LLaMA-Factory"), ("torchtune", "torchtune")])
def test_tools_without_expert_targets_refuse_them(fmt, tool):
    with pytest.raises(ExportError, match=f"{tool}.* cannot target routed experts' fused parameters") as err:
        export(_record("mixtral", Strategy("mlp_only", "mlp")), fmt)
    assert "\n" not in str(err.value)
    attention = _record("mixtral", Strategy("attention_only", "attn"))
    if fmt == "llamafactory":  # without experts the placement is LLaMA-Factory's as before
        assert yaml.safe_load(export(attention, fmt))["lora_target"] == "q_proj,k_proj,v_proj,o_proj"
    header = export(replace(attention, modules={**attention.modules, **_record("mixtral", Strategy("e", "mlp.experts")).modules}),
                    "axolotl").splitlines()[0]
    assert "8 modules + 4 expert parameters" in header
