"""What one RECAST adapter costs: its coefficients, bytes on disk and the mimicry error of each template group."""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field

import safetensors.torch
import torch
from peft.utils import get_peft_model_state_dict
from torch import nn

from .config import RecastConfig
from .group import RecastGroup
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
    """What one RECAST adapter costs: coefficients, bytes on disk and per-group mimicry error
    (:func:`recast_summary` makes it; ``str()`` is a table).

    Args:
        adapter_name (`str`): The adapter.
        coefficients (`int`): Its trained RECAST coefficients (a tensor shared by several modules counted once).
        other_trainable (`int`): Other saved parameters (``modules_to_save`` such as a head, trained biases).
        coefficient_bytes (`int`): Size of a safetensors file of the coefficients alone, header included.
        adapter_bytes (`int`): Size of the ``adapter_model.safetensors`` that ``save_pretrained`` writes.
        coefficient_data_bytes (`int`): Bytes of the coefficients' values.
        groups (`list[GroupReport]`): One report per template group.

    Example:

        ```py
        >>> import peft_recast
        >>> from peft import get_peft_model
        >>> from transformers import BertConfig, BertModel

        >>> base = BertModel(BertConfig(hidden_size=32, num_hidden_layers=4, num_attention_heads=4,
        ...                             intermediate_size=64))
        >>> summary = peft_recast.recast_summary(get_peft_model(base, peft_recast.RecastConfig()))
        >>> summary.coefficients, summary.coefficient_data_bytes, len(summary.groups)  # float32 numbers
        (32, 128, 4)

        ```
    """

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

    Example:

        ```py
        >>> import peft_recast
        >>> from peft import get_peft_model
        >>> from transformers import GPT2Config, GPT2Model

        >>> gpt2 = GPT2Model(GPT2Config(n_layer=2, n_embd=32, n_head=4))
        >>> model = get_peft_model(gpt2, peft_recast.RecastConfig(fan_in_fan_out=True))  # Conv1D stores (in, out)
        >>> summary = peft_recast.recast_summary(model)  # GPT-2's fused c_attn, one group of 2 layers
        >>> summary.groups[0].name, summary.coefficients
        ('h.0-1.attn.c_attn', 8)

        ```
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
                relative_error=reconstruction_error(config.base_fingerprint[group.name], templates)
                if group.relative_error is None else group.relative_error,
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
