"""anatomy.analyze on tiny random-init models of every registered architecture, plain and PEFT-wrapped."""
from __future__ import annotations

import functools
import json
import warnings

import pytest
import torch
from peft import LoraConfig, get_peft_model
from torch import nn
from transformers.pytorch_utils import Conv1D

from loraplace.core.roles import EXPERTS, ROLE_GROUPS, ROLES, is_expert_role, role_keys
from loraplace.model.anatomy import AnatomyError, analyze
from tiny_models import ARCH_NAMES, EXPECTED_ROLES, MOE_NAMES, build


@functools.cache
def _built(arch):  # one model + anatomy per arch for the read-only tests
    model = build(arch)
    return model, analyze(model)


def _unique_params(model):
    return sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())


def test_role_constants():
    assert set(ROLE_GROUPS) == {"attn", "mlp", EXPERTS}
    assert ROLE_GROUPS["attn"] + ROLE_GROUPS["mlp"] == ROLES  # the two groups cover every role once
    assert ROLE_GROUPS["mlp"][-len(ROLE_GROUPS[EXPERTS]):] == ROLE_GROUPS[EXPERTS]  # the experts: a part of mlp
    assert [r for r in ROLES if is_expert_role(r)] == list(ROLE_GROUPS[EXPERTS])
    assert role_keys("mlp.experts.down") == ("mlp.experts.down", EXPERTS, "mlp")  # the most specific first
    assert role_keys("attn.q") == ("attn.q", "attn") and role_keys("other") == ("other",)


@pytest.mark.parametrize("arch", ARCH_NAMES)
def test_roles_per_block(arch):
    model, anat = _built(arch)
    assert anat.n_blocks == model.config.num_hidden_layers
    assert sorted({l.block for l in anat.layers}) == list(range(anat.n_blocks))
    for b in range(anat.n_blocks):
        roles = [l.role for l in anat.layers if l.block == b]
        assert sorted(roles) == sorted(EXPECTED_ROLES[arch]), (arch, b, roles)  # each role exactly once
    assert set(anat.roles_present()) == set(EXPECTED_ROLES[arch])
    assert list(anat.roles_present()) == [r for r in ROLES if r in anat.roles_present()]


@pytest.mark.parametrize("arch", ARCH_NAMES)
def test_layers_cover_blocks_once(arch):
    model, anat = _built(arch)
    inside = [n for n, m in model.named_modules()
              if isinstance(m, (nn.Linear, Conv1D)) and n.startswith(anat.blocks_path + ".")]
    assert [l.name for l in anat.layers] == inside  # every block linear, named_modules order
    grouped = [l.name for ls in anat.by_role().values() for l in ls]
    assert sorted(grouped) == sorted(inside)  # each layer in exactly one role
    for l in anat.layers:
        assert l.name.startswith(f"{anat.blocks_path}.{l.block}.")
    assert sum(anat.role_params().values()) == sum(l.params for l in anat.layers)


@pytest.mark.parametrize("arch", ARCH_NAMES)
def test_shapes_match_weights(arch):
    model, anat = _built(arch)
    for l in anat.layers + anat.outside:
        mod = model.get_submodule(l.name)
        w = mod.weight
        if l.kind == "Conv1D":
            assert isinstance(mod, Conv1D) and tuple(w.shape) == (l.in_features, l.out_features)
        elif l.kind == "Linear":
            assert isinstance(mod, nn.Linear) and tuple(w.shape) == (l.out_features, l.in_features)
        else:
            assert l.kind == "Embedding" and tuple(w.shape) == (l.in_features, l.out_features)
        assert l.params == w.numel() + (mod.bias.numel() if getattr(mod, "bias", None) is not None else 0)


