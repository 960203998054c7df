"""The trial lifecycle: a trial advanced in pieces, checkpointed and restored (here or in a new process), computes
exactly what it computes in one go, on both engines, in float64 and fp32."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from dataclasses import replace

import pytest
import tiny_models
import torch
from safetensors.torch import load_file
from toys import REPO, SPEC, outcomes, run, setup, tasks, toy_set, toy_workspace

from loraplace.core.config import TrainSpec
from loraplace.model.anatomy import analyze
from loraplace.placement.resolve import resolve
from loraplace.placement.strategy import Strategy
from loraplace.placement.variants import VARIANTS, Variant
from loraplace.train import checkpoint, segments, sequential
from loraplace.train.trial import TrialError

STRATEGIES = [Strategy("all_linear", "all"), Strategy("attention_only", "attn"), Strategy("block1", "all", "1")]
# LoRA dropout on: the pieces must also carry each trial's RNG stream across the checkpoint
PIECE_SPEC = {**SPEC, "dropout": 0.1}
RACE = {"at": [4 / 12, 7 / 12]}  # racing rungs at steps 4 and 7 of 12: a study pauses (checkpoints) a trial there


def _tensors(result) -> dict[str, torch.Tensor]:
    return load_file(result.adapter_dir / "adapter_model.safetensors")


def _same(a, b) -> None:
    """Bit-identical: every logged loss, the eval loss, every adapter tensor, every rung evaluation both made."""
    assert a.curve == b.curve and len(a.curve) == 12
    assert a.metrics["eval_loss"] == b.metrics["eval_loss"]
    ta, tb = _tensors(a), _tensors(b)
    assert ta.keys() == tb.keys() and ta
    assert all(torch.equal(ta[k], tb[k]) for k in ta)
    rungs, other = dict(a.evals), dict(b.evals)
    assert rungs.keys() & other.keys() == {3, 6}  # the rungs every study records
    assert all(rungs[s]["eval_loss"] == other[s]["eval_loss"] for s in (3, 6))


# A new process takes the study's next piece of work from the checkpoint: the model and data are rebuilt there.
CHILD = textwrap.dedent("""
    import json, sys
    import torch
    import tiny_models
    from toys import SPEC, outcomes, tasks, toy_set, toy_workspace
    from loraplace.core.config import TrainSpec
    from loraplace.model.anatomy import analyze
    from loraplace.placement.resolve import resolve
    from loraplace.placement.strategy import Strategy

    ckpt, out, dtype, threads, race = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4]), json.loads(sys.argv[5])
    torch.set_num_threads(threads)  # bit for bit needs the same thread count (reductions split by thread)
    if dtype == "float64":
        torch.set_default_dtype(torch.float64)
    model = tiny_models.build("llama")
    model = model.double() if dtype == "float64" else model
    ws = toy_workspace(model, toy_set(21), TrainSpec(**{**SPEC, "dropout": 0.1}), race=race)
    p = resolve(Strategy("all_linear", "all"), analyze(model), rank=4, alpha=8)
    [result] = outcomes(ws, tasks(ws, [p], [3], [out], [ckpt]))  # from the checkpoint at step 7 to the end
    json.dump({"curve": result.curve, "eval_loss": result.metrics["eval_loss"], "rungs": [s for s, _ in result.evals]},
              open(out + ".json", "w"))
