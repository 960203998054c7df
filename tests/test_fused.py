"""Fused trials give the sequential engine's numbers: per-step losses, eval losses, saved adapters, failures."""

from __future__ import annotations

import json
import math

import pytest
import tiny_models
import torch
import transformers as T
from safetensors.torch import load_file

from loraplace import fused
from loraplace.anatomy import analyze
from loraplace.config import ConfigError, EvalSpec, StudyConfig, TrainSpec
from loraplace.data import TokenizedSet
from loraplace.metrics import IGNORE_INDEX
from loraplace.placement import Placement, Strategy, resolve
from loraplace.trial import TrialError, TrialResult, _train_batches, run_trial, total_steps

PAD = 0
REL = 1e-4


def _toy_set(n: int, seed: int = 0) -> TokenizedSet:
    """Prompt: random tokens of random length; completion: a token fixed by the prompt, then a fixed tail."""
    g = torch.Generator().manual_seed(seed)
    ids, labels = [], []
    for _ in range(n):
        plen = int(torch.randint(3, 14, (1,), generator=g))
        prompt = torch.randint(3, tiny_models.VOCAB, (plen,), generator=g).tolist()
        completion = [3 + prompt[0] % 4, 9, 10, 2]
        ids.append(prompt + completion)
        labels.append([IGNORE_INDEX] * plen + completion)
    return TokenizedSet(input_ids=ids, labels=labels)


def _gpt2_without_dropout():
    """GPT-2 (Conv1D layers) with its own dropouts off: fusable (with them on it runs sequentially)."""
    torch.manual_seed(0)
    cfg = T.GPT2Config(n_embd=48, n_layer=2, n_head=4, n_positions=64, resid_pdrop=0.0, embd_pdrop=0.0,
                       attn_pdrop=0.0, vocab_size=tiny_models.VOCAB, bos_token_id=1, eos_token_id=2, pad_token_id=0)
    return T.AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)


def _model(arch):
    return _gpt2_without_dropout() if arch == "gpt2" else tiny_models.build(arch)


def _strategies():
    return [
        (Strategy("all_linear", "all"), 0),
        (Strategy("attention_only", "attn"), 1),
        (Strategy("block1", "all", "1"), 0),  # a block subset: block 0 carries nothing
        (Strategy("ranks", "all", rank={"attn": 2, "mlp": 6}), 2),  # per-module ranks
    ]


# 21 examples in batches of 4: a short last batch each epoch, at a seed-dependent step; 12 steps: two epochs
SPEC = dict(lr=2e-2, steps=12, batch_size=4, warmup=0.2, schedule="cosine", rank=4, alpha=8, max_grad_norm=0.5)


def _close(a: float, b: float) -> bool:
    return math.isclose(a, b, rel_tol=REL, abs_tol=1e-6)


def _sequential(model, placements, seeds, ts, spec, dirs):
    out = []
    for p, s, d in zip(placements, seeds, dirs):
        try:
            out.append(run_trial(model, p, ts, ts, spec, EvalSpec(batch_size=8), seed=s, pad_id=PAD, adapter_dir=d,
                                 prefix_cache_bytes=0))  # the reference recomputes the prefix every step
        except TrialError as e:
            out.append(e)
    return out


def _assert_same_adapter(seq_dir, fused_dir, rel: float = 1e-3):
    """Same config and tensors; each tensor within ``rel`` of its largest entry. In fp32 the fused
    matmuls round differently and AdamW's normalised steps carry that noise into the weights (a few
    1e-4 of a tensor's scale after 12 steps at lr 2e-2); in float64 the two agree to 1e-15 (below)."""
    assert json.loads((seq_dir / "adapter_config.json").read_text()) == json.loads((fused_dir / "adapter_config.json").read_text())
    a, b = load_file(seq_dir / "adapter_model.safetensors"), load_file(fused_dir / "adapter_model.safetensors")
    assert a.keys() == b.keys() and a
    for k in a:
        assert a[k].shape == b[k].shape and a[k].dtype == b[k].dtype
        assert float((a[k] - b[k]).abs().max()) <= rel * float(a[k].abs().max()), k


