"""What a trial measures: every metric's name, unit and meaning, and the torch-free measurements.

Usage::

    ppl = perplexity(loss)                      # loss: token-weighted mean NLL, nats/token
    unit, meaning = METRICS["peak_mem_bytes"]

``METRICS`` documents every figure a trial records (the ``metrics_json`` column of the store). The
loss itself is computed where the model runs (``trial.target_nll``). Torch is imported only to read
CUDA memory counters, so this module is part of the torch-free core.
"""

from __future__ import annotations

import math
import os
import resource
import sys

IGNORE_INDEX = -100  # label of prompt and padding tokens: excluded from every loss

# name -> (unit, meaning). Every trial's metrics dict uses these names.
METRICS: dict[str, tuple[str, str]] = {
    "eval_loss": ("nats/token", "token-weighted mean cross-entropy over all eval target tokens (next-token, shifted)"),
    "perplexity": ("", "exp(eval_loss)"),
    "eval_tokens": ("tokens", "target tokens in the eval set (the weights of eval_loss)"),
    "train_loss_final": ("nats/token", "token-weighted mean train loss over the last 10% of steps"),
    "accuracy": ("fraction", "generation exact match of the final answer (question/answer data, optional)"),
    "accuracy_n": ("examples", "examples accuracy is measured on: the first eval.accuracy_limit eval examples with an answer"),
    "trainable_params": ("params", "parameters of the LoRA adapters (sum of r*(in+out) over adapted modules)"),
    "base_params": ("params", "parameters of the base model, adapters excluded, tied weights once"),
    "trainable_pct": ("%", "100 * trainable_params / base_params"),
    "n_modules": ("modules", "number of adapted modules"),
    "adapter_bytes": ("bytes", "size on disk of the saved adapter: adapter_model.safetensors + adapter_config.json"),
    "train_time_s": ("s", "wall time of the training loop"),
    "eval_time_s": ("s", "wall time of the evaluation"),
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
}


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
    """Estimated training FLOPs.

    Frozen base weights cost a forward (2 FLOP/param/token) and the backward through
    activations (2 more), but no weight gradients; LoRA weights cost the usual 6.
    """
    return float(4 * base_params * tokens + 6 * trainable_params * tokens)


def _is_cuda(device) -> bool:
    return str(device).startswith("cuda")


def peak_memory_bytes(device="cpu") -> int:
    """CUDA: max allocated since the last reset. CPU: the process's RSS high-water mark."""
    if _is_cuda(device):
        import torch

        return int(torch.cuda.max_memory_allocated(device))
    try:  # Linux: VmHWM, which reset_peak_memory can reset between trials
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024  # kB
    except OSError:
        pass
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(rss if sys.platform == "darwin" else rss * 1024)  # Linux reports KiB


def free_memory_bytes(device="cpu") -> int:
    """Memory a run on ``device`` can still take: CUDA's free memory, or the host's available memory."""
    if _is_cuda(device):
        import torch

        return int(torch.cuda.mem_get_info(torch.device(device))[0])
    try:
        with open("/proc/meminfo") as f:
            return next(int(line.split()[1]) * 1024 for line in f if line.startswith("MemAvailable:"))  # kB
    except (OSError, StopIteration, ValueError):
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def reset_peak_memory(device="cpu") -> None:
    """Start a new CUDA peak window. RSS high-water cannot be reset portably; on Linux we try
    /proc/self/clear_refs (5 resets VmHWM) so each trial reports its own peak."""
    if _is_cuda(device):
        import torch

        torch.cuda.reset_peak_memory_stats(device)
        return
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass


def adapter_bytes(path: str | os.PathLike) -> int:
    """Bytes of a saved PEFT adapter: its weights and config (adapter_*), not the README PEFT adds."""
    return sum(os.path.getsize(os.path.join(path, f)) for f in os.listdir(path) if f.startswith("adapter_"))

