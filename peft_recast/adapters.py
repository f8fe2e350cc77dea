"""Many adapters on one model: weighted combinations, swapping an adapter's coefficients in place, bulk loading.

Adapters made with one grouping on one base model share every layer's basis ``W_1..W_m`` and mixing ``R``, and the
update of a residual adapter is linear in its coefficients, ``delta_W(theta) = sum_j (mean_K(theta) @ R)_j W_j``. So

    delta_W(sum_i w_i mean_K(theta_i)) = sum_i w_i delta_W(theta_i)        exactly, for any weights w_i,

and a combination of adapters is one more adapter of the same size (:func:`add_weighted_adapter`). The replacement
form (``W = sum_k theta_k T_k``) is affine, not linear, in ``theta``, so it is refused.
"""

from __future__ import annotations

import copy
import os
from typing import TYPE_CHECKING, Optional, Sequence

import torch
from peft.utils import load_peft_weights
from peft.utils.save_and_load import _insert_adapter_name_into_state_dict
from torch import nn

from .config import GROUPING_FIELDS, RecastConfig, differing_field
from .grouping import adapter_layers
from .mimicry import fingerprint_mismatch

if TYPE_CHECKING:
    from .layer import RecastLayer
    from .model import RecastModel


def coefficient_problem(
    layers: dict[str, RecastLayer], adapter_name: str, state_dict: dict[str, torch.Tensor]
) -> Optional[str]:
    """Check the ``recast_coefficients`` (and ``recast_gate_scores``) of a checkpoint (keys already mapped to the
    model's) against the RECAST layers of ``adapter_name``; describe the first problem found, or return ``None``."""
    for attribute, noun, shape in (
        ("recast_coefficients", "coefficients", "num_coefficient_sets x templates of its group"),
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
    the owner's saved entry where the file holds only the owner's (see :func:`shared_coefficient_keys`); files that
    hold every module's entry, as written before, are returned as they are."""
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


def add_weighted_adapter(
    tuner: RecastModel, adapters: Sequence[str], weights: Sequence[float], adapter_name: str
) -> None:
    """Add ``adapter_name`` whose coefficients are ``sum_i weights[i] * mean_K(theta_i)`` of ``adapters`` (every set
    of the new adapter holds that sum), so that its update is the weighted sum of their updates, exactly.

    Raises ``ValueError`` (and adds nothing) when an adapter is unknown, the name is taken, the adapters differ in
    grouping (:data:`GROUPING_FIELDS`), use the replacement form or a ``coefficient_bound``, or hold
    ``modules_to_save``.
    """
    if len(adapters) != len(weights) or not adapters:
        raise ValueError(f"Pass one weight per adapter: got {len(adapters)} adapter(s) and {len(weights)} weight(s).")
    unknown = [name for name in adapters if name not in tuner.peft_config]
    if unknown:
        raise ValueError(f"Adapter(s) {unknown} do not exist; this model has {sorted(tuner.peft_config)}.")
    if adapter_name in tuner.peft_config:
        raise ValueError(f"An adapter named '{adapter_name}' exists already; choose another `adapter_name`.")
    configs = [tuner.peft_config[name] for name in adapters]
    for name, config in zip(adapters[1:], configs[1:]):
        field = differing_field(configs[0], config)
        if field is not None:
            raise ValueError(
                f"Cannot combine RECAST adapters '{adapters[0]}' and '{name}': `{field}` is "
                f"{getattr(configs[0], field)!r} for one and {getattr(config, field)!r} for the other. Only adapters "
                "made with the same grouping on the same base model share their templates, so only they add up exactly."
            )
    if configs[0].weight_form != "residual":
        raise ValueError(
            "Cannot combine RECAST adapters in the replacement form (`weight_form='replace'`): their weight is affine, "
            "not linear, in the coefficients. Combine residual adapters."
        )
    if configs[0].coefficient_bound is not None:
        raise ValueError(
            f"Cannot combine RECAST adapters with a `coefficient_bound` ({configs[0].coefficient_bound:g}): the bound "
            "makes the update a nonlinear function (b tanh(theta / b)) of the coefficients, so sums of coefficients "
            "are not sums of updates. Combine adapters made with coefficient_bound=None."
        )
    if configs[0].module_gates:
        raise ValueError(
            "Cannot combine RECAST adapters with `module_gates`: a gate multiplies its module's update by 0 or 1, which "
            "sums of coefficients do not carry. Call peft_recast.prune_gates on each adapter first."
        )
    if any(config.modules_to_save for config in configs):
        raise ValueError(
            "Cannot combine RECAST adapters that train `modules_to_save` (e.g. a task head): those modules are not "
            "combined. Combine adapters without them."
        )
    tuner.peft_config[adapter_name] = copy.deepcopy(configs[0])
    try:
        tuner.inject_adapter(tuner.model, adapter_name)
    except BaseException:
        del tuner.peft_config[adapter_name]
        raise
    with torch.no_grad():
        for layer in adapter_layers(tuner.model, adapter_name).values():
            if adapter_name in layer.recast_tie:
                continue  # a fused member: it shares its owner's coefficient tensor
            target = layer.recast_coefficients[adapter_name]
            total = sum(w * layer.recast_coefficients[name].float().mean(0) for name, w in zip(adapters, weights))
            target.copy_(total.to(target.dtype).expand_as(target))


def _saved_state(tuner: RecastModel, model_id: str, adapter_name: str) -> tuple[dict, dict, Optional[str]]:
    """The saved tensors of ``model_id`` keyed as ``adapter_name``'s, that adapter's RECAST layers by prefixed key,
    and the first problem of the saved coefficients against those layers (``coefficient_problem``)."""

    state = _insert_adapter_name_into_state_dict(
        load_peft_weights(model_id), adapter_name=adapter_name, parameter_prefix=tuner.prefix
    )
    layers = {f"base_model.model.{key}": layer for key, layer in adapter_layers(tuner.model, adapter_name).items()}
    state = fill_shared_coefficients(layers, adapter_name, state)
    return state, layers, coefficient_problem(layers, adapter_name, state)


def _live_key(key: str, adapter_name: str, targets: dict[str, nn.Parameter]) -> str:
    """The parameter a saved key fills: itself, or for ``modules_to_save`` its copy ``.modules_to_save.<adapter>.``."""
    if key in targets:
        return key
    module, _, leaf = key.rpartition(".")
    copied = f"{module}.modules_to_save.{adapter_name}.{leaf}"
    return copied if copied in targets else key


def hotswap_adapter(model: nn.Module, model_id: str, adapter_name: str = "default", **kwargs) -> None:
    """Replace the coefficients (and ``modules_to_save`` tensors) of the loaded adapter ``adapter_name`` with those
    saved in ``model_id`` (a folder or Hub id), in place: no re-injection, no new tensors, so a compiled model keeps
    its graphs. The saved adapter must have the loaded one's grouping and base model (fingerprint); every check runs
    before anything is copied, so a refused swap leaves the model as it was.

    Example::

        model = PeftModel.from_pretrained(base, "adapters/task-a")
        hotswap_adapter(model, "adapters/task-b")  # now task b, same tensors
    """
    from peft.config import PeftConfig

    tuner = model.base_model
    if adapter_name not in tuner.peft_config:
        raise ValueError(f"No adapter '{adapter_name}' is loaded; hotswap replaces a loaded adapter's coefficients.")
    config = PeftConfig.from_pretrained(model_id, **kwargs)
    if not isinstance(config, RecastConfig):
        raise ValueError(f"{model_id} holds a {type(config).__name__} adapter, not a RECAST one.")
    loaded = tuner.peft_config[adapter_name]
    problem, field = None, differing_field(loaded, config, GROUPING_FIELDS[:-1])  # fingerprint: with its tolerance
    if field is not None:
        problem = f"`{field}` is {getattr(config, field)!r} in the file but {getattr(loaded, field)!r} in the adapter"
    if problem is None and config.base_fingerprint is not None:
        mismatch = fingerprint_mismatch(config.base_fingerprint, loaded.base_fingerprint)
        if mismatch is not None:
            problem = f"it was trained on another base model ({mismatch})"
    if problem is None and sorted(config.modules_to_save or []) != sorted(loaded.modules_to_save or []):
        problem = "its `modules_to_save` differ from the loaded adapter's"
    if problem is not None:
        raise ValueError(f"Cannot hotswap {model_id} into adapter '{adapter_name}': {problem}. Load it with "
                         "`load_adapter` as an adapter of its own instead.")
    state_dict, _, problem = _saved_state(tuner, model_id, adapter_name)
    targets = dict(model.named_parameters(remove_duplicate=False))  # shared tensors under each module's key
    state_dict = {_live_key(key, adapter_name, targets): value for key, value in state_dict.items()}
    missing = [key for key in state_dict if key not in targets]
    if problem is None and missing:
        problem = f"the file holds tensors this model does not have, e.g. {missing[:3]}"
    if problem is None:
        for key, value in state_dict.items():
            if tuple(value.shape) != tuple(targets[key].shape):
                problem = f"'{key}' has shape {tuple(value.shape)} in the file but {tuple(targets[key].shape)} here"
                break
    if problem is not None:
        raise ValueError(f"Cannot hotswap {model_id} into adapter '{adapter_name}': {problem}. Nothing was changed.")
    with torch.no_grad():
        for key, value in state_dict.items():
            targets[key].copy_(value.to(device=targets[key].device, dtype=targets[key].dtype))


def load_adapters(
    model: nn.Module, model_ids: Sequence[str], adapter_names: Optional[Sequence[str]] = None
) -> list[str]:
    """Load many saved RECAST adapters onto a ``PeftModel`` (for inference, as ``load_adapter`` with its default
    ``is_trainable=False``), in time bounded by reading their files when they share the grouping of an adapter on
    the model: each gets new coefficients beside that adapter's group and mixing, without PEFT's per-adapter pass
    over the whole model. Others go through ``model.load_adapter``.

    Args:
        model (`PeftModel`): a model holding at least one RECAST adapter.
        model_ids (`Sequence[str]`): adapter folders (or Hub ids).
        adapter_names (`Sequence[str]`, *optional*): their names; default: each folder's last component.

    Returns:
        The names loaded. A file that does not load (another base model, a damaged file, a name in use) raises
        ``ValueError`` and removes every adapter this call added, so the model is as it was.

    Example::

        names = load_adapters(model, [f"adapters/user-{i}" for i in range(1000)])
        model(**batch, adapter_names=[names[i % 1000] for i in range(len(batch["input_ids"]))])
    """
    from peft.config import PeftConfig

    names = list(adapter_names) if adapter_names is not None else [
        os.path.basename(os.path.normpath(model_id)) for model_id in model_ids
    ]
    if len(names) != len(model_ids) or len(set(names)) != len(names):
        raise ValueError("Pass one distinct adapter name per adapter folder.")
    tuner = model.base_model
    taken = [name for name in names if name in tuner.peft_config]
    if taken:
        raise ValueError(f"Adapter name(s) {taken[:3]} are in use on this model; pass other `adapter_names`.")
    added: list[str] = []
    try:
        for model_id, name in zip(model_ids, names):
            config = PeftConfig.from_pretrained(model_id)
            if not isinstance(config, RecastConfig):
                raise ValueError(f"{model_id} holds a {type(config).__name__} adapter, not a RECAST one.")
            config.inference_mode = True
            tuner.peft_config[name] = config
            if not tuner._inject_like_existing(tuner.model, name):
                del tuner.peft_config[name]
                model.load_adapter(model_id, adapter_name=name)
                added.append(name)
                continue
            added.append(name)
            state, layers, problem = _saved_state(tuner, model_id, name)
            if problem is not None:
                raise ValueError(f"Cannot load the RECAST adapter {model_id}: {problem}")
            with torch.no_grad():
                for key, value in state.items():
                    target = layers[key[: key.index(".recast_coefficients")]].recast_coefficients[name]
                    target.copy_(value.to(device=target.device, dtype=target.dtype))
    except BaseException:
        for name in added:
            model.delete_adapter(name)
        for name in names:
            if name not in added:
                tuner.peft_config.pop(name, None)
        raise
    return names
