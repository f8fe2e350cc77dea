"""Which modules share a template group: roles, layer indices, groups of consecutive layers and fused modules.

A module key such as ``encoder.layer.3.attention.self.query`` has a *role* (the key with its layer index written
``{}``: ``encoder.layer.{}.attention.self.query``) and a *layer index* (3). Modules of one role and one weight shape
are cut, in layer order, into groups of ``layers_per_group`` consecutive layers (or ``num_groups`` near-equal groups);
each group gets its own templates (:mod:`peft_recast.mimicry`).
"""

from __future__ import annotations

import re
import warnings
from collections import defaultdict
from typing import Optional, Union

import torch
from torch import nn

from .config import RecastConfig, config_list
from .layer import RecastLayer

_LAYER_INDEX = re.compile(r"(?<=\.)\d+(?=\.|$)|^\d+(?=\.)")


class RecastGroup:
    """The modules whose templates are built from one another's pretrained weights (one per adapter and group).

    A plain object, not an ``nn.Module``: it holds references to its member layers without adding entries to the
    model's ``state_dict`` or module tree.
    """

    def __init__(self, name: str, members: list[RecastLayer]) -> None:
        self.name = name
        self.members = members
        self.fitted = self.weights_state()  # the weights the group's templates were fitted to

    def weights_state(self) -> tuple:
        """The members' pretrained weights by storage and version counter: it changes when any of them does."""
        return tuple(member.weight_state() for member in self.members)

    def basis(self) -> list[torch.Tensor]:
        """The members' pretrained weights ``W_1..W_m`` (untouched by any merge), which span the templates."""
        return [member.pristine_weight() for member in self.members]

    def __repr__(self) -> str:
        return f"RecastGroup({self.name!r}, {len(self.members)} modules)"


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


def split_layers(items: list, config: RecastConfig) -> list[list]:
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
        role, index = role_and_index(key, config.layers_pattern)
        if index is None:
            role, index = key.replace("{", "{{").replace("}", "}}"), 0
        elif config.share_across_module_types:
            role = role[: role.index("{}") + 2] + ".*"  # every module type of the layer, by shape
        by_role[(role, layer.weight_shape())].append((index, key, layer))
    shapes_per_role = defaultdict(int)
    for role, _ in by_role:
        shapes_per_role[role] += 1
    groups = []
    for (role, shape), items in by_role.items():
        items.sort(key=lambda item: item[:2])
        for chunk in split_layers(sorted({index for index, _, _ in items}), config):
            first, last = chunk[0], chunk[-1]
            name = role.format(f"{first}-{last}" if first != last else f"{first}")
            if shapes_per_role[role] > 1:
                name += "[" + "x".join(map(str, shape)) + "]"
            groups.append((name, [layer for index, _, layer in items if first <= index <= last]))
    return groups


def adapter_layers(model: nn.Module, adapter_name: str, members: bool = False) -> dict[str, RecastLayer]:
    """The RECAST layers of ``model`` that hold coefficients of ``adapter_name``, by module key; ``members=True``: also
    those in its template groups without coefficients (``config.inactive_modules``)."""
    return {
        key: module
        for key, module in model.named_modules()
        if isinstance(module, RecastLayer) and (
            adapter_name in module.recast_coefficients or (members and adapter_name in module.recast_group))
    }


def peft_adapter_layers(model: nn.Module, adapter_name: Optional[str] = None) -> tuple[str, dict[str, RecastLayer]]:
    """``adapter_name`` (default: the active adapter) of a PEFT model and its RECAST layers by key (as in the base
    model's ``named_modules()``); an adapter the model does not have raises ``ValueError``."""
    name, configs = adapter_name or getattr(model, "active_adapter", None), getattr(model, "peft_config", {})
    if name not in configs:
        raise ValueError(f"Adapter {name!r} does not exist; this model has {sorted(configs)}.")
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return name, adapter_layers(base, name)


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


def flat_cat(weights: list[torch.Tensor]) -> torch.Tensor:
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
