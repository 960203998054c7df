"""The base-weights guard every engine and the probe run under: a run that changes the shared base stops the study."""

from __future__ import annotations

import pytest
import tiny_models
import torch

from loraplace.train.guard import BaseWeightsChanged, base_unchanged


def test_guard_passes_an_untouched_base_and_stops_a_changed_one():
    model = tiny_models.build("llama")
    with base_unchanged(model, "a harmless run"):
        model(input_ids=torch.tensor([[1, 5, 7]]))
    with pytest.raises(BaseWeightsChanged, match="base weights changed during trial x: refusing to continue"):
        with base_unchanged(model, "trial x"):
            with torch.no_grad():
                model.get_input_embeddings().weight[3, 0] += 1.0


def test_the_fingerprint_is_the_float64_sum_of_every_weights_magnitude_and_sees_a_small_change():
    from loraplace.train.guard import weights_fingerprint

    model = tiny_models.build("llama")
    expected = sum(p.detach().double().abs().sum().item() for p in model.parameters())
    assert weights_fingerprint(model) == pytest.approx(expected, rel=1e-12)
    with torch.no_grad():
        model.lm_head.weight[0, 0] += 1e-4 * (1 if model.lm_head.weight[0, 0] >= 0 else -1)  # |w| grows by 1e-4
    assert weights_fingerprint(model) == pytest.approx(expected + 1e-4, rel=1e-12)


def test_a_changed_base_wins_over_the_runs_own_error_and_is_never_a_recorded_failure():
    from loraplace.study.executor import RECORDED

    model = tiny_models.build("llama")
    with pytest.raises(BaseWeightsChanged) as e:
        with base_unchanged(model, "trial y"):
            with torch.no_grad():
                model.lm_head.weight.mul_(2)
            raise RuntimeError("the trial failed too")
    assert isinstance(e.value.__context__, RuntimeError)
    assert not isinstance(e.value, RECORDED)  # the executor re-raises it instead of storing a failed trial


@pytest.mark.parametrize("mode", ["nf4", "int8"])
def test_the_guard_sees_a_quantized_bases_scales(tmp_path, mode):
    """bitsandbytes keeps a quantized weight's scales beside it, not in a parameter: the guard checks them too."""
    pytest.importorskip("bitsandbytes", reason="bitsandbytes is not installed (pip install -e '.[quant]')")
    from loraplace.model.loading import load

    model, _ = load(tiny_models.save("llama", tmp_path), quantize=mode)
    with base_unchanged(model, "a harmless run"):
        with torch.no_grad():
            model(input_ids=torch.tensor([[1, 5, 7]]))  # an 8-bit layer moves its scales to its state here
    layer = model.model.layers[0].mlp.down_proj
    scales = layer.weight.quant_state.state2.absmax if mode == "nf4" else layer.state.SCB  # fp32, not parameters
    with pytest.raises(BaseWeightsChanged):
        with base_unchanged(model, "trial z"):
            scales.mul_(2)