@pytest.mark.parametrize("arch", ARCH_NAMES)
def test_outside_and_base_params(arch):
    model, anat = _built(arch)
    assert anat.base_params == _unique_params(model)
    assert anat.model_type == model.config.model_type
    outside = {l.name: l for l in anat.outside}
    assert outside["lm_head"].role == "lm_head" and outside["lm_head"].block == -1
    emb = model.get_input_embeddings()
    emb_name = next(n for n, m in model.named_modules() if m is emb)
    assert outside[emb_name].role == "embedding" and outside[emb_name].kind == "Embedding"
    assert not {l.name for l in anat.layers} & set(outside)


def test_gqa_and_fused_shapes():
    _, llama = _built("llama")  # hidden 48, 6 heads x 8, 2 KV heads, MLP 128
    shapes = {l.role: (l.in_features, l.out_features) for l in llama.layers if l.block == 0}
    assert shapes == {"attn.q": (48, 48), "attn.k": (48, 16), "attn.v": (48, 16), "attn.o": (48, 48),
                      "mlp.gate": (48, 128), "mlp.up": (48, 128), "mlp.down": (128, 48)}
    _, phi3 = _built("phi3")  # qkv 64 + 2*32 = 128 is also 2 x 64 (a shape-valid gate_up): must still be attention
    shapes = {l.role: (l.in_features, l.out_features) for l in phi3.layers if l.block == 0}
    assert shapes == {"attn.qkv": (64, 128), "attn.o": (64, 64), "mlp.gate_up": (64, 192), "mlp.down": (96, 64)}


def test_gpt2_c_proj_split():
    _, anat = _built("gpt2")  # n_embd 48, Conv1D weights are (in, out)
    got = {l.name: (l.role, l.kind, l.in_features, l.out_features) for l in anat.layers if l.block == 1}
    assert got == {
        "transformer.h.1.attn.c_attn": ("attn.qkv", "Conv1D", 48, 144),
        "transformer.h.1.attn.c_proj": ("attn.o", "Conv1D", 48, 48),
        "transformer.h.1.mlp.c_fc": ("mlp.up", "Conv1D", 48, 192),
        "transformer.h.1.mlp.c_proj": ("mlp.down", "Conv1D", 192, 48),
    }


def test_opt_mlp_directly_in_block():
    _, anat = _built("opt")
    roles = {l.name.rsplit(".", 1)[-1]: l.role for l in anat.layers if l.block == 0}
    assert roles == {"q_proj": "attn.q", "k_proj": "attn.k", "v_proj": "attn.v", "out_proj": "attn.o",
                     "fc1": "mlp.up", "fc2": "mlp.down"}


@pytest.mark.parametrize("arch", ARCH_NAMES)
def test_registration_order_fallback_agrees(arch):
    model, anat = _built(arch)
    assert analyze(model, trace=False).layers == anat.layers


@pytest.mark.parametrize("arch", ARCH_NAMES)
def test_peft_wrapped_matches_plain(arch):
    plain = build(arch)
    anat = analyze(plain)
    targets = [l.name for l in anat.layers[::2]] + ["lm_head"]  # full names: short ones are ambiguous
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # peft's fan_in_fan_out / tied-weights / deprecation notices
        peft_model = get_peft_model(plain, LoraConfig(r=2, target_modules=targets))
    wrapped = analyze(peft_model)
    names = {n for n, _ in peft_model.named_modules()}
    pre = "base_model.model."
    assert all(l.name in names for l in wrapped.layers + wrapped.outside)
    assert not any("lora_" in l.name or l.name.endswith("base_layer") for l in wrapped.layers + wrapped.outside)
    def strip(ls):  # names (and the tied-to name) carry the wrapper's prefix; everything else is equal
        return [(l.name.removeprefix(pre),) + tuple(vars(l).values())[1:-1] + ((l.tied_to or "").removeprefix(pre),)
                for l in ls]
    assert strip(wrapped.layers) == strip(anat.layers)
    assert strip(wrapped.outside) == strip(anat.outside)
    assert wrapped.blocks_path == pre + anat.blocks_path
    assert wrapped.base_params == anat.base_params < _unique_params(peft_model)  # LoRA tensors not counted


