"""TAPS gates (Wallingford et al., arXiv 2203.16708): a learned on/off switch per module (the layer's part; pruning
closed gates is :mod:`peft_recast.pruning`).

A module with gate score ``g`` (a 1-element tensor) uses

    delta_W = 1[g >= t] * delta_W(theta)          (t = RecastConfig.gate_threshold)

with a straight-through gradient (``d gate / d g = 1``, so a closed gate still learns whether to reopen), and the
sparsity penalty ``lambda * sum_l |g_l| / M`` of the TAPS loss enters as its gradient, ``lambda sign(g) / M``, added in
backward (:class:`_PenaltyGradient`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

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


@dataclass
class GateState:
    """One gated adapter's gate settings on one module.

    Attributes:
        threshold: ``RecastConfig.gate_threshold``: the gate is open while its score is at least this.
        penalty: this module's share ``gate_penalty / M`` of the sparsity penalty (set by :func:`finish_gates`).
        warmup_steps: ``RecastConfig.gate_warmup_steps``: training forwards before the penalty acts.
        forwards_seen: training forwards counted so far.
    """

    threshold: float
    penalty: float = 0.0
    warmup_steps: int = 0
    forwards_seen: int = 0

    def is_open(self, score: torch.Tensor) -> bool:
        """Whether a gate with ``score`` (a ``(1,)`` tensor) is open."""
        return bool(score.detach().item() >= self.threshold)


class GatedLayer:
    """The gate part of :class:`~peft_recast.layer.RecastLayer`: ``recast_gate_scores`` (a ``(1,)`` parameter per gated
    adapter) and ``recast_gate`` (a :class:`GateState` per gated adapter).
    ``drop_coefficients`` is the layer's own."""

    recast_gate_scores: nn.ParameterDict
    recast_gate: dict[str, GateState]
    recast_coefficients: nn.ParameterDict

    def _set_gate(self, adapter_name: str, config: RecastConfig, trainable: bool) -> None:
        """A gate score at ``config.gate_init`` (``module_gates``); :func:`finish_gates` sets the penalty's share."""
        if not config.module_gates:
            return
        like = self.recast_coefficients[adapter_name]
        score = torch.full((1,), float(config.gate_init), dtype=like.dtype, device=like.device)
        self.recast_gate_scores[adapter_name] = nn.Parameter(score, requires_grad=trainable and like.requires_grad)
        self.recast_gate[adapter_name] = GateState(float(config.gate_threshold), 0.0, int(config.gate_warmup_steps))

    def drop_gate(self, adapter_name: str, keep_coefficients: bool) -> None:
        """Remove the gate (:func:`~peft_recast.pruning.prune_gates`): an open module keeps its coefficients (its gate
        was 1), a closed one loses them and computes the pretrained layer for this adapter."""
        del self.recast_gate_scores[adapter_name]
        del self.recast_gate[adapter_name]
        if not keep_coefficients:
            self.drop_coefficients(adapter_name)

    def _gate(self, adapter: str) -> torch.Tensor:
        """The adapter's gate, 0 or 1 (:func:`gate_value`); training forwards are counted and the penalty's gradient
        joins after ``gate_warmup_steps`` of them."""
        score, state = self.recast_gate_scores[adapter], self.recast_gate[adapter]
        if torch.is_grad_enabled() and score.requires_grad:
            penalty = state.penalty if state.forwards_seen >= state.warmup_steps else 0.0
            state.forwards_seen += 1
            return gate_value(score.float(), state.threshold, penalty)
        return gate_value(score.float(), state.threshold)


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
        layer.recast_gate[adapter_name].penalty = config.gate_penalty / len(gated)
