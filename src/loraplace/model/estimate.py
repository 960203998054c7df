"""What a placement will cost to train, before anything is trained: peak memory by term, and FLOPs per step.

Usage::

    est = estimate(placement, batch_size=8, seq_len=256, dtype="float32")
    est.peak_bytes, est.terms["activations"], est.flops_per_step

Works from the Anatomy and the Placement alone (shapes, no tensors), so it answers for a 70B model
built on the meta device. What it models is what a training step (``train.sequential``) keeps alive at the peak of a step
(the head's backward, after the optimizer state exists from step 1 on):

- ``weights``: base parameters x dtype bytes (tied weights once); with ``quantize`` the quantized linears'
  packed weights and quantization state instead (``model.quantize.base_weight_bytes``).
- ``adapters``, ``adapter_grads``: LoRA parameters x 4 bytes (PEFT keeps adapters in fp32 even on a
  bf16/fp16 base: ``autocast_adapter_dtype``).
- ``adamw``: two fp32 moments per adapter parameter (8 bytes).
- ``activations``: tensors autograd saves for the backward in one forward, per token and block, for
  a pre-norm Llama-style block with SDPA attention (the transformers default: no L x L score matrix
  is kept). Only from the first adapted block on: below it nothing requires a gradient, so nothing
  is saved. Within a block, with H the residual width, q/kv the query/key widths, I the MLP width:
  each norm keeps its input and one statistic (H + 1); a sub-block whose input projections carry
  an adapter keeps the normed input (H); attention keeps q, k, v as SDPA reads them, its output and
  the log-sum-exp (2q + 2kv + heads); a gated MLP keeps gate and up outputs, the activation output
  (3I) and the product when mlp.down is adapted (+I); a plain MLP keeps the activation input (I),
  its output when mlp.down is adapted (+I); each adapted module keeps its lora_A output (r).
  Frozen layers keep nothing for their own weights: PyTorch saves an input only for a weight that
  needs its gradient. With ``gradient_checkpointing`` only each active block's input (H) is kept,
  plus one block's activations while it is recomputed in the backward.
- A variant keeps its own extra, by term (``Variant.memory``, ``placement.variants``): DoRA's saved tensors in
  ``activations``, PiSSA's residual copy of each adapted weight in ``weights``.
- ``logits``: the output head runs only on target positions (``train.loss.target_nll``): the saved
  log-softmax (targets x vocab, fp32) and, in the head's backward, two gradient buffers of the
  same shape: 3 x targets x vocab x 4 bytes. ``target_frac`` (default 1: every position is a
  target, the upper bound) scales the target count.
- ``head_bytes`` (the sequential engine's ``train.loss.HEAD_BYTES``): a batch whose head logits would pass it
  runs as groups of rows, one forward and backward at a time, so ``activations`` and ``logits`` are one
  group's (``Estimate.group_rows``); FLOPs stay the whole batch's.

FLOPs per step are ``core.metrics.train_flops``: 4 x base params x tokens (forward + backward through
the activations; frozen weights get no gradient) + 6 x adapter params x tokens. Attention scores
(about 6 x L x q per token per block) are not counted, as in that metric.

``peak_bytes`` is what the tensors need (``torch.cuda.max_memory_allocated`` on a GPU, where the
caching allocator reuses freed blocks). A CPU process holds more: glibc's default malloc keeps
freed activation blocks in its heap, so ``cpu_rss_bytes`` = weights + ``GLIBC_RSS_FACTOR`` x
``training_bytes``. With gradient checkpointing the blocks recomputed one by one in the backward
leave a heap that grows with what they compute, not with what is kept: ``cpu_rss_bytes`` = the
peak + ``GLIBC_HEAP_CHECKPOINTING`` x the activations the run would keep without checkpointing.
Both factors are measured on the embedded model (BENCHMARKS.md).

Not modeled: mixture-of-experts expert activations (a note says so), and the framework's own
memory (Python, torch libraries: measured as the process baseline).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from loraplace.core.metrics import DTYPE_BYTES, train_flops
from loraplace.model.quantize import base_weight_bytes

ADAPTER_BYTES = 4  # PEFT keeps LoRA weights in fp32
# Families whose saved-activation bytes the formula matches within 12% (most within 2%) on the test models
# (tests/model/test_estimate.py);
# others (GPT-2, GPT-J, CodeGen, GPTBigCode, Gemma 2, Phi, ...) keep more (eager attention, extra norms):
# up to 64% under (GPT-2), i.e. about 3x low.
CALIBRATED = ("llama", "mistral", "qwen2", "qwen3", "gemma", "olmo", "starcoder2", "stablelm")
# CPU RSS above the loaded model / training_bytes under glibc's default allocator, SmolLM2-135M, fp32
# (BENCHMARKS.md): 1.74-1.76 for all_linear at 4x128 and 8x256, 1.50-1.87 at eight held-out placements
# and shapes.
GLIBC_RSS_FACTOR = 1.75
# With gradient checkpointing: (CPU RSS - weights - training_bytes) / activations without checkpointing,
# same model (BENCHMARKS.md).
GLIBC_HEAP_CHECKPOINTING = 0.68
CHECKPOINT_OVERHEAD = 64 * 1024  # bytes of a checkpoint beside its tensors: RNG state, curve, pickle framing
HEAD_DIM_GUESS = 64  # heads = q width / 64 when only shapes are known (the log-sum-exp term is tiny)


@dataclass(frozen=True)
class Estimate:
    terms: dict[str, int]  # bytes: weights, adapters, adapter_grads, adamw, activations, logits
    flops_per_step: float
    tokens_per_step: int
    notes: tuple[str, ...] = field(default=())
    cpu_rss_bytes: int = 0  # the resident memory of a CPU training process at its peak (see the module doc)
    checkpoint_bytes: int = 0  # a racing trial's resumable checkpoint on disk: adapters and AdamW's two moments (fp32)
    group_rows: int | None = None  # rows one forward holds when the batch runs in row groups (head_bytes); None: all

    @property
    def peak_bytes(self) -> int:
        return sum(self.terms.values())

    @property
    def training_bytes(self) -> int:
        """The peak above the loaded model: what a step adds to the base weights."""
        return self.peak_bytes - self.terms["weights"]

    def to_dict(self) -> dict:
        return {"peak_bytes": self.peak_bytes, "cpu_rss_bytes": self.cpu_rss_bytes, "checkpoint_bytes": self.checkpoint_bytes,
                "terms": dict(self.terms),
                "flops_per_step": self.flops_per_step,
                "tokens_per_step": self.tokens_per_step, "group_rows": self.group_rows, "notes": list(self.notes)}


@dataclass(frozen=True)
class _Shapes:  # widths read from the anatomy's layers (the first block that has each role)
    hidden: int
    q: int
    kv: int
    inter: int
    gated: bool
    vocab: int


def _shapes(anat) -> _Shapes:
    first = {}
    for l in anat.layers:
        first.setdefault(l.role, l)
    emb = next((l for l in anat.outside if l.role == "embedding"), None)
    head = next((l for l in anat.outside if l.role == "lm_head"), None)
    hidden = (first["attn.o"].out_features if "attn.o" in first else first["mlp.down"].out_features if "mlp.down" in first
              else emb.out_features if emb else 0)
    q = first["attn.o"].in_features if "attn.o" in first else first["attn.q"].out_features if "attn.q" in first else hidden
    if "attn.k" in first:
        kv = first["attn.k"].out_features
    elif "attn.qkv" in first:
        kv = max(0, (first["attn.qkv"].out_features - q) // 2)
    else:
        kv = q
    inter = first["mlp.down"].in_features if "mlp.down" in first else 0
    gated = "mlp.gate" in first or "mlp.gate_up" in first
    vocab = head.out_features if head else emb.in_features if emb else 0
    return _Shapes(hidden, q, kv, inter, gated, vocab)


def _block_elems(s: _Shapes, roles: dict[str, int], start: str, has_mlp: bool) -> int:
    """Elements saved per token in one block. roles: adapted role -> rank (summed over modules of the role);
    start: "before" (an adapted block below: everything requires grad), "attn" or "mlp" (first adapted block,
    gradients start in that sub-block)."""
    heads = max(1, s.q // HEAD_DIM_GUESS)
    attn_in = any(r in roles for r in ("attn.q", "attn.k", "attn.v", "attn.qkv"))
    mlp_in = any(r in roles for r in ("mlp.up", "mlp.gate", "mlp.gate_up"))
    n = sum(roles.values())  # lora_A outputs: r per adapted module
    if start == "before":
        n += s.hidden + 1  # input norm: input + statistic
    if start in ("before", "attn"):
        n += s.hidden * attn_in + 2 * s.q + 2 * s.kv + heads
        n += s.hidden + 1  # post-attention norm
    if has_mlp and s.inter:
        n += s.hidden * mlp_in
        down = "mlp.down" in roles
        n += (3 + down) * s.inter if s.gated else (1 + down) * s.inter
    return n


def estimate(placement, batch_size: int, seq_len: int, dtype: str = "float32", gradient_checkpointing: bool = False,
             target_frac: float = 1.0, quantize: str | None = None, head_bytes: int | None = None) -> Estimate:
    """Peak training memory (bytes, by term) and FLOPs of one step of `placement` at batch_size x seq_len tokens;
    ``quantize`` (nf4 | fp4 | int8): the base's linears as bitsandbytes holds them (``model.quantize``);
    ``head_bytes``: the row groups of the sequential engine (None: the batch in one forward, as a fused group)."""
    anat = placement.anatomy
    s = _shapes(anat)
    group_rows = None
    row_logits = max(1, int(round(seq_len * target_frac))) * s.vocab * 4
    if head_bytes is not None and batch_size * row_logits > head_bytes:
        group_rows = max(1, head_bytes // row_logits)  # fewer than batch_size rows, as the batch does not fit
    flop_tokens = batch_size * seq_len
    tokens = (group_rows or batch_size) * seq_len  # what one forward holds
    act_bytes = DTYPE_BYTES[dtype]
    n_lora = placement.trainable_params
    notes = []
    per_block: dict[int, dict[str, int]] = {}
    for name, r in placement.modules.items():
        l = anat.layer(name)
        per_block.setdefault(l.block, {}).setdefault(l.role, 0)
        per_block[l.block][l.role] += r
    has_mlp = bool(s.inter)
    if anat.model_type not in CALIBRATED:
        notes.append(f"activations are calibrated on Llama-style blocks; for {anat.model_type or 'this model'} "
                     "they can be up to 3x low")
    if quantize is not None:
        notes.append(f"{quantize} base: its packed weights and their quantization state are counted; a layer's "
                     "dequantized weight during its matmul is not")
    if any(l.is_parameter for l in anat.layers) or anat.fixed_params().get("moe.experts"):
        notes.append("routed-expert activations are not modeled (mixture of experts): the estimate is low")
    elems = full = 0  # saved elements per token; full: the same without checkpointing
    if per_block:
        first = min(per_block)
        first_start = "attn" if any(r.startswith("attn.") for r in per_block[first]) else "mlp"
        blocks = [_block_elems(s, per_block.get(b, {}), "before" if b > first else first_start, has_mlp)
                  for b in range(first, anat.n_blocks)]
        full = sum(blocks) + s.hidden + 1  # + the final norm
        elems = s.hidden * len(blocks) + max(blocks) + s.hidden + 1 if gradient_checkpointing else full
    extra = placement.variant.memory(placement, tokens, act_bytes, gradient_checkpointing)  # by term, bytes
    targets = int(round(tokens * target_frac))
    terms = {
        "weights": base_weight_bytes(anat, quantize, act_bytes) + extra.get("weights", 0),
        "adapters": n_lora * ADAPTER_BYTES,
        "adapter_grads": n_lora * ADAPTER_BYTES,
        "adamw": 2 * n_lora * 4,
        "activations": elems * tokens * act_bytes + extra.get("activations", 0),
        "logits": 3 * targets * s.vocab * 4 if per_block else 0,
    }
    flops = train_flops(anat.base_params, n_lora, flop_tokens)
    peak = sum(terms.values())
    if gradient_checkpointing:
        rss = peak + int(GLIBC_HEAP_CHECKPOINTING * (full * tokens * act_bytes + extra.get("activations", 0)))
    else:
        rss = terms["weights"] + int(GLIBC_RSS_FACTOR * (peak - terms["weights"]))
    checkpoint = terms["adapters"] + terms["adamw"] + CHECKPOINT_OVERHEAD
    if group_rows is not None:
        notes.append(f"the head's logits over {s.vocab:,} entries would take {batch_size * row_logits / 1e9:.1f} GB "
                     f"for the batch: it runs {group_rows} row(s) at a time, and memory is one group's")
    return Estimate(terms, flops, flop_tokens, tuple(notes), rss, checkpoint, group_rows)
