"""What a RECAST layer serves again without recomputing it: its adapted weight ``W + sum_a delta_W_a`` for the active
adapters, and the stacked per-adapter mixes of a mixed-task batch (``(A + 1, m, B)``: one ``mean_K(theta) @ R`` per
adapter, then zeros for the rows of no adapter).

Each lives in one slot of the layer, ``(key, coefficient values, tensor)``, and is rebuilt when :func:`cache_key`
changes (every tensor involved, by identity or storage and version counter, the device it is built on, and whether
inference mode is on) or when a coefficient's values changed without a version bump (an assignment through
``.data``). Nothing is cached while the coefficients train: the caller builds afresh then.
"""

from __future__ import annotations

from typing import Any, Callable

import torch

from .spectrum import spectrum_of


def cache_key(layer: Any, adapters: list[str], device: torch.device, basis: bool = True) -> tuple:
    """What anything built from ``adapters`` on ``layer`` (a :class:`~peft_recast.layer.RecastLayer`) and placed on
    ``device`` depends on: every tensor involved, by storage and version; ``basis=False`` leaves out the base weight
    and the group bases (a mix does not depend on them)."""
    tie, mixings, scores = layer.recast_tie, layer.recast_mixing, layer.recast_gate_scores
    parts: list = [torch.is_inference_mode_enabled(), device]
    for adapter in adapters:
        coefficients, mixing = tie.get(adapter, layer).recast_coefficients[adapter], mixings[adapter]
        parts += [adapter, id(coefficients), coefficients._version, id(mixing), mixing._version]
        if adapter in scores:
            score = scores[adapter]
            parts += [id(score), score._version]
    if not basis:
        return tuple(parts)
    weight, groups = layer.get_base_layer().weight, layer.recast_group
    parts += [weight.data_ptr(), weight._version, weight.dtype]
    distinct = {id(groups[adapter]): adapter for adapter in adapters}
    for adapter in distinct.values():
        if spectrum_of(layer, adapter) is not None:
            parts.append(id(groups[adapter]))  # fixed factors
        else:
            parts += [(member.data_ptr(), member._version) for member in groups[adapter].basis()]
    return tuple(parts)


def cached(layer: Any, slot: str, adapters: list[str], build: Callable[[], torch.Tensor], device: torch.device,
           basis: bool = True) -> torch.Tensor:
    """``build()`` (run without gradients; its result on ``device``) for ``adapters``, kept in ``layer``'s attribute
    ``slot`` and served again until :func:`cache_key` (with ``device`` and ``basis``) or the coefficient values
    change."""
    key = cache_key(layer, adapters, device, basis)
    tie, scores = layer.recast_tie, layer.recast_gate_scores
    values = [tie.get(a, layer).recast_coefficients[a].detach().reshape(-1) for a in adapters]
    values += [scores[a].detach().reshape(-1) for a in adapters if a in scores]
    values = values[0] if len(values) == 1 else torch.cat(values)  # one comparison for all
    entry = getattr(layer, slot)  # read once: another thread may replace it meanwhile
    if entry is None or entry[0] != key or not torch.equal(entry[1], values):
        with torch.no_grad():
            entry = (key, values.clone(), build())
        setattr(layer, slot, entry)
    return entry[2]
