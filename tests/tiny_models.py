"""Tiny random-init causal LMs of many architectures, built from configs (no downloads), for tests.

Usage: ``from tiny_models import build, ARCH_NAMES, EXPECTED_ROLES; model = build("llama")``
"""
from __future__ import annotations

import torch
import transformers as T

VOCAB = 128
# Special ids inside the tiny vocabulary (the configs' defaults, e.g. 50256, would be out of range).
_IDS = dict(vocab_size=VOCAB, bos_token_id=1, eos_token_id=2, pad_token_id=0)
_GATED = ("attn.q", "attn.k", "attn.v", "attn.o", "mlp.gate", "mlp.up", "mlp.down")
_SPLIT_QKV = ("attn.q", "attn.k", "attn.v", "attn.o", "mlp.up", "mlp.down")
_FUSED_QKV = ("attn.qkv", "attn.o", "mlp.up", "mlp.down")


def _llama_like(cls, **kw):
    # hidden 48, 6 heads of 8 over 2 KV heads (3:1 GQA, like SmolLM2), MLP 128: k/v are 16 wide, q 48.
    args = dict(hidden_size=48, intermediate_size=128, num_hidden_layers=2, num_attention_heads=6,
                num_key_value_heads=2, max_position_embeddings=64, **_IDS)
    return lambda: cls(**{**args, **kw})


# name -> (config factory, roles every block must show)
_SPECS = {
    "llama": (_llama_like(T.LlamaConfig, tie_word_embeddings=True), _GATED),
    "mistral": (_llama_like(T.MistralConfig, sliding_window=None), _GATED),
    "qwen2": (_llama_like(T.Qwen2Config), _GATED),  # q/k/v carry biases
    # MQA (1 KV head), head_dim 16 != hidden/heads, scaled embedding, tied head.
    "gemma": (_llama_like(T.GemmaConfig, hidden_size=64, num_attention_heads=4, num_key_value_heads=1,
                          head_dim=16), _GATED),
    # Fused qkv_proj (64 + 2*32 = 128 = 2 x q width: also shape-valid as a fused gate_up) and gate_up_proj.
    "phi3": (_llama_like(T.Phi3Config, hidden_size=64, num_attention_heads=4, num_key_value_heads=2,
                         intermediate_size=96),
             ("attn.qkv", "attn.o", "mlp.gate_up", "mlp.down")),
    "gpt2": (lambda: T.GPT2Config(n_embd=48, n_layer=2, n_head=4, n_positions=64, **_IDS), _FUSED_QKV),  # Conv1D
    "gpt_neox": (lambda: T.GPTNeoXConfig(hidden_size=48, intermediate_size=96, num_hidden_layers=2,
                                         num_attention_heads=4, max_position_embeddings=64, **_IDS), _FUSED_QKV),
    # fc1/fc2 sit directly in the decoder layer, not in an MLP submodule.
    "opt": (lambda: T.OPTConfig(hidden_size=48, ffn_dim=96, num_hidden_layers=2, num_attention_heads=4,
                                word_embed_proj_dim=48, max_position_embeddings=64, **_IDS), _SPLIT_QKV),
    "phi": (lambda: T.PhiConfig(hidden_size=48, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                                max_position_embeddings=64, **_IDS), _SPLIT_QKV),
    # multi_query: one KV head, qkv out = 48 + 2*12 = 72 (config.num_kv_heads says 4; the layer ignores it).
    "falcon": (lambda: T.FalconConfig(hidden_size=48, num_hidden_layers=2, num_attention_heads=4, **_IDS),
               _FUSED_QKV),
    "bloom": (lambda: T.BloomConfig(hidden_size=48, n_layer=2, n_head=4, **_IDS), _FUSED_QKV),
    # q/k/v/out_proj are all 48x48 and registered k, v, q, out.
    "gptj": (lambda: T.GPTJConfig(n_embd=48, n_layer=2, n_head=4, rotary_dim=8, n_positions=64, **_IDS),
             _SPLIT_QKV),
    "qwen3": (_llama_like(T.Qwen3Config, head_dim=8), _GATED),  # q/k norms inside attention
    "gemma2": (_llama_like(T.Gemma2Config, hidden_size=64, num_attention_heads=4, num_key_value_heads=2,
                           head_dim=16), _GATED),  # extra pre/post feed-forward norms
    # multi-query Conv1D-free GPT-2: c_attn out = 48 + 2*12 = 72.
    "gpt_bigcode": (lambda: T.GPTBigCodeConfig(n_embd=48, n_layer=2, n_head=4, n_positions=64, **_IDS), _FUSED_QKV),
    "starcoder2": (_llama_like(T.Starcoder2Config), _SPLIT_QKV),  # c_fc / c_proj MLP, no gate
    "stablelm": (_llama_like(T.StableLmConfig), _GATED),
    "olmo": (_llama_like(T.OlmoConfig, num_key_value_heads=6), _GATED),
    # parallel attention + MLP from one layer norm; qkv_proj fused (3 x 48), MLP fc_in / fc_out.
    "codegen": (lambda: T.CodeGenConfig(n_embd=48, n_layer=2, n_head=4, rotary_dim=8, n_positions=64, n_ctx=64,
                                        **_IDS), _FUSED_QKV),
}

