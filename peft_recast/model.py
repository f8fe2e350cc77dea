"""The RECAST tuner: injection, template groups and their Neural Mimicry, mixed-task batches, reporting."""

from __future__ import annotations

import math
import re
import warnings
from collections import defaultdict
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import partial
from typing import Any, Iterator, Optional, Union

import safetensors.torch
import torch
from peft.tuners.tuners_utils import BaseTuner, BaseTunerLayer, check_target_module_exists
from peft.utils import (
    TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING,
    AuxiliaryTrainingWrapper,
    get_peft_model_state_dict,
)
from peft.utils.other import _get_submodules
from torch import nn
from tqdm.auto import tqdm
from transformers.pytorch_utils import Conv1D

from .bank import BankGroup, TemplateBank, load_template_bank
from .config import RecastConfig, preset_fields
from .layer import Conv2d, Linear, RecastGroup, RecastLayer
from .mimicry import GroupFit, fingerprint_mismatch, fit_group, reconstruction_error

# Show a progress bar for mimicry once the targeted weights exceed this many elements (~a 100M-parameter model).
PROGRESS_MIN_NUMEL = 100_000_000
# Default target modules per transformers model type: LoRA's attention query/value choice, plus ViT (module names
# of transformers 5).
TRANSFORMERS_MODELS_TO_RECAST_TARGET_MODULES_MAPPING = {
    **TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING,
    "vit": ["q_proj", "v_proj"],
}
_LAYER_INDEX = re.compile(r"(?<=\.)\d+(?=\.|$)|^\d+(?=\.)")


def _adapter_names_pre_forward_hook(module: nn.Module, args: tuple, kwargs: dict, adapter_names: list[str]):
    kwargs["adapter_names"] = adapter_names
    return args, kwargs


def _role_and_index(key: str, layers_pattern: Optional[Union[str, list[str]]] = None) -> tuple[str, Optional[int]]:
    """Split a module key at its first numeric component: ``"enc.layer.3.q"`` -> ``("enc.layer.{}.q", 3)``; with
    ``layers_pattern`` at the component after it (``"stages.1.layers.3.conv"``, ``"layers"`` -> index 3)."""
    patterns = [layers_pattern] if isinstance(layers_pattern, str) else list(layers_pattern or [])
    for pattern in patterns:
        found = re.search(rf"(?:^|\.)(?:{pattern})\.(\d+)(?=\.|$)", key)
        if found is not None:
            return key[: found.start(1)] + "{}" + key[found.end(1) :], int(found.group(1))
    match = _LAYER_INDEX.search(key)
    if match is None:
        return key, None
    return key[: match.start()] + "{}" + key[match.end() :], int(match.group())


def _split(items: list, config: RecastConfig) -> list[list]:
    """Contiguous chunks of ``items`` (layer indices): of ``config.group_size``, or ``config.num_groups`` near-equal
    ones."""
    if config.num_groups is None:
        size = config.group_size
        return [items[start : start + size] for start in range(0, len(items), size)]
    count = min(config.num_groups, len(items))
    base, extra = divmod(len(items), count)
    chunks, start = [], 0
    for i in range(count):
        stop = start + base + (1 if i < extra else 0)
        chunks.append(items[start:stop])
        start = stop
    return chunks


def _coefficient_unit(norm: float, config: RecastConfig, num_templates: int) -> float:
    """What a unit coefficient moves a layer by along one unit template: ``s ||W||_F / sqrt(n)``, so that moving all
    ``n`` coefficients by ``c`` moves the weight by ``c s ||W||_F`` whatever ``n`` is (AdamW moves every coefficient by
    about the learning rate per step, so the best learning rate does not depend on the number of templates)."""
    return norm * config.coefficient_scale / math.sqrt(num_templates)


