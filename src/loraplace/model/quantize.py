"""A quantized frozen base (``quantize: nf4 | fp4 | int8``): bitsandbytes' config, its bytes, and a CPU fix.

Usage::

    qc = bnb_config("nf4", torch.float32)          # transformers' BitsAndBytesConfig (QLoRA's NF4 + double quant)
    model = AutoModelForCausalLM.from_pretrained(path, quantization_config=qc, device_map={"": "cpu"})
    keep_trainable_layout(model)                   # before any eval pass (see below)
    base_weight_bytes(anatomy, "nf4", 4)           # what the loaded base takes, from shapes alone

``model.loading.load(spec, quantize=...)`` does the loading; PEFT puts its own bitsandbytes LoRA layers
(``peft.tuners.lora.bnb``) on the quantized linears. Torch-free at import (``model.estimate`` and ``plan``
use the byte formulas); bitsandbytes is imported only when a quantized base is asked for (the ``quant`` extra).

Not called: PEFT's ``prepare_model_for_kbit_training``. It freezes the base (every trial trains only its own
adapter tensors already), casts fp16/bf16 non-quantized weights to fp32 (loraplace loads them in train.dtype, as
for a float base: fp32 by default, so nothing to cast) and turns on reentrant gradient checkpointing with an
input-grad hook (``train.gradient_checkpointing`` is loraplace's own, non-reentrant, needing no hook). It would
also change the shared base in place, which the frozen-base guard forbids.

Which layers: transformers quantizes every ``nn.Linear`` / ``Conv1D`` except the output head and tied weights;
embeddings, norms, the head and every bias stay in the float dtype. Bytes of one quantized layer of ``n = in x out``
weights (bitsandbytes 0.50.2, as loaded in memory; checked against real layers in tests/model/test_quantize.py):

- nf4 / fp4 with double quantization (what loraplace loads): ``ceil(n / 2)`` packed 4-bit weights (uint8),
  ``b = ceil(n / 64)`` block scales (absmax) quantized to uint8 (``b``), their own fp32 scales per 256
  (``4 * ceil(b / 256)``), a fp32 offset (4), the layer's 16-entry fp32 code (64) and its own copy of the
  nested quantization's 256-entry fp32 code (1024: ``quantize_blockwise`` copies it per call).
- nf4 / fp4 without double quantization: the packed weights, ``4 * b`` fp32 absmax and the 64-byte code.
- int8 (LLM.int8()): ``n`` int8 weights and one fp32 scale per output row (``4 * out``).
"""

from __future__ import annotations

import logging
import math
from typing import TYPE_CHECKING

from loraplace.core.config import QUANTIZE_MODES
from loraplace.core.errors import LoraplaceError

if TYPE_CHECKING:
    import torch

    from loraplace.model.anatomy import Anatomy

BLOCKSIZE_4BIT = 64  # bitsandbytes' default 4-bit blocksize (transformers does not change it)
NESTED_BLOCKSIZE = 256  # double quantization: absmax values per second-level fp32 scale
CODE_4BIT_BYTES = 16 * 4  # a layer's NF4/FP4 value table (quant_map), fp32
NESTED_CODE_BYTES = 256 * 4  # the dynamic 8-bit map of the nested quantization, fp32, copied into every layer
MIN_BITSANDBYTES = (0, 47)  # the first release whose 4-bit and 8-bit layers run forward and backward on CPU
INSTALL = "pip install 'bitsandbytes>=0.47' (loraplace's quant extra: pip install -e \".[quant]\")"


class QuantizeError(LoraplaceError, ValueError):
    """A quantized base cannot be loaded here (bitsandbytes missing or too old, an unknown mode)."""


def require_bitsandbytes(mode: str):
    """bitsandbytes, imported; a one-line error naming the extra when it is missing or older than 0.47."""
    if mode not in QUANTIZE_MODES:
        raise QuantizeError(f"quantize: {mode!r} is not one of {', '.join(QUANTIZE_MODES)} or null")
    try:
        import bitsandbytes
    except ImportError as e:
        raise QuantizeError(f"quantize={mode} needs the bitsandbytes package ({e.name or e}): {INSTALL}") from None
    version = tuple(int(p) for p in bitsandbytes.__version__.split(".")[:2] if p.isdigit())
    if version < MIN_BITSANDBYTES:
        raise QuantizeError(f"quantize={mode} needs bitsandbytes >= 0.47 (its CPU layers), found "
                            f"{bitsandbytes.__version__}: {INSTALL}")
    return bitsandbytes


def bnb_config(mode: str, compute_dtype: "torch.dtype"):
    """transformers' BitsAndBytesConfig for ``mode``: QLoRA's NF4 with double quantization and ``compute_dtype``
    (train.dtype) as the compute dtype; fp4 the same with the FP4 type; int8 is LLM.int8() (outlier threshold 6)."""
    require_bitsandbytes(mode)
    from transformers import BitsAndBytesConfig

    if mode == "int8":
        _quiet_int8_cast()
        return BitsAndBytesConfig(load_in_8bit=True)
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=mode, bnb_4bit_use_double_quant=True,
                              bnb_4bit_compute_dtype=compute_dtype)


