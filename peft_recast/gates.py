"""TAPS gates (Wallingford et al., arXiv 2203.16708): a learned on/off switch per module, and pruning the closed ones.

A module with gate score ``g`` (a 1-element tensor) uses

    delta_W = 1[g >= t] * delta_W(theta)          (t = RecastConfig.gate_threshold)

with a straight-through gradient (``d gate / d g = 1``, so a closed gate still learns whether to reopen), and the
sparsity penalty ``lambda * sum_l |g_l| / M`` of the TAPS loss enters as its gradient, ``lambda sign(g) / M``, added in
backward (:class:`_PenaltyGradient`).
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, Optional

import torch
from torch import nn

if TYPE_CHECKING:
    from .config import RecastConfig


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


class GatedLayer:
    """The gate part of :class:`~peft_recast.layer.RecastLayer`: ``recast_gate_scores`` (a ``(1,)`` parameter per gated
    adapter) and ``recast_gate`` (per adapter: threshold, penalty share, warm-up forwards, training forwards seen).
    ``drop_coefficients`` is the layer's own."""

    recast_gate_scores: nn.ParameterDict
    recast_gate: dict[str, list]
    recast_coefficients: nn.ParameterDict

    def _set_gate(self, adapter_name: str, config: RecastConfig, trainable: bool) -> None:
        """A gate score at ``config.gate_init`` (``module_gates``); :func:`finish_gates` sets the penalty's share."""
        if not config.module_gates:
            return
        like = self.recast_coefficients[adapter_name]
        score = torch.full((1,), float(config.gate_init), dtype=like.dtype, device=like.device)
        self.recast_gate_scores[adapter_name] = nn.Parameter(score, requires_grad=trainable and like.requires_grad)
        self.recast_gate[adapter_name] = [float(config.gate_threshold), 0.0, int(config.gate_warmup_steps), 0]

    def drop_gate(self, adapter_name: str, keep_coefficients: bool) -> None:
        """Remove the gate (:func:`prune_gates`): an open module keeps its coefficients (its gate was 1), a closed one
        loses them and computes the pretrained layer for this adapter."""
        del self.recast_gate_scores[adapter_name]
        del self.recast_gate[adapter_name]
        if not keep_coefficients:
            self.drop_coefficients(adapter_name)

    def _gate(self, adapter: str) -> torch.Tensor:
        """The adapter's gate, 0 or 1 (:func:`gate_value`); training forwards are counted and the penalty's gradient
        joins after ``gate_warmup_steps`` of them."""
        score, state = self.recast_gate_scores[adapter], self.recast_gate[adapter]
        threshold, penalty, warmup, seen = state
        if torch.is_grad_enabled() and score.requires_grad:
            state[3] = seen + 1
            return gate_value(score.float(), threshold, penalty if seen >= warmup else 0.0)
        return gate_value(score.float(), threshold)


def finish_gates(layers: dict, adapter_name: str, config: RecastConfig) -> None:
    """After injection: drop the coefficients of ``config.inactive_modules`` (their weights stay in the groups'
    templates) and give each gated module its share ``gate_penalty / M`` of the penalty (``layers``: the adapter's
    RECAST layers by key). Raises ``ValueError`` for an inactive module the adapter does not adapt, or all of them."""
    inactive = config.inactive_modules or []
    unknown = sorted(set(inactive) - set(layers))
    if unknown:
        raise ValueError(
            f"`inactive_modules` names module(s) that the RECAST adapter '{adapter_name}' does not adapt, e.g. "
            f"{unknown[:3]}: the adapter_config.json does not belong to this model or was edited."
        )
    if inactive and len(inactive) == len(layers):
        raise ValueError(f"`inactive_modules` names every module of the RECAST adapter '{adapter_name}'; keep at "
                         "least one module active.")
    for key in inactive:
        layers[key].drop_coefficients(adapter_name)
    gated = [layer for layer in layers.values() if adapter_name in layer.recast_gate_scores]
    for layer in gated:
        layer.recast_gate[adapter_name][1] = config.gate_penalty / len(gated)


def gate_states(model: nn.Module, adapter_name: Optional[str] = None) -> dict[str, bool]:
    """Whether each gated module of ``adapter_name`` (default: the active adapter) is open, by module key."""
    return _open_gates(*_gated_layers(model, adapter_name))


def _open_gates(name: str, layers: dict) -> dict[str, bool]:
    return {key: bool(layer.recast_gate_scores[name].detach().item() >= layer.recast_gate[name][0])
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
    name, layers = _gated_layers(model, adapter_name)
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


def _gated_layers(model: nn.Module, adapter_name: Optional[str]) -> tuple[str, dict]:
    """:func:`~peft_recast.grouping.peft_adapter_layers`, imported here: :mod:`peft_recast.layer` imports this module."""
    from .grouping import peft_adapter_layers

    return peft_adapter_layers(model, adapter_name)