@pytest.mark.parametrize("arch,dropout", [("llama", 0.0), ("llama", 0.1), ("gpt2", 0.0), ("qwen2", 0.0)])
def test_fused_group_equals_sequential_trials(tmp_path, arch, dropout):
    model = _model(arch)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    anat = analyze(model)
    placements = [resolve(s, anat, rank=4, alpha=8) for s, _ in _strategies()]
    seeds = [seed for _, seed in _strategies()]
    assert len({tuple(p.modules.items()) for p in placements}) == 4
    ts = _toy_set(21)
    spec = TrainSpec(**SPEC, dropout=dropout)
    seq = _sequential(model, placements, seeds, ts, spec, [tmp_path / f"seq{i}" for i in range(4)])
    got = fused.run_fused_trials(model, placements, seeds, ts, ts, spec, EvalSpec(batch_size=8), pad_id=PAD,
                                 adapter_dirs=[tmp_path / f"fused{i}" for i in range(4)])
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # base pristine
    assert all(p.grad is None for p in model.parameters())  # the frozen base got no gradients
    for i, (s, f) in enumerate(zip(seq, got)):
        assert isinstance(s, TrialResult) and isinstance(f, TrialResult), (s, f)
        assert [st for st, _ in f.curve] == [st for st, _ in s.curve] == list(range(1, 13))
        for (_, ls), (_, lf) in zip(s.curve, f.curve):
            assert _close(lf, ls), (i, s.curve, f.curve)
        assert _close(f.metrics["eval_loss"], s.metrics["eval_loss"]), i
        assert s.metrics["eval_loss"] < s.curve[0][1]  # it trained: the comparison is not of untouched adapters
        for k in ("steps", "train_tokens", "padding_frac", "trainable_params", "n_modules", "adapter_bytes", "eval_tokens"):
            assert f.metrics[k] == s.metrics[k], k
        assert f.placement == s.placement
        assert f.metrics["fused_trials"] == 4 and 0 < f.metrics["fused_padding_frac"] < 1  # mixed seeds pad
        assert f.metrics["prefix_cached_blocks"] == 0  # all_linear adapts block 0: no frozen prefix to cache
        _assert_same_adapter(s.adapter_dir, f.adapter_dir)


def _float64_runs(tmp_path, build_model, pick) -> list[TrialResult]:
    """Sequential and fused runs of pick(anatomy) -> (placements, seeds) in float64, checked equal to 1e-10."""
    torch.set_default_dtype(torch.float64)
    try:
        model = build_model().double()
        placements, seeds = pick(analyze(model))
        ts, spec = _toy_set(21), TrainSpec(**SPEC)
        seq = _sequential(model, placements, seeds, ts, spec, [tmp_path / f"seq{i}" for i in range(4)])
        got = fused.run_fused_trials(model, placements, seeds, ts, ts, spec, EvalSpec(batch_size=8), pad_id=PAD,
                                     adapter_dirs=[tmp_path / f"fused{i}" for i in range(4)])
    finally:
        torch.set_default_dtype(torch.float32)
    for s, f in zip(seq, got):
        assert all(math.isclose(lf, ls, rel_tol=1e-10) for (_, ls), (_, lf) in zip(s.curve, f.curve))
        assert math.isclose(f.metrics["eval_loss"], s.metrics["eval_loss"], rel_tol=1e-10)
        _assert_same_adapter(s.adapter_dir, f.adapter_dir, rel=1e-10)
    return got


def test_fused_equals_sequential_to_float64_precision(tmp_path):
    """In float64 rounding cannot hide a difference: the fused math is the sequential math."""
    def pick(anat):
        return [resolve(s, anat, rank=4, alpha=8) for s, _ in _strategies()], [seed for _, seed in _strategies()]
    _float64_runs(tmp_path, lambda: tiny_models.build("llama"), pick)


def test_same_seed_group_adds_no_padding(tmp_path):
    model = tiny_models.build("llama")
    anat = analyze(model)
    placements = [resolve(Strategy(n, r), anat, rank=4, alpha=8) for n, r in [("a", "all"), ("b", "attn"), ("c", "mlp")]]
    ts = _toy_set(21)
    spec = TrainSpec(**SPEC)
    got = fused.run_fused_trials(model, placements, [3, 3, 3], ts, ts, spec, EvalSpec(batch_size=8), pad_id=PAD)
    assert all(r.metrics["fused_padding_frac"] == pytest.approx(r.metrics["padding_frac"]) for r in got)


