"""Exports mean exactly the placement: PEFT and axolotl configs are applied to a tiny Llama with PEFT
and the adapted modules/ranks compared; tools that cannot express a placement raise ExportError."""

import functools
import json
from dataclasses import replace

import pytest
import yaml

from loraplace.cli import main
from loraplace.model.anatomy import analyze
from loraplace.placement.export import ExportError, export
from loraplace.store.results import placement_for
from loraplace.placement.record import ModuleSpec, PlacementRecord
from loraplace.placement.resolve import resolve
from loraplace.placement.strategy import Strategy
from loraplace.store.db import Store

N_BLOCKS = 4
NAMES = {"attn.q": "self_attn.q_proj", "attn.k": "self_attn.k_proj", "attn.v": "self_attn.v_proj",
         "attn.o": "self_attn.o_proj", "mlp.gate": "mlp.gate_proj", "mlp.up": "mlp.up_proj",
         "mlp.down": "mlp.down_proj"}
ALL = list(NAMES)


def _tiny_llama(n_blocks=N_BLOCKS):
    from transformers import LlamaConfig, LlamaForCausalLM

    return LlamaForCausalLM(LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=n_blocks,
                                        num_attention_heads=4, num_key_value_heads=2, vocab_size=64))


@functools.lru_cache(maxsize=None)
def _anatomy(n_blocks):
    return analyze(_tiny_llama(n_blocks))


def placement(roles, blocks=range(N_BLOCKS), rank=8, ranks=None, model_type="llama", strategy="s", n_blocks=N_BLOCKS):
    """A placement resolved on a tiny Llama as a study resolves it, as the record a trial stores.
    ranks: {(role, block) or role: rank} overrides; alpha = 2 * rank per module."""
    anat = _anatomy(n_blocks)
    by_name = {}
    for layer in anat.layers:
        r = (ranks or {}).get((layer.role, layer.block), (ranks or {}).get(layer.role))
        if r is not None:
            by_name[layer.name] = r
    p = resolve(Strategy(strategy, "+".join(roles), ",".join(map(str, blocks))), anat, rank=rank, alpha=2 * rank,
                alpha_per_rank=True, ranks=by_name)
    record = p.record(dropout=0.05)
    return record if model_type == "llama" else replace(record, model_type=model_type)


def adapted(lora_kwargs, n_blocks=N_BLOCKS):
    """{module name: (r, alpha)} of the LoRA layers PEFT creates on a tiny Llama for this config."""
    from peft import LoraConfig, get_peft_model
    from peft.tuners.lora import LoraLayer

    model = get_peft_model(_tiny_llama(n_blocks), LoraConfig(**lora_kwargs))
    prefix = "base_model.model."
    return {n[len(prefix):]: (m.r["default"], m.lora_alpha["default"])
            for n, m in model.named_modules() if isinstance(m, LoraLayer)}


def expected(pl):
    return {n: (m.rank, m.alpha) for n, m in pl.modules.items()}


def axolotl_to_peft(cfg):
    """What axolotl's load_lora hands to LoraConfig."""
    return {"r": cfg["lora_r"], "lora_alpha": cfg["lora_alpha"], "lora_dropout": cfg["lora_dropout"],
            "target_modules": cfg["lora_target_modules"], "layers_to_transform": cfg.get("peft_layers_to_transform"),
            "task_type": "CAUSAL_LM"}


def test_peft_per_module_ranks_applied_exactly():
    pl = placement(["attn.q", "attn.v", "mlp.down"], blocks=[1, 3], ranks={"attn.v": 4, ("mlp.down", 3): 16})
    cfg = json.loads(export(pl, "peft"))
    assert cfg["task_type"] == "CAUSAL_LM" and cfg["r"] == 8 and cfg["lora_alpha"] == 16
    assert cfg["target_modules"][0] == "model.layers.1.self_attn.q_proj"  # full names, block order
    assert cfg["rank_pattern"]["model.layers.3.mlp.down_proj"] == 16
    assert cfg["alpha_pattern"]["model.layers.1.self_attn.v_proj"] == 8
    assert adapted(cfg) == expected(pl)