def plan_groups(layers: dict[str, RecastLayer], config: RecastConfig) -> list[tuple[str, list[RecastLayer]]]:
    """Group target modules into template banks.

    Modules share a bank when they have the same role (their key up to the layer index, e.g.
    ``encoder.layer.{}.attention.self.query``; with ``share_across_module_types`` every module of the layer list,
    ``encoder.layer.{}.*``) and the same weight shape; each role's layers, in order, are cut into contiguous groups of
    layers. Modules without a layer index form a group of their own.

    Returns:
        ``(name, members)`` pairs, e.g. ``("encoder.layer.0-1.attention.self.query", [layer0, layer1])``.
    """
    by_role: dict[tuple[str, tuple[int, ...]], list[tuple[int, str, RecastLayer]]] = defaultdict(list)
    for key, layer in layers.items():
        role, index = _role_and_index(key, config.layers_pattern)
        if index is None:
            role, index = key.replace("{", "{{").replace("}", "}}"), 0
        elif config.share_across_module_types:
            role = role[: role.index("{}") + 2] + ".*"  # every module type of the layer, by shape
        by_role[(role, tuple(layer.get_base_layer().weight.shape))].append((index, key, layer))
    shapes_per_role = defaultdict(int)
    for role, _ in by_role:
        shapes_per_role[role] += 1
    groups = []
    for (role, shape), items in by_role.items():
        items.sort(key=lambda item: item[:2])
        for chunk in _split(sorted({index for index, _, _ in items}), config):
            first, last = chunk[0], chunk[-1]
            name = role.format(f"{first}-{last}" if first != last else f"{first}")
            if shapes_per_role[role] > 1:
                name += "[" + "x".join(map(str, shape)) + "]"
            groups.append((name, [layer for index, _, layer in items if first <= index <= last]))
    return groups


def adapter_layers(model: nn.Module, adapter_name: str) -> dict[str, RecastLayer]:
    """The RECAST layers of ``model`` that hold ``adapter_name``, by module key."""
    return {
        key: module
        for key, module in model.named_modules()
        if isinstance(module, RecastLayer) and adapter_name in module.recast_coefficients
    }


def _layer_index(key: str, layers_pattern: Optional[Union[str, list[str]]]) -> Optional[int]:
    """The layer index that PEFT's ``layers_to_transform`` filter reads from a module key.

    Without ``layers_pattern``: the first all-digit component that has at least two components before it and one
    after it (``model.layers.3.mlp`` -> 3). With it: the first all-digit component right after a component matching
    one of the patterns (``h.3.attn`` with ``"h"`` -> 3).
    """
    patterns = [layers_pattern] if isinstance(layers_pattern, str) else list(layers_pattern or [])
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


def layers_to_transform_problem(
    model: nn.Module, config: RecastConfig, layers: dict[str, RecastLayer]
) -> Optional[str]:
    """Say which ``layers_to_transform`` indices adapted no module (out of range, or no target in them), or
    return ``None``."""
    requested = config.layers_to_transform
    if requested is None:
        return None
    requested = [requested] if isinstance(requested, int) else list(requested)
    if not requested:
        return None
    adapted = {_layer_index(key, config.layers_pattern) for key in layers}
    missing = sorted(set(requested) - adapted)
    if not missing:
        return None
    indices = (_layer_index(key, config.layers_pattern) for key, _ in model.named_modules())
    present = sorted({index for index in indices if index is not None})
    where = f"layers {present[0]} to {present[-1]}" if present else "no numbered layers"
    pattern = f" under `layers_pattern`={config.layers_pattern!r}" if config.layers_pattern else ""
    return (
        f"`layers_to_transform` asks for layer(s) {missing}, but no module of those layers matches `target_modules` "
        f"({config.target_modules if isinstance(config.target_modules, str) else sorted(config.target_modules)}). "
        f"This model has {where}{pattern}. Use indices of layers that hold "
        "target modules (counted from 0), or drop the others from `layers_to_transform`."
    )


