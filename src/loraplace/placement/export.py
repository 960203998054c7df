"""Write a studied placement as a config for another fine-tuning tool.

Usage::

    from loraplace.placement.export import export
    print(export(placement, "axolotl"))     # placement: a PlacementRecord; peft | axolotl | llamafactory | torchtune

``store.results.placement_for`` finds the record a study stored for a strategy.

A placement (``placement.record.PlacementRecord``, as the trial stored it) lists every adapted module with its rank,
alpha, role and block, and the dropout it was trained with.
Each format is written only when it means exactly that placement; otherwise ``ExportError`` says,
in one line, what the tool cannot express:

* peft: ``LoraConfig`` JSON from ``PlacementRecord.lora_kwargs``, the same settings the trial trained with:
  explicit full module names, per-module ``rank_pattern`` / ``alpha_pattern`` keyed by full name (PEFT
  matches those keys as ``(.*\\.)?KEY$``), routed experts as full parameter names in ``target_parameters``.
  Always works.
* axolotl: ``lora_target_modules`` + ``peft_layers_to_transform`` when every chosen block adapts the
  same module short names; otherwise full module names (axolotl hands ``lora_target_modules`` to
  PEFT's ``target_modules``, which accepts full names). Routed experts: full parameter names in
  ``lora_target_parameters``, which axolotl hands to PEFT's ``target_parameters`` (PEFT's
  ``layers_to_transform`` never filters parameters, so they are always listed per block). One
  ``lora_r``/``lora_alpha``: ranks must be uniform.
* llamafactory: ``lora_target`` short names applied to every block, uniform rank; no routed experts (its
  ``lora_target`` names modules only).
* The variant: its PEFT switches in peft's config, each tool's own switch for it (``Variant.export_switch``,
  ``placement.variants``: e.g. ``peft_use_dora`` in axolotl), or ExportError where the tool has none.
* The learning rate the placement trained at (``export(..., lr=)``): ``learning_rate`` (axolotl, LLaMA-Factory),
  ``optimizer.lr`` (torchtune); PEFT's LoraConfig has none (``loraplace export`` says it on stderr).
* The base's quantization (``export(..., quantize=)``, the study's ``quantize``): axolotl ``adapter: qlora`` with
  ``load_in_4bit`` and ``bnb_config_kwargs`` (quant type, double quantization) or ``load_in_8bit``; LLaMA-Factory
  ``quantization_bit`` (4 or 8), ``quantization_type`` and ``double_quantization``; torchtune's builders take
  ``quantize_base: true`` (NF4 only: fp4 and int8 raise); a PEFT LoraConfig has none (``loraplace export`` says
  on stderr how the base was loaded).
* torchtune: ``lora_attn_modules`` / ``apply_lora_to_mlp`` mapped from roles (Llama-family roles
  only, all blocks, uniform rank; the MLP's three projections together or not at all, and at least
  one attention projection, since its builders reject an empty ``lora_attn_modules``; no routed experts).
"""

from __future__ import annotations

import json
from dataclasses import replace

import yaml

from loraplace.core.errors import LoraplaceError
from loraplace.core.identity import plain
from loraplace.core.roles import role_rank
from loraplace.placement.record import PlacementRecord
from loraplace.placement.variants import VARIANTS, get_variant

FORMATS = ("peft", "axolotl", "llamafactory", "torchtune")

# role -> torchtune attention module name (torchtune's LORA_ATTN_MODULES vocabulary)
TORCHTUNE_ATTN = {"attn.q": "q_proj", "attn.k": "k_proj", "attn.v": "v_proj", "attn.o": "output_proj"}
TORCHTUNE_MLP = {"mlp.gate", "mlp.up", "mlp.down"}  # apply_lora_to_mlp adapts w1, w2, w3 together
# HF model_types whose torchtune builders take lora_attn_modules with that vocabulary
TORCHTUNE_MODEL_TYPES = {"llama", "mistral", "qwen2", "gemma"}