def test_peft_patterns_do_not_leak_between_blocks_1_and_11():
    # PEFT matches pattern keys as regexes "(.*\\.)?KEY$": block 1's key must not catch block 11
    pl = placement(["attn.v"], blocks=range(12), ranks={("attn.v", 1): 4, ("attn.v", 11): 16}, n_blocks=12)
    cfg = json.loads(export(pl, "peft"))
    assert adapted(cfg, n_blocks=12) == expected(pl)


def test_axolotl_block_subset_uses_layers_to_transform():
    pl = placement(["attn.q", "attn.v"], blocks=[2, 3])
    cfg = yaml.safe_load(export(pl, "axolotl"))
    assert cfg["lora_target_modules"] == ["q_proj", "v_proj"]
    assert cfg["peft_layers_to_transform"] == [2, 3]
    assert cfg["lora_r"] == 8 and cfg["lora_alpha"] == 16
    assert adapted(axolotl_to_peft(cfg)) == expected(pl)


def test_axolotl_all_blocks_has_no_layer_list():
    cfg = yaml.safe_load(export(placement(ALL), "axolotl"))
    assert "peft_layers_to_transform" not in cfg
    assert cfg["lora_target_modules"] == ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def test_axolotl_uneven_blocks_use_full_names():
    pl = placement(["attn.q"], blocks=[0])
    pl = replace(pl, modules={**pl.modules, **placement(["mlp.up"], blocks=[3]).modules})
    cfg = yaml.safe_load(export(pl, "axolotl"))
    assert cfg["lora_target_modules"] == ["model.layers.0.self_attn.q_proj", "model.layers.3.mlp.up_proj"]
    assert adapted(axolotl_to_peft(cfg)) == expected(pl)


def test_axolotl_rejects_per_module_ranks():
    with pytest.raises(ExportError, match="axolotl has one LoRA rank.*4, 8"):
        export(placement(["attn.q", "attn.v"], ranks={"attn.v": 4}), "axolotl")


def test_llamafactory():
    cfg = yaml.safe_load(export(placement(["attn.q", "attn.v"]), "llamafactory"))
    assert cfg == {"finetuning_type": "lora", "lora_target": "q_proj,v_proj", "lora_rank": 8,
                   "lora_alpha": 16, "lora_dropout": 0.05}
    with pytest.raises(ExportError, match="blocks 2-3 of 4"):
        export(placement(["attn.q"], blocks=[2, 3]), "llamafactory")
    with pytest.raises(ExportError, match="rank"):
        export(placement(["attn.q", "attn.v"], ranks={"attn.v": 4}), "llamafactory")


def test_torchtune_maps_roles():
    cfg = yaml.safe_load(export(placement(ALL), "torchtune"))["model"]
    assert cfg["lora_attn_modules"] == ["q_proj", "k_proj", "v_proj", "output_proj"]
    assert cfg["apply_lora_to_mlp"] is True and cfg["apply_lora_to_output"] is False
    assert cfg["lora_rank"] == 8 and cfg["lora_alpha"] == 16
    cfg = yaml.safe_load(export(placement(["attn.q", "attn.o"]), "torchtune"))["model"]
    assert cfg["lora_attn_modules"] == ["q_proj", "output_proj"] and cfg["apply_lora_to_mlp"] is False


@pytest.mark.parametrize(
    "pl, message",
    [
        (placement(ALL, blocks=[0, 1]), "same modules in every block"),
        (placement(["attn.q", "mlp.up"]), "adapts only mlp.up"),
        (placement(["mlp.gate", "mlp.up", "mlp.down"]), "at least one of q_proj"),
        (placement(["attn.q"], model_type="gpt2"), "not 'gpt2'"),
        (placement(["attn.q", "attn.v"], ranks={"attn.v": 4}), "one LoRA rank"),
    ],
)
def test_torchtune_refuses_what_it_cannot_express(pl, message):
    with pytest.raises(ExportError, match=message) as err:
        export(pl, "torchtune")
    assert "\n" not in str(err.value)


def test_torchtune_refuses_fused_roles():
    pl = placement(["attn.q"], model_type="llama")
    pl = replace(pl, modules={n: replace(m, role="attn.qkv") for n, m in pl.modules.items()})
    with pytest.raises(ExportError, match="attn.qkv"):
        export(pl, "torchtune")