def loading_text(mode: str, compute_dtype: str = "float32") -> str:
    """How ``bnb_config`` loads the base, as a user would write it for transformers (for notes beside exports)."""
    if mode == "int8":
        return "from_pretrained(..., quantization_config=BitsAndBytesConfig(load_in_8bit=True))"
    return (f"from_pretrained(..., quantization_config=BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="
            f"'{mode}', bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=torch.{compute_dtype}))")


def keep_trainable_layout(model: "torch.nn.Module") -> int:
    """Keep every 4-bit layer in its trainable layout through evaluation passes; returns the layers set.

    bitsandbytes 0.50.2 (``bitsandbytes.nn.Linear4bit.forward``): on a CPU with AVX512-BF16
    (``support_avx512bf16_for_cpu``, from ``bitsandbytes.functional.has_avx512bf16()``), a forward in eval mode
    whose input does not require grad (any no-grad evaluation) repacks the weight in place with
    ``bitsandbytes.functional._convert_weight_packed_for_cpu`` (an inference layout: the nested absmax is
    dequantized to bf16, ``quant_state.packing_format_for_cpu`` is set) and ``.train()`` does not undo it. From
    then on ``bitsandbytes.matmul_4bit`` sends every CPU call to ``F.gemv_4bit``, which computes in bf16 and has
    no autograd kernel: the gradient through the base layer is silently wrong (torch warns once), a bias that
    needs a gradient fails, and the stored weight bytes change (the frozen-base guard fires). A trial alternates
    training and evaluation, so loraplace turns the repack off: evaluation then runs the same dequantizing
    kernel as training."""
    n = 0
    for mod in model.modules():
        if hasattr(mod, "support_avx512bf16_for_cpu"):
            mod.support_avx512bf16_for_cpu = False
            n += 1
    return n


class _Int8CastNotice(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("MatMul8bitLt: inputs will be cast")


def _quiet_int8_cast() -> None:
    """bitsandbytes logs "MatMul8bitLt: inputs will be cast from torch.float32 to float16" at every eval-mode
    forward of every 8-bit layer (hundreds of lines per evaluation); the cast is LLM.int8()'s design, so drop it."""
    log = logging.getLogger("bitsandbytes.autograd._functions")
    if not any(isinstance(f, _Int8CastNotice) for f in log.filters):
        log.addFilter(_Int8CastNotice())


def is_quantized(model: "torch.nn.Module") -> bool:
    """True for a base loaded with a bitsandbytes quantization (4-bit or 8-bit)."""
    return bool(getattr(model, "is_loaded_in_4bit", False) or getattr(model, "is_loaded_in_8bit", False))


# -- bytes -------------------------------------------------------------------------------------------
def layer_bytes(in_features: int, out_features: int, mode: str, double_quant: bool = True) -> int:
    """Bytes of one quantized linear layer's weight and its quantization state (bias excluded), as bitsandbytes
    holds them in memory; the module docstring gives the formula."""
    n = in_features * out_features
    if mode == "int8":
        return n + 4 * out_features  # int8 weights + fp32 row scales (SCB)
    if mode not in ("nf4", "fp4"):
        raise QuantizeError(f"quantize: {mode!r} is not one of {', '.join(QUANTIZE_MODES)}")
    blocks = math.ceil(n / BLOCKSIZE_4BIT)
    packed = math.ceil(n / 2)  # two 4-bit values per byte
    if double_quant:  # uint8 absmax, fp32 second-level scales and their code, fp32 offset
        return packed + blocks + 4 * math.ceil(blocks / NESTED_BLOCKSIZE) + NESTED_CODE_BYTES + 4 + CODE_4BIT_BYTES
    return packed + 4 * blocks + CODE_4BIT_BYTES


def quantized_layers(anat: "Anatomy") -> list:
    """The anatomy's layers transformers quantizes: every Linear/Conv1D but the output head and tied ones."""
    return [l for l in anat.layers + anat.outside
            if l.kind in ("Linear", "Conv1D") and l.role != "lm_head" and l.tied_to is None]


def base_weight_bytes(anat: "Anatomy", mode: str | None, dtype_bytes: int, double_quant: bool = True) -> int:
    """Bytes of the whole base as loaded with ``quantize=mode`` (None: float, base_params x dtype_bytes): the
    quantized layers by ``layer_bytes``, every other parameter (embeddings, norms, head, biases) in the float dtype."""
    if mode is None:
        return anat.base_params * dtype_bytes
    layers = quantized_layers(anat)
    weights = sum(l.in_features * l.out_features for l in layers)
    quantized = sum(layer_bytes(l.in_features, l.out_features, mode, double_quant) for l in layers)
    return quantized + (anat.base_params - weights) * dtype_bytes
