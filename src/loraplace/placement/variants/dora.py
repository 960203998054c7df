"""DoRA: PEFT's ``use_dora``; each adapted weight is rescaled by a trained magnitude vector.

Usage::

    DoRA().extra_params(layer, rank)      # out_features: the magnitude vector, counted in every budget
    DoRA().memory(placement, tokens, 4, checkpointing=False)    # {"activations": bytes it saves beside LoRA's}

Memory (``model.estimate``): PEFT's ``DoraLinearLayer`` saves more per adapted module than LoRA, counted in
``activations``: the base output and the scaled LoRA output (2 x tokens x out) and a few fp32 vectors of out (the
magnitude's scale): within 1% of what a step adds on tiny Llama-style models (tests/model/test_estimate.py). Its
weight-norm pass (an identity matrix through the adapter: in x in, then out x in) is detached and freed at once: a
transient, not kept. Under gradient checkpointing only the block being recomputed keeps them.
"""

from __future__ import annotations

from loraplace.core.metrics import DTYPE_BYTES
from loraplace.placement.variants import Variant


class DoRA(Variant):
    name, label, methods_label = "dora", "DoRA", "DoRA"
    switches = {"use_dora": True}
    tools = {"axolotl": "peft_use_dora", "llamafactory": "use_dora", "torchtune": "use_dora"}
    unfusable = "DoRA rescales each weight by its magnitude vector, which the fused forward does not"

    def extra_params(self, layer, rank: int) -> int:
        return layer.out_features  # the magnitude vector, whatever the rank

    def memory(self, placement, tokens: int, act_bytes: int, checkpointing: bool) -> dict[str, int]:
        per_block = {}  # block -> DoRA's saved elements: per token, and token-free (fp32)
        for name in placement.modules:
            layer = placement.anatomy.layer(name)
            per_tok, fixed = per_block.get(layer.block, (0, 0))
            per_block[layer.block] = (per_tok + 2 * layer.out_features, fixed + 3 * layer.out_features)
        saved = {b: t * tokens * act_bytes + f * DTYPE_BYTES["float32"] for b, (t, f) in per_block.items()}
        return {"activations": (max(saved.values()) if checkpointing else sum(saved.values())) if saved else 0}
