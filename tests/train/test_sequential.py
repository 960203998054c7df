"""One trial on tiny models: correct losses, real training, pristine base, saved adapters, determinism."""

from __future__ import annotations

import math

import pytest
import torch
from tiny_models import ARCH_NAMES, build
from toys import PAD, run, toy_set, toy_workspace

from loraplace.core.config import EvalSpec, TrainSpec
from loraplace.core.metrics import IGNORE_INDEX
from loraplace.data.batches import batches
from loraplace.model.anatomy import analyze
from loraplace.placement.resolve import Placement, resolve
from loraplace.placement.strategy import Strategy, get_strategy
from loraplace.train.loss import evaluate, target_nll
from loraplace.train.schedule import lr_factor


def _toy_set(n: int = 24, seed: int = 0):
    return toy_set(n, seed, plen=(4, 10))


def _reference_nll(logits: torch.Tensor, labels: torch.Tensor) -> tuple[float, int]:
    """The textbook shifted loss over full logits (batch, seq, vocab): position t predicts label t+1."""
    logits, labels = logits[:, :-1].float(), labels[:, 1:]
    total = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.size(-1)), labels.reshape(-1),
                                              ignore_index=IGNORE_INDEX, reduction="sum")
    return float(total), int((labels != IGNORE_INDEX).sum())


def _weights(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


@pytest.mark.parametrize("arch", ARCH_NAMES)
def test_target_only_loss_equals_full_shifted_loss_with_mask(arch):
    """Head on target positions only, no attention mask == full logits with the padding mask."""
    model = build(arch).eval()
    ts = _toy_set(10)
    for batch in batches(ts, 5, seed=None, pad_id=PAD):
        with torch.no_grad():
            fast, n_fast = target_nll(model, batch)
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        full, n_full = _reference_nll(logits, batch["labels"])
        assert n_fast == n_full > 0
        assert float(fast) == pytest.approx(full, rel=1e-4), arch


def _specs(**kw):
    train = dict(lr=3e-2, steps=20, batch_size=8, warmup=0.0, schedule="constant", rank=4, alpha=8, dropout=0.0)
    train.update(kw)
    return TrainSpec(**train), EvalSpec(batch_size=8)


def _trial(model, placement, ts, spec, seed=0, adapter_dir=None, **setup_fields):
    """One trial through the executor (``run_one``): its TrialResult, or the error text it is stored with."""
    [out] = run(toy_workspace(model, ts, spec, **setup_fields), [placement], [seed], [adapter_dir])
    return out


def test_trial_trains_restores_base_and_saves_a_loadable_adapter(tmp_path):
    from peft import PeftModel

    model = build("llama")
    before = _weights(model)
    anat = analyze(model)
    p = resolve(get_strategy("all_linear"), anat, rank=4, alpha=8)
    ts = _toy_set()
    zero = evaluate(model, ts, 8, PAD)["eval_loss"]
    train, ev = _specs()
    result = _trial(model, p, ts, train, adapter_dir=tmp_path / "a")
    m = result.metrics
    # learns the mapping; tiny logits (init std 0.02, tied head) cap how far the loss can fall
    assert m["eval_loss"] < zero - 0.4, (zero, m["eval_loss"])
    assert m["perplexity"] == pytest.approx(math.exp(m["eval_loss"]))
    assert m["trainable_params"] == p.trainable_params and m["base_params"] == anat.base_params
    assert m["steps"] == 20 and len(result.curve) == 20 and m["train_tokens"] > 0
    assert m["peak_mem_bytes"] > 0 and m["adapter_bytes"] > p.trainable_params * 4
    assert result.curve[-1][1] < result.curve[0][1]
    after = _weights(model)
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    assert evaluate(model, ts, 8, PAD)["eval_loss"] == pytest.approx(zero)  # base unchanged in behaviour too
    loaded = PeftModel.from_pretrained(build("llama"), tmp_path / "a")
    assert evaluate(loaded, ts, 8, PAD)["eval_loss"] == pytest.approx(m["eval_loss"], rel=1e-5)


@pytest.mark.slow
def test_same_seed_same_numbers_other_seed_other_numbers():
    model = build("gpt2")
    p = resolve(get_strategy("attention_only"), analyze(model), rank=4, alpha=8)
    ts = _toy_set()
    train, ev = _specs(dropout=0.1)
    runs = [_trial(model, p, ts, train, seed=s).curve for s in (0, 0, 1)]
    assert runs[0] == runs[1]
    assert runs[0] != runs[2]


def test_non_finite_loss_is_a_trial_error_and_base_is_unwrapped():
    model = build("llama")
    p = resolve(get_strategy("all_linear"), analyze(model), rank=4, alpha=8)
    blowup = Placement(p.strategy, p.modules, {n: math.inf for n in p.modules}, p.anatomy)  # inf x (B = 0): NaN
    train, ev = _specs()
    assert _trial(model, blowup, _toy_set(), train) == "TrialError: non-finite train loss (nan) at step 1"
    from peft.tuners.lora import LoraLayer

    assert not any(isinstance(m, LoraLayer) for m in model.modules())


def test_lr_schedule_warmup_then_decay():
    spec = TrainSpec(steps=10, warmup=0.2, schedule="cosine")
    f = [lr_factor(s, 10, spec) for s in range(10)]
    assert f[0] == pytest.approx(0.5) and f[1] == pytest.approx(1.0)
    assert all(a >= b for a, b in zip(f[1:], f[2:])) and f[-1] < 0.1
    lin = TrainSpec(steps=10, warmup=0, schedule="linear")
    assert [round(lr_factor(s, 10, lin), 2) for s in (0, 5)] == [1.0, 0.5]


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_gradient_checkpointing_gives_the_same_training(arch):
    model = build(arch)
    p = resolve(get_strategy("all_linear"), analyze(model), rank=4, alpha=8)
    ts = _toy_set()
    plain, ev = _specs(steps=4)
    ckpt, _ = _specs(steps=4, gradient_checkpointing=True)
    a, b = _trial(model, p, ts, plain), _trial(model, p, ts, ckpt)
    assert len(a.curve) == len(b.curve) == 4
    assert [l for _, l in a.curve] == pytest.approx([l for _, l in b.curve], rel=1e-5)
    assert b.metrics["eval_loss"] == pytest.approx(a.metrics["eval_loss"], rel=1e-5)
    assert not any(getattr(m, "gradient_checkpointing", False) for m in model.modules())  # off again for the next trial


def test_gradient_checkpointing_keeps_the_frozen_prefix_out_of_the_backward():
    """With adapters in block 1 only, block 0 runs once per step: the backward does not recompute it."""
    model = build("llama")
    anat = analyze(model)
    p = resolve(Strategy("block1", "all", "1"), anat, rank=4, alpha=8)
    first = model.get_submodule(anat.blocks_path)[0].self_attn.q_proj
    runs = []
    first.register_forward_hook(lambda mod, args, out: runs.append(mod.training) if torch.is_grad_enabled() else None)
    spec, ev = _specs(steps=4, gradient_checkpointing=True)
    _trial(model, p, _toy_set(), spec, prefix_cache_bytes=0)  # no cache: every step
    assert runs == [True] * 4


# -- generation for accuracy ---------------------------------------------------------------------


def test_row_groups_keep_each_groups_head_logits_within_the_budget():
    from loraplace.train.loss import row_groups

    [batch] = list(batches(_toy_set(10), 10, seed=None, pad_id=PAD))
    vocab, targets = 100, int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())  # 4 targets a toy row
    assert row_groups(batch, vocab, budget=targets * 4 * vocab)[0] is batch  # fits whole: the batch itself
    groups = row_groups(batch, vocab, budget=9 * 4 * vocab)  # 9 targets a group: two rows each
    assert [len(g["input_ids"]) for g in groups] == [2, 2, 2, 2, 2]
    assert all(g["input_ids"].shape[1] == int(g["attention_mask"].sum(1).max()) for g in groups)  # cut to its rows

    def rows(parts):
        return [ids[m.bool()].tolist() + lab[m.bool()].tolist() for p in parts
                for ids, lab, m in zip(p["input_ids"], p["labels"], p["attention_mask"])]

    assert rows(groups) == rows([batch])


