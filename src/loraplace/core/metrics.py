"""What a trial measures: every metric's name, unit and meaning, the quality measures, and the torch-free formulas.

Usage::

    ppl = perplexity(loss)                      # loss: token-weighted mean NLL, nats/token
    unit, meaning = METRICS["peak_mem_bytes"]
    QUALITY["accuracy"].higher_is_better        # True

``METRICS`` documents every figure a trial records (the ``metrics_json`` column of the store; the same
table is in docs/results.md). The loss itself is computed where the model runs (``train.loss``); memory
readings are taken there too (``train.memory``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

IGNORE_INDEX = -100  # label of prompt and padding tokens: excluded from every loss
DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}  # bytes per element of each train.dtype


# name -> (unit, meaning). Every trial's metrics dict uses these names.
METRICS: dict[str, tuple[str, str]] = {
    "eval_loss": ("nats/token", "token-weighted mean cross-entropy over all eval target tokens (next-token, shifted)"),
    "perplexity": ("", "exp(eval_loss)"),
    "eval_tokens": ("tokens", "target tokens in the eval set (the weights of eval_loss)"),
    "train_loss_final": ("nats/token", "token-weighted mean train loss over the last 10% of steps"),
    "accuracy": ("fraction", "generation exact match of the final answer (question/answer data, optional)"),
    "accuracy_n": ("examples", "examples accuracy is measured on: the first eval.accuracy_limit eval examples with an answer"),
    "trainable_params": ("params", "parameters the trial trains: sum of r*(in+out) over adapted modules, plus "
                                   "out_features per module under DoRA (its magnitude vector) and r under AdaLoRA "
                                   "(its singular values, at the ranks it kept)"),
    "base_params": ("params", "parameters of the base model, adapters excluded, tied weights once"),
    "trainable_pct": ("%", "100 * trainable_params / base_params"),
    "n_modules": ("modules", "number of adapted modules"),
    "adapter_bytes": ("bytes", "size on disk of the saved adapter files (adapter_model.safetensors + adapter_config.json); "
                                "an estimate from the parameter count when the adapter is not saved"),
    "train_time_s": ("s", "wall time of the training loop"),
    "eval_time_s": ("s", "wall time of the evaluation, accuracy generation included"),
    "train_tokens": ("tokens", "non-padding tokens fed to the model during training"),
    "tokens_per_s": ("tokens/s", "train_tokens / train_time_s"),
    "padding_frac": ("fraction", "padding share of the token slots in train batches"),
    "steps": ("steps", "optimizer steps"),
    "peak_mem_bytes": ("bytes", "CPU: process RSS high-water mark; CUDA: max memory allocated"),
    "prefix_cached_blocks": ("blocks", "frozen blocks whose output was computed once per example and reused (0: none)"),
    "train_flops": ("FLOP", "estimate: 2*N_base*T forward + 2*N_base*T backward through activations + 6*N_lora*T"),
    # only in trials trained in a fused group (train.fuse); their train/eval times are equal shares of the group's
    "fused_trials": ("trials", "size of the fused group the trial trained in"),
    "fused_padding_frac": ("fraction", "padding share of the token slots in the group's stacked batches"),
    "group_train_time_s": ("s", "wall time of the fused group's training loop (all its trials)"),
    # with eval.forgetting (the default): what the adapter changed about the base model (measure/forgetting.py)
    "forgetting": ("nats/token", "mean NLL of the adapted model on the forgetting set minus the base model's (on text "
                                 "the base samples: an unbiased estimate of KL(base || adapted) per token); 0 = unchanged"),
    "forgetting_loss": ("nats/token", "mean NLL of the adapted model on the forgetting set"),
    "forgetting_time_s": ("s", "wall time of the forgetting pass at the trial's end"),
}


@dataclass(frozen=True)
class Quality:
    """A quality measure a study can decide on (``analysis.metric``)."""

    label: str  # as written in sentences and axis labels
    higher_is_better: bool
    unit: str


QUALITY = {
    "eval_loss": Quality("eval loss", False, "nats/token"),
    "accuracy": Quality("accuracy", True, "fraction"),
}
METRIC_CHOICES = tuple(QUALITY)  # the values of analysis.metric


def better(metric: str, a: float, b: float) -> bool:
    """Whether value ``a`` of ``metric`` is strictly better than ``b``."""
    return a > b if QUALITY[metric].higher_is_better else a < b


def numeric(metrics: dict) -> dict[str, float]:
    """The finite numbers of a trial's metrics dict, as floats (booleans, text, inf and nan left out)."""
    return {k: float(v) for k, v in metrics.items()
            if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(float(v))}


def perplexity(loss: float) -> float:
    """exp(loss); inf when the loss is too large to exponentiate."""
    try:
        return math.exp(loss)
    except OverflowError:
        return float("inf")


def train_flops(base_params: int, trainable_params: int, tokens: int) -> float:
    """Estimated training FLOPs of ``tokens`` tokens (the one formula; ``model.estimate`` uses it per step).

    Frozen base weights cost a forward (2 FLOP/param/token) and the backward through
    activations (2 more), but no weight gradients; LoRA weights cost the usual 6.
    """
    return float(4 * base_params * tokens + 6 * trainable_params * tokens)
