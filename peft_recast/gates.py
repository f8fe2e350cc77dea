"""TAPS gates (Wallingford et al., arXiv 2203.16708): a learned on/off switch per module, and pruning the closed ones.

A module with gate score ``g`` (a 1-element tensor) uses

    delta_W = 1[g >= t] * delta_W(theta)          (t = RecastConfig.gate_threshold)

with a straight-through gradient (``d gate / d g = 1``, so a closed gate still learns whether to reopen), and the
sparsity penalty ``lambda * sum_l |g_l| / M`` of the TAPS loss enters as its gradient, ``lambda sign(g) / M``, added in
backward (:class:`_PenaltyGradient`).
"""

from __future__ import annotations

import dataclasses
from typing import Optional

import torch
from torch import nn


class _PenaltyGradient(torch.autograd.Function):
    """Identity in forward; backward adds ``weight * sign(score)``, the gradient of ``weight * |score|``."""

    @staticmethod
    def forward(ctx, score: torch.Tensor, weight: float) -> torch.Tensor:
        ctx.save_for_backward(score)
        ctx.weight = weight
        return score.view_as(score)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (score,) = ctx.saved_tensors
        return grad + ctx.weight * torch.sign(score), None


def gate_value(score: torch.Tensor, threshold: float, penalty: float = 0.0) -> torch.Tensor:
    """``1[score >= threshold]`` (exactly 0 or 1 in forward) with the straight-through gradient, plus ``penalty *
    sign(score)`` in backward when ``penalty`` is not 0. Shapes: ``score`` ``(1,)`` -> ``(1,)``."""
    hard = (score >= threshold).to(score.dtype)
    if not (torch.is_grad_enabled() and score.requires_grad):
        return hard.detach()
    if penalty:
        score = _PenaltyGradient.apply(score, penalty)
    return hard + (score - score.detach())


def gate_states(model: nn.Module, adapter_name: Optional[str] = None) -> dict[str, bool]:
    """Whether each gated module of ``adapter_name`` (default: the active adapter) is open, by module key."""
    name, layers = _gated_layers(model, adapter_name)
    states = {}
    for key, layer in layers.items():
        if name in layer.recast_gate_scores:
            threshold = layer.recast_gate[name][0]
            states[key] = bool(layer.recast_gate_scores[name].detach().item() >= threshold)
    return states


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
    name, layers = _gated_layers(model, adapter_name)
    config = model.peft_config[name]
    if not config.module_gates:
        raise ValueError(f"The RECAST adapter '{name}' has no gates to prune: it was made without module_gates=True.")
    states = gate_states(model, name)
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


def _gated_layers(model: nn.Module, adapter_name: Optional[str]) -> tuple[str, dict]:
    """The adapter's name and its RECAST layers by key (imported here: :mod:`peft_recast.layer` imports this module)."""
    from .grouping import adapter_layers

    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    name = adapter_name or model.active_adapter
    if name not in model.peft_config:
        raise ValueError(f"Adapter {name!r} does not exist; this model has {sorted(model.peft_config)}.")
    return name, adapter_layers(base, name)
