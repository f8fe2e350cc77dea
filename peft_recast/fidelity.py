"""How faithfully mimicked templates reproduce a pretrained model (the paper's weight and feature cosine checks).

The *mimicked model* is the paper's: every targeted weight replaced by its reconstruction
``W_rec_l = mean_K(alpha_0l) @ T`` (RECAST's ``weight_form="replace"`` at initialisation), for closed-form templates
or a gradient template bank. Per group of ``m`` modules with pretrained weights ``W_l`` (flattened, fused roles
concatenated):

    relative error  = ||[W_rec_1..m] - [W_1..m]||_F / ||[W_1..m]||_F
    weight cosine_l = <W_rec_l, W_l> / (||W_rec_l|| ||W_l||)
    output cosine_l = mean over samples b of cos(y_rec_l[b], y_l[b])   (y: the module's output, flattened per sample)

where ``y`` and ``y_rec`` are the module's outputs in the original and the mimicked model on the same inputs (so
errors of earlier layers propagate, as in the paper's layer-wise feature similarity).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field, replace
from typing import Any, Mapping, Optional

import torch
import torch.nn.functional as F
from torch import nn

from .bank import MimicrySettings, save_template_bank
from .config import RecastConfig
from .gradient_mimicry import mimic_template_bank
from .planning import GroupFits, adapter_layers, plan_groups, plan_model_groups

FIDELITY_ADAPTER = "recast_fidelity"


@dataclass
class GroupFidelity:
    """Fidelity of one template group (cosines: min and mean over its modules)."""

    name: str
    modules: int
    templates: int
    relative_error: float
    weight_cosine_min: float
    weight_cosine_mean: float
    output_cosine_min: float
    output_cosine_mean: float


@dataclass
class FidelityReport:
    """Fidelity of one mimicry method on one model; ``seconds`` is its wall time (``nan`` if not measured)."""

    method: str
    seconds: float
    output_cosine: float
    groups: list[GroupFidelity] = field(default_factory=list)
    details: dict[str, Any] = field(default_factory=dict)

    def __str__(self) -> str:
        lines = [
            f"{self.method}: wall time {self.seconds:.2f} s, 1 - cosine of the model output "
            f"{1 - self.output_cosine:.2e}",
            f"{'group':<58} {'m':>2} {'n':>2} {'rel. error':>10} {'1-w-cos max':>11} {'1-out-cos max':>13} "
            f"{'1-out-cos mean':>14}",
        ]
        for group in self.groups:
            lines.append(
                f"{group.name:<58} {group.modules:>2} {group.templates:>2} {group.relative_error:>10.2e} "
                f"{1 - group.weight_cosine_min:>11.2e} {1 - group.output_cosine_min:>13.2e} "
                f"{1 - group.output_cosine_mean:>14.2e}"
            )
        return "\n".join(lines)


def _output_tensor(output: Any) -> torch.Tensor:
    """The main tensor of a module or model output (first element, ``last_hidden_state`` or ``logits``)."""
    if isinstance(output, torch.Tensor):
        return output
    for name in ("last_hidden_state", "logits"):
        value = getattr(output, name, None)
        if isinstance(value, torch.Tensor):
            return value
    return output[0]


def _sample_cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    """Mean over the leading (sample) axis of the cosine of the flattened samples."""
    a, b = a.reshape(a.shape[0], -1).double(), b.reshape(b.shape[0], -1).double()
    return F.cosine_similarity(a, b, dim=1).mean().item()


@torch.no_grad()
def _run_with_hooks(model: nn.Module, modules: Mapping[str, nn.Module], inputs: Mapping[str, Any]):
    """Run ``model(**inputs)`` and return its main output and the outputs of ``modules`` (by key)."""
    captured: dict[str, torch.Tensor] = {}
    handles = [
        module.register_forward_hook(lambda _m, _a, out, key=key: captured.__setitem__(key, _output_tensor(out)))
        for key, module in modules.items()
    ]
    try:
        output = _output_tensor(model(**inputs))
    finally:
        for handle in handles:
            handle.remove()
    return output, captured


@torch.no_grad()
def fidelity_report(
    model: nn.Module,
    config: RecastConfig,
    inputs: Mapping[str, Any],
    method: Optional[str] = None,
    seconds: float = math.nan,
) -> FidelityReport:
    """Measure how well ``config``'s templates (closed form, or its ``template_bank``) mimic ``model``.

    ``model`` (a transformers / torch model in eval mode) is left unchanged; ``inputs`` are keyword arguments of its
    forward (e.g. a tokenizer's batch).
    """
    from peft import get_peft_model

    probe = replace(config, weight_form="replace", init_weights=True, base_fingerprint=None, inference_mode=True)
    peft_model = get_peft_model(model, probe, adapter_name=FIDELITY_ADAPTER)
    try:
        layers = adapter_layers(peft_model.get_base_model(), FIDELITY_ADAPTER)  # every one lies in one plan's units
        plans = plan_groups(layers, peft_model.peft_config[FIDELITY_ADAPTER])
        with peft_model.disable_adapter():
            reference, original = _run_with_hooks(peft_model, layers, inputs)
        mimicked_output, mimicked = _run_with_hooks(peft_model, layers, inputs)
        groups = []
        for plan in plans:
            name, units = plan.name, plan.units
            pretrained, rebuilt = [], []
            for unit in units:
                pretrained.append(torch.cat([layer.pristine_weight().double().reshape(-1) for _, layer in unit]))
                # replacement form: W_pre + delta_W = mean_K(alpha_0) @ T, the mimicked weight
                rebuilt.append(
                    torch.cat(
                        [
                            (layer.pristine_weight().double() + layer.get_delta_weight(FIDELITY_ADAPTER)).reshape(-1)
                            for _, layer in unit
                        ]
                    )
                )
            a, r = torch.stack(pretrained), torch.stack(rebuilt)
            weight_cosines = F.cosine_similarity(a, r, dim=1)
            output_cosines = [_sample_cosine(original[key], mimicked[key]) for unit in units for key, _ in unit]
            groups.append(
                GroupFidelity(
                    name=name,
                    modules=len(units),
                    templates=units[0][0][1].recast_coefficients[FIDELITY_ADAPTER].shape[1],
                    relative_error=((r - a).norm() / a.norm()).item(),
                    weight_cosine_min=weight_cosines.min().item(),
                    weight_cosine_mean=weight_cosines.mean().item(),
                    output_cosine_min=min(output_cosines),
                    output_cosine_mean=sum(output_cosines) / len(output_cosines),
                )
            )
        report = FidelityReport(
            method=method or ("gradient (template bank)" if config.template_bank else "closed form"),
            seconds=seconds,
            output_cosine=_sample_cosine(reference, mimicked_output),
            groups=groups,
        )
    finally:
        peft_model.unload()
    return report


def compare_mimicry(
    model: nn.Module,
    config: RecastConfig,
    inputs: Mapping[str, Any],
    bank_dir: str,
    settings: Optional[Any] = None,
    progress: bool = True,
) -> tuple[FidelityReport, FidelityReport]:
    """Closed-form versus gradient mimicry of ``model`` for ``config``, each with its wall time.

    The closed-form time is that of fitting every group (``fit_group``) as an adapter is injected; the gradient time
    that of :func:`peft_recast.gradient_mimicry.mimic_template_bank` (the bank is saved to ``bank_dir``).
    """

    closed = replace(config, template_bank=None, base_fingerprint=None, inference_mode=True)
    start = time.perf_counter()
    fits = GroupFits()
    for plan in plan_model_groups(model, closed):
        fits.fit(plan, closed.num_templates, plan.weights())
    closed_seconds = time.perf_counter() - start
    closed_report = fidelity_report(model, closed, inputs, method="closed form", seconds=closed_seconds)

    bank = mimic_template_bank(model, config, settings or MimicrySettings(), progress=progress)
    path = save_template_bank(bank, bank_dir)
    gradient = replace(config, template_bank=path, base_fingerprint=None, inference_mode=True)
    gradient_report = fidelity_report(
        model, gradient, inputs, method=f"gradient, {bank.settings.steps} steps", seconds=bank.seconds
    )
    gradient_report.details = {"best_loss": bank.best_loss, "bank": path, "settings": bank.settings}
    return closed_report, gradient_report


def format_comparison(closed: FidelityReport, gradient: FidelityReport) -> str:
    """A markdown table: per group the relative error, ``1 - cosine`` of the weights (worst module) and of the layer
    outputs (mean over the group's modules) for both methods, then the model output and the wall times."""
    lines = [
        "| group | rel. error closed / gradient | 1 - weight cos (worst) closed / gradient | "
        "1 - output cos (mean) closed / gradient |",
        "|---|---|---|---|",
    ]
    for c, g in zip(closed.groups, gradient.groups):
        lines.append(
            f"| {c.name} | {c.relative_error:.2e} / {g.relative_error:.2e} | {1 - c.weight_cosine_min:.2e} / "
            f"{1 - g.weight_cosine_min:.2e} | {1 - c.output_cosine_mean:.2e} / {1 - g.output_cosine_mean:.2e} |"
        )
    lines.append(
        f"| model output (1 - cos) | {1 - closed.output_cosine:.2e} / {1 - gradient.output_cosine:.2e} | wall time "
        f"{closed.seconds:.2f} s / {gradient.seconds:.1f} s | |"
    )
    return "\n".join(lines)