def coefficient_problem(
    layers: dict[str, RecastLayer], adapter_name: str, state_dict: dict[str, torch.Tensor]
) -> Optional[str]:
    """Check the ``recast_coefficients`` of a checkpoint (keys already mapped to the model's) against the RECAST
    layers of ``adapter_name``; describe the first problem found, or return ``None``."""
    suffix = f".recast_coefficients.{adapter_name}"
    expected = {key + suffix: layer.recast_coefficients[adapter_name] for key, layer in layers.items()}
    loaded = {key: value for key, value in state_dict.items() if ".recast_coefficients" in key}
    pair = "adapter_model.safetensors and adapter_config.json do not belong together (or one was edited)"
    unexpected = sorted(set(loaded) - set(expected))
    if unexpected:
        return (
            f"the checkpoint holds coefficients for {len(unexpected)} module(s) that the adapter's config does not "
            f"target, e.g. {unexpected[:3]}: {pair}. Load the adapter_config.json saved with these coefficients."
        )
    missing = sorted(set(expected) - set(loaded))
    if missing:
        return (
            f"the checkpoint lacks the coefficients of {len(missing)} targeted module(s), e.g. {missing[:3]}: the file "
            f"is incomplete or {pair}. Save the adapter again with save_pretrained, or restore the file."
        )
    for key in sorted(loaded):
        value, target = loaded[key], expected[key]
        if not value.is_floating_point():
            return (
                f"the coefficients '{key}' are {value.dtype}, not floating point: the file was not written by RECAST."
            )
        if tuple(value.shape) != tuple(target.shape):
            return (
                f"the coefficients '{key}' have shape {tuple(value.shape)} in the checkpoint but {tuple(target.shape)} "
                "(num_coefficient_sets x templates of its group) under the adapter's config: "
                f"{pair}. Load the adapter_config.json saved with these coefficients."
            )
        if value.device.type != "meta" and not torch.isfinite(value).all():
            bad = int((~torch.isfinite(value)).sum())
            return (
                f"the coefficients '{key}' hold {bad} NaN or infinite value(s): the file is damaged or the training "
                "that wrote it diverged. Restore the file from a good checkpoint, or retrain with a lower learning "
                "rate."
            )
    return None


def _warn_if_templates_exceed_groups(
    adapter_name: str, config: RecastConfig, groups: list[tuple[str, list[RecastLayer]]]
) -> None:
    """Warn when ``num_templates`` is larger than every group: a group of ``m`` modules spans ``m`` templates.
    Presets are exempt: the paper's conv variant asks for as many templates as each group holds."""
    largest = max((len(members) for _, members in groups), default=0)
    if groups and config.num_templates > largest and getattr(config, "preset", None) is None:
        plural = "s" if largest > 1 else ""
        warnings.warn(
            f"`num_templates`={config.num_templates} is larger than every template group of adapter "
            f"'{adapter_name}' (the largest has {largest} module{plural}), and a group of m modules spans at most m "
            f"templates, so each group uses at most {largest}. Lower `num_templates`, or put more layers in a "
            "group (`layers_per_group`, `num_groups`).",
            UserWarning,
        )


def _flat_cat(weights: list[torch.Tensor]) -> torch.Tensor:
    """One fused weight: the members' weights flattened and concatenated, ``(sum numel,)``."""
    return torch.cat([weight.detach().reshape(-1) for weight in weights])


def fuse_groups(
    groups: list[tuple[str, list[RecastLayer]]], layers: dict[str, RecastLayer], config: RecastConfig
) -> list[tuple[str, list[list[tuple[str, RecastLayer]]]]]:
    """Turn groups into groups of *units*: a unit is one module, or (``config.fused_modules``) the modules of one
    layer that act as one weight, e.g. ``query``/``key``/``value`` as the paper's ``qkv``; the groups of the fused
    roles (same layers) merge into one named ``...query+key+value``. ``layers``: the groups' modules by key.
    """
    keys = {id(layer): key for key, layer in layers.items()}
    fused = list(config.fused_modules or [])
    units: dict[str, dict[str, list[RecastLayer]]] = {}
    for name, members in groups:
        role = next((f for f in fused if name == f or name.endswith("." + f)), None)
        if role is None:
            units[name] = {"": members}
            continue
        units.setdefault(name[: len(name) - len(role)] + "+".join(fused), {})[role] = members
    result = []
    for name, by_role in units.items():
        ordered = [by_role[role] for role in ([""] if "" in by_role else [f for f in fused if f in by_role])]
        if len({len(members) for members in ordered}) != 1:
            raise ValueError(
                f"`fused_modules` {fused} fuse modules of one layer, but group '{name}' has "
                f"{[len(m) for m in ordered]} modules per role: target the same layers for every fused name."
            )
        result.append((name, [[(keys[id(layer)], layer) for layer in unit] for unit in zip(*ordered)]))
    return result


