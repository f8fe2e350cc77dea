"""The RECAST tuner: injection, template groups and their Neural Mimicry, mixed-task batches, reporting."""

from __future__ import annotations

import re
import warnings
from collections import defaultdict
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import partial
from typing import Any, Iterator, Optional

import safetensors.torch
import torch
from peft.tuners.tuners_utils import BaseTuner, BaseTunerLayer
from peft.utils import (
    TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING,
    AuxiliaryTrainingWrapper,
    get_peft_model_state_dict,
)
from peft.utils.other import _get_submodules
from torch import nn
from tqdm.auto import tqdm
from transformers.pytorch_utils import Conv1D

from .config import RecastConfig
from .layer import Linear, RecastGroup, RecastLayer
from .mimicry import fingerprint_mismatch, fit_group, reconstruction_error

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


def _role_and_index(key: str) -> tuple[str, Optional[int]]:
    """Split a module key at its first numeric component: ``"enc.layer.3.q"`` -> ``("enc.layer.{}.q", 3)``."""
    match = _LAYER_INDEX.search(key)
    if match is None:
        return key, None
    return key[: match.start()] + "{}" + key[match.end() :], int(match.group())


def _split(items: list, config: RecastConfig) -> list[list]:
    """Contiguous chunks: of ``config.group_size`` items, or ``config.num_groups`` near-equal ones."""
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
    ``encoder.layer.{}.attention.self.query``) and the same weight shape; each role's modules, in layer order, are cut
    into contiguous groups. Modules without a layer index form a group of their own.

    Returns:
        ``(name, members)`` pairs, e.g. ``("encoder.layer.0-1.attention.self.query", [layer0, layer1])``.
    """
    by_role: dict[tuple[str, tuple[int, ...]], list[tuple[int, RecastLayer]]] = defaultdict(list)
    for key, layer in layers.items():
        role, index = _role_and_index(key)
        if index is None:
            role, index = key.replace("{", "{{").replace("}", "}}"), 0
        by_role[(role, tuple(layer.get_base_layer().weight.shape))].append((index, layer))
    shapes_per_role = defaultdict(int)
    for role, _ in by_role:
        shapes_per_role[role] += 1
    groups = []
    for (role, shape), items in by_role.items():
        items.sort(key=lambda item: item[0])
        for chunk in _split(items, config):
            first, last = chunk[0][0], chunk[-1][0]
            name = role.format(f"{first}-{last}" if first != last else f"{first}")
            if shapes_per_role[role] > 1:
                name += "[" + "x".join(map(str, shape)) + "]"
            groups.append((name, [layer for _, layer in chunk]))
    return groups


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
        if type(base_layer) is nn.Linear:
            if recast_config.fan_in_fan_out:
                warnings.warn(
                    "fan_in_fan_out is set to True but the target module is `torch.nn.Linear`. Using False for it."
                )
            return Linear(target, adapter_name, recast_config, fan_in_fan_out=False)
        raise TypeError(
            f"Target module {target} is not supported. RECAST supports `torch.nn.Linear` and "
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
        layers = {
            key: module
            for key, module in model.named_modules()
            if isinstance(module, RecastLayer) and adapter_name in module.recast_coefficients
        }
        groups = plan_groups(layers, config)
        numel = sum(layer.get_base_layer().weight.numel() for layer in layers.values())
        fingerprint = {}
        for name, members in tqdm(groups, desc="RECAST mimicry", unit="group", disable=numel < PROGRESS_MIN_NUMEL):
            weights = [member.pristine_weight() for member in members]
            if any(weight.device.type == "meta" for weight in weights):
                raise ValueError(
                    f"The base weights of '{name}' are on the meta device. RECAST builds its templates from the "
                    "pretrained weights, so load the base model with real weights before adding a RECAST adapter."
                )
            fit = fit_group(weights, config.num_templates)
            group = RecastGroup(name, members)
            for member, norm in zip(members, fit.member_norms):
                member.attach_group(adapter_name, group, fit.mixing * (norm * config.coefficient_scale))
            fingerprint[name] = fit.fingerprint()
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
    def _remove_adapter_layers(model: nn.Module, adapter_name: str, layers: dict[str, RecastLayer]) -> None:
        """Undo a failed injection: drop the adapter and unwrap layers left without any adapter."""
        for key, layer in layers.items():
            layer.delete_adapter(adapter_name)
            if not layer.recast_coefficients:
                parent, _, target_name = _get_submodules(model, key)
                setattr(parent, target_name, layer.get_base_layer())

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
    groups: dict[int, RecastGroup] = {}
    for module in model.modules():
        if isinstance(module, RecastLayer) and adapter_name in module.recast_group:
            group = module.recast_group[adapter_name]
            groups.setdefault(id(group), group)
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
                coefficients=sum(member.recast_coefficients[adapter_name].numel() for member in group.members),
                relative_error=reconstruction_error(config.base_fingerprint[group.name], templates),
            )
        )
    coefficients = sum(value.numel() for value in coefficient_state.values())
    return RecastSummary(
        adapter_name=adapter_name,
        coefficients=coefficients,
        other_trainable=sum(value.numel() for value in state_dict.values()) - coefficients,
        coefficient_bytes=_safetensors_bytes(coefficient_state),
        adapter_bytes=_safetensors_bytes(state_dict),
        groups=reports,
    )
