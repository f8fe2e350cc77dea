"""Planning and fitting template groups: which modules share a group, and building each group's templates.

A module key such as ``encoder.layer.3.attention.self.query`` has a *role* (the key with its layer index written
``{}``: ``encoder.layer.{}.attention.self.query``) and a *layer index* (3). Modules of one role and one weight shape
are cut, in layer order, into groups of ``layers_per_group`` consecutive layers (or ``num_groups`` near-equal
groups); with ``fused_modules`` the modules of one layer named there act as one weight (a *unit*). Each group's
templates come from closed-form mimicry (:mod:`peft_recast.mimicry`) or a template bank (:mod:`peft_recast.bank`).

:func:`plan_model_groups` plans the groups of a model without any adapter (gradient mimicry and
fidelity reports use it); :func:`build_groups` attaches the fitted groups to an injected adapter's layers.
"""

from __future__ import annotations

import copy
import math
import re
import warnings
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any, Callable, Optional, Union

import torch
from peft.tuners.tuners_utils import BaseTuner, _maybe_include_all_linear_layers, check_target_module_exists
from peft.utils import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING
from torch import nn
from tqdm.auto import tqdm
from transformers.pytorch_utils import Conv1D

from .bands import BandsFit, fit_bands
from .bank import TemplateBank, load_template_bank
from .config import RecastConfig, config_list
from .group import BankGroup, RecastGroup
from .layer import RecastLayer
from .mimicry import GroupFit, fit_group
from .presets import preset_fields
from .spectrum import SpectrumFit, fit_spectrum, matrix_of

# Layers per group when neither `layers_per_group` nor `num_groups` is set.
DEFAULT_LAYERS_PER_GROUP = 2
# Show a progress bar for mimicry once the targeted weights exceed this many elements (~a 100M-parameter model).
PROGRESS_MIN_NUMEL = 100_000_000
# Default target modules per transformers model type: LoRA's attention query/value choice, plus ViT (module names
# of transformers 5), MPNet's query/value and ModernBERT's fused query-key-value projection.
TRANSFORMERS_MODELS_TO_RECAST_TARGET_MODULES_MAPPING = {
    **TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING,
    "vit": ["q_proj", "v_proj"],
    "mpnet": ["q", "v"],
    "modernbert": ["Wqkv"],
}
_LAYER_INDEX = re.compile(r"(?<=\.)\d+(?=\.|$)|^\d+(?=\.)")
_SUPPORTED = (nn.Linear, nn.Conv2d, Conv1D)  # bitsandbytes' 4/8-bit layers subclass nn.Linear


@dataclass
class GroupPlan:
    """One template group to build.

    Attributes:
        name: e.g. ``"encoder.layer.0-1.attention.self.query"`` (``...query+key+value`` for fused modules; a shape
            suffix such as ``[384x1536]`` when one role has weights of several shapes).
        units: per member, in layer order, one ``(key, module)`` per fused role (one pair when nothing is fused).
    """

    name: str
    units: list[list[tuple[str, Any]]] = field(default_factory=list)

    def weights(self) -> list[list[torch.Tensor]]:
        """The units' pretrained weights (without any merged adapter), ``m`` lists of one weight per role."""
        return [[pretrained_weight(module) for _, module in unit] for unit in self.units]


def pretrained_weight(module: nn.Module) -> torch.Tensor:
    """A target's pretrained weight: a RECAST layer's pristine weight, or a plain module's own (detached)."""
    return module.pristine_weight() if isinstance(module, RecastLayer) else module.weight.detach()


def _weight_state(module: nn.Module) -> tuple[int, int]:
    """A key that changes when a target's pretrained weight does: its storage and version counter (a quantized
    RECAST layer answers for its packed weight, not a dequantized copy)."""
    if isinstance(module, RecastLayer):
        return module.weight_state()
    return module.weight.data_ptr(), module.weight._version


def _weight_shape(module: nn.Module) -> tuple[int, ...]:
    return module.weight_shape() if isinstance(module, RecastLayer) else tuple(module.weight.shape)


