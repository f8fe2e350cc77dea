"""A tiny Llama and a character-level tokenizer built on the spot, for the TRL examples: nothing is downloaded.

``make_tiny_llama(directory)`` writes a randomly initialised ``LlamaForCausalLM`` and its tokenizer into
``directory`` (so that an adapter trained on it names a local ``base_model_name_or_path``, which
``peft.AutoPeftModelForCausalLM`` reloads); ``make_chat_template_source(directory)`` writes a tokenizer with a ChatML
chat template whose two tokens (``<|im_start|>``, ``<|im_end|>``) the tiny tokenizer lacks, for
``SFTConfig(chat_template_path=...)``. Replace both with ``from_pretrained`` of a real model for real work.
"""

from __future__ import annotations

import string

import torch
from tokenizers import Tokenizer, decoders, models
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

SPECIAL_TOKENS = {"pad_token": "<pad>", "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"}
CHAT_TOKENS = ["<|im_start|>", "<|im_end|>"]
# ChatML, as Qwen's tokenizers carry it: each turn is `<|im_start|>role\ncontent<|im_end|>\n`.
CHATML_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def char_tokenizer() -> PreTrainedTokenizerFast:
    """One token per printable ASCII character plus ``<pad>``, ``<s>``, ``</s>``, ``<unk>`` (100 tokens): a BPE
    model without merges, so a text is split into its characters, and a decoder that joins them back."""
    alphabet = list(SPECIAL_TOKENS.values()) + [c for c in string.printable if c not in "\t\r\x0b\x0c"]
    backend = Tokenizer(models.BPE(vocab={c: i for i, c in enumerate(alphabet)}, merges=[], unk_token="<unk>"))
    backend.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(tokenizer_object=backend, **SPECIAL_TOKENS)


def make_tiny_llama(directory: str, hidden: int = 64, layers: int = 4, seed: int = 0) -> str:
    """Save a random ``LlamaForCausalLM`` (``hidden`` wide, ``layers`` layers, 4 query and 2 key/value heads, MLP
    twice as wide, untied output head) and its :func:`char_tokenizer` into ``directory``; return ``directory``."""
    tokenizer = char_tokenizer()
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256, tie_word_embeddings=False,
        pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
    )  # fmt: skip
    torch.manual_seed(seed)
    LlamaForCausalLM(config).save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


def make_chat_template_source(directory: str) -> str:
    """Save a :func:`char_tokenizer` with :data:`CHAT_TOKENS` added, the ChatML template and ``<|im_end|>`` as end of
    turn into ``directory``; return ``directory``. Passed as ``SFTConfig(chat_template_path=directory)``, TRL copies
    the template and adds the two tokens to the model's tokenizer (``trl.clone_chat_template``)."""
    tokenizer = char_tokenizer()
    tokenizer.add_special_tokens({"additional_special_tokens": CHAT_TOKENS})
    tokenizer.eos_token = "<|im_end|>"
    tokenizer.chat_template = CHATML_TEMPLATE
    tokenizer.save_pretrained(directory)
    return directory