@pytest.mark.parametrize("where", ["all_linear", "block1"])  # block1: the frozen block 0 from the prefix cache
def test_head_logits_past_the_budget_run_in_row_groups_with_the_unsplit_numbers(monkeypatch, where):
    from loraplace.train import loss as L

    model = build("llama")
    strategy = get_strategy("all_linear") if where == "all_linear" else Strategy("block1", "all", "1")
    p = resolve(strategy, analyze(model), rank=4, alpha=8)
    ts = _toy_set()
    train, _ = _specs(steps=6)
    whole, zero = _trial(model, p, ts, train), evaluate(model, ts, 8, PAD)["eval_loss"]
    seen, target_nll = [], L.target_nll

    def spy(m, batch):
        seen.append(len(batch["input_ids"]))
        return target_nll(m, batch)

    monkeypatch.setattr(L, "target_nll", spy)
    monkeypatch.setattr(L, "HEAD_BYTES", 9 * 4 * L.vocab_size(model))  # two toy rows a forward
    split = _trial(model, p, ts, train)
    assert set(seen) == {2}  # training and evaluation ran two rows at a time
    assert evaluate(model, ts, 8, PAD)["eval_loss"] == pytest.approx(zero, rel=1e-6)
    assert [l for _, l in split.curve] == pytest.approx([l for _, l in whole.curve], rel=1e-5)
    assert split.metrics["eval_loss"] == pytest.approx(whole.metrics["eval_loss"], rel=1e-5)