def role_and_index(key: str, layers_pattern: Optional[Union[str, list[str]]] = None) -> tuple[str, Optional[int]]:
    """Split a module key at its first numeric component: ``"enc.layer.3.q"`` -> ``("enc.layer.{}.q", 3)``; with
    ``layers_pattern`` at the component after it (``"stages.1.layers.3.conv"``, ``"layers"`` -> index 3)."""
    patterns = config_list(layers_pattern)
    for pattern in patterns:
        found = re.search(rf"(?:^|\.)(?:{pattern})\.(\d+)(?=\.|$)", key)
        if found is not None:
            return key[: found.start(1)] + "{}" + key[found.end(1) :], int(found.group(1))
    match = _LAYER_INDEX.search(key)
    if match is None:
        return key, None
    return key[: match.start()] + "{}" + key[match.end() :], int(match.group())


def layer_index(key: str, layers_pattern: Optional[Union[str, list[str]]]) -> Optional[int]:
    """The layer index that PEFT's ``layers_to_transform`` filter reads from a module key.

    Without ``layers_pattern``: the first all-digit component that has at least two components before it and one
    after it (``model.layers.3.mlp`` -> 3). With it: the first all-digit component right after a component matching
    one of the patterns (``h.3.attn`` with ``"h"`` -> 3).
    """
    patterns = config_list(layers_pattern)
    if patterns:
        for pattern in patterns:
            match = re.search(rf"(?:^|\.)(?:{pattern})\.(\d+)\.", key)
            if match is not None:
                return int(match.group(1))
        return None
    parts = key.split(".")
    for position in range(2, len(parts) - 1):
        if parts[position].isdigit():
            return int(parts[position])
    return None


def is_target(config: RecastConfig, key: str) -> Union[bool, re.Match, None]:
    """PEFT's matching of ``key`` against ``config``, plus ``layers_to_transform`` for a regex ``target_modules``
    (PEFT applies it to lists of names only, so a regex would silently adapt every layer)."""
    found = check_target_module_exists(config, key)
    wanted = config_list(config.layers_to_transform)
    if found and isinstance(config.target_modules, str) and wanted:
        return layer_index(key, config.layers_pattern) in wanted
    return found


def resolve_targets(config: RecastConfig, model_config: dict) -> RecastConfig:
    """Fill in a preset's target (and fused) modules for ``model_config["model_type"]``, then the default target
    modules of that model type when ``target_modules`` is ``None`` (in place, as PEFT's ``_prepare_adapter_config``)."""
    if getattr(config, "preset", None) is not None and config.target_modules is None:
        for name, value in preset_fields(config.preset, model_config).items():
            if name == "target_modules" or getattr(config, name) is None:
                setattr(config, name, value)
    if config.target_modules is None:
        default = TRANSFORMERS_MODELS_TO_RECAST_TARGET_MODULES_MAPPING.get(model_config.get("model_type"))
        if default is None:
            raise ValueError("Please specify `target_modules` in `peft_config`")
        config.target_modules = default if isinstance(default, str) else set(default)
    return config


def plan_model_groups(model: nn.Module, config: RecastConfig) -> list[GroupPlan]:
    """The template groups an adapter with ``config`` gets on ``model`` (a model without RECAST adapters, left
    unchanged; ``config`` is not changed either): the same targets injection finds (presets, default targets,
    ``"all-linear"``, exclusions), planned by :func:`plan_groups`."""
    config = resolve_targets(copy.copy(config), BaseTuner.get_model_config(model))
    config = _maybe_include_all_linear_layers(config, model)
    found = {key: module for key, module in model.named_modules() if key and isinstance(module, _SUPPORTED)
             and is_target(config, key)}
    if not found:
        raise ValueError(f"Target modules {config.target_modules} not found in the base model. Please check the "
                         "target modules and try again.")
    return plan_groups(found, config)


def split_layers(items: list, config: RecastConfig) -> list[list]:
    """Contiguous chunks of ``items`` (layer indices): of ``config.layers_per_group`` (default
    :data:`DEFAULT_LAYERS_PER_GROUP`), or ``config.num_groups`` near-equal ones."""
    if config.num_groups is None:
        size = config.layers_per_group or DEFAULT_LAYERS_PER_GROUP
        return [items[start : start + size] for start in range(0, len(items), size)]
    count = min(config.num_groups, len(items))
    base, extra = divmod(len(items), count)
    chunks, start = [], 0
    for i in range(count):
        stop = start + base + (1 if i < extra else 0)
        chunks.append(items[start:stop])
        start = stop
    return chunks