def test_a_diverging_trial_leaves_the_group_and_the_others_finish_identically(tmp_path):
    model = tiny_models.build("llama")
    anat = analyze(model)
    good = [resolve(s, anat, rank=4, alpha=8) for s, _ in _strategies()[:3]]
    seeds = [0, 1, 0, 1]
    # an infinite LoRA scale: inf * (B = 0) makes its outputs NaN at step 1 (finite huge scales do
    # not fail on these models: RMSNorm turns overflowing residuals into zeros, AdamW inf gradients)
    bad_src = resolve(Strategy("blowup", "mlp"), anat, rank=4, alpha=8)
    bad = Placement(bad_src.strategy, bad_src.modules, {n: math.inf for n in bad_src.modules}, anat)
    placements = [good[0], bad, good[1], good[2]]
    ts = _toy_set(21)
    spec = TrainSpec(**SPEC)
    seq = _sequential(model, placements, seeds, ts, spec, [None] * 4)
    assert isinstance(seq[1], TrialError) and "non-finite train loss" in str(seq[1])
    got = fused.run_fused_trials(model, placements, seeds, ts, ts, spec, EvalSpec(batch_size=8), pad_id=PAD)
    assert isinstance(got[1], TrialError) and str(got[1]) == str(seq[1])
    for i in (0, 2, 3):
        assert len(got[i].curve) == 12
        assert all(_close(lf, ls) for (_, lf), (_, ls) in zip(got[i].curve, seq[i].curve)), i
        assert _close(got[i].metrics["eval_loss"], seq[i].metrics["eval_loss"])


def _study_cfg(tmp_path, out, fuse):
    return StudyConfig.from_dict({
        "out": str(tmp_path / out),
        "strategies": ["all_linear", "attention_only", "top_half"],
        "seeds": [0, 1],
        "data": {"limit": 60, "eval_size": 12, "max_length": 96},
        "train": {"steps": 4, "batch_size": 4, "rank": 4, "alpha": 8, "lr": 1e-2, "fuse": fuse},
        "eval": {"batch_size": 8},
    })


def test_study_with_fuse_stores_the_numbers_of_the_sequential_study(tmp_path):
    from loraplace import study as S

    off = S.run_study(_study_cfg(tmp_path, "off", "off"), (tiny_models.build("llama"), tiny_models.tokenizer()))
    on = S.run_study(_study_cfg(tmp_path, "on", 4), (tiny_models.build("llama"), tiny_models.tokenizer()))
    assert [r.trial_id for r in on] == [r.trial_id for r in off]  # fuse is not part of a trial's identity
    assert all(r.status == "done" for r in on + off)
    assert sorted(r.metrics["fused_trials"] for r in on) == [2, 2, 4, 4, 4, 4]  # seed 0's three + one of seed 1, then two
    for a, b in zip(off, on):
        assert "fused_trials" not in a.metrics
        assert _close(b.metrics["eval_loss"], a.metrics["eval_loss"]), (a.strategy, a.seed)
        assert all(_close(y, x) for (_, x), (_, y) in zip(a.curve, b.curve))
        _assert_same_adapter(tmp_path / "off" / a.adapter_path, tmp_path / "on" / b.adapter_path)


def test_auto_is_sequential_on_cpu_and_models_with_dropout_are_not_fused(tmp_path):
    model = tiny_models.build("llama")
    assert fused.group_size(_study_cfg(tmp_path, "a", "auto"), model, "cpu", 12) == 1
    assert fused.group_size(_study_cfg(tmp_path, "a", 4), model, "cpu", 12) == 4
    assert fused.group_size(_study_cfg(tmp_path, "a", 4), model, "cpu", 3) == 3
    assert fused.group_size(_study_cfg(tmp_path, "a", "off"), model, "cpu", 12) == 1
    gpt2 = tiny_models.build("gpt2")  # default dropouts 0.1: their masks would come from one stream
    assert "dropout" in fused.fusable(gpt2, TrainSpec())
    assert fused.group_size(_study_cfg(tmp_path, "a", 4), gpt2, "cpu", 12) == 1
    assert "checkpointing" in fused.fusable(model, TrainSpec(dropout=0.1, gradient_checkpointing=True))
    assert fused.fusable(model, TrainSpec(dropout=0.1)) is None