class RecastModel(BaseTuner):
    """Creates a RECAST model from a pretrained transformers model (use ``peft.get_peft_model``).

    Every adapter (task) gets ``K x n`` coefficients per target module; templates are rebuilt from the base weights
    by closed-form Neural Mimicry whenever an adapter is injected (see :mod:`peft_recast.mimicry`), so adapter files
    hold coefficients only.
    """

    prefix: str = "recast_"
    tuner_layer_cls = RecastLayer
    target_module_mapping = TRANSFORMERS_MODELS_TO_RECAST_TARGET_MODULES_MAPPING

    def _create_and_replace(
        self,
        recast_config: RecastConfig,
        adapter_name: str,
        target: nn.Module,
        target_name: str,
        parent: nn.Module,
        current_key: str,
        **optional_kwargs: Any,
    ) -> None:
        if isinstance(target, RecastLayer):
            target.update_layer(adapter_name, recast_config)
            return
        new_module = self._create_new_module(recast_config, adapter_name, target)
        if adapter_name not in self.active_adapters:
            # adding an additional adapter: it is not automatically trainable
            new_module.requires_grad_(False)
        self._replace_module(parent, target_name, new_module, target)

    @staticmethod
    def _create_new_module(recast_config: RecastConfig, adapter_name: str, target: nn.Module) -> Linear:
        base_layer = target.get_base_layer() if isinstance(target, BaseTunerLayer) else target
        if isinstance(base_layer, Conv1D):
            if not recast_config.fan_in_fan_out:
                warnings.warn("fan_in_fan_out is set to False but the target module is `Conv1D`. Using True for it.")
            return Linear(target, adapter_name, recast_config, fan_in_fan_out=True)
        if type(base_layer) is nn.Conv2d:
            return Conv2d(target, adapter_name, recast_config)
        if type(base_layer) is nn.Linear:
            if recast_config.fan_in_fan_out:
                warnings.warn(
                    "fan_in_fan_out is set to True but the target module is `torch.nn.Linear`. Using False for it."
                )
            return Linear(target, adapter_name, recast_config, fan_in_fan_out=False)
        raise TypeError(
            f"Target module {target} is not supported. RECAST supports `torch.nn.Linear`, `torch.nn.Conv2d` and "
            "`transformers.pytorch_utils.Conv1D`; remove this module from `target_modules`."
        )

    def inject_adapter(
        self,
        model: nn.Module,
        adapter_name: str,
        autocast_adapter_dtype: bool = True,
        low_cpu_mem_usage: bool = False,
        state_dict: Optional[dict[str, torch.Tensor]] = None,
    ) -> None:
        """PEFT's injection, then Neural Mimicry over the groups of the new adapter's modules."""
        super().inject_adapter(
            model,
            adapter_name,
            autocast_adapter_dtype=autocast_adapter_dtype,
            low_cpu_mem_usage=low_cpu_mem_usage,
            state_dict=state_dict,
        )
        self._fit_templates(model, adapter_name)

    def _fit_templates(self, model: nn.Module, adapter_name: str) -> None:
        config = self.peft_config[adapter_name]
        layers = adapter_layers(model, adapter_name)
        problem = layers_to_transform_problem(model, config, layers)
        if problem is not None:
            self._remove_adapter_layers(model, adapter_name, layers)
            raise ValueError(problem)
        groups = plan_groups(layers, config)
        _warn_if_templates_exceed_groups(adapter_name, config, groups)
        numel = sum(layer.get_base_layer().weight.numel() for layer in layers.values())
        try:
            units_per_group = fuse_groups(groups, layers, config)
            bank = load_template_bank(config.template_bank) if config.template_bank is not None else None
        except ValueError:
            self._remove_adapter_layers(model, adapter_name, layers)
            raise
        fingerprint = {}
        for name, units in tqdm(
            units_per_group, desc="RECAST mimicry", unit="group", disable=numel < PROGRESS_MIN_NUMEL
        ):
            weights = [[member.pristine_weight() for _, member in unit] for unit in units]
            if any(weight.device.type == "meta" for unit in weights for weight in unit):
                raise ValueError(
                    f"The base weights of '{name}' are on the meta device. RECAST builds its templates from the "
                    "pretrained weights, so load the base model with real weights before adding a RECAST adapter."
                )
            fit = fit_group(
                [unit[0] if len(unit) == 1 else _flat_cat(unit) for unit in weights], config.num_templates
            )
            fingerprint[name] = fit.fingerprint()
            try:
                self._attach_units(adapter_name, config, name, units, fit, bank)
            except ValueError:
                self._remove_adapter_layers(model, adapter_name, layers)
                raise
        if config.base_fingerprint is not None:
            problem = fingerprint_mismatch(config.base_fingerprint, fingerprint)
            if problem is not None:
                self._remove_adapter_layers(model, adapter_name, layers)
                raise ValueError(
                    f"The RECAST adapter '{adapter_name}' does not belong to this base model: {problem}. Its "
                    "coefficients only have a meaning with the templates of the model it was trained on (or a "
                    "model that was merged or modified since). Load it onto that base model "
                    f"(base_model_name_or_path={config.base_model_name_or_path!r}); to start a new adapter on "
                    "this model, use a RecastConfig whose base_fingerprint is None."
                )
        config.base_fingerprint = fingerprint

    @staticmethod
    def _attach_units(
        adapter_name: str,
        config: RecastConfig,
        name: str,
        units: list[list[tuple[str, RecastLayer]]],
        fit: GroupFit,
        bank: Optional[TemplateBank],
    ) -> None:
        """Give every module of one group its basis ``B``, mixing ``R`` and (replacement form) ``alpha_0``.

        With ``u_l`` = :func:`_coefficient_unit` (``s ||W_l||_F / sqrt(n)``). Closed form: ``B`` = the members'
        pretrained weights, ``R_l = u_l M`` (residual) or ``M`` with ``alpha_0 = C_l = M^T[l] s^2`` (replace). Bank:
        ``B`` = the stored templates, ``R_l = diag(u_l / ||T_k||)`` (residual: coefficients on the closed form's
        scale) or ``I`` with the bank's ``alpha_0`` (replace). ``W_l`` of fused units is the concatenation of its roles' weights; the
        roles after the first share the first one's coefficient tensor.
        """
        replace_form = config.weight_form == "replace"
        if bank is None:
            roles = [RecastGroup(name, [unit[r][1] for unit in units]) for r in range(len(units[0]))]
            coefficients = fit.mixing.T * fit.singular_values[: fit.num_templates] ** 2  # C = U_n diag(s_n), (m x n)
        else:
            keys = [[key for key, _ in unit] for unit in units]
            entry = bank.check(name, keys, fit.fingerprint(), config.num_templates)
            stacked = torch.stack(
                [_flat_cat([layer.pristine_weight() for _, layer in unit]).float().cpu() for unit in units]
            )
            error = ((entry.reconstruction() - stacked).norm() / stacked.norm()).item()
            templates, offset, roles = entry.templates, 0, []
            for r in range(len(units[0])):
                shape = tuple(units[0][r][1].pristine_weight().shape)
                size = math.prod(shape)
                piece = templates[:, offset : offset + size].reshape(templates.shape[0], *shape)
                roles.append(BankGroup(name, [unit[r][1] for unit in units], piece, relative_error=error))
                offset += size
            template_norms = templates.double().norm(dim=1)
        for j, unit in enumerate(units):
            norm = fit.member_norms[j]
            initial = None
            if bank is None:
                mixing = fit.mixing if replace_form else fit.mixing * _coefficient_unit(norm, config, len(fit.mixing))
                if replace_form:
                    initial = coefficients[j].expand(config.num_coefficient_sets, -1)
            elif replace_form:
                mixing = torch.eye(len(template_norms), dtype=torch.float64)
                alpha = entry.coefficients[j]
                initial = alpha if alpha.shape[0] == config.num_coefficient_sets else alpha.mean(0).expand(
                    config.num_coefficient_sets, -1
                )
            else:
                mixing = torch.diag(_coefficient_unit(norm, config, len(template_norms)) / template_norms)
            owner = unit[0][1]
            for r, (_, member) in enumerate(unit):
                member.attach_group(adapter_name, roles[r], mixing, initial=initial, replace=replace_form)
                if r > 0:
                    member.tie_coefficients(adapter_name, owner)

    def plan_units(
        self, model: nn.Module, adapter_name: str
    ) -> list[tuple[str, list[list[tuple[str, RecastLayer]]]]]:
        """The template groups of ``adapter_name``: per group its units (one ``(key, layer)`` per fused role)."""
        layers, config = adapter_layers(model, adapter_name), self.peft_config[adapter_name]
        return fuse_groups(plan_groups(layers, config), layers, config)

    @staticmethod
    def _check_target_module_exists(peft_config: RecastConfig, key: str) -> Union[bool, re.Match, None]:
        """PEFT's matching, plus ``layers_to_transform`` for a regex ``target_modules`` (PEFT applies it to lists of
        names only, so a regex would silently adapt every layer)."""
        found = check_target_module_exists(peft_config, key)
        wanted = peft_config.layers_to_transform
        if found and isinstance(peft_config.target_modules, str) and wanted not in (None, []):
            wanted = [wanted] if isinstance(wanted, int) else wanted
            return _layer_index(key, peft_config.layers_pattern) in wanted
        return found

    def _prepare_adapter_config(self, peft_config: RecastConfig, model_config: dict) -> RecastConfig:
        """Resolve a preset's target (and fused) modules for this model type, then PEFT's defaults."""
        if getattr(peft_config, "preset", None) is not None and peft_config.target_modules is None:
            for name, value in preset_fields(peft_config.preset, model_config).items():
                if name == "target_modules" or getattr(peft_config, name) is None:
                    setattr(peft_config, name, value)
        return super()._prepare_adapter_config(peft_config, model_config)

    @staticmethod
    def _remove_adapter_layers(model: nn.Module, adapter_name: str, layers: dict[str, RecastLayer]) -> None:
        """Undo a failed injection: drop the adapter and unwrap layers left without any adapter."""
        for key, layer in layers.items():
            layer.delete_adapter(adapter_name)
            if not layer.recast_coefficients:
                parent, _, target_name = _get_submodules(model, key)
                setattr(parent, target_name, layer.get_base_layer())

    def merge_adapter(self, adapter_names: Optional[list[str]] = None, safe_merge: bool = False) -> None:
        """PEFT's ``merge_adapter``; with ``safe_merge`` every layer's coefficients are checked before any is
        merged, so a broken adapter raises without leaving some layers merged."""
        if safe_merge:
            self._check_finite_coefficients(adapter_names)
        super().merge_adapter(adapter_names=adapter_names, safe_merge=safe_merge)

    def _unload_and_optionally_merge(
        self,
        merge: bool = True,
        progressbar: bool = False,
        safe_merge: bool = False,
        adapter_names: Optional[list[str]] = None,
    ) -> nn.Module:
        if merge and safe_merge:  # before PEFT starts merging *and unwrapping* layers one by one
            self._check_finite_coefficients(adapter_names)
        return super()._unload_and_optionally_merge(
            merge=merge, progressbar=progressbar, safe_merge=safe_merge, adapter_names=adapter_names
        )

    def _check_finite_coefficients(self, adapter_names: Optional[list[str]]) -> None:
        """Raise PEFT's ``safe_merge`` error if any coefficient of the adapters to merge is NaN or infinite."""
        names = self.active_adapters if adapter_names is None else adapter_names
        for key, module in self.model.named_modules():
            if not isinstance(module, RecastLayer):
                continue
            for name in names:
                if name in module.recast_coefficients and not torch.isfinite(module.recast_coefficients[name]).all():
                    raise ValueError(
                        f"NaNs detected in the merged weights. The adapter {name} seems to be broken: its "
                        f"coefficients in '{key}' are NaN or infinite. Nothing was merged."
                    )

    @classmethod
    def _remap_adapter_state_dict_for_load(
        cls, model: nn.Module, config: RecastConfig, adapter_name: str, state_dict: dict[str, torch.Tensor]
    ) -> dict[str, torch.Tensor]:
        """PEFT's key remapping, then a check of the coefficients before they are loaded: a missing, unexpected,
        misshapen, non-float or non-finite coefficient tensor raises ``ValueError`` and removes the adapter again."""
        state_dict = super()._remap_adapter_state_dict_for_load(model, config, adapter_name, state_dict)
        layers = adapter_layers(model, adapter_name)
        problem = coefficient_problem(layers, adapter_name, state_dict)
        if problem is not None:
            cls._remove_adapter_layers(model, adapter_name, layers)
            peft_config = getattr(model, "peft_config", None)
            if isinstance(peft_config, dict):
                peft_config.pop(adapter_name, None)
            raise ValueError(
                f"Cannot load the RECAST adapter '{adapter_name}': {problem} The adapter was removed again."
            )
        return state_dict

    @contextmanager
    def _enable_peft_forward_hooks(self, *args: Any, **kwargs: Any) -> Iterator[None]:
        """Route ``adapter_names`` (one per sample, ``"__base__"`` for none) to every RECAST layer and to the
        ``modules_to_save`` / trainable-token wrappers; repeat them per beam for beam search (encoder excepted)."""
        adapter_names = kwargs.pop("adapter_names", None)
        if adapter_names is None:
            yield
            return
        if self.training:
            raise ValueError("Cannot pass `adapter_names` when the model is in training mode.")
        layers = [module for module in self.modules() if isinstance(module, RecastLayer)]
        known = set().union(*(layer.recast_coefficients.keys() for layer in layers))
        unknown = {name for name in adapter_names if name != "__base__"} - known
        if unknown:
            raise ValueError(f"Trying to infer with non-existing adapter(s): {', '.join(sorted(unknown))}")
        original_adapter_names = list(adapter_names)
        num_beams = kwargs.get("num_beams", None)
        uses_beam_search = isinstance(num_beams, int) and num_beams > 1
        if uses_beam_search:
            # generate() repeats every input num_beams times (the encoder of an encoder-decoder model excepted)
            adapter_names = [name for name in adapter_names for _ in range(num_beams)]
        wrapped = (RecastLayer, AuxiliaryTrainingWrapper)  # + modules_to_save / trainable tokens
        handles = []
        for module in self.modules():
            if isinstance(module, wrapped):
                hook = partial(_adapter_names_pre_forward_hook, adapter_names=adapter_names)
                handles.append(module.register_forward_pre_hook(hook, with_kwargs=True))
        encoder = _get_encoder(self.model)
        if uses_beam_search and encoder is not None:
            for module in encoder.modules():
                if isinstance(module, wrapped):
                    hook = partial(_adapter_names_pre_forward_hook, adapter_names=original_adapter_names)
                    handles.append(module.register_forward_pre_hook(hook, with_kwargs=True))
        try:
            yield
        finally:
            for handle in handles:
                handle.remove()