def plan_groups(modules: dict[str, nn.Module], config: RecastConfig) -> list[GroupPlan]:
    """Group target modules (by key) into template groups of units.

    Modules share a group when they have the same role (their key up to the layer index, e.g.
    ``encoder.layer.{}.attention.self.query``; with ``share_across_module_types`` every module of the layer list,
    ``encoder.layer.{}.*``) and the same weight shape; each role's layers, in order, are cut into contiguous groups
    (:func:`split_layers`). Modules without a layer index form a group of their own. With ``fused_modules`` the
    groups of the fused roles (same layers) merge into one named ``...query+key+value`` whose units hold one module
    per role.
    """
    by_role: dict[tuple[str, tuple[int, ...]], list[tuple[int, str, nn.Module]]] = defaultdict(list)
    for key, module in modules.items():
        role, index = role_and_index(key, config.layers_pattern)
        if index is None:
            role, index = key.replace("{", "{{").replace("}", "}}"), 0
        elif config.share_across_module_types:
            role = role[: role.index("{}") + 2] + ".*"  # every module type of the layer, by shape
        by_role[(role, _weight_shape(module))].append((index, key, module))
    shapes_per_role: dict[str, int] = defaultdict(int)
    for role, _ in by_role:
        shapes_per_role[role] += 1
    fused = list(config.fused_modules or [])
    by_name: dict[str, dict[str, list[tuple[str, nn.Module]]]] = {}
    for (role, shape), items in by_role.items():
        items.sort(key=lambda item: item[:2])
        for chunk in split_layers(sorted({index for index, _, _ in items}), config):
            first, last = chunk[0], chunk[-1]
            name = role.format(f"{first}-{last}" if first != last else f"{first}")
            if shapes_per_role[role] > 1:
                name += "[" + "x".join(map(str, shape)) + "]"
            members = [(key, module) for index, key, module in items if first <= index <= last]
            fused_role = next((f for f in fused if name == f or name.endswith("." + f)), None)
            if fused_role is None:
                by_name[name] = {"": members}
            else:
                by_name.setdefault(name[: len(name) - len(fused_role)] + "+".join(fused), {})[fused_role] = members
    plans = []
    for name, by_fused_role in by_name.items():
        roles = [""] if "" in by_fused_role else [f for f in fused if f in by_fused_role]
        ordered = [by_fused_role[r] for r in roles]
        if len({len(members) for members in ordered}) != 1:
            raise ValueError(
                f"`fused_modules` {fused} fuse modules of one layer, but group '{name}' has "
                f"{[len(m) for m in ordered]} modules per role: target the same layers for every fused name."
            )
        plans.append(GroupPlan(name, [list(unit) for unit in zip(*ordered)]))
    return plans


def adapter_layers(model: nn.Module, adapter_name: str, members: bool = False) -> dict[str, RecastLayer]:
    """The RECAST layers of ``model`` that hold coefficients of ``adapter_name``, by key in ``model.named_modules()``;
    ``members=True``: also those in its template groups without coefficients (``config.inactive_modules``)."""
    return {
        key: module
        for key, module in model.named_modules()
        if isinstance(module, RecastLayer)
        and (adapter_name in module.recast_coefficients or (members and adapter_name in module.recast_group))
    }


def peft_model_layers(model: nn.Module, adapter_name: Optional[str] = None) -> tuple[str, dict[str, RecastLayer]]:
    """For functions that take a ``PeftModel``: ``adapter_name`` (default: the active adapter) and its RECAST layers
    by key as in the base model's ``named_modules()``; an adapter the model does not have raises ``ValueError``."""
    name, configs = adapter_name or getattr(model, "active_adapter", None), getattr(model, "peft_config", {})
    if name not in configs:
        raise ValueError(f"Adapter {name!r} does not exist; this model has {sorted(configs)}.")
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return name, adapter_layers(base, name)