def test_layer_lookup_and_to_dict():
    _, anat = _built("llama")
    name = "model.layers.1.mlp.down_proj"
    assert anat.layer(name).role == "mlp.down" and anat.layer(name).block == 1
    assert anat.layer("lm_head").role == "lm_head"
    with pytest.raises(KeyError, match="model.layers.9.mlp"):
        anat.layer("model.layers.9.mlp")
    d = json.loads(json.dumps(anat.to_dict()))
    assert d["n_blocks"] == 2 and d["blocks_path"] == "model.layers" and d["base_params"] == anat.base_params
    assert [x["name"] for x in d["layers"]] == [l.name for l in anat.layers]


def test_no_block_stack_raises():
    with pytest.raises(AnatomyError, match="no block stack"):
        analyze(nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 8)))
    assert issubclass(AnatomyError, ValueError)


class _Block(nn.Module):  # attention-shaped, but its three input projections have uninformative names
    def __init__(self, h=16):
        super().__init__()
        self.mix = nn.ModuleDict({"a": nn.Linear(h, h), "b": nn.Linear(h, h), "c": nn.Linear(h, h)})
        self.mix["proj"] = nn.Linear(h, h)
        self.ffn = nn.Sequential(nn.Linear(h, 4 * h), nn.GELU(), nn.Linear(4 * h, h))


class _NoConfigLM(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(32, 16)
        self.blocks = nn.ModuleList(_Block() for _ in range(3))
        self.head = nn.Linear(16, 32)


def test_no_config_model_never_guesses():
    torch.manual_seed(0)
    anat = analyze(_NoConfigLM())  # no config, no forward that takes input_ids: shapes + registration order
    assert anat.blocks_path == "blocks" and anat.n_blocks == 3 and anat.model_type == ""
    roles = {l.name.split(".", 2)[-1]: l.role for l in anat.layers if l.block == 0}
    # q/k/v cannot be told apart (same shape, no names): "other", never guessed; o and the MLP are structural.
    assert roles == {"mix.a": "other", "mix.b": "other", "mix.c": "other", "mix.proj": "attn.o",
                     "ffn.0": "mlp.up", "ffn.2": "mlp.down"}
    assert {l.role for l in anat.outside} == {"embedding", "other"}  # no get_output_embeddings: head is "other"


def test_tied_output_head_is_marked_and_counted_once():
    from tiny_models import build

    tied = analyze(build("llama"))  # tie_word_embeddings=True
    head = next(l for l in tied.outside if l.role == "lm_head")
    emb = next(l for l in tied.outside if l.role == "embedding")
    assert head.tied_to == emb.name and emb.tied_to is None
    assert tied.base_params == sum(l.params for l in tied.layers) + emb.params + sum(
        p.numel() for n, p in build("llama").named_parameters() if "norm" in n)
    untied = analyze(build("mistral"))
    assert all(l.tied_to is None for l in untied.outside)


def _meta(arch):
    from transformers import AutoModelForCausalLM
    from tiny_models import config

    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config(arch))


@pytest.mark.parametrize("arch", ARCH_NAMES + MOE_NAMES)
def test_meta_skeleton_reads_like_real_weights(arch):
    real = analyze(build(arch))
    meta = _meta(arch)
    assert all(p.device.type == "meta" for p in meta.parameters())
    assert analyze(meta) == real  # roles, names, shapes, params, tied weights, fixed (MoE) weights


