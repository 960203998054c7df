"""The trial lifecycle: a trial advanced in pieces, checkpointed and restored (here or in a new process), computes
exactly what it computes in one go, on both engines, in float64 and fp32."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest
import tiny_models
import torch
from safetensors.torch import load_file
from toys import REPO, SPEC, setup, toy_set

from loraplace.core.config import TrainSpec
from loraplace.model.anatomy import analyze
from loraplace.placement.resolve import resolve
from loraplace.placement.strategy import Strategy
from loraplace.train import fused, sequential
from loraplace.train.trial import Trial, TrialError

STRATEGIES = [Strategy("all_linear", "all"), Strategy("attention_only", "attn"), Strategy("block1", "all", "1")]
# LoRA dropout on: the pieces must also carry each trial's RNG stream across the checkpoint
PIECE_SPEC = {**SPEC, "dropout": 0.1}


def _tensors(result) -> dict[str, torch.Tensor]:
    return load_file(result.adapter_dir / "adapter_model.safetensors")


def _same(a, b) -> None:
    """Bit-identical: every logged loss, the eval loss, every adapter tensor."""
    assert a.curve == b.curve
    assert a.metrics["eval_loss"] == b.metrics["eval_loss"]
    ta, tb = _tensors(a), _tensors(b)
    assert ta.keys() == tb.keys() and ta
    assert all(torch.equal(ta[k], tb[k]) for k in ta)


# A new process restores the checkpoint, trains the rest and finishes: the model and data are rebuilt there.
CHILD = textwrap.dedent("""
    import json, sys
    import torch
    import tiny_models
    from toys import SPEC, setup, toy_set
    from loraplace.core.config import TrainSpec
    from loraplace.model.anatomy import analyze
    from loraplace.placement.resolve import resolve
    from loraplace.placement.strategy import Strategy
    from loraplace.train import sequential
    from loraplace.train.trial import Trial

    ckpt, out, dtype, threads = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
    torch.set_num_threads(threads)  # bit for bit needs the same thread count (reductions split by thread)
    if dtype == "float64":
        torch.set_default_dtype(torch.float64)
    model = tiny_models.build("llama")
    model = model.double() if dtype == "float64" else model
    s = setup(model, toy_set(21), TrainSpec(**{**SPEC, "dropout": 0.1}))
    p = resolve(Strategy("all_linear", "all"), analyze(model), rank=4, alpha=8)
    trial = Trial.restore(ckpt, s, p)
    assert trial.step == 7, trial.step
    sequential.advance(s, [trial], trial.total - trial.step)
    sequential.evaluate(s, [trial])
    result = trial.finish(s, out)
    json.dump({"curve": result.curve, "eval_loss": result.metrics["eval_loss"]}, open(out + ".json", "w"))