class ExportError(LoraplaceError, ValueError):
    """The placement cannot be expressed in the requested tool's vocabulary (one-line message)."""


def export(placement: PlacementRecord, fmt: str, lr: float | None = None, quantize: str | None = None) -> str:
    """The config text for ``fmt`` (one of FORMATS); raises ExportError when it cannot be exact. ``lr``: the peak
    learning rate the placement trained at (a tuned study's chosen rate), written where the tool takes one
    (axolotl and LLaMA-Factory ``learning_rate``, torchtune's ``optimizer.lr``; a PEFT config has none).
    ``quantize``: the study's bitsandbytes base (nf4 | fp4 | int8 | None), written as each tool loads it."""
    writers = {"peft": _peft, "axolotl": _axolotl, "llamafactory": _llamafactory, "torchtune": _torchtune}
    if fmt not in writers:
        raise ExportError(f"unknown format {fmt!r}; choose one of {', '.join(FORMATS)}")
    if not placement.modules:
        raise ExportError("the placement adapts no modules; nothing to export")
    text = writers[fmt](placement, _quantized(fmt, quantize) if quantize else {})
    if lr is None or fmt == "peft":
        return text
    if fmt == "torchtune":  # a section of its own beside model: (the recipe's optimizer keeps its _component_)
        return text + "# merge into the recipe's optimizer: section\n" + _yaml({"optimizer": {"lr": float(lr)}})
    return text + _yaml({"learning_rate": float(lr)})


# -- helpers ---------------------------------------------------------------------------------------
def _quantized(fmt: str, mode: str) -> dict:
    """The keys that load the base as the study did (QLoRA's NF4 with double quantization, FP4, or LLM.int8())."""
    four = mode in ("nf4", "fp4")
    if fmt == "axolotl":  # axolotl builds BitsAndBytesConfig from these; its qlora adapter is LoRA on a 4-bit base
        if not four:
            return {"load_in_8bit": True}
        return {"adapter": "qlora", "load_in_4bit": True,
                "bnb_config_kwargs": {"bnb_4bit_quant_type": mode, "bnb_4bit_use_double_quant": True}}
    if fmt == "llamafactory":  # its QuantizationArguments (bitsandbytes is its default quantization_method)
        return ({"quantization_bit": 4, "quantization_type": mode, "double_quantization": True} if four
                else {"quantization_bit": 8})
    if fmt == "torchtune":  # its LoRA builders' quantize_base: torchao's NF4, as QLoRA's
        if mode != "nf4":
            raise ExportError(f"torchtune's quantize_base quantizes to NF4 only; this study's base was {mode}")
        return {"quantize_base": True}
    return {}  # peft: a LoraConfig does not load the base (the CLI says how on stderr)


def _short(name: str) -> str:
    return name.rsplit(".", 1)[-1]


def _variant(placement: PlacementRecord, fmt: str, tool: str) -> dict:
    """The tool's switch for the placement's variant ({} when it exports as plain LoRA); ExportError where it has none."""
    switch = get_variant(placement.variant).export_switch(fmt)
    if switch is None:
        keys = [k for v in VARIANTS.values() for k in v.switches]
        raise ExportError(f"{tool} has no switch for {placement.variant} (export to peft, which has "
                          f"{', '.join(keys[:-1])} and {keys[-1]})")
    return switch


def _dropout(placement: PlacementRecord, key: str) -> dict:
    """{key: dropout} when the study recorded it; otherwise nothing, so the tool's default applies."""
    return {} if placement.dropout is None else {key: placement.dropout}


def _uniform(placement: PlacementRecord, tool: str) -> tuple[int, float]:
    """The single (rank, alpha) of every module, or ExportError naming the tool."""
    mods = placement.modules.values()
    ranks = sorted({m.rank for m in mods})
    alphas = sorted({plain(m.alpha) for m in mods})
    if len(ranks) > 1:
        raise ExportError(f"{tool} has one LoRA rank for all modules; this placement uses ranks "
                          f"{', '.join(map(str, ranks))} (export to peft, which has rank_pattern)")
    if len(alphas) > 1:
        raise ExportError(f"{tool} has one LoRA alpha for all modules; this placement uses alphas "
                          f"{', '.join(map(str, alphas))} (export to peft, which has alpha_pattern)")
    return ranks[0], alphas[0]


