"""Greedy generation and exact-match accuracy of a model (the base or an adapted one).

Usage::

    answer_accuracy(model, tok, prompts, [e.answer for e in scored], eval_spec)   # {"accuracy", "accuracy_n"}

``generate_greedy`` batches the prompts (left-padded); a finished row leaves the batch and the KV cache at
once. Answers are parsed and compared by ``data.answers``.
"""

from __future__ import annotations

import torch
from tqdm.auto import tqdm

from loraplace.core.config import EvalSpec
from loraplace.data.answers import answer_matches, final_line_stop
from loraplace.data.tokenize import pad_id


def eos_ids(model, tokenizer) -> set[int]:
    """End-of-turn ids: the tokenizer's eos plus the model's generation_config eos (an id or a list)."""
    ids = {tokenizer.eos_token_id}
    gen = getattr(model, "generation_config", None)
    extra = getattr(gen, "eos_token_id", None) if gen is not None else None
    ids.update(extra if isinstance(extra, (list, tuple)) else [extra])
    return {int(i) for i in ids if i is not None}


def _forward_last(model, **kw):
    """Logits of each row's last position (B, vocab); logits_to_keep=1 spares the head elsewhere."""
    try:
        out = model(**kw, use_cache=True, logits_to_keep=1)
    except TypeError:  # a model whose forward has no logits_to_keep
        out = model(**kw, use_cache=True)
    return out.logits[:, -1], out.cache  # transformers 5.x: `cache` (was past_key_values)


@torch.inference_mode()
def generate_greedy(model, prompts: list[list[int]], max_new_tokens: int, pad_id: int, stop_ids: set[int],
                    stop=None, device="cpu") -> list[list[int]]:
    """Greedy continuations of a batch of prompts (token ids), one list of new ids per prompt.

    Prompts are left-padded into one batch. A row ends at a token in ``stop_ids`` (not included),
    when its stop function says so (``stop``: one ``stop(ids_so_far) -> bool`` for every row, or a
    list of them, one per prompt; the token that completed it is included), or after
    max_new_tokens. Finished rows leave the batch and the KV cache at once, so a row that stops
    early costs nothing more while the others go on."""
    width = max(len(p) for p in prompts)
    ids = torch.tensor([[pad_id] * (width - len(p)) + p for p in prompts], device=device)
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts], device=device)
    pos = (mask.cumsum(-1) - 1).clamp(min=0)  # positions count real tokens only, as in training
    logits, cache = _forward_last(model, input_ids=ids, attention_mask=mask, position_ids=pos)
    prune = hasattr(cache, "batch_select_indices")
    stops = list(stop) if isinstance(stop, (list, tuple)) else [stop] * len(prompts)
    out: list[list[int]] = [[] for _ in prompts]
    active = list(range(len(prompts)))  # prompt index of each batch row
    live = set(active)  # rows still generating
    for step in range(max_new_tokens):
        toks = logits.argmax(-1).tolist()
        keep = []
        for j, (row, t) in enumerate(zip(active, toks)):
            if row not in live:
                continue
            if t in stop_ids:
                continue
            out[row].append(t)
            if not (stops[row] is not None and stops[row](out[row])):
                keep.append(j)
        live = {active[j] for j in keep}
        if not keep or step + 1 == max_new_tokens:
            break
        nxt = logits.argmax(-1)
        if prune and len(keep) < len(active):
            idx = torch.tensor(keep, device=device)
            cache.batch_select_indices(idx)
            mask, pos, nxt = mask[idx], pos[idx], nxt[idx]
            active = [active[j] for j in keep]
        mask = torch.cat([mask, mask.new_ones(len(active), 1)], dim=1)
        pos = pos[:, -1:] + 1
        logits, cache = _forward_last(model, input_ids=nxt[:, None], attention_mask=mask, position_ids=pos,
                                      cache=cache)
    return out


@torch.inference_mode()
def answer_accuracy(model, tokenizer, prompts: list[list[int]], answers: list[str], eval_spec: EvalSpec,
                    device="cpu") -> dict:
    """Share of prompts (token ids, as ``data.tokenize.encode_prompt`` gives them) whose greedy generation matches
    its answer (see ``answer_matches``).

    Returns {"accuracy": hits / n, "accuracy_n": n}. Generation: ``generate_greedy`` in batches of
    eval.batch_size (prompts grouped by length, so little padding), stopping at eos or at the end of
    the answer line (``final_line_stop``), at most eval.max_new_tokens new tokens."""
    was_training = model.training
    model.eval()
    hits = 0
    pad = pad_id(tokenizer)
    stop_ids = eos_ids(model, tokenizer)
    stops = [final_line_stop(tokenizer, a) for a in answers]
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    bar = tqdm(total=len(prompts), desc="accuracy", unit="ex", leave=False, dynamic_ncols=True, disable=None)
    for i in range(0, len(order), eval_spec.batch_size):
        chunk = order[i : i + eval_spec.batch_size]
        outs = generate_greedy(model, [prompts[j] for j in chunk], eval_spec.max_new_tokens, pad, stop_ids,
                               [stops[j] for j in chunk], device)
        for j, new in zip(chunk, outs):
            hits += answer_matches(tokenizer.decode(new, skip_special_tokens=True), answers[j])
        bar.update(len(chunk))
    bar.close()
    model.train(was_training)
    return {"accuracy": hits / len(prompts), "accuracy_n": len(prompts)}


@torch.inference_mode()
def sample(model, start: list[int], n: int, length: int, seed: int, device="cpu", batch_size: int = 16) -> list[list[int]]:
    """``n`` sequences of ``length`` tokens drawn from ``model`` at temperature 1, each beginning with ``start``:
    ancestral sampling, no stopping (a token after an end-of-text token is still drawn from the model given
    what came before). Draws come from a CPU generator seeded by ``seed``, so the same seed and model give the
    same sequences on every run."""
    was_training = model.training
    model.eval()
    g = torch.Generator().manual_seed(seed)
    out: list[list[int]] = []
    try:
        for i in range(0, n, batch_size):
            rows = min(batch_size, n - i)
            ids = torch.tensor([start] * rows, device=device)
            seqs = ids.cpu()
            logits, cache = _forward_last(model, input_ids=ids)
            for _ in range(length - len(start)):
                probs = torch.softmax(logits.float(), dim=-1).cpu()
                nxt = torch.multinomial(probs, 1, generator=g)  # (rows, 1)
                seqs = torch.cat([seqs, nxt], dim=1)
                if seqs.shape[1] == length:
                    break
                logits, cache = _forward_last(model, input_ids=nxt.to(device), cache=cache)
            out += seqs.tolist()
    finally:
        model.train(was_training)
    return out
