"""model.quantize and load(quantize=...): bitsandbytes bases from a float directory, their anatomy, their bytes,
and gradients that an evaluation pass leaves as they were."""
from __future__ import annotations

import importlib.util
import math
import sys

import pytest
import tiny_models
import torch

from loraplace.core.config import ConfigError, StudyConfig
from loraplace.model.anatomy import analyze
from loraplace.model.estimate import estimate
from loraplace.model.loading import ModelError, load
from loraplace.model.quantize import base_weight_bytes, is_quantized, layer_bytes, quantized_layers
from loraplace.placement.resolve import resolve
from loraplace.placement.strategy import get_strategy

MODES = ("nf4", "fp4", "int8")
needs_bnb = pytest.mark.skipif(importlib.util.find_spec("bitsandbytes") is None,
                               reason="bitsandbytes is not installed (pip install -e '.[quant]')")


def save_llama(path, **over) -> str:
    """The tiny Llama at widths bitsandbytes' CPU inference repack accepts (every out_features a multiple of 32:
    hidden 64, 4 heads of 16 over 2 KV heads, MLP 128), saved with the character tokenizer."""
    import transformers as T

    fields = {k: v for k, v in tiny_models.config("llama").to_dict().items() if k != "layer_types"}
    cfg = T.LlamaConfig(**{**fields, "hidden_size": 64, "num_attention_heads": 4, "num_key_value_heads": 2,
                           "head_dim": 16, "intermediate_size": 128, **over})
    torch.manual_seed(0)
    T.AutoModelForCausalLM.from_config(cfg, dtype=torch.float32).save_pretrained(path)
    tiny_models.tokenizer().save_pretrained(path)
    return str(path)


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory):
    return save_llama(tmp_path_factory.mktemp("llama64"))


def held_bytes(model) -> int:
    """Bytes of every distinct tensor storage the base holds for its weights: parameters, and bitsandbytes' state
    beside them (4-bit absmax, codes, nested absmax and offset; 8-bit row scales)."""
    seen: dict[int, int] = {}

    def add(t):
        if isinstance(t, torch.Tensor):
            seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()

    for p in model.parameters():
        add(p)
    for m in model.modules():
        w = getattr(m, "weight", None)
        qs = getattr(w, "quant_state", None)
        if qs is not None:
            for t in (qs.absmax, qs.code) + ((qs.state2.absmax, qs.state2.code, qs.offset) if qs.nested else ()):
                add(t)
        add(getattr(getattr(m, "state", None), "SCB", None))
        add(getattr(w, "SCB", None))
    return sum(seen.values())


# -- config and errors (no bitsandbytes needed) --------------------------------------------------
def test_quantize_is_null_by_default_and_checked():
    assert StudyConfig().quantize is None and StudyConfig.load(overrides=["quantize=nf4"]).quantize == "nf4"
    with pytest.raises(ConfigError, match=r"quantize: 'nf8' is not one of nf4, fp4, int8"):
        StudyConfig.load(overrides=["quantize=nf8"])


def test_missing_bitsandbytes_is_a_one_line_error_naming_the_extra(llama_dir, monkeypatch):
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # import bitsandbytes now raises ImportError
    with pytest.raises(ModelError, match=r"quantize=nf4 needs the bitsandbytes package.*\[quant\]") as e:
        load(llama_dir, quantize="nf4")
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("n_in,n_out", [(301, 299), (1000, 33), (64, 64)])  # odd n; > 256 blocks; one block row
@needs_bnb
def test_layer_bytes_match_real_bitsandbytes_layers(n_in, n_out):
    import bitsandbytes as bnb

    for mode in ("nf4", "fp4"):
        for dq in (True, False):
            layer = bnb.nn.Linear4bit(n_in, n_out, bias=False, compress_statistics=dq, quant_type=mode).to("cpu")
            qs = layer.weight.quant_state
            parts = [layer.weight, qs.absmax, qs.code] + ([qs.state2.absmax, qs.state2.code, qs.offset] if dq else [])
            assert sum(t.untyped_storage().nbytes() for t in parts) == layer_bytes(n_in, n_out, mode, dq), (mode, dq)
    layer = bnb.nn.Linear8bitLt(n_in, n_out, bias=False, has_fp16_weights=False).to("cpu")
    held = layer.weight.untyped_storage().nbytes() + layer.weight.SCB.untyped_storage().nbytes()
    assert held == layer_bytes(n_in, n_out, "int8")


