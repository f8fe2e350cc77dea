"""What one RECAST adapter costs: its coefficients, bytes on disk and the mimicry error of each template group."""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field

import safetensors.torch
import torch
from peft.utils import get_peft_model_state_dict
from torch import nn

from .bank import BankGroup
from .config import RecastConfig
from .grouping import RecastGroup
from .layer import RecastLayer
from .mimicry import reconstruction_error


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
    coefficient_data_bytes: int
    groups: list[GroupReport] = field(default_factory=list)

    def __str__(self) -> str:
        lines = [
            f"RECAST adapter '{self.adapter_name}': {self.coefficients} coefficients in {len(self.groups)} groups, "
            f"{self.other_trainable} other saved parameters (heads, biases)",
            f"adapter file: {self.adapter_bytes} bytes; the coefficients are {self.coefficient_data_bytes} bytes of "
            f"data ({self.coefficient_bytes} bytes as a safetensors file of their own, header included)",
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
    ``coefficient_bytes`` the size of a file holding the RECAST coefficients alone (mostly the safetensors header,
    which names every tensor), ``coefficient_data_bytes`` the bytes of the coefficients' values (each shared tensor of
    fused modules once).
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
    data_bytes = 0
    for module in model.modules():
        if isinstance(module, RecastLayer) and adapter_name in module.recast_group:
            group = module.recast_group[adapter_name]
            groups.setdefault(group.name, group)
            if adapter_name not in module.recast_tie:
                coefficients = module.recast_coefficients[adapter_name]
                owned[group.name] += coefficients.numel()
                data_bytes += coefficients.numel() * coefficients.element_size()
    reports = []
    for group in groups.values():
        first = group.members[0]
        templates = first.recast_coefficients[adapter_name].shape[1]
        reports.append(
            GroupReport(
                name=group.name,
                modules=len(group.members),
                shape=first.weight_shape(),
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
        coefficient_data_bytes=data_bytes,
        groups=reports,
    )
