"""Tiny in-process models and a local tokenizer, for fast exact tests.

No hub access: the tokenizer is a byte-level BPE with no merges (every byte
is a token) plus ChatML-style special tokens and a chat template, and the
models are built from transformers configs with random weights.
"""

from __future__ import annotations

import torch

CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]

# Architectures covered by the fast tests: dense and MoE, Linear and fused 3-D experts.
ARCHITECTURES = [
    "llama",
    "qwen2",
    "qwen3",
    "mistral",
    "gemma2",
    "gemma3_text",
    "phi3",
    "qwen2_moe",
    "qwen3_moe",
    "mixtral",
    "gpt_oss",
]
MOE_ARCHITECTURES = {"qwen2_moe", "qwen3_moe", "mixtral", "gpt_oss"}
# The real models of these architectures attend through sliding windows (Mistral and Phi-3 on every
# layer, Gemma 2 and GPT-OSS on every other one, Gemma 3 on five of six). The tiny ones keep that,
# shrunk to a few tokens so that every test prompt is longer than the window.
SLIDING_ARCHITECTURES = {"mistral", "phi3", "gemma2", "gemma3_text", "gpt_oss"}
TINY_SLIDING_WINDOW = 6


def make_tokenizer(chat_template: bool = True):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    alphabet = list(bytes_to_unicode().values())
    vocab = {ch: i for i, ch in enumerate(SPECIALS + alphabet)}
    core = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    tok = PreTrainedTokenizerFast(
        tokenizer_object=core,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        bos_token="<|im_start|>",
        additional_special_tokens=[],
    )
    tok.add_special_tokens({"additional_special_tokens": SPECIALS})
    if chat_template:
        tok.chat_template = CHAT_TEMPLATE
    return tok


def make_model(
    arch: str,
    tokenizer=None,
    layers: int = 4,
    hidden: int = 64,
    seed: int = 0,
    sliding_window: int = TINY_SLIDING_WINDOW,
):
    from transformers import AutoConfig, AutoModelForCausalLM

    tokenizer = tokenizer or make_tokenizer()
    vocab = len(tokenizer)
    kwargs = dict(
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=hidden // 4,
        vocab_size=vocab,
        max_position_embeddings=512,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=tokenizer.bos_token_id,
        tie_word_embeddings=False,
    )
    config = AutoConfig.for_model(arch, **kwargs)
    for key, value in (
        ("moe_intermediate_size", hidden),
        ("shared_expert_intermediate_size", hidden),
        ("num_experts", 4),
        ("num_local_experts", 4),
        ("num_experts_per_tok", 2),
        ("decoder_sparse_step", 1),
    ):
        if hasattr(config, key):
            setattr(config, key, value)
    if arch in SLIDING_ARCHITECTURES:
        config.sliding_window = sliding_window
    if arch == "gemma3_text":
        # Gemma 3's pattern is five sliding layers, then a full one; keep at least one full layer.
        config.layer_types = ["sliding_attention"] * (layers - 1) + ["full_attention"]
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    # Random init of the size of real models makes logits tiny; scale up so greedy text varies.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() >= 2:
                p.normal_(0, 0.2)
            elif name.endswith("bias"):  # trained biases are not zero (gpt-oss, Qwen2 attention)
                p.normal_(0, 0.2)
    return model.eval()


def make_lm(arch: str = "llama", **kw):
    from abliterate.core.loading import ModelSpec, from_model

    tok = make_tokenizer()
    return from_model(make_model(arch, tok, **kw), tok, ModelSpec(source=f"<tiny {arch}>"))