def test_bad_inputs():
    with pytest.raises(ExportError, match="unknown format 'unsloth'"):
        export(placement(["attn.q"]), "unsloth")
    with pytest.raises(ExportError, match="no modules"):
        export(PlacementRecord("empty", {}), "peft")
    assert issubclass(ExportError, ValueError)


def test_placement_for_store(tmp_path, capsys):
    store = Store.open(tmp_path)
    for name, roles in [("attn", ["attn.q", "attn.v"]), ("mlp", ["mlp.up"])]:
        store.add_pending(name, name, 0, {})
        store.mark_done(name, {"eval_loss": 1.0}, [], placement(roles, strategy=name), {})
    store.add_pending("bad", "broken", 0, {})
    store.mark_failed("bad", "OOM")
    trials = store.current_trials()
    assert placement_for(trials, "attn") == placement(["attn.q", "attn.v"], strategy="attn")  # round trip
    with pytest.raises(ExportError, match="no strategy 'nope'.*exportable: attn, mlp"):
        placement_for(trials, "nope")
    with pytest.raises(ExportError, match="'broken' has no finished trial.*1 failed"):
        placement_for(trials, "broken")
    store.close()
    # placements stored before records carried dropout: it comes from the trial's train config
    pl = placement(["mlp.up"], strategy="real").to_dict()
    del pl["dropout"]
    store = Store.open(tmp_path)
    store.add_pending("real", "real", 0, {"train": {"dropout": 0.1}})
    store.mark_done("real", {"eval_loss": 1.0}, [], pl, {})
    assert json.loads(export(placement_for(store.current_trials(), "real"), "peft"))["lora_dropout"] == 0.1
    assert "lora_dropout" not in json.loads(export(PlacementRecord.from_dict(pl), "peft"))  # unknown: tool default
    store.close()
    assert main(["export", str(tmp_path), "--strategy", "attn", "--format", "llamafactory"]) == 0
    text = capsys.readouterr().out
    assert text.startswith("# loraplace export for LLaMA-Factory: strategy 'attn'")
    assert yaml.safe_load(text)["lora_target"] == "q_proj,v_proj"


def test_export_of_a_quantized_study_loads_the_base_as_it_did(tmp_path, capsys):
    store = Store.open(tmp_path)
    store.add_pending("q", "attn", 0, {"quantize": "nf4", "train": {"dtype": "bfloat16"}})
    store.mark_done("q", {"eval_loss": 1.0}, [], placement(["attn.q", "attn.v"], strategy="attn"), {})
    store.close()
    assert main(["export", str(tmp_path), "--strategy", "attn", "--format", "axolotl"]) == 0
    cfg = yaml.safe_load(capsys.readouterr().out)
    assert cfg["adapter"] == "qlora" and cfg["load_in_4bit"] and cfg["bnb_config_kwargs"]["bnb_4bit_quant_type"] == "nf4"
    assert main(["export", str(tmp_path), "--strategy", "attn", "--format", "peft"]) == 0
    out, err = capsys.readouterr()
    assert "quant" not in out  # a LoraConfig has no quantization: the note says how the base was loaded
    assert ("note: the study trained on a base quantized to nf4; load it as it did: from_pretrained(..., quantization_config="
            "BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type='nf4', bnb_4bit_use_double_quant=True, "
            "bnb_4bit_compute_dtype=torch.bfloat16))") in err


def test_export_takes_the_latest_configs_placement_in_a_reused_directory(tmp_path, capsys):
    """A directory run first with one config and then another keeps both configs' trials; the report counts only
    the latest config's, and so does export: an older trial of the same strategy is not what it exports."""
    from loraplace.core.config import StudyConfig

    with Store.open(tmp_path) as store:
        store.add_pending("old", "attn", 0, {})
        store.mark_done("old", {"eval_loss": 1.0}, [], placement(["attn.q"], strategy="attn", rank=4), {})
        store.add_pending("new", "attn", 0, {})
        store.mark_done("new", {"eval_loss": 1.0}, [], placement(["attn.q", "attn.v"], strategy="attn", rank=8), {})
        store.put_study_config(StudyConfig(strategies=["attn"], baseline="attn"), ["new"])
        assert placement_for(store.current_trials(), "attn").rank == 8
    assert main(["export", str(tmp_path), "--strategy", "attn", "--format", "peft"]) == 0
    exported = json.loads(capsys.readouterr().out)
    assert exported["r"] == 8 and len(exported["target_modules"]) == 2 * N_BLOCKS