def test_plan_groups_keeps_seeds_together():
    from loraplace.workspace import TrialTask

    tasks = [TrialTask(f"{s}{n}", n, s, {}, None) for s in (0, 1, 2) for n in "abc"]
    groups = fused.plan_groups(tasks, 3)
    assert [[t.trial_id for t in g] for g in groups] == [["0a", "0b", "0c"], ["1a", "1b", "1c"], ["2a", "2b", "2c"]]
    assert [len(g) for g in fused.plan_groups(tasks, 4)] == [4, 4, 1]


@pytest.mark.parametrize("value,expected", [("auto", "auto"), ("off", 1), (False, 1), (4, 4), ("4", 4), (1, 1)])
def test_fuse_setting_parses(value, expected):
    assert TrainSpec(fuse=value).fuse_trials() == expected
    cfg = StudyConfig.load(overrides=[f"train.fuse={'off' if value is False else value}"])
    assert cfg.train.fuse_trials() == expected


@pytest.mark.parametrize("value", ["0", "many", "-2", "true"])
def test_bad_fuse_setting_is_a_config_error(value):
    with pytest.raises(ConfigError, match="train.fuse"):
        StudyConfig.load(overrides=[f"train.fuse={value}"])


def test_out_of_memory_splits_the_group_and_loses_no_trial(tmp_path, monkeypatch):
    """The CUDA fallback, exercised on CPU: a group 'too big' for memory runs as smaller groups."""
    from loraplace import study as S

    real = fused.run_fused_trials
    sizes = []

    def tight(model, placements, *a, **kw):
        sizes.append(len(placements))
        if len(placements) > 2:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory (simulated)")
        return real(model, placements, *a, **kw)

    monkeypatch.setattr(fused, "run_fused_trials", tight)
    cfg = _study_cfg(tmp_path, "oom", 3)
    cfg.seeds = [0]
    records = S.run_study(cfg, (tiny_models.build("llama"), tiny_models.tokenizer()))
    assert sizes == [3, 2]  # 3 -> 1 (the sequential engine) + 2
    assert [r.status for r in records] == ["done"] * 3
    assert sorted(r.metrics.get("fused_trials", 1) for r in records) == [1, 2, 2]


def test_auto_on_cuda_sizes_groups_from_free_memory(tmp_path, monkeypatch):
    """auto's CUDA branch, exercised on CPU with a stated amount of free memory."""
    model = tiny_models.build("llama")
    cfg = _study_cfg(tmp_path, "a", "auto")
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (64 * 2**30, 80 * 2**30))
    assert fused.group_size(cfg, model, "cuda", 12) == 12  # tiny model: all of them fit
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (16 * 2**20, 80 * 2**30))
    small = fused.group_size(cfg, model, "cuda", 12)
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (2**10, 80 * 2**30))
    assert fused.group_size(cfg, model, "cuda", 12) == 1 < small < 12  # estimate scales with free memory


def test_fused_trials_score_accuracy_like_sequential_ones(tmp_path):
    """eval.accuracy runs on the restored PEFT wrapping of each fused trial, on the same examples."""
    from loraplace import study as S

    def cfg(out, fuse):
        c = _study_cfg(tmp_path, out, fuse)
        c.strategies, c.seeds = ["all_linear", "attention_only"], [0]
        c.eval.accuracy, c.eval.accuracy_limit, c.eval.max_new_tokens = True, 3, 4
        return c

    off = S.run_study(cfg("off", "off"), (tiny_models.build("llama"), tiny_models.tokenizer()))
    on = S.run_study(cfg("on", 2), (tiny_models.build("llama"), tiny_models.tokenizer()))
    for a, b in zip(off, on):
        assert b.metrics["fused_trials"] == 2 and "accuracy" in a.metrics
        assert b.metrics["accuracy"] == a.metrics["accuracy"]


