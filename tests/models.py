"""Tiny transformers models built from configs (no downloads), shared by the tests."""

from __future__ import annotations

import torch
from transformers import (
    BertConfig,
    BertForSequenceClassification,
    BertModel,
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
)


def tiny_bert(seed: int = 0, layers: int = 4, hidden: int = 32) -> BertModel:
    torch.manual_seed(seed)
    config = BertConfig(
        vocab_size=100,
        hidden_size=hidden,
        num_hidden_layers=layers,
        num_attention_heads=4,
        intermediate_size=2 * hidden,
        max_position_embeddings=64,
    )
    return BertModel(config).eval()


def tiny_bert_classifier(seed: int = 0, num_labels: int = 2, dropout: float = 0.1) -> BertForSequenceClassification:
    """A 4-layer, 32-wide BERT with a sequence-classification head (in train mode: ``Trainer`` sets the mode)."""
    torch.manual_seed(seed)
    config = BertConfig(
        vocab_size=100,
        hidden_size=32,
        num_hidden_layers=4,
        num_attention_heads=4,
        intermediate_size=64,
        max_position_embeddings=64,
        num_labels=num_labels,
        hidden_dropout_prob=dropout,
        attention_probs_dropout_prob=dropout,
    )
    return BertForSequenceClassification(config)


def tiny_gpt2(seed: int = 0, layers: int = 4) -> GPT2LMHeadModel:
    torch.manual_seed(seed)
    config = GPT2Config(vocab_size=100, n_embd=32, n_layer=layers, n_head=4, n_positions=64)
    return GPT2LMHeadModel(config).eval()


def tiny_llama(seed: int = 0, layers: int = 4) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=100,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
    )
    return LlamaForCausalLM(config).eval()


MODEL_BUILDERS = {"bert": tiny_bert, "gpt2": tiny_gpt2, "llama": tiny_llama}


def model_output(model: torch.nn.Module, input_ids: torch.Tensor, **kwargs) -> torch.Tensor:
    """The tensor a test compares: hidden states for encoders, logits for decoders."""
    out = model(input_ids=input_ids, **kwargs)
    return out.logits if hasattr(out, "logits") and out.logits is not None else out.last_hidden_state