def layers_to_transform_problem(
    model: nn.Module, config: RecastConfig, layers: dict[str, RecastLayer]
) -> Optional[str]:
    """Say which ``layers_to_transform`` indices adapted no module (out of range, or no target in them), or
    return ``None``."""
    requested = config_list(config.layers_to_transform)
    if not requested:
        return None
    adapted = {layer_index(key, config.layers_pattern) for key in layers}
    missing = sorted(set(requested) - adapted)
    if not missing:
        return None
    indices = (layer_index(key, config.layers_pattern) for key, _ in model.named_modules())
    present = sorted({index for index in indices if index is not None})
    where = f"layers {present[0]} to {present[-1]}" if present else "no numbered layers"
    pattern = f" under `layers_pattern`={config.layers_pattern!r}" if config.layers_pattern else ""
    return (
        f"`layers_to_transform` asks for layer(s) {missing}, but no module of those layers matches `target_modules` "
        f"({config.target_modules if isinstance(config.target_modules, str) else sorted(config.target_modules)}). "
        f"This model has {where}{pattern}. Use indices of layers that hold "
        "target modules (counted from 0), or drop the others from `layers_to_transform`."
    )


def warn_if_templates_exceed_groups(
    adapter_name: str, config: RecastConfig, plans: list[GroupPlan]
) -> None:
    """Warn when ``num_templates`` is larger than every group: a group of ``m`` modules spans ``m`` templates.
    Presets are exempt: the paper's conv variant asks for as many templates as each group holds."""
    largest = max((len(plan.units) for plan in plans), default=0)
    if config.template_family != "group_span":
        return  # each module's templates come from its own weight
    if plans and config.num_templates > largest and getattr(config, "preset", None) is None:
        plural = "s" if largest > 1 else ""
        warnings.warn(
            f"`num_templates`={config.num_templates} is larger than every template group of adapter "
            f"'{adapter_name}' (the largest has {largest} module{plural}), and a group of m modules spans at most m "
            f"templates, so each group uses at most {largest}. Lower `num_templates`, or put more layers in a "
            "group (`layers_per_group`, `num_groups`).",
            UserWarning,
        )


def flat_cat(weights: list[torch.Tensor]) -> torch.Tensor:
    """One fused weight: the members' weights flattened and concatenated, ``(sum numel,)``."""
    return torch.cat([weight.detach().reshape(-1) for weight in weights])


# The fit of one module's own pretrained weight (in its stored layout; its output axis; `num_templates`) for each
# template family built from each module's own weight.
OWN_WEIGHT_FITS: dict[str, Callable[[torch.Tensor, int, int], Union[SpectrumFit, BandsFit]]] = {
    "own_spectrum": lambda weight, axis, num_templates: fit_spectrum(matrix_of(weight, axis), num_templates),
    "spectral_bands": fit_bands,
}


class GroupFits:
    """Closed-form fits of groups' weights, each computed once: a later adapter with the same grouping reuses the fit
    (and so its templates and mixing) as long as none of the weights changed. The key holds each member's storage
    and version counter, so an in-place change or a merge fits anew."""

    def __init__(self) -> None:
        self._fits: dict[tuple, GroupFit] = {}
        self._spectra: dict[tuple, Union[SpectrumFit, BandsFit]] = {}

    def spectrum(self, layer: RecastLayer, family: str, num_templates: int,
                 weight: torch.Tensor) -> Union[SpectrumFit, BandsFit]:
        """The ``own_spectrum`` or ``spectral_bands`` fit (``family``) of one layer's pretrained ``weight``
        (:func:`~peft_recast.spectrum.fit_spectrum`, :func:`~peft_recast.bands.fit_bands`)."""
        key = (family, num_templates, layer.weight_state(), tuple(weight.shape))
        if key not in self._spectra:
            self._spectra[key] = OWN_WEIGHT_FITS[family](weight, layer.output_axis, num_templates)
        return self._spectra[key]

    def fit(self, plan: GroupPlan, num_templates: int, weights: list[list[torch.Tensor]]) -> GroupFit:
        """The closed-form fit of ``plan``'s units (``weights``: :meth:`GroupPlan.weights`; a fused unit's weights
        flattened and concatenated)."""
        states = tuple(_weight_state(module) for unit in plan.units for _, module in unit)
        key = (num_templates, states, tuple((w.dtype, w.shape) for unit in weights for w in unit))
        if key not in self._fits:
            stacked = [unit[0] if len(unit) == 1 else flat_cat(unit) for unit in weights]
            self._fits[key] = fit_group(stacked, num_templates)
        return self._fits[key]