def test_exported_peft_config_is_the_trained_one():
    """The PEFT JSON export and the LoraConfig training uses come from one function: same settings, and
    loading the exported JSON adapts exactly what apply() adapted, with the same ranks and alphas."""
    from peft import LoraConfig

    from loraplace.placement.peft import apply

    anat = _anatomy(N_BLOCKS)
    p = resolve(Strategy("mixed", "attn.q+attn.v+mlp.down", "1-3", rank={"attn.v": 4, "default": 8}), anat,
                rank=8, alpha=16)
    exported = json.loads(export(p.record(dropout=0.1), "peft"))
    exported.pop("peft_type")
    assert LoraConfig(**exported) == p.record(dropout=0.1).lora_config()
    trained = apply(_tiny_llama(N_BLOCKS), p, dropout=0.1)
    prefix = "base_model.model."
    from peft.tuners.lora import LoraLayer

    got = {n[len(prefix):]: (m.r["default"], m.lora_alpha["default"], m.lora_dropout["default"].p)
           for n, m in trained.named_modules() if isinstance(m, LoraLayer)}
    assert {n: v[:2] for n, v in got.items()} == adapted(exported) == expected(p.record())
    assert {v[2] for v in got.values()} == {0.1}


def test_record_round_trip_and_gpt2_fan_in_fan_out():
    import tiny_models

    p = resolve(Strategy("all_linear"), analyze(tiny_models.build("gpt2")), rank=4, alpha=8)
    record = p.record(dropout=0.0)
    assert record.fan_in_fan_out and record.lora_kwargs()["fan_in_fan_out"] is True
    assert PlacementRecord.from_dict(json.loads(json.dumps(record.to_dict()))) == record
    assert isinstance(next(iter(record.modules.values())), ModuleSpec)


@pytest.mark.parametrize("mode", ["nf4", "fp4", "int8"])
def test_quantized_base_exports_load_it_as_the_study_did(mode):
    """Each tool's keys rebuild the study's BitsAndBytesConfig (model.quantize.bnb_config); PEFT's config is unchanged."""
    pytest.importorskip("bitsandbytes")
    import torch
    from transformers import BitsAndBytesConfig

    from loraplace.model.quantize import bnb_config

    pl = placement(ALL)
    ours = bnb_config(mode, torch.float32)
    ax = yaml.safe_load(export(pl, "axolotl", quantize=mode))
    lf = yaml.safe_load(export(pl, "llamafactory", quantize=mode))
    if mode == "int8":
        assert ax["adapter"] == "lora" and ax["load_in_8bit"] and "load_in_4bit" not in ax
        assert lf["quantization_bit"] == 8 and ours.load_in_8bit
    else:  # axolotl: BitsAndBytesConfig(load_in_4bit=True, **bnb_config_kwargs); LLaMA-Factory: its arguments
        theirs = BitsAndBytesConfig(load_in_4bit=ax["load_in_4bit"], **ax["bnb_config_kwargs"])
        assert ax["adapter"] == "qlora"
        assert (theirs.bnb_4bit_quant_type, theirs.bnb_4bit_use_double_quant) == (
            ours.bnb_4bit_quant_type, ours.bnb_4bit_use_double_quant)
        assert (lf["quantization_bit"], lf["quantization_type"], lf["double_quantization"]) == (
            4, ours.bnb_4bit_quant_type, ours.bnb_4bit_use_double_quant)
    assert ax["lora_target_modules"] == yaml.safe_load(export(pl, "axolotl"))["lora_target_modules"]
    assert export(pl, "peft", quantize=mode) == export(pl, "peft")
    if mode == "nf4":  # torchtune's quantize_base is NF4
        assert yaml.safe_load(export(pl, "torchtune", quantize=mode))["model"]["quantize_base"] is True
    else:
        with pytest.raises(ExportError, match="NF4 only"):
            export(pl, "torchtune", quantize=mode)
