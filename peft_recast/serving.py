"""Serving many adapters on one model: swapping an adapter's coefficients in place, saving and loading many at once.

Adapters made with one grouping on one base model share every layer's basis and mixing, so an adapter of a grouping
the model has already costs its coefficients alone (:meth:`~peft_recast.model.RecastModel.inject_like_existing`).
"""

from __future__ import annotations

import os
from typing import Any, Optional, Sequence

import torch
from peft.config import PeftConfig
from peft.utils import load_peft_weights
from peft.utils.save_and_load import _insert_adapter_name_into_state_dict
from torch import nn

from .checkpoint import coefficient_problem, fill_shared_coefficients, with_block_axis
from .config import GROUPING_FIELDS, RecastConfig, differing_field
from .layer import RecastLayer
from .mimicry import fingerprint_mismatch


def _saved_state(
    tuner: nn.Module, model_id: str, adapter_name: str, recast_layers: Optional[list[tuple[str, RecastLayer]]] = None
) -> tuple[dict, dict, Optional[str]]:
    """The saved tensors of ``model_id`` keyed as ``adapter_name``'s, that adapter's RECAST layers by prefixed key,
    and the first problem of the saved coefficients against those layers (``coefficient_problem``).
    ``recast_layers``: the model's RECAST layers by prefixed key (:func:`_recast_layers`), when the caller has them."""

    state = _insert_adapter_name_into_state_dict(
        load_peft_weights(model_id), adapter_name=adapter_name, parameter_prefix=tuner.prefix
    )
    if recast_layers is None:
        recast_layers = _recast_layers(tuner)
    layers = {key: layer for key, layer in recast_layers if adapter_name in layer.recast_coefficients}
    state = with_block_axis(layers, adapter_name, fill_shared_coefficients(layers, adapter_name, state))
    return state, layers, coefficient_problem(layers, adapter_name, state)


def _recast_layers(tuner: nn.Module) -> list[tuple[str, RecastLayer]]:
    """The RECAST layers of the tuner's model, each by its key as in a ``PeftModel``'s state dict (as
    :func:`~peft_recast.planning.adapter_layers` finds them, for every adapter at once)."""
    return [(f"base_model.model.{key}", module) for key, module in tuner.model.named_modules()
            if isinstance(module, RecastLayer)]


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

    Example:

        ```py
        >>> import tempfile, torch, peft_recast
        >>> from peft import get_peft_model
        >>> from transformers import BertConfig, BertModel

        >>> torch.manual_seed(0)  # doctest: +ELLIPSIS
        <torch._C.Generator object at ...>
        >>> base = BertModel(BertConfig(hidden_size=32, num_hidden_layers=4, num_attention_heads=4,
        ...                             intermediate_size=64))
        >>> model = get_peft_model(base, peft_recast.RecastConfig())
        >>> folder = tempfile.mkdtemp()
        >>> model.add_adapter("task_b", peft_recast.RecastConfig(init_weights=False))
        >>> model.save_pretrained(folder, selected_adapters=["task_b"])
        >>> coefficients = model.base_model.model.encoder.layer[0].attention.self.query.recast_coefficients
        >>> before = coefficients["default"]
        >>> peft_recast.hotswap_adapter(model, f"{folder}/task_b")  # "default" now holds task b's coefficients
        >>> coefficients["default"] is before, torch.equal(coefficients["default"], coefficients["task_b"])
        (True, True)

        ```
    """
    tuner = model.base_model
    if adapter_name not in tuner.peft_config:
        raise ValueError(f"No adapter '{adapter_name}' is loaded; hotswap replaces a loaded adapter's coefficients.")
    config = PeftConfig.from_pretrained(model_id, **kwargs)
    if not isinstance(config, RecastConfig):
        raise ValueError(f"{model_id} holds a {type(config).__name__} adapter, not a RECAST one.")
    loaded = tuner.peft_config[adapter_name]
    problem, field = None, differing_field(loaded, config, GROUPING_FIELDS)
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

    Example:

        ```py
        >>> import tempfile, torch, peft_recast
        >>> from peft import get_peft_model
        >>> from transformers import BertConfig, BertModel

        >>> base = BertModel(BertConfig(hidden_size=32, num_hidden_layers=4, num_attention_heads=4,
        ...                             intermediate_size=64))
        >>> model = get_peft_model(base, peft_recast.RecastConfig())
        >>> folder = tempfile.mkdtemp()
        >>> for user in range(3):
        ...     model.add_adapter(f"user-{user}", peft_recast.RecastConfig(init_weights=False))
        >>> model.save_pretrained(folder, selected_adapters=["user-0", "user-1", "user-2"])
        >>> for user in range(3):
        ...     model.delete_adapter(f"user-{user}")
        >>> peft_recast.load_adapters(model, [f"{folder}/user-{user}" for user in range(3)])
        ['user-0', 'user-1', 'user-2']
        >>> ids = torch.tensor([[1, 2, 3]] * 4)
        >>> _ = model.eval()
        >>> rows = model(input_ids=ids, adapter_names=["user-0", "user-1", "user-2", "__base__"]).last_hidden_state
        >>> rows.shape
        torch.Size([4, 3, 32])

        ```
    """
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
    recast_layers = None  # walked once: adapters added on the fast path join layers the model has already
    try:
        for model_id, name in zip(model_ids, names):
            config = PeftConfig.from_pretrained(model_id)
            if not isinstance(config, RecastConfig):
                raise ValueError(f"{model_id} holds a {type(config).__name__} adapter, not a RECAST one.")
            config.inference_mode = True
            tuner.peft_config[name] = config
            if not tuner.inject_like_existing(tuner.model, name):
                del tuner.peft_config[name]
                model.load_adapter(model_id, adapter_name=name)
                added.append(name)
                recast_layers = None  # PEFT's injection may have added layers
                continue
            added.append(name)
            if recast_layers is None:
                recast_layers = _recast_layers(tuner)
            state, layers, problem = _saved_state(tuner, model_id, name, recast_layers)
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