def coefficient_unit(norm: float, config: RecastConfig, num_templates: int) -> float:
    """What a unit coefficient moves a layer by along one unit template: ``s ||W||_F / sqrt(n)``, so that moving all
    ``n`` coefficients by ``c`` moves the weight by ``c s ||W||_F`` whatever ``n`` is (AdamW moves every coefficient by
    about the learning rate per step, so the best learning rate does not depend on the number of templates)."""
    return norm * config.coefficient_scale / math.sqrt(num_templates)


def build_groups(
    model: nn.Module, adapter_name: str, config: RecastConfig, layers: dict[str, RecastLayer], fits: GroupFits
) -> dict[str, list[float]]:
    """Plan the template groups of ``adapter_name``'s RECAST ``layers`` (by key) on ``model``, fit each group's
    templates (closed form, or ``config.template_bank``) and attach them to the layers. Returns the fingerprint of
    the base weights, each group's singular values by group name (``RecastConfig.base_fingerprint``)."""
    problem = layers_to_transform_problem(model, config, layers)
    if problem is not None:
        raise ValueError(problem)
    plans = plan_groups(layers, config)
    warn_if_templates_exceed_groups(adapter_name, config, plans)
    numel = sum(layer.get_base_layer().weight.numel() for layer in layers.values())
    bank = load_template_bank(config.template_bank) if config.template_bank is not None else None
    fingerprint: dict[str, list[float]] = {}
    shared: Optional[dict[tuple[str, int], RecastLayer]] = {} if config.coefficient_sharing == "position" else None
    for plan in tqdm(plans, desc="RECAST mimicry", unit="group", disable=numel < PROGRESS_MIN_NUMEL):
        weights = plan.weights()  # once per group: a quantized layer dequantizes its weight for this
        if any(weight.device.type == "meta" for unit in weights for weight in unit):
            raise ValueError(
                f"The base weights of '{plan.name}' are on the meta device. RECAST builds its templates from the "
                "pretrained weights, so load the base model with real weights before adding a RECAST adapter."
            )
        if config.template_family != "group_span":
            fingerprint.update(_attach_spectra(adapter_name, config, plan, weights, fits, shared))
            continue
        fit = fits.fit(plan, config.num_templates, weights)
        fingerprint[plan.name] = fit.fingerprint()
        _attach(adapter_name, config, plan, weights, fit, bank, shared)
    return fingerprint


def _owner(unit: list[tuple[str, Any]], j: int, config: RecastConfig,
           shared: Optional[dict[tuple[str, int], RecastLayer]]) -> RecastLayer:
    """The layer whose coefficient tensor the unit at position ``j`` of its group uses: its first module, or with
    ``shared`` (``coefficient_sharing="position"``) the first such unit's of the role."""
    owner = unit[0][1]
    if shared is not None:
        owner = shared.setdefault((role_and_index(unit[0][0], config.layers_pattern)[0], j), owner)
    return owner


def _attach_spectra(
    adapter_name: str,
    config: RecastConfig,
    plan: GroupPlan,
    weights: list[list[torch.Tensor]],
    fits: GroupFits,
    shared: Optional[dict[tuple[str, int], RecastLayer]],
) -> dict[str, list[float]]:
    """A module's own templates and mixing (:data:`OWN_WEIGHT_FITS`, then the fit's ``group``: ``"own_spectrum"``
    :class:`~peft_recast.spectrum.OwnSpectrum`, ``"spectral_bands"`` :class:`~peft_recast.bands.SpectralBands`; unit
    ``u``) for every module of ``plan``; returns each module's fingerprint (its top singular values) by key. The plan's
    groups only decide which modules share coefficients."""
    fingerprint = {}
    for j, (unit, (weight,)) in enumerate(zip(plan.units, weights)):
        (key, layer), = unit  # fused modules are refused by the config
        fit = fits.spectrum(layer, config.template_family, config.num_templates, weight)
        fingerprint[key] = fit.fingerprint()
        unit_scale = coefficient_unit(float(fit.singular_values.norm()), config, config.num_templates)
        layer.attach_group(adapter_name, *fit.group(key, layer, config.num_templates, unit_scale))
        owner = _owner(unit, j, config, shared)
        if layer is not owner:
            layer.tie_coefficients(adapter_name, owner)
    return fingerprint