def _get_encoder(model: nn.Module) -> Optional[nn.Module]:
    """The encoder of an encoder-decoder model, else ``None`` (transformers 5 returns the model itself)."""
    if not hasattr(model, "get_encoder"):
        return None
    encoder = model.get_encoder()
    return None if encoder is model else encoder


@dataclass
class GroupReport:
    """One template group: its modules, templates and how well the templates reproduce the pretrained weights."""

    name: str
    modules: int
    shape: tuple[int, ...]
    templates: int
    coefficients: int
    relative_error: float


@dataclass
class RecastSummary:
    """What one RECAST adapter costs: coefficients, bytes on disk and per-group mimicry error."""

    adapter_name: str
    coefficients: int
    other_trainable: int
    coefficient_bytes: int
    adapter_bytes: int
    groups: list[GroupReport] = field(default_factory=list)

    def __str__(self) -> str:
        lines = [
            f"RECAST adapter '{self.adapter_name}': {self.coefficients} coefficients in {len(self.groups)} groups, "
            f"{self.other_trainable} other saved parameters (heads, biases)",
            f"adapter file: {self.adapter_bytes} bytes ({self.coefficient_bytes} bytes for the coefficients alone)",
            f"{'group':<56} {'modules':>7} {'shape':>11} {'templates':>9} {'coef':>5} {'rel. error':>10}",
        ]
        for group in self.groups:
            shape = "x".join(map(str, group.shape))
            lines.append(
                f"{group.name:<56} {group.modules:>7} {shape:>11} {group.templates:>9} {group.coefficients:>5} "
                f"{group.relative_error:>10.2e}"
            )
        return "\n".join(lines)