def _block_sets(placement: PlacementRecord, key: str) -> dict[int, frozenset]:
    """{block: set of the modules' `key` ("short" name or "role")} over adapted blocks."""
    sets: dict[int, set] = {}
    for name, m in placement.modules.items():
        if m.block < 0:
            raise ExportError(f"module {name} is outside the transformer blocks; only peft can target it")
        sets.setdefault(m.block, set()).add(_short(name) if key == "short" else m.role)
    return {b: frozenset(s) for b, s in sets.items()}


def _blocks_shape(placement: PlacementRecord, key: str, tool: str, need_all_blocks: bool) -> tuple[list, list[int], bool]:
    """(the common per-block set, adapted blocks, whether they are all blocks); ExportError if uneven."""
    sets = _block_sets(placement, key)
    blocks = sorted(sets)
    common = set(sets[blocks[0]])
    uneven = any(s != sets[blocks[0]] for s in sets.values())
    n_blocks = placement.n_blocks
    all_blocks = n_blocks is not None and blocks == list(range(int(n_blocks)))
    if need_all_blocks and (uneven or not all_blocks):
        what = "different modules in different blocks" if uneven else (
            f"blocks {_ranges(blocks)} of {n_blocks}" if n_blocks is not None else "an unknown block count")
        raise ExportError(f"{tool} applies LoRA to the same modules in every block; this placement adapts {what}")
    role_of = {(_short(n) if key == "short" else m.role): m.role for n, m in placement.modules.items()}
    return sorted(common, key=lambda x: (role_rank(role_of.get(x, "")), x)), blocks, all_blocks and not uneven


def _ranges(blocks: list[int]) -> str:
    """[0, 1, 2, 5] -> '0-2, 5'."""
    out, start = [], None
    for i, b in enumerate(blocks):
        if start is None:
            start = b
        if i + 1 == len(blocks) or blocks[i + 1] != b + 1:
            out.append(str(start) if start == b else f"{start}-{b}")
            start = None
    return ", ".join(out)


def _no_experts(placement: PlacementRecord, tool: str) -> None:
    """ExportError when the placement adapts routed experts, which ``tool`` cannot target."""
    params = placement.parameters()
    if params:
        roles = sorted({placement.modules[n].role for n in params}, key=role_rank)
        raise ExportError(f"{tool} cannot target routed experts' fused parameters ({', '.join(roles)}); "
                          "export to peft or axolotl, which have target_parameters")


def _modules_only(placement: PlacementRecord) -> PlacementRecord:
    """The placement less its routed experts (what a tool's module targets cover)."""
    params = set(placement.parameters())
    return replace(placement, modules={n: m for n, m in placement.modules.items() if n not in params})


def _header(placement: PlacementRecord, tool: str) -> str:
    params = placement.trainable_params
    extra = f", {params:,} trainable params" if params else ""
    experts = len(placement.parameters())
    what = f"{len(placement.modules) - experts} modules" + (f" + {experts} expert parameters" if experts else "")
    return (f"# loraplace export for {tool}: strategy {placement.strategy or '?'!r}, "
            f"{what}{extra}, model_type {placement.model_type or '?'}\n")


class _Dumper(yaml.SafeDumper):
    """Block-style mappings; lists of scalars on one line ([2, 3]) as configs usually write them."""


_Dumper.add_representer(list, lambda d, data: d.represent_sequence(
    "tag:yaml.org,2002:seq", data, flow_style=all(not isinstance(x, (list, dict)) for x in data)))


def _yaml(data: dict) -> str:
    return yaml.dump(data, Dumper=_Dumper, sort_keys=False, default_flow_style=False, width=100)


# -- writers ---------------------------------------------------------------------------------------
def _peft(placement: PlacementRecord, quant: dict) -> str:
    return json.dumps({"peft_type": "LORA", **placement.lora_kwargs()}, indent=2) + "\n"