def _attach(
    adapter_name: str,
    config: RecastConfig,
    plan: GroupPlan,
    weights: list[list[torch.Tensor]],
    fit: GroupFit,
    bank: Optional[TemplateBank],
    shared: Optional[dict[tuple[str, int], RecastLayer]],
) -> None:
    """Give every module of one group its basis ``B``, mixing ``R`` and (replacement form) ``alpha_0``; with
    ``shared`` (``coefficient_sharing="position"``), the unit at position ``j`` of a role ties its coefficients to
    the first such unit's (kept in ``shared``, by role and position).

    With ``u_l`` = :func:`coefficient_unit` (``s ||W_l||_F / sqrt(n)``). Closed form: ``B`` = the members'
    pretrained weights, ``R_l = u_l M`` (residual) or ``M`` with ``alpha_0 = C_l = M^T[l] s^2`` (replace). Bank:
    ``B`` = the stored templates, ``R_l = diag(u_l / ||T_k||)`` (residual: coefficients on the closed form's
    scale) or ``I`` with the bank's ``alpha_0`` (replace). ``W_l`` of fused units is the concatenation of its roles'
    weights; the roles after the first share the first one's coefficient tensor.
    """
    name, units = plan.name, plan.units
    replace_form = config.weight_form == "replace"
    if bank is None:
        roles = [RecastGroup(name, [unit[r][1] for unit in units]) for r in range(len(units[0]))]
        coefficients = fit.mixing.T * fit.singular_values[: fit.num_templates] ** 2  # C = U_n diag(s_n), (m x n)
    else:
        entry = bank.check(name, [[key for key, _ in unit] for unit in units], fit.fingerprint(), config.num_templates)
        stacked = torch.stack([flat_cat(unit).float().cpu() for unit in weights])
        error = ((entry.reconstruction() - stacked).norm() / stacked.norm()).item()
        templates, offset, roles = entry.templates, 0, []
        for r in range(len(units[0])):
            shape = tuple(weights[0][r].shape)
            size = math.prod(shape)
            piece = templates[:, offset : offset + size].reshape(templates.shape[0], *shape)
            roles.append(BankGroup(name, [unit[r][1] for unit in units], piece, relative_error=error))
            offset += size
        template_norms = templates.double().norm(dim=1)
    for j, unit in enumerate(units):
        norm = fit.member_norms[j]
        initial = None
        if bank is None:
            mixing = fit.mixing if replace_form else fit.mixing * coefficient_unit(norm, config, len(fit.mixing))
            if replace_form:
                initial = coefficients[j].expand(config.num_coefficient_sets, -1)
        elif replace_form:
            mixing = torch.eye(len(template_norms), dtype=torch.float64)
            alpha = entry.coefficients[j]
            initial = alpha if alpha.shape[0] == config.num_coefficient_sets else alpha.mean(0).expand(
                config.num_coefficient_sets, -1
            )
        else:
            mixing = torch.diag(coefficient_unit(norm, config, len(template_norms)) / template_norms)
        owner = _owner(unit, j, config, shared)
        for r, (_, member) in enumerate(unit):
            member.attach_group(adapter_name, roles[r], mixing, initial=initial, replace=replace_form)
            if member is not owner:
                member.tie_coefficients(adapter_name, owner)


def attach_channels(layers: dict[str, RecastLayer], adapter_name: str, channels: dict[str, list[int]]) -> None:
    """Give the rows of ``channels`` coefficients of their own (:meth:`RecastLayer.add_channels`; ``layers``: the
    adapter's RECAST layers by key); a key that names no module of the adapter, or a row past a module's output rows,
    raises ``ValueError`` before any layer changes."""
    unknown = sorted(set(channels) - set(layers))
    if unknown:
        raise ValueError(
            f"`channels` names module(s) that the RECAST adapter '{adapter_name}' does not adapt, e.g. "
            f"{unknown[:3]}; use the keys of its modules (peft_recast.rank_channels returns them), e.g. "
            f"{sorted(layers)[:2]}."
        )
    for key, rows in channels.items():
        too_far = [row for row in rows if row >= layers[key].out_features]
        if too_far:
            raise ValueError(f"`channels` lists row(s) {too_far[:5]} of '{key}', which has {layers[key].out_features} "
                             "output rows; row indices run from 0 to out_features - 1.")
    for key, rows in channels.items():
        layers[key].add_channels(adapter_name, rows)