""")


@pytest.fixture(params=["float32", "float64"])
def dtype(request):
    """Both precisions; in float64 (default dtype and model) rounding cannot hide a difference."""
    if request.param == "float64":
        torch.set_default_dtype(torch.float64)
    yield request.param
    torch.set_default_dtype(torch.float32)


def _model(dtype):
    model = tiny_models.build("llama")
    return model.double() if dtype == "float64" else model


@pytest.mark.slow
def test_sequential_trial_in_pieces_and_processes_is_bit_identical(tmp_path, dtype):
    """The executor's pieces of a raced trial (paused and checkpointed at each racing rung, restored as a new object
    or in a new process) compute what the whole trial computes."""
    model, ts, spec = _model(dtype), toy_set(21), TrainSpec(**PIECE_SPEC)
    p = resolve(STRATEGIES[0], analyze(model), rank=4, alpha=8)
    [whole] = run(toy_workspace(model, ts, spec), [p], [3], [tmp_path / "whole"])

    ws = toy_workspace(model, ts, spec, race=RACE)
    todo = tasks(ws, [p], [3], [tmp_path / "pieces"], [tmp_path / "ckpt"])
    assert [o.step for o in outcomes(ws, todo)] == [4]  # paused at the first racing rung, checkpointed
    assert [o.step for o in outcomes(ws, todo)] == [7]  # restored from it (a fresh trial), paused at the next
    proc = subprocess.run([sys.executable, "-c", CHILD, str(tmp_path / "ckpt"), str(tmp_path / "child"), dtype,
                           str(torch.get_num_threads()), json.dumps(RACE)],
                          env={**os.environ, "PYTHONPATH": str(REPO / "tests")}, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    [pieces] = outcomes(ws, todo)  # and here too, from the same checkpoint, to the end
    _same(whole, pieces)
    assert [s for s, _ in pieces.evals] == [3, 4, 6, 7]  # every rung of the raced study, none twice
    child = json.loads((tmp_path / "child.json").read_text())
    assert [tuple(x) for x in child["curve"]] == whole.curve and child["eval_loss"] == whole.metrics["eval_loss"]
    assert child["rungs"] == [3, 4, 6, 7]
    ta, tc = _tensors(whole), load_file(tmp_path / "child" / "adapter_model.safetensors")
    assert ta.keys() == tc.keys() and all(torch.equal(ta[k], tc[k]) for k in ta)
    assert whole.metrics["eval_loss"] < whole.curve[0][1]  # it trained: equal untouched adapters would prove nothing


@pytest.mark.slow
def test_fused_group_in_pieces_is_bit_identical(tmp_path, dtype):
    model, ts, spec = _model(dtype), toy_set(21), TrainSpec(**PIECE_SPEC)
    anat = analyze(model)
    placements, seeds = [resolve(st, anat, rank=4, alpha=8) for st in STRATEGIES], [0, 1, 0]
    whole = run(toy_workspace(model, ts, spec), placements, seeds, [tmp_path / f"whole{i}" for i in range(3)], fuse=True)

    ws = toy_workspace(model, ts, spec, race={"at": [5 / 12]})
    todo = tasks(ws, placements, seeds, [tmp_path / f"pieces{i}" for i in range(3)], [tmp_path / f"ckpt{i}" for i in range(3)])
    assert [o.step for o in outcomes(ws, todo, fuse=True)] == [5, 5, 5]  # the group paused at the racing rung
    pieces = outcomes(ws, todo, fuse=True)  # restored from the three checkpoints, fused again, to the end
    assert len(whole) == len(pieces) == 3
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
    checkpoint.save(trial, tmp_path / "a")
    with pytest.raises(TrialError, match="another placement or run length"):
        checkpoint.restore(tmp_path / "a", s, b)
    longer = setup(model, toy_set(21), TrainSpec(**{**SPEC, "steps": 20}))
    with pytest.raises(TrialError, match="another placement or run length"):
        checkpoint.restore(tmp_path / "a", longer, a)
    with pytest.raises(TrialError, match="cannot be read"):
        checkpoint.restore(tmp_path / "missing", s, a)
    assert checkpoint.restore(tmp_path / "a", s, a).step == 2


def test_a_snapshot_is_read_back_to_evaluate_never_to_train(tmp_path):
    """tune.reuse's snapshots: saved without AdamW's state, read back as a trial of its own (the training's tensors,
    curve and records, none of the saving trial's evaluations), moved to a later snapshot in place; never trained."""
    model = tiny_models.build("llama")
    s = setup(model, toy_set(21), TrainSpec(**SPEC))
    a = resolve(STRATEGIES[0], analyze(model), rank=4, alpha=8)
    trial = sequential.start(s, a, seed=0)
    sequential.advance(s, [trial], 2)
    trial.evals = [(2, {"eval_loss": 9.0})]  # e.g. a tuning trial's selection loss: not the reader's
    checkpoint.save(trial, tmp_path / "s2", optimizer=False)
    sequential.advance(s, [trial], 3)
    checkpoint.save(trial, tmp_path / "s5", optimizer=False)
    read = checkpoint.replayed(tmp_path / "s2", s, a)
    assert read.step == 2 and read.evals == [] and read.eval is None and read.curve == trial.curve[:2]
    with pytest.raises(TrialError, match="cannot be trained on"):
        segments.run_to(s, [read], 5)
    before = {n: p for n, p in read.params.items()}
    checkpoint.replay(read, tmp_path / "s5", s)
    assert read.step == 5 and read.curve == trial.curve and read.train_time == trial.train_time
    assert all(read.params[n] is before[n] and torch.equal(read.params[n], trial.params[n]) for n in trial.params)
    assert not all(torch.equal(before[n], p) for n, p in checkpoint.replayed(tmp_path / "s2", s, a).params.items())
    with pytest.raises(TrialError, match="a replay of a trial that trains"):
        checkpoint.replay(trial, tmp_path / "s5", s)


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


class Counting(Variant):
    """A variant defined in one place (this test's): it trains plain LoRA and counts the optimizer steps it sees,
    in its own per-trial state, checkpointed by itself; ``fail_at``: the count at which it fails the trial."""

    name, label = "counting", "Counting"

    def __init__(self, fail_at: int | None = None):
        self.fail_at = fail_at

    def start(self, trial, init_time):
        return {"steps": 0}

    def after_step(self, trial, setup):
        trial.variant_state["steps"] += 1
        return f"counted {self.fail_at} steps" if trial.variant_state["steps"] == self.fail_at else None

    def state_dict(self, state):
        return {"counting": state["steps"]}

    def load_state(self, saved, device):
        if "counting" not in saved:
            raise LookupError("its step count")
        return {"steps": saved["counting"]}

    def method_time(self, state):
        return float(state["steps"])  # reported as the variant's own time: here its count, to see it travel


@pytest.mark.slow
@pytest.mark.parametrize("fuse", [False, True])
def test_the_lifecycle_asks_the_variant(tmp_path, monkeypatch, fuse):
    """A new variant is one class in the registry: both engines, the checkpoint at a racing rung and the metrics
    ask it (its hook ran once per step, its state survived the checkpoint), and what it returns as a failure
    fails the trial as the study records it. It trains plain LoRA here, so the numbers are plain LoRA's."""
    monkeypatch.setitem(VARIANTS, "counting", Counting())
    model, ts, spec = _model("float32"), toy_set(21), TrainSpec(**SPEC)
    anat = analyze(model)
    plain = [resolve(st, anat, rank=4, alpha=8) for st in STRATEGIES[:2]]
    counted = [resolve(replace(st, variant="counting"), anat, rank=4, alpha=8) for st in STRATEGIES[:2]]
    ref = run(toy_workspace(model, ts, spec), plain, [0, 1], fuse=fuse)
    ws = toy_workspace(model, ts, spec, race={"at": [0.5]})
    todo = tasks(ws, counted, [0, 1], checkpoint_dirs=[tmp_path / "c0", tmp_path / "c1"])
    assert [o.step for o in outcomes(ws, todo, fuse)] == [6, 6]  # paused at the racing rung, checkpointed
    got = outcomes(ws, todo, fuse)  # restored: the variant's state comes back from the checkpoint
    assert len(got) == len(ref) == 2
    for r, g in zip(ref, got):
        assert g.metrics["method_time_s"] == 12.0 and "method_time_s" not in r.metrics
        assert g.curve == r.curve and len(g.curve) == 12 and g.metrics["eval_loss"] == r.metrics["eval_loss"]
        assert g.placement.variant == "counting" and r.placement.variant == "lora"

    monkeypatch.setitem(VARIANTS, "counting", Counting(fail_at=3))
    assert run(toy_workspace(model, ts, spec), counted, [0, 1], fuse=fuse) == ["TrialError: counted 3 steps"] * 2

    monkeypatch.setattr(Counting, "state_dict", lambda self, state: {})  # a checkpoint without the variant's state
    trial = sequential.start(ws.setup, counted[0], seed=0)
    checkpoint.save(trial, tmp_path / "bare")
    with pytest.raises(TrialError, match="of a Counting trial lacks its step count"):
        checkpoint.restore(tmp_path / "bare", ws.setup, counted[0])