# -- loading ---------------------------------------------------------------------------------------
@needs_bnb
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("arch", ["llama", "qwen2"])  # tied head; untied head and biased q/k/v
def test_each_mode_loads_a_float_directory(tmp_path, mode, arch):
    import bitsandbytes as bnb

    d = save_llama(tmp_path) if arch == "llama" else tiny_models.save(arch, tmp_path)
    float_model, _ = load(d)
    model, tok = load(d, quantize=mode)
    assert is_quantized(model) and not is_quantized(float_model)
    cls = bnb.nn.Linear8bitLt if mode == "int8" else bnb.nn.Linear4bit
    fa, qa = analyze(float_model), analyze(model)
    # every block linear is a bitsandbytes layer; the head and embeddings stay float
    assert all(isinstance(model.get_submodule(l.name), cls) for l in qa.layers)
    assert type(model.get_output_embeddings()) is torch.nn.Linear
    assert {l.name for l in quantized_layers(qa)} == {l.name for l in qa.layers}
    if mode != "int8":
        assert getattr(model.get_submodule(qa.layers[0].name).weight.quant_state, "quant_type") == mode
        assert model.get_submodule(qa.layers[0].name).weight.quant_state.nested  # double quantization
    # the anatomy is the float model's: names, roles, shapes, parameter counts
    assert qa.layers == fa.layers and qa.outside == fa.outside and qa.base_params == fa.base_params
    # and the memory is what base_weight_bytes says, from shapes alone
    assert held_bytes(model) == base_weight_bytes(qa, mode, 4) < base_weight_bytes(qa, None, 4) == held_bytes(float_model)
    # plan's memory estimate counts the base as loaded (the weights term is the base: no variant adds to it here)
    p = resolve(get_strategy("all_linear"), qa, rank=4, alpha=8)
    assert estimate(p, 2, 16, quantize=mode).terms["weights"] == held_bytes(model)
    assert estimate(p, 2, 16).terms["weights"] == held_bytes(float_model)
    # same model, a little rounding: the loss of a random-init model moves by a small fraction
    ids = torch.tensor([tok.encode("The cat sat on the mat.")])
    with torch.no_grad():
        lf, lq = (m(input_ids=ids, labels=ids).loss.item() for m in (float_model, model))
    assert math.isfinite(lq) and abs(lq - lf) < 0.02 * lf


def _mapped(path) -> bool:
    """Whether this process still maps ``path`` (Linux: /proc/self/maps)."""
    with open("/proc/self/maps") as f:
        return any(line.rstrip().endswith(str(path)) for line in f)


@needs_bnb
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/maps (Linux)")
@pytest.mark.parametrize("own", [True, False])
def test_a_quantized_base_does_not_keep_the_float_file_mapped(tmp_path, monkeypatch, own):
    """The float embeddings and head of a 4-bit base would otherwise stay views into the memory-mapped float file,
    keeping every page bitsandbytes read to quantize resident; without the copy (own=False) the file stays mapped,
    which shows the check can fail."""
    import gc

    from loraplace.model import loading

    if not own:
        monkeypatch.setattr(loading, "_own_float_weights", lambda model: None)
    d = save_llama(tmp_path)
    gc.collect()
    model, _ = load(d, quantize="nf4")
    gc.collect()
    f = tmp_path / "model.safetensors"
    assert f.is_file()
    assert _mapped(f) is not own
    # the copy keeps the tied head tied (one parameter, one storage)
    assert model.get_output_embeddings().weight.data_ptr() == model.get_input_embeddings().weight.data_ptr()


