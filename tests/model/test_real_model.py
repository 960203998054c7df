"""The real embedded SmolLM2-135M-Instruct: loading, anatomy, placement and a short trial (slow)."""

from __future__ import annotations

import pytest
import torch

from loraplace.core.config import StudyConfig
from loraplace.model.anatomy import analyze
from loraplace.model.loading import ModelError, load
from loraplace.placement.resolve import resolve
from loraplace.placement.strategy import get_strategy
from loraplace.study.executor import run_one
from loraplace.study.plan import plan_trials, resolve_placements, segment
from loraplace.study.workspace import Workspace
from loraplace.train.loss import evaluate

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def smol():
    try:
        return load("smollm2-135m")
    except ModelError as e:  # the package is installed by the README's set-up command
        pytest.skip(f"embedded model not available: {e}")


def test_embedded_model_is_plain_trainable_llama(smol):
    model, tok = smol
    assert type(model).__name__ == "LlamaForCausalLM"
    assert getattr(model, "hf_quantizer", None) is None and getattr(model.config, "quantization_config", None) is None
    assert all(p.dtype == torch.float32 for p in model.parameters())
    assert tok.eos_token == "<|im_end|>" and tok.pad_token_id == tok.eos_token_id == 2
    anat = analyze(model)
    unique = {id(p): p.numel() for p in model.parameters()}  # tied embeddings are one tensor
    assert (anat.n_blocks, anat.base_params) == (model.config.num_hidden_layers, sum(unique.values()))
    assert anat.roles_present() == ("attn.q", "attn.k", "attn.v", "attn.o", "mlp.gate", "mlp.up", "mlp.down")
    k = anat.layer("model.layers.0.self_attn.k_proj")
    assert (k.role, k.in_features, k.out_features) == ("attn.k", 576, 192)  # 3 KV heads of 64


def test_greedy_answer_is_sane(smol):
    model, tok = smol
    ids = tok.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                  add_generation_prompt=True, return_tensors="pt", return_dict=True)
    with torch.no_grad():
        out = model.generate(**ids, max_new_tokens=12, do_sample=False, pad_token_id=tok.pad_token_id)
    assert "Paris" in tok.decode(out[0, ids["input_ids"].shape[1]:])


def test_placements_on_the_real_model(smol):
    anat = analyze(smol[0])
    counts = {s: resolve(get_strategy(s), anat, rank=16) for s in ("all_linear", "attention_only", "mlp_only", "qv_only")}
    n = anat.n_blocks
    assert {s: len(p.modules) for s, p in counts.items()} == {"all_linear": 7 * n, "attention_only": 4 * n,
                                                              "mlp_only": 3 * n, "qv_only": 2 * n}
    # r * (in + out) per module, summed over the blocks, from the model's own Linear layers
    per_block = sum(m.in_features + m.out_features for m in smol[0].model.layers[0].modules()
                    if isinstance(m, torch.nn.Linear))
    assert counts["all_linear"].trainable_params == 16 * n * per_block


def test_short_trial_improves_on_builtin_data_and_keeps_base(smol, tmp_path):
    model, tok = smol
    cfg = StudyConfig.from_dict({"out": str(tmp_path / "study"), "strategies": ["all_linear"], "seeds": [0],
                                 "data": {"eval_size": 32, "limit": 200},
                                 "train": {"steps": 8, "lr": 1e-3, "batch_size": 8, "rank": 8, "alpha": 16,
                                           "save_adapter": False},
                                 "eval": {"forgetting": False}})
    ws = Workspace.build(cfg, (model, tok))  # the trial as a study runs it (study.executor)
    eval_set = ws.eval_set
    zero = evaluate(model, eval_set, 16, tok.pad_token_id)["eval_loss"]
    [task] = plan_trials(cfg, resolve_placements(cfg, ws.anatomy))
    before = model.model.layers[3].mlp.down_proj.weight.clone()
    outcome = run_one(ws, segment(task, 0, ws.setup.total_steps, cfg.race))
    assert outcome.error is None, outcome.error
    result = outcome.result
    assert result.metrics["eval_loss"] < zero - 0.5, (zero, result.metrics["eval_loss"])
    assert torch.equal(model.model.layers[3].mlp.down_proj.weight, before)
    assert evaluate(model, eval_set, 16, tok.pad_token_id)["eval_loss"] == pytest.approx(zero)