# Mixture-of-experts: attention is nn.Linear; the routed experts are one module of fused 3-D parameters.
_MOE = dict(num_hidden_layers=2, hidden_size=48, num_attention_heads=6, num_key_value_heads=2,
            max_position_embeddings=64, num_experts_per_tok=2, **_IDS)
MOE_SPECS = {
    "mixtral": lambda: T.MixtralConfig(intermediate_size=64, num_local_experts=4, **_MOE),
    "qwen2_moe": lambda: T.Qwen2MoeConfig(intermediate_size=64, moe_intermediate_size=32, num_experts=4,
                                          shared_expert_intermediate_size=64, **_MOE),
    "qwen3_moe": lambda: T.Qwen3MoeConfig(intermediate_size=64, moe_intermediate_size=32, num_experts=4,
                                          head_dim=8, **_MOE),
}
MOE_NAMES: list[str] = list(MOE_SPECS)

# A Llama 3 70B config.json (no weights): what inspect and plan read for a model that size.
LLAMA_70B = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 8192,
             "intermediate_size": 28672, "num_hidden_layers": 80, "num_attention_heads": 64,
             "num_key_value_heads": 8, "vocab_size": 128256, "max_position_embeddings": 8192,
             "rms_norm_eps": 1e-5, "tie_word_embeddings": False, "hidden_act": "silu"}

ARCH_NAMES: list[str] = list(_SPECS)
EXPECTED_ROLES: dict[str, tuple[str, ...]] = {k: v[1] for k, v in _SPECS.items()}


def config(arch: str) -> T.PretrainedConfig:
    return _SPECS[arch][0]() if arch in _SPECS else MOE_SPECS[arch]()


def build(arch: str, seed: int = 0) -> torch.nn.Module:
    """A fresh fp32 random-init model of `arch` (same weights for the same seed)."""
    torch.manual_seed(seed)
    return T.AutoModelForCausalLM.from_config(config(arch), dtype=torch.float32)


ARCHS = {name: (lambda name=name: build(name)) for name in ARCH_NAMES}


def tokenizer():
    """A character-level tokenizer whose ids fit the tiny vocabulary: pad 0, bos 1, eos 2, unk 3,
    then printable ASCII. Any text tokenizes (unknown characters become <unk>)."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers

    chars = [chr(c) for c in range(32, 127)]
    vocab = {"<pad>": 0, "<bos>": 1, "<eos>": 2, "<unk>": 3, **{c: i + 4 for i, c in enumerate(chars)}}
    assert len(vocab) <= VOCAB
    tk = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    tk.decoder = decoders.Fuse()
    return T.PreTrainedTokenizerFast(tokenizer_object=tk, pad_token="<pad>", bos_token="<bos>", eos_token="<eos>",
                                     unk_token="<unk>")


# ChatML as SmolLM2 and Qwen2 write it, default system prompt included (it appears whenever the
# conversation does not start with its own system turn).
CHATML = ("{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
          "{{ '<|im_start|>system\nYou are tiny.<|im_end|>\n' }}{% endif %}"
          "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}{% endfor %}"
          "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")


def chat_tokenizer():
    """The character tokenizer plus newline and the ChatML specials, with the CHATML template and
    <|im_end|> as EOS (as SmolLM2-Instruct has): pad 0, bos 1, unk 3, ASCII 4-98, newline 99,
    <|im_start|> 100, <|im_end|> 101. Decoding gives the text back exactly."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers

    chars = [chr(c) for c in range(32, 127)] + ["\n"]
    specials = ["<|im_start|>", "<|im_end|>"]
    vocab = {"<pad>": 0, "<bos>": 1, "<eos>": 2, "<unk>": 3, **{c: i + 4 for i, c in enumerate(chars + specials)}}
    assert len(vocab) <= VOCAB
    tk = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Split(Regex("[\\s\\S]"), behavior="isolated")  # one piece per character
    tk.decoder = decoders.Fuse()
    tk.add_special_tokens(specials)
    tok = T.PreTrainedTokenizerFast(tokenizer_object=tk, pad_token="<pad>", bos_token="<bos>", eos_token="<|im_end|>",
                                    unk_token="<unk>")
    tok.chat_template = CHATML
    return tok


def save(arch: str, path) -> str:
    """Save a tiny model and the character tokenizer as a local Hugging Face model directory."""
    build(arch).save_pretrained(path)
    tokenizer().save_pretrained(path)
    return str(path)


def save_config(arch: str, path) -> str:
    """Write only config.json (no weights, no tokenizer): what `inspect` and `plan` need."""
    config(arch).save_pretrained(path)
    return str(path)