def _embedding_prefixes(model: nn.Module) -> tuple[str, ...]:
    """The state-dict prefixes of ``model``'s input and output embeddings (what PEFT saves with
    ``save_embedding_layers``); none for a model without transformers' embedding accessors."""
    layers = []
    for accessor in ("get_input_embeddings", "get_output_embeddings"):
        try:
            layers.append(getattr(model, accessor)())
        except (AttributeError, NotImplementedError):
            continue
    return tuple(f"{name}." for name, module in model.named_modules() if any(module is layer for layer in layers))


def save_adapters(
    model: nn.Module, save_directory: str, adapter_names: Optional[Sequence[str]] = None, **kwargs: Any
) -> list[str]:
    """Save many adapters of a ``PeftModel``: the files ``model.save_pretrained(save_directory,
    selected_adapters=adapter_names, **kwargs)`` writes (``default`` in ``save_directory``, any other adapter in
    ``save_directory/<name>``), in time that grows with the number saved.

    PEFT filters the whole state dict against the name of every other adapter for each adapter it saves, so saving
    ``A`` adapters of a model holding ``A`` costs ``A^2`` state-dict keys times ``A`` names. Here the state dict is
    split by adapter once (an adapter's name is one dot-separated part of its keys: a RECAST adapter name holds no
    dot), and each ``save_pretrained`` call gets only its adapter's entries and the biases and embeddings PEFT may
    save with it.

    Args:
        model (`PeftModel`): the model holding the adapters.
        save_directory (`str`): the folder to write to, as for ``save_pretrained``.
        adapter_names (`Sequence[str]`, *optional*): the adapters to save; default: every adapter of the model.
        kwargs: passed to ``save_pretrained`` (``safe_serialization``, ``save_embedding_layers``, ...).

    Returns:
        The folder of each adapter, in order: what :func:`load_adapters` reads back.

    Example:

        ```py
        >>> import tempfile, peft_recast
        >>> from peft import get_peft_model
        >>> from transformers import BertConfig, BertModel

        >>> base = BertModel(BertConfig(hidden_size=32, num_hidden_layers=4, num_attention_heads=4,
        ...                             intermediate_size=64))
        >>> model = get_peft_model(base, peft_recast.RecastConfig())
        >>> for user in range(3):
        ...     model.add_adapter(f"user-{user}", peft_recast.RecastConfig(init_weights=False))
        >>> folder = tempfile.mkdtemp()
        >>> folders = peft_recast.save_adapters(model, folder, [f"user-{user}" for user in range(3)])
        >>> [name[len(folder) + 1:] for name in folders]
        ['user-0', 'user-1', 'user-2']

        ```
    """
    held = list(model.peft_config)
    names = held if adapter_names is None else list(adapter_names)
    unknown = [name for name in names if name not in model.peft_config]
    if unknown:
        raise ValueError(f"Cannot save adapter(s) {unknown[:3]}: this model holds {held[:10]}. Nothing was written.")
    if len(set(names)) != len(names):
        raise ValueError("Pass each adapter name once. Nothing was written.")
    folders = [save_directory if name == "default" else os.path.join(save_directory, name) for name in names]
    state = kwargs.pop("state_dict", None)
    state = model.state_dict() if state is None else state
    owned: dict[str, dict[str, torch.Tensor]] = {name: {} for name in names}
    with_biases: dict[str, torch.Tensor] = {}  # keys of no adapter that PEFT may save: embeddings and biases
    embeddings = _embedding_prefixes(model)
    for key, value in state.items():
        owners = set(key.split(".")[1:]).intersection(model.peft_config)
        if len(owners) == 1:  # a key naming two adapters is every other adapter's to leave out, as PEFT does
            owned.get(next(iter(owners)), {})[key] = value
        elif not owners and (key.startswith(embeddings) or key.rpartition(".")[2] == "bias"):
            with_biases[key] = value
    without_biases = {key: value for key, value in with_biases.items() if key.startswith(embeddings)}
    for name in names:
        keep = with_biases if getattr(model.peft_config[name], "bias", "none") != "none" else without_biases
        model.save_pretrained(save_directory, selected_adapters=[name], state_dict={**keep, **owned[name]}, **kwargs)
    return folders
