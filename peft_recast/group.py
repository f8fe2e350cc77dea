"""A template group: the modules whose templates are built from one another's pretrained weights.

A group holds references to its member layers (any object with ``pristine_weight()``, ``weight_placement()`` and
``weight_state()``, in practice :class:`~peft_recast.layer.RecastLayer`) and knows its *basis* ``W_1..W_m``: the
members' pretrained weights (closed-form mimicry) or stored templates (a gradient-mimicry template bank). This
module imports no other module of the package, so layers, planning and reports can all hold groups.
"""

from __future__ import annotations

import math
from typing import Any, Optional

import torch


class RecastGroup:
    """The modules whose templates are combinations of one another's pretrained weights (one per adapter and group).

    A plain object, not an ``nn.Module``: it holds references to its member layers without adding entries to the
    model's ``state_dict`` or module tree.

    Args:
        name (`str`): The group's name, e.g. ``"encoder.layer.0-1.attention.self.query"``.
        members (`list`): Its layers, in layer order.
    """

    def __init__(self, name: str, members: list[Any]) -> None:
        self.name = name
        self.members = members
        # ||reconstruction - weights||_F / ||weights||_F where the group knows it; None: the pretrained weights span
        # the templates, and the error follows from the fingerprint (mimicry.reconstruction_error)
        self.relative_error: Optional[float] = None
        self.fitted = self.weights_state()  # the weights the group's templates were fitted to

    def weights_state(self) -> tuple:
        """The members' pretrained weights by storage and version counter: it changes when any of them does."""
        return tuple(member.weight_state() for member in self.members)

    def basis(self) -> list[torch.Tensor]:
        """The members' pretrained weights ``W_1..W_m`` (untouched by any merge), which span the templates."""
        return [member.pristine_weight() for member in self.members]

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.name!r}, {len(self.members)} modules)"


class BankGroup(RecastGroup):
    """A template group whose basis is a slice of stored template-bank templates (one fused role), shaped as its
    weights.

    Args:
        name (`str`): The group's name.
        members (`list`): Its layers.
        templates (`torch.Tensor`): ``(n, *weight shape)`` float32 on the CPU.
        relative_error (`float`): ``||mean_K(alpha_0) T - A||_F / ||A||_F`` of the whole group.
    """

    def __init__(
        self, name: str, members: list[Any], templates: torch.Tensor, relative_error: float = math.nan
    ) -> None:
        super().__init__(name, members)
        self.templates = templates
        self.relative_error = relative_error
        self._cache: dict[tuple, list[torch.Tensor]] = {}

    def basis(self) -> list[torch.Tensor]:
        """The ``n`` templates on the device and in the dtype of the members' weights."""
        device, dtype = self.members[0].weight_placement()
        key = (device, dtype)
        if key not in self._cache:
            self._cache = {key: list(self.templates.to(device=device, dtype=dtype).unbind(0))}
        return self._cache[key]
