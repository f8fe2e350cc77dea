"""Gradient Neural Mimicry, as in the paper, and the template banks it produces.

The paper (Tasnim & Plummer, ICLR 2025; official code ``appledora/RECAST_ICLR25``, notebooks
``reconstruction-*.ipynb``) learns, for every group of ``m`` modules, ``n`` templates ``T`` (``n x d``) and ``K``
coefficient sets per module (``C``: ``m x K x n``) by gradient descent on the weights alone (no data):

    W_gen_l = mean_K(C_l + noise) @ T                                   (d,)
    loss    = sum_groups sum_l  lambda * SmoothL1_beta(W_gen_l, W_pre_l)  (mean over the d entries)

with RMSprop (lr 0.1), ``StepLR(200, 0.1)``, 1000 full-batch steps, gradient clipping at norm 1.0, coefficient noise
of std 1e-4 while training, templates initialised with ``kaiming_normal_``, each coefficient set with
``orthogonal_`` (a random unit vector) and the lowest-loss snapshot kept (ViT settings; ResNet-34: lr 0.2,
``StepLR(500, 0.1)``, 3000 steps, no noise). Numbers from ``shared/research/recast-paper.md`` §2.1.

Such templates are not a function of the base weights, so they are stored once per base model in a *template bank*
(one safetensors file: per group the templates ``(n, d)`` and the mimicked coefficients ``(m, K, n)``, plus the
group's member modules and a fingerprint of its base weights), which every adapter names in
``RecastConfig.template_bank``; adapter files keep holding coefficients only.
"""

from __future__ import annotations

import math
import time
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from .bank import BankGroupEntry, MimicrySettings, TemplateBank
from .config import RecastConfig
from .planning import GroupFits, flat_cat, plan_model_groups

__all__ = ["MimicrySettings", "fit_bank", "mimic_template_bank"]


def _template_shape(shapes: Sequence[Sequence[int]]) -> tuple[int, ...]:
    """The shape the paper gives one template: the weight's, rows concatenated for fused weights (``qkv``)."""
    if len(shapes) == 1:
        return tuple(shapes[0])
    if all(tuple(s[1:]) == tuple(shapes[0][1:]) for s in shapes):
        return (sum(s[0] for s in shapes), *shapes[0][1:])
    return (sum(math.prod(s) for s in shapes),)


def fit_bank(
    groups: dict[str, torch.Tensor],
    template_shapes: dict[str, tuple[int, ...]],
    num_templates: int,
    num_coefficient_sets: int,
    settings: MimicrySettings = MimicrySettings(),
    progress: bool = True,
) -> tuple[dict[str, tuple[torch.Tensor, torch.Tensor]], float]:
    """Gradient Neural Mimicry of several groups at once (one optimiser, as in the paper: clipping is joint).

    Args:
        groups: per group the stacked pretrained weights ``A`` (``m x d``, any float dtype).
        template_shapes: per group the shape of one template (``prod = d``), used for the ``kaiming_normal_`` init.
        num_templates: ``n`` (capped at ``m`` per group).
        num_coefficient_sets: ``K``.

    Returns:
        ``({name: (templates (n x d), coefficients (m x K x n))}, best loss)``: the lowest-loss snapshot, float32.
        Deterministic for a given ``settings.seed`` (and thread count).
    """
    generator = torch.Generator().manual_seed(settings.seed)
    targets, templates, coefficients = {}, {}, {}
    for name, stacked in groups.items():
        m = stacked.shape[0]
        n = min(num_templates, m)
        targets[name] = stacked.detach().float().cpu()
        bank = torch.empty((n, *template_shapes[name]))
        nn.init.kaiming_normal_(bank, generator=generator)
        templates[name] = nn.Parameter(bank.reshape(n, -1))
        sets = torch.empty(m, num_coefficient_sets, n, 1)
        for index in range(m * num_coefficient_sets):
            nn.init.orthogonal_(sets.view(-1, n, 1)[index], generator=generator)
        coefficients[name] = nn.Parameter(sets.squeeze(-1))
    parameters = [*templates.values(), *coefficients.values()]
    optimizer = torch.optim.RMSprop(parameters, lr=settings.lr)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=settings.lr_step, gamma=settings.lr_gamma)
    best_loss, best = math.inf, None
    bar = tqdm(range(settings.steps), desc="RECAST gradient mimicry", unit="step", disable=not progress)
    for step in bar:
        loss = torch.zeros(())
        for name, target in targets.items():
            sets = coefficients[name]
            if settings.noise_std > 0:
                sets = sets + settings.noise_std * torch.randn(sets.shape, generator=generator)
            generated = sets.mean(1) @ templates[name]
            per_layer = F.smooth_l1_loss(generated, target, reduction="none", beta=settings.smooth_l1_beta).mean(1)
            loss = loss + settings.loss_weight * per_layer.sum()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        value = loss.item()
        if value < best_loss:
            best_loss = value
            best = {name: (templates[name].detach().clone(), coefficients[name].detach().clone()) for name in targets}
        nn.utils.clip_grad_norm_(parameters, settings.clip_norm)
        optimizer.step()
        scheduler.step()
        if step % 50 == 0 or step == settings.steps - 1:
            bar.set_postfix(loss=f"{value:.3e}")
    return best, best_loss


def mimic_template_bank(
    model: nn.Module,
    config: RecastConfig,
    settings: MimicrySettings = MimicrySettings(),
    progress: bool = True,
) -> TemplateBank:
    """Fit a template bank to ``model`` (a transformers / torch model, left unchanged) for ``config``'s groups.

    The groups are exactly those an adapter with ``config`` gets (targets, presets, grouping, fused modules), so any
    adapter made with the same grouping fields and ``template_bank=<this bank>`` uses it.
    """
    start = time.perf_counter()
    stacked, shapes, entries, fingerprint = {}, {}, {}, {}
    fits = GroupFits()
    for plan in plan_model_groups(model, config):
        weights = plan.weights()
        stacked[plan.name] = torch.stack([flat_cat(unit).float() for unit in weights])
        shapes[plan.name] = _template_shape([list(w.shape) for w in weights[0]])
        entries[plan.name] = ([[key for key, _ in unit] for unit in plan.units], [list(w.shape) for w in weights[0]])
        fingerprint[plan.name] = fits.fit(plan, config.num_templates, weights).fingerprint()
    fitted, best_loss = fit_bank(
        stacked, shapes, config.num_templates, config.num_coefficient_sets, settings, progress=progress
    )
    groups = {
        name: BankGroupEntry(
            templates=fitted[name][0],
            coefficients=fitted[name][1],
            members=entries[name][0],
            shapes=entries[name][1],
            fingerprint=fingerprint[name],
        )
        for name in stacked
    }
    return TemplateBank(
        groups=groups,
        settings=settings,
        num_templates=config.num_templates,
        num_coefficient_sets=config.num_coefficient_sets,
        base_model_name_or_path=getattr(getattr(model, "config", None), "name_or_path", None) or None,
        best_loss=best_loss,
        seconds=time.perf_counter() - start,
    )