""")


@pytest.fixture(params=["float32", "float64"])
def dtype(request):
    """Both precisions; in float64 (default dtype and model) rounding cannot hide a difference."""
    if request.param == "float64":
        torch.set_default_dtype(torch.float64)
    yield request.param
    torch.set_default_dtype(torch.float32)


def _shared(dtype):
    model = tiny_models.build("llama")
    model = model.double() if dtype == "float64" else model
    return model, setup(model, toy_set(21), TrainSpec(**PIECE_SPEC))


def test_sequential_trial_in_pieces_and_processes_is_bit_identical(tmp_path, dtype):
    model, s = _shared(dtype)
    p = resolve(STRATEGIES[0], analyze(model), rank=4, alpha=8)
    whole = sequential.run_trial(s, p, seed=3, adapter_dir=tmp_path / "whole")

    trial = sequential.start(s, p, seed=3)
    sequential.advance(s, [trial], 4)
    trial.save(tmp_path / "ckpt")
    trial = Trial.restore(tmp_path / "ckpt", s, p)  # the same process, a fresh object
    sequential.advance(s, [trial], 3)
    trial.save(tmp_path / "ckpt")
    proc = subprocess.run([sys.executable, "-c", CHILD, str(tmp_path / "ckpt"), str(tmp_path / "child"), dtype,
                           str(torch.get_num_threads())],
                          env={**os.environ, "PYTHONPATH": str(REPO / "tests")}, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    trial = Trial.restore(tmp_path / "ckpt", s, p)  # and here too, from the same checkpoint
    sequential.advance(s, [trial], trial.total)  # to the end: a piece never passes the run's last step
    assert trial.step == trial.total == 12
    sequential.evaluate(s, [trial])
    pieces = trial.finish(s, tmp_path / "pieces")
    _same(whole, pieces)
    child = json.loads((tmp_path / "child.json").read_text())
    assert [tuple(x) for x in child["curve"]] == whole.curve and child["eval_loss"] == whole.metrics["eval_loss"]
    ta, tc = _tensors(whole), load_file(tmp_path / "child" / "adapter_model.safetensors")
    assert all(torch.equal(ta[k], tc[k]) for k in ta)
    assert whole.metrics["eval_loss"] < whole.curve[0][1]  # it trained: equal untouched adapters would prove nothing


def test_fused_group_in_pieces_is_bit_identical(tmp_path, dtype):
    model, s = _shared(dtype)
    anat = analyze(model)
    placements, seeds = [resolve(st, anat, rank=4, alpha=8) for st in STRATEGIES], [0, 1, 0]
    whole = fused.run_fused_trials(s, placements, seeds, [tmp_path / f"whole{i}" for i in range(3)])

    trials = [Trial.start(s, p, seed) for p, seed in zip(placements, seeds)]
    fused.advance(s, trials, 5)
    for i, t in enumerate(trials):
        t.save(tmp_path / f"ckpt{i}")
    trials = [Trial.restore(tmp_path / f"ckpt{i}", s, p) for i, p in enumerate(placements)]
    fused.advance(s, trials, 100)
    fused.evaluate(s, trials)
    pieces = [t.finish(s, tmp_path / f"pieces{i}") for i, t in enumerate(trials)]
    for a, b in zip(whole, pieces):
        _same(a, b)
        assert a.metrics["fused_trials"] == b.metrics["fused_trials"] == 3
        assert a.metrics["fused_padding_frac"] == b.metrics["fused_padding_frac"]


def test_restore_refuses_a_checkpoint_of_another_trial(tmp_path):
    model = tiny_models.build("llama")
    s = setup(model, toy_set(21), TrainSpec(**SPEC))
    anat = analyze(model)
    a, b = (resolve(st, anat, rank=4, alpha=8) for st in STRATEGIES[:2])
    trial = sequential.start(s, a, seed=0)
    sequential.advance(s, [trial], 2)
    trial.save(tmp_path / "a")
    with pytest.raises(TrialError, match="another placement or run length"):
        Trial.restore(tmp_path / "a", s, b)
    longer = setup(model, toy_set(21), TrainSpec(**{**SPEC, "steps": 20}))
    with pytest.raises(TrialError, match="another placement or run length"):
        Trial.restore(tmp_path / "a", longer, a)
    with pytest.raises(TrialError, match="cannot be read"):
        Trial.restore(tmp_path / "missing", s, a)
    assert Trial.restore(tmp_path / "a", s, a).step == 2


def test_a_failed_trial_advances_no_further_and_finish_says_why():
    model = tiny_models.build("llama")
    with torch.no_grad():
        model.get_input_embeddings().weight.fill_(float("nan"))
    s = setup(model, toy_set(21), TrainSpec(**SPEC))
    trial = sequential.start(s, resolve(STRATEGIES[0], analyze(model), rank=4, alpha=8), seed=0)
    sequential.advance(s, [trial], 5)
    assert trial.error == "non-finite train loss (nan) at step 1" and trial.step == 0 and trial.done
    sequential.advance(s, [trial], 5)
    assert trial.step == 0
    with pytest.raises(TrialError, match="non-finite train loss"):
        trial.finish(s)