@needs_bnb
def test_an_alias_is_quantized_from_loraplaces_fp32_cache(tmp_path, monkeypatch):
    """A GGUF alias is dequantized once into the cache; quantize reads that fp32 copy (here: the tiny Llama standing in
    for the cached SmolLM2), never the GGUF file again."""
    import json

    from loraplace.model import loading

    monkeypatch.setenv("LORAPLACE_CACHE", str(tmp_path))
    cached = tmp_path / "models" / f"smollm2-135m-{loading.ALIASES['smollm2-135m'].version}"
    save_llama(cached)
    (cached / "loraplace.json").write_text(json.dumps({"source": "test", "dtype": "float32"}))
    monkeypatch.setattr(loading, "embedded_gguf", lambda alias: tmp_path / "never-read.gguf")
    model, _ = load("smollm2-135m", quantize="nf4")
    assert is_quantized(model) and analyze(model).base_params == analyze(load(str(cached))[0]).base_params


# -- an evaluation pass in the middle of training --------------------------------------------------
def _grads(peft_model, ids, layer, x):
    """Training-mode loss and gradients: of every LoRA tensor, and of one frozen quantized layer's input (None when
    the layer passes none back)."""
    peft_model.train()
    peft_model.zero_grad(set_to_none=True)
    loss = peft_model(input_ids=ids, labels=ids).loss
    loss.backward()
    x = x.detach().clone().requires_grad_(True)
    layer(x).pow(2).sum().backward()
    grads = {n: p.grad.clone() for n, p in peft_model.named_parameters() if p.requires_grad}
    return loss.item(), grads, x.grad


def _eval_pass(peft_model, ids):
    peft_model.eval()
    with torch.no_grad():
        peft_model(input_ids=ids)


def _adapted(d, mode, layout_fix: bool = True):
    from peft import LoraConfig, get_peft_model

    model, _ = load(d, quantize=mode)
    names = [l.name for l in analyze(model).layers]  # its traced eval forward would repack without the fix
    torch.manual_seed(0)  # init_lora_weights=False: B is not zero, so every adapter gets a gradient
    peft_model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=names, init_lora_weights=False))
    if not layout_fix:  # undo model.quantize.keep_trainable_layout: bitsandbytes' own behaviour
        for m in model.modules():
            if hasattr(m, "support_avx512bf16_for_cpu"):
                m.support_avx512bf16_for_cpu = True
    layer = model.get_submodule(names[-1]).get_base_layer()  # the last block's mlp.down, frozen
    return peft_model, layer, names


@needs_bnb
@pytest.mark.parametrize("mode", MODES)
def test_an_eval_pass_leaves_the_gradients_as_they_were(llama_dir, mode):
    from loraplace.train.guard import weights_fingerprint

    peft_model, layer, names = _adapted(llama_dir, mode)
    assert type(peft_model.base_model.model.get_submodule(names[0])).__module__ == "peft.tuners.lora.bnb"  # PEFT's own
    ids = torch.tensor([[5, 17, 40, 9, 33, 61, 7, 2]])
    x = torch.randn(3, layer.in_features, generator=torch.Generator().manual_seed(1))
    print_before = weights_fingerprint(peft_model)
    loss0, g0, gx0 = _grads(peft_model, ids, layer, x)
    _eval_pass(peft_model, ids)
    loss1, g1, gx1 = _grads(peft_model, ids, layer, x)
    assert len(g0) == 2 * len(names) and all(float(g.abs().sum()) > 0 for g in g0.values())
    assert loss1 == loss0 and gx0 is not None and torch.equal(gx1, gx0) and float(gx0.abs().sum()) > 0
    assert all(torch.equal(g1[n], g0[n]) for n in g0)
    assert weights_fingerprint(peft_model) == print_before