def _safetensors_bytes(state_dict: dict[str, torch.Tensor]) -> int:
    tensors = {key: value.detach().cpu().contiguous().clone() for key, value in state_dict.items()}
    return len(safetensors.torch.save(tensors, metadata={"format": "pt"}))


def recast_summary(model: nn.Module, adapter_name: str = "default") -> RecastSummary:
    """Count the coefficients of ``adapter_name`` on a ``PeftModel`` and measure its ``adapter_model.safetensors``.

    ``adapter_bytes`` is the size ``save_pretrained`` writes (with heads and other ``modules_to_save``);
    ``coefficient_bytes`` the size of a file holding the RECAST coefficients alone.
    """
    config = model.peft_config[adapter_name]
    if not isinstance(config, RecastConfig):
        raise TypeError(f"Adapter '{adapter_name}' is a {type(config).__name__}, not a RecastConfig.")
    state_dict = get_peft_model_state_dict(model, adapter_name=adapter_name, save_embedding_layers=False)
    coefficient_state = {key: value for key, value in state_dict.items() if "recast_coefficients" in key}
    # one report per group name (the roles of fused modules share it); coefficient tensors shared by fused roles count
    # once (the file stores them under every role's key)
    groups: dict[str, RecastGroup] = {}
    owned: dict[str, int] = defaultdict(int)
    for module in model.modules():
        if isinstance(module, RecastLayer) and adapter_name in module.recast_group:
            group = module.recast_group[adapter_name]
            groups.setdefault(group.name, group)
            if adapter_name not in module.recast_tie:
                owned[group.name] += module.recast_coefficients[adapter_name].numel()
    reports = []
    for group in groups.values():
        first = group.members[0]
        templates = first.recast_coefficients[adapter_name].shape[1]
        reports.append(
            GroupReport(
                name=group.name,
                modules=len(group.members),
                shape=tuple(first.get_base_layer().weight.shape),
                templates=templates,
                coefficients=owned[group.name],
                relative_error=group.relative_error
                if isinstance(group, BankGroup)
                else reconstruction_error(config.base_fingerprint[group.name], templates),
            )
        )
    stored = sum(value.numel() for value in coefficient_state.values())
    return RecastSummary(
        adapter_name=adapter_name,
        coefficients=sum(owned.values()),
        other_trainable=sum(value.numel() for value in state_dict.values()) - stored,
        coefficient_bytes=_safetensors_bytes(coefficient_state),
        adapter_bytes=_safetensors_bytes(state_dict),
        groups=reports,
    )