def _axolotl(placement: PlacementRecord, quant: dict) -> str:
    r, alpha = _uniform(placement, "axolotl")
    modules = _modules_only(placement)
    sets = _block_sets(modules, "short")
    blocks = sorted(sets)
    config = {"adapter": "lora", "lora_r": r, "lora_alpha": alpha, **_dropout(placement, "lora_dropout"),
              **_variant(placement, "axolotl", "axolotl")}
    if not modules.modules:  # routed experts only
        config["lora_target_modules"] = []
    elif all(s == sets[blocks[0]] for s in sets.values()):
        shorts, blocks, all_blocks = _blocks_shape(modules, "short", "axolotl", need_all_blocks=False)
        config["lora_target_modules"] = shorts
        if not all_blocks:  # block subset: PEFT layers_to_transform
            config["peft_layers_to_transform"] = blocks
    else:  # uneven per block: explicit full names (PEFT matches them exactly)
        config["lora_target_modules"] = modules.names()
    if placement.parameters():  # PEFT target_parameters, by full name (layers_to_transform does not apply to them)
        config["lora_target_parameters"] = placement.parameters()
    config.update(quant)
    return _header(placement, "axolotl") + _yaml(config)


def _llamafactory(placement: PlacementRecord, quant: dict) -> str:
    _no_experts(placement, "LLaMA-Factory's lora_target")
    r, alpha = _uniform(placement, "LLaMA-Factory")
    shorts, _, _ = _blocks_shape(placement, "short", "LLaMA-Factory lora_target", need_all_blocks=True)
    config = {"finetuning_type": "lora", "lora_target": ",".join(shorts), "lora_rank": r,
              "lora_alpha": alpha, **_dropout(placement, "lora_dropout"),
              **_variant(placement, "llamafactory", "LLaMA-Factory"), **quant}
    return _header(placement, "LLaMA-Factory") + _yaml(config)


def _torchtune(placement: PlacementRecord, quant: dict) -> str:
    _no_experts(placement, "torchtune's LoRA builders")
    model_type = placement.model_type
    if model_type and model_type not in TORCHTUNE_MODEL_TYPES:
        raise ExportError(f"torchtune's lora_attn_modules vocabulary covers {', '.join(sorted(TORCHTUNE_MODEL_TYPES))} "
                          f"models, not {model_type!r}")
    roles, _, _ = _blocks_shape(placement, "role", "torchtune", need_all_blocks=True)
    other = [x for x in roles if x not in TORCHTUNE_ATTN and x not in TORCHTUNE_MLP]
    if other:
        raise ExportError(f"torchtune has no LoRA switch for role(s) {', '.join(other)} "
                          "(only attn.q/k/v/o and the whole MLP)")
    mlp = [x for x in roles if x in TORCHTUNE_MLP]
    if mlp and set(mlp) != TORCHTUNE_MLP:
        raise ExportError(f"torchtune's apply_lora_to_mlp adapts gate, up and down together; this placement "
                          f"adapts only {', '.join(mlp)}")
    attn = [TORCHTUNE_ATTN[x] for x in roles if x in TORCHTUNE_ATTN]
    if not attn:  # its lora_*_self_attention builders raise on an empty lora_modules list
        raise ExportError("torchtune's LoRA builders need at least one of q_proj, k_proj, v_proj, output_proj in "
                          "lora_attn_modules; this placement adapts only the MLP")
    r, alpha = _uniform(placement, "torchtune")
    model = {"lora_attn_modules": attn,
             "apply_lora_to_mlp": bool(mlp), "apply_lora_to_output": False,
             "lora_rank": r, "lora_alpha": alpha, **_dropout(placement, "lora_dropout"),
             **_variant(placement, "torchtune", "torchtune"), **quant}
    note = "# merge into the recipe's model: section (keep its _component_ builder)\n"
    return _header(placement, "torchtune") + note + _yaml({"model": model})