@needs_bnb
@pytest.mark.parametrize("mode", ["nf4", "fp4"])
@pytest.mark.filterwarnings("ignore:.*an autograd kernel was not registered:UserWarning")  # gemv_4bit, below
def test_without_the_fix_bitsandbytes_repacks_4bit_weights_on_avx512_bf16_cpus(llama_dir, mode):
    """What model.quantize.keep_trainable_layout avoids (bitsandbytes 0.50.2): if this starts failing, bitsandbytes
    no longer repacks in eval mode, and the fix may go."""
    from bitsandbytes.functional import has_avx512bf16

    from loraplace.train.guard import weights_fingerprint

    if not has_avx512bf16():
        pytest.skip("this CPU has no AVX512-BF16: bitsandbytes never repacks here")
    peft_model, layer, _ = _adapted(llama_dir, mode, layout_fix=False)
    ids = torch.tensor([[5, 17, 40, 9, 33, 61, 7, 2]])
    x = torch.randn(3, layer.in_features, generator=torch.Generator().manual_seed(1))
    before = weights_fingerprint(peft_model)
    _, g0, gx0 = _grads(peft_model, ids, layer, x)
    _eval_pass(peft_model, ids)
    assert layer.weight.quant_state.packing_format_for_cpu  # the inference layout stays after .train()
    assert weights_fingerprint(peft_model) != before  # the guard sees it
    _, g1, gx1 = _grads(peft_model, ids, layer, x)
    assert gx0 is not None and gx1 is None  # the repacked layer passes no gradient back to its input (gemv_4bit)
    assert any(not torch.allclose(g1[n], g0[n], rtol=1e-2) for n in g0)  # so the adapters below it learn wrongly


@needs_bnb
def test_int8_eval_rows_interact_through_the_outlier_columns():
    """LLM.int8() (transformers' threshold 6) computes in fp16 every input column where any row of the batch reaches
    the threshold, the rest in int8: in eval mode a row's output depends on the other rows (so a fused group's eval,
    or another eval batch size, changes it a little). Training (bitsandbytes' MatMul8bitFp: dequantized weights)
    keeps rows apart."""
    import bitsandbytes as bnb

    torch.manual_seed(0)
    layer = bnb.nn.Linear8bitLt(64, 32, bias=False, has_fp16_weights=False, threshold=6.0).to("cpu")
    x = torch.randn(1, 64)  # no entry reaches 6: all int8 alone
    other = torch.zeros(1, 64)
    other[0, 5] = 20.0  # an outlier in column 5: the column goes to fp16 for every row of the batch
    diffs = {}
    for mode in ("eval", "train"):
        layer.train(mode == "train")
        with torch.no_grad():
            alone, together = layer(x), layer(torch.cat([x, other]))[:1]
        diffs[mode] = float((alone - together).abs().max() / alone.abs().max())
    assert diffs["eval"] > 1e-4 and diffs["train"] < 1e-6, diffs


@needs_bnb
@pytest.mark.parametrize("mode", MODES)
def test_int8_bases_run_trials_one_by_one_and_pissa_is_refused(tmp_path, llama_dir, mode):
    """Because of the above, an int8 base never fuses (4-bit bases do: their matmuls keep rows apart); PiSSA, which
    rewrites base weights, is refused in one line before anything loads."""
    from loraplace.core.config import TrainSpec
    from loraplace.placement.strategy import PlacementError
    from loraplace.study.plan import resolve_placements
    from loraplace.train.fused import INT8_UNFUSABLE, fusable

    model, _ = load(llama_dir, quantize=mode)
    assert fusable(model, TrainSpec()) == (INT8_UNFUSABLE if mode == "int8" else None)
    cfg = StudyConfig.load(overrides=[f"quantize={mode}", "strategies=[all_linear,pis]"])
    cfg.define = {"pis": {"roles": "all", "variant": "pissa"}}
    with pytest.raises(PlacementError, match=rf"^strategy pis cannot run with quantize={mode}: PiSSA writes") as e:
        resolve_placements(cfg, analyze(model))
    assert "\n" not in str(e.value)


def test_a_handed_in_model_must_be_what_quantize_says(llama_dir):
    """The store files results under cfg.quantize, so a float model handed to a quantized study (or the reverse) is
    refused in one line."""
    from loraplace.study.workspace import Workspace

    model, tok = load(llama_dir)
    with pytest.raises(ModelError, match=r"^quantize=nf4 but the model handed in is a float model"):
        Workspace.build(StudyConfig.load(overrides=["quantize=nf4"]), (model, tok))
