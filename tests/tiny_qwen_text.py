"""Tiny Qwen tokenizers and text encoders for the 2026 image families' test pipelines (offline).

The tokenizer is a byte-level BPE ``Qwen2Tokenizer`` without merges whose vocabulary is the 256
byte symbols plus Qwen's chat special tokens: every byte is one token, so the chat templates the
pipelines wrap prompts in tokenize the same way on every machine. Qwen3's chat template is a short
Jinja transcription of the real one's behaviour for a single user message (with
``enable_thinking=False`` the assistant turn starts with an empty think block, as Qwen3's does).
"""

from __future__ import annotations

from pathlib import Path

SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<think>", "</think>"]
QWEN3_CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n"
    "{% if enable_thinking is defined and enable_thinking is false %}<think>\n\n</think>\n\n{% endif %}{% endif %}"
)


def qwen_tokenizer(directory: Path, chat_template: str | None = None):
    """A byte-level ``Qwen2Tokenizer`` saved to ``directory`` and loaded back with from_pretrained."""
    from tokenizers.pre_tokenizers import ByteLevel
    from transformers import Qwen2Tokenizer

    vocab = {symbol: i for i, symbol in enumerate(sorted(ByteLevel.alphabet()))}
    tokenizer = Qwen2Tokenizer(vocab=vocab, merges=[], additional_special_tokens=SPECIALS[1:])
    if chat_template:
        tokenizer.chat_template = chat_template
    tokenizer.save_pretrained(directory)
    return Qwen2Tokenizer.from_pretrained(directory)


def tiny_qwen3(vocab_size: int, hidden_size: int = 32, layers: int = 2):
    """A random ``Qwen3ForCausalLM`` (the FLUX.2 [klein] and Z-Image text encoder)."""
    from transformers import Qwen3Config, Qwen3ForCausalLM

    config = Qwen3Config(vocab_size=vocab_size, hidden_size=hidden_size, intermediate_size=37,
                         num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2, head_dim=8,
                         max_position_embeddings=2048, tie_word_embeddings=False)
    return Qwen3ForCausalLM(config)