# -- the frozen prefix, computed once per example and reused in later epochs ----------------------
def _deep(arch: str, **cfg) -> torch.nn.Module:
    """A 4-block tiny model (GPT-2 without its dropouts), with ``cfg`` set on its config."""
    config = _gpt2_without_dropout().config if arch == "gpt2" else tiny_models.config(arch)
    fields = {k: v for k, v in config.to_dict().items() if k not in ("layer_types", "n_layer")}  # per-layer lists follow
    config = type(config)(**{**fields, "num_hidden_layers": 4, **cfg})
    assert config.num_hidden_layers == 4
    torch.manual_seed(0)
    return T.AutoModelForCausalLM.from_config(config, dtype=torch.float32)


def _upper(anat):
    """Trials that all leave blocks 0-1 alone (the group's lowest adapted block is 2; one starts at 3)."""
    strategies = [(Strategy("top_half", "all", "last:50%"), 0), (Strategy("attn3", "attn", "3"), 1),
                  (Strategy("ranks", "all", "2-3", rank={"attn": 2, "mlp": 6}), 2), (Strategy("mlp_top", "mlp", "2,3"), 0)]
    return [resolve(s, anat, rank=4, alpha=8) for s, _ in strategies], [seed for _, seed in strategies]


def _prefix_runs(model, anat) -> list[bool]:
    """Counts training forwards that really compute block 0 (a hook on its first linear layer: a
    bypassed block runs none of its layers)."""
    first = next(m for m in model.get_submodule(anat.blocks_path)[0].modules() if isinstance(m, (torch.nn.Linear, T.Conv1D)))
    runs: list[bool] = []
    first.register_forward_hook(lambda mod, args, out: runs.append(True) if mod.training else None)
    return runs


def _steps_with_new_examples(ts, spec, seeds) -> tuple[int, int]:
    """(steps whose stacked batch holds an example not seen at an earlier step, the last such step)."""
    steps = total_steps(spec, len(ts))
    streams = [_train_batches(ts, spec, s, PAD, steps, index=True) for s in seeds]
    seen, misses, last = set(), 0, 0
    for step in range(1, steps + 1):
        idx = {i for b in (next(g) for g in streams) for i in b["index"].tolist()}
        if not idx <= seen:
            misses, last = misses + 1, step
        seen |= idx
    return misses, last


@pytest.mark.parametrize("arch,checkpointing", [("llama", False), ("gpt_neox", False), ("bloom", False),
                                                ("gpt2", False), ("llama", True)])
def test_frozen_prefix_is_computed_once_and_results_equal_sequential(tmp_path, arch, checkpointing):
    """Every trial starts at block 2 or above: blocks 0-1 run in epoch 1 only (bloom's blocks return
    tuples; gpt2 has Conv1D layers and positional block arguments), with the sequential numbers."""
    model = _deep(arch)
    anat = analyze(model)
    placements, seeds = _upper(anat)
    ts = _toy_set(21)
    spec = TrainSpec(**SPEC, gradient_checkpointing=checkpointing)
    seq = _sequential(model, placements, seeds, ts, spec, [tmp_path / f"seq{i}" for i in range(4)])
    runs = _prefix_runs(model, anat)
    got = fused.run_fused_trials(model, placements, seeds, ts, ts, spec, EvalSpec(batch_size=8), pad_id=PAD,
                                 adapter_dirs=[tmp_path / f"fused{i}" for i in range(4)])
    misses, last = _steps_with_new_examples(ts, spec, seeds)
    per_epoch = math.ceil(len(ts) / spec.batch_size)
    assert len(runs) == misses and last <= per_epoch < 12  # the prefix ran in epoch 1 only, once for each such step
    for i, (s, f) in enumerate(zip(seq, got)):
        assert isinstance(s, TrialResult) and isinstance(f, TrialResult), (s, f)
        assert f.metrics["prefix_cached_blocks"] == 2
        assert len(f.curve) == len(s.curve) == 12
        assert all(_close(lf, ls) for (_, ls), (_, lf) in zip(s.curve, f.curve)), (i, s.curve, f.curve)
        assert _close(f.metrics["eval_loss"], s.metrics["eval_loss"]), i
        assert s.metrics["eval_loss"] < s.curve[0][1]
        _assert_same_adapter(s.adapter_dir, f.adapter_dir)


