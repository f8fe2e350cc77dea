"""Checks of a saved RECAST adapter against the layers it is loaded into, and the coefficient tensors a file holds
once for several modules.

Every coefficient tensor is ``(K, n, B)`` (sets, templates, blocks of output rows); a file that stores one block's
coefficients as ``(K, n)`` is read as ``(K, n, 1)`` (:func:`with_block_axis`).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Optional

import torch

if TYPE_CHECKING:
    from .layer import RecastLayer


def with_block_axis(
    layers: dict[str, RecastLayer], adapter_name: str, state_dict: dict[str, torch.Tensor]
) -> dict[str, torch.Tensor]:
    """``state_dict`` (keys mapped to the model's) with each ``(K, n)`` coefficient tensor of a module whose
    coefficients are ``(K, n, 1)`` given its block axis: files once stored one block's coefficients without it."""
    converted = dict(state_dict)
    for key, layer in layers.items():
        name = f"{key}.recast_coefficients.{adapter_name}"
        value, target = converted.get(name), layer.recast_coefficients.get(adapter_name)
        if value is not None and target is not None and target.shape[2] == 1 and value.shape == target.shape[:2]:
            converted[name] = value.unsqueeze(-1)
    return converted


def coefficient_problem(
    layers: dict[str, RecastLayer], adapter_name: str, state_dict: dict[str, torch.Tensor]
) -> Optional[str]:
    """Check the ``recast_coefficients`` (and ``recast_gate_scores``) of a checkpoint (keys already mapped to the
    model's) against the RECAST layers of ``adapter_name``; describe the first problem found, or return ``None``."""
    for attribute, noun, shape in (
        ("recast_coefficients", "coefficients", "num_coefficient_sets x templates of its group x blocks"),
        ("recast_gate_scores", "gate scores", "one score per gated module"),
    ):
        expected = {f"{key}.{attribute}.{adapter_name}": getattr(layer, attribute)[adapter_name]
                    for key, layer in layers.items() if adapter_name in getattr(layer, attribute)}
        loaded = {key: value for key, value in state_dict.items() if f".{attribute}" in key}
        problem = _tensors_problem(expected, loaded, noun, shape)
        if problem is not None:
            return problem
    return None


def shared_coefficient_keys(layers: dict[str, RecastLayer], adapter_name: str) -> dict[str, str]:
    """The coefficient keys of ``adapter_name``'s modules that share another module's tensor (the later roles of a
    fused weight; the later groups under ``coefficient_sharing="position"``), each mapped to its owner's key.

    A saved adapter holds each shared tensor once, under its owner's key: ``N`` shared tensors of ``K x n`` numbers
    cost ``N`` entries of the safetensors header, not one per module.
    """
    keys, suffix = {id(layer): key for key, layer in layers.items()}, f".recast_coefficients.{adapter_name}"
    shared = {}
    for key, layer in layers.items():
        owner = layer.recast_tie.get(adapter_name)
        if owner is not None and id(owner) in keys:
            shared[key + suffix] = keys[id(owner)] + suffix
    return shared


def fill_shared_coefficients(
    layers: dict[str, RecastLayer], adapter_name: str, state_dict: dict[str, torch.Tensor]
) -> dict[str, torch.Tensor]:
    """``state_dict`` (keys mapped to the model's) with each module that shares its owner's coefficient tensor given
    the owner's saved entry where the file holds only the owner's (see :func:`shared_coefficient_keys`); a file that
    holds every module's entry is returned as it is."""
    filled = dict(state_dict)
    for key, owner_key in shared_coefficient_keys(layers, adapter_name).items():
        if key not in filled and owner_key in filled:
            filled[key] = filled[owner_key]
    return filled


def _tensors_problem(
    expected: dict[str, torch.Tensor], loaded: dict[str, torch.Tensor], noun: str, shape: str
) -> Optional[str]:
    pair = "adapter_model.safetensors and adapter_config.json do not belong together (or one was edited)"
    unexpected = sorted(set(loaded) - set(expected))
    if unexpected:
        return (
            f"the checkpoint holds {noun} for {len(unexpected)} module(s) that the adapter's config does not "
            f"target, e.g. {unexpected[:3]}: {pair}. Load the adapter_config.json saved with these {noun}."
        )
    missing = sorted(set(expected) - set(loaded))
    if missing:
        return (
            f"the checkpoint lacks the {noun} of {len(missing)} targeted module(s), e.g. {missing[:3]}: the file "
            f"is incomplete or {pair}. Save the adapter again with save_pretrained, or restore the file."
        )
    for key in sorted(loaded):
        value, target = loaded[key], expected[key]
        if not value.is_floating_point():
            return f"the {noun} '{key}' are {value.dtype}, not floating point: the file was not written by RECAST."
        if tuple(value.shape) != tuple(target.shape):
            return (
                f"the {noun} '{key}' have shape {tuple(value.shape)} in the checkpoint but {tuple(target.shape)} "
                f"({shape}) under the adapter's config: "
                f"{pair}. Load the adapter_config.json saved with these {noun}."
            )
        if value.device.type != "meta" and not torch.isfinite(value).all():
            bad = int((~torch.isfinite(value)).sum())
            return (
                f"the {noun} '{key}' hold {bad} NaN or infinite value(s): the file is damaged or the training "
                "that wrote it diverged. Restore the file from a good checkpoint, or retrain with a lower learning "
                "rate."
            )
    return None