@pytest.mark.parametrize("arch", MOE_NAMES)
def test_moe_experts_are_parameter_layers_and_the_router_stays_apart(arch):
    model = build(arch)
    anat = analyze(model)
    blocks, cfg = model.config.num_hidden_layers, model.config
    assert {"attn.q", "attn.k", "attn.v", "attn.o"} <= set(anat.roles_present())
    experts = [l for l in anat.layers if l.is_parameter]
    n_experts = getattr(cfg, "num_local_experts", None) or cfg.num_experts
    inter = getattr(cfg, "moe_intermediate_size", None) or cfg.intermediate_size
    for l in experts:
        p = model.get_parameter(l.name)  # a parameter's full name, held by the experts module
        assert p.dim() == 3 and not isinstance(model.get_submodule(l.name.rpartition(".")[0]), nn.Linear)
        assert l.params == p.numel() and l.experts == p.shape[0] == n_experts
        # transformers keeps each expert's weight as (out, in), as nn.Linear does (PEFT reads it so too)
        assert (l.out_features, l.in_features) == tuple(p.shape[1:])
        want = {"mlp.experts.gate_up": (cfg.hidden_size, 2 * inter), "mlp.experts.down": (inter, cfg.hidden_size)}
        assert (l.in_features, l.out_features) == want[l.role]
    assert sorted((l.block, l.role) for l in experts) == sorted(
        (b, r) for b in range(blocks) for r in ("mlp.experts.gate_up", "mlp.experts.down"))
    assert set(anat.adaptable()) >= {l.name for l in experts} and anat.layer(experts[0].name) == experts[0]
    assert [f.role for f in anat.fixed] == ["moe.router"] * blocks  # only the routers are left out
    for f in anat.fixed:
        assert "Router" in f.kind and f.params == model.get_submodule(f.name).weight.numel()
    # everything counted: adaptable layers + fixed weights + outside + norms (1-D) == all parameters
    norms = sum(p.numel() for n, p in model.named_parameters() if "norm" in n)
    assert (sum(l.params for l in anat.layers) + sum(anat.fixed_params().values())
            + sum(l.params for l in anat.outside if not l.tied_to) + norms) == anat.base_params
    assert json.loads(json.dumps(anat.to_dict()))["fixed"][0]["reason"] == anat.fixed[0].reason
    assert {d["experts"] for d in anat.to_dict()["layers"]} == {0, n_experts}


def test_peft_wrapped_experts_read_like_the_bare_model():
    """Through PEFT's ParamWrappers (nested where one experts module has two adapted parameters) the anatomy is the
    bare model's: names, shapes, counts, base parameters without the adapters."""
    model = build("qwen2_moe")
    bare = analyze(model)
    names = [l.name for l in bare.layers if l.is_parameter or l.role == "attn.q"]
    peft_model = get_peft_model(model, LoraConfig(r=2, target_modules=[n for n in names if "q_proj" in n],
                                                  target_parameters=[n for n in names if "experts" in n]))
    wrapped = analyze(peft_model)
    strip = len("base_model.model.")
    assert [(l.name[strip:], l.role, l.in_features, l.out_features, l.experts, l.params) for l in wrapped.layers] == [
        (l.name, l.role, l.in_features, l.out_features, l.experts, l.params) for l in bare.layers]
    assert wrapped.base_params == bare.base_params and len(wrapped.fixed) == len(bare.fixed)


def test_experts_whose_projections_cannot_be_read_stay_fixed():
    """Three same-shape expert stacks with no telling names: no reading, so no placement role."""
    model = build("mixtral")
    experts = model.model.layers[0].mlp.experts
    h, i = model.config.hidden_size, model.config.intermediate_size
    del experts.gate_up_proj
    experts.register_parameter("w_a", nn.Parameter(torch.zeros(4, i, h)))
    experts.register_parameter("w_b", nn.Parameter(torch.zeros(4, i, h)))
    anat = analyze(model, trace=False)
    stuck = [f for f in anat.fixed if f.role == "moe.experts"]
    assert [f.name for f in stuck] == ["model.layers.0.mlp.experts"] and "could not be read" in stuck[0].reason
    assert not [l for l in anat.layers if l.block == 0 and l.is_parameter]
    assert {l.role for l in anat.layers if l.block == 1 and l.is_parameter} == {"mlp.experts.gate_up", "mlp.experts.down"}


def test_dense_models_have_no_fixed_weights():
    for arch in ARCH_NAMES:
        assert _built(arch)[1].fixed == (), arch