def test_prefix_cache_over_its_cap_is_skipped_with_the_same_results(caplog):
    model = _deep("qwen2")
    anat = analyze(model)
    placements, seeds = _upper(anat)
    ts, spec = _toy_set(21), TrainSpec(**SPEC)
    seq = _sequential(model, placements, seeds, ts, spec, [None] * 4)
    runs = _prefix_runs(model, anat)
    with caplog.at_level("INFO", logger="loraplace"):
        got = fused.run_fused_trials(model, placements, seeds, ts, ts, spec, EvalSpec(batch_size=8), pad_id=PAD,
                                     prefix_cache_bytes=1024)
    assert "not caching the frozen prefix (blocks 0-1)" in caplog.text and "over the cap of" in caplog.text
    assert len(runs) == 12  # every step ran the prefix
    for s, f in zip(seq, got):
        assert f.metrics["prefix_cached_blocks"] == 0
        assert all(_close(lf, ls) for (_, ls), (_, lf) in zip(s.curve, f.curve))
        assert _close(f.metrics["eval_loss"], s.metrics["eval_loss"])


def test_prefix_with_dropout_or_one_epoch_is_not_cached(caplog):
    """A prefix with its own dropout draws new masks every epoch, so its output is not reusable; with one
    pass over the train set nothing is needed twice."""
    ts = _toy_set(21)
    model = _deep("llama", attention_dropout=0.1)
    anat = analyze(model)
    placements, seeds = _upper(anat)
    runs = _prefix_runs(model, anat)
    with caplog.at_level("INFO", logger="loraplace"):
        got = fused.run_fused_trials(model, placements, seeds, ts, ts, TrainSpec(**SPEC), EvalSpec(batch_size=8),
                                     pad_id=PAD)
    assert "not caching the frozen prefix" in caplog.text and "config.attention_dropout=0.1" in caplog.text
    assert len(runs) == 12 and all(r.metrics["prefix_cached_blocks"] == 0 for r in got)

    model = _deep("llama")
    runs = _prefix_runs(model, anat)
    got = fused.run_fused_trials(model, placements, seeds, ts, ts, TrainSpec(**{**SPEC, "steps": 6}),
                                 EvalSpec(batch_size=8), pad_id=PAD)
    assert len(runs) == 6 and all(r.metrics["prefix_cached_blocks"] == 0 for r in got)


def test_prefix_cache_steps_aside_when_block_k_does_not_read_the_prefix_output(caplog):
    """Something between block k-1 and block k (here a pre-hook that rescales block 2's input) would
    be skipped by the cache: it is detected on the first step and the prefix runs every step."""
    model = _deep("llama")
    anat = analyze(model)
    model.get_submodule(anat.blocks_path)[2].register_forward_pre_hook(lambda mod, args: (args[0] * 0.5,) + args[1:])
    placements, seeds = _upper(anat)
    ts, spec = _toy_set(21), TrainSpec(**SPEC)
    seq = _sequential(model, placements, seeds, ts, spec, [None] * 4)
    runs = _prefix_runs(model, anat)
    with caplog.at_level("INFO", logger="loraplace"):
        got = fused.run_fused_trials(model, placements, seeds, ts, ts, spec, EvalSpec(batch_size=8), pad_id=PAD)
    assert "does not read block 1's output directly" in caplog.text
    assert len(runs) == 12
    for s, f in zip(seq, got):
        assert f.metrics["prefix_cached_blocks"] == 0
        assert all(_close(lf, ls) for (_, ls), (_, lf) in zip(s.curve, f.curve))


def test_prefix_cache_equals_sequential_to_float64_precision(tmp_path):
    """In float64 the kept hidden states are the ones the sequential engine recomputes every epoch."""
    got = _float64_runs(tmp_path, lambda: _deep("llama"), _upper)
    assert all(f.metrics["prefix_cached_blocks"] == 2 for f in got)
