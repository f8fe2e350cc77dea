"""Pruning TAPS gates after training: closed modules lose their coefficients, open ones keep them without a gate."""

from __future__ import annotations

import dataclasses
from typing import Optional

from torch import nn

from .layer import RecastLayer
from .planning import peft_model_layers


def gate_states(model: nn.Module, adapter_name: Optional[str] = None) -> dict[str, bool]:
    """Whether each gated module of ``adapter_name`` (default: the active adapter) is open, by module key."""
    return _open_gates(*peft_model_layers(model, adapter_name))


def _open_gates(name: str, layers: dict[str, RecastLayer]) -> dict[str, bool]:
    return {key: layer.recast_gate[name].is_open(layer.recast_gate_scores[name])
            for key, layer in layers.items() if name in layer.recast_gate_scores}


def prune_gates(model: nn.Module, adapter_name: Optional[str] = None) -> list[str]:
    """After training with ``module_gates``: drop the coefficients of every module whose gate is closed and every
    gate score, so that the adapter computes exactly what it did and saves (and counts) only the open modules.

    The adapter's config is replaced by a copy with ``module_gates=False`` and the closed modules added to
    ``inactive_modules`` (they stay in their template groups, so the open modules keep their templates, and a saved
    adapter loads as it was). Returns the closed modules' keys.

    Args:
        model (`torch.nn.Module`): The PEFT model.
        adapter_name (`str`, *optional*): Defaults to the active adapter.

    Raises:
        ValueError: the adapter has no gates, or every gate is closed (nothing is changed then).

    Example:

        ```py
        >>> import peft_recast
        >>> from peft import get_peft_model
        >>> from transformers import BertConfig, BertModel

        >>> base = BertModel(BertConfig(hidden_size=32, num_hidden_layers=4, num_attention_heads=4, intermediate_size=64))
        >>> model = get_peft_model(base, peft_recast.RecastConfig(module_gates=True, gate_penalty=0.5))
        >>> # ... train; here one gate is closed by hand
        >>> layer = model.base_model.model.encoder.layer[3].attention.self.value
        >>> _ = layer.recast_gate_scores["default"].data.fill_(0.0)
        >>> peft_recast.prune_gates(model)
        ['encoder.layer.3.attention.self.value']
        >>> model.get_nb_trainable_parameters()[0]  # 7 modules x 2 templates x 2 row blocks
        28

        ```
    """
    name, layers = peft_model_layers(model, adapter_name)
    config = model.peft_config[name]
    if not config.module_gates:
        raise ValueError(f"The RECAST adapter '{name}' has no gates to prune: it was made without module_gates=True.")
    states = _open_gates(name, layers)
    closed = sorted(key for key, is_open in states.items() if not is_open)
    if len(closed) == len(layers):
        raise ValueError(f"Every gate of the RECAST adapter '{name}' is closed, so pruning would leave the pretrained "
                         "model; nothing was changed. Train with a smaller gate_penalty or more gate_warmup_steps.")
    new_config = dataclasses.replace(
        config, module_gates=False, inactive_modules=sorted({*(config.inactive_modules or []), *closed}) or None,
        channels={key: rows for key, rows in (config.channels or {}).items() if key not in closed} or None,
    )
    for key, layer in layers.items():
        layer.drop_gate(name, keep_coefficients=key not in closed)
    model.peft_config[name] = new_config
    return closed
