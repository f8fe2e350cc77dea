"""The ``spectral_bands`` template family: each module's own weight cut into bands of its singular spectrum.

A module's weight, as the ``out x d`` matrix of :func:`~peft_recast.spectrum.matrix_of`, is the sum
``W = sum_i sigma_i u_i v_i^T``. Its ``n`` templates are consecutive bands of that sum,

    T_b = sum_{i in S_b} sigma_i u_i v_i^T          (b = 0 .. n - 1;  sum_b T_b = W)

cut so that each band holds about ``1/n`` of ``||W||_F^2``: band ``b > 0`` starts at the first index whose preceding
singular values hold at least ``b/n`` of the energy, and at least one index after band ``b - 1``'s start. On the
output rows of block ``r`` a coefficient scales its band's singular values:

    delta_W[rows of r] = sum_b theta[b, r] (u / ||T_b||_F) T_b[rows of r],          u = s ||W||_F / sqrt(n)

(:func:`peft_recast.planning.coefficient_unit`, the same scale as every family). With ``n = 1`` this is
``s theta W``, a scale of the whole weight per block of rows; more bands let the head and the tail of the spectrum move
apart. A term ``sigma_i u_i v_i^T`` does not depend on the signs of its singular vectors, so the templates are the
same on any machine wherever the singular values at a band's edge are distinct.

Only the first ``n - 1`` bands are stored, ``(n - 1, *weight shape)``; the last is the rest of the weight,
``T_{n-1} = W - sum_{b < n-1} T_b``. The basis is ``(T_0, .., T_{n-2}, W)``, the pretrained weight last (a quantized
one dequantized where it is needed, :mod:`peft_recast.quantized`), and the mixing ``R`` (``(n, n)``, rows the
coefficients, columns the basis) folds the last band into it, with ``c_b = u / ||T_b||_F``:

    R[b, b] = c_b  (b < n - 1),    R[n-1, b] = -c_{n-1}  (b < n - 1),    R[n-1, n-1] = c_{n-1}

so ``theta @ R`` weighs the basis exactly as ``sum_b theta_b c_b T_b`` weighs the bands. One band stores nothing and
only the singular values are computed. As a template bank's, the basis is shared by every adapter of the module, so
merging, mixed batches and the shared products of serving take the group-span path unchanged.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

import torch

from .group import RecastGroup
from .mimicry import numerical_rank
from .spectrum import matrix_of, stored_layout, top_values


def band_starts(singular_values: torch.Tensor, num_bands: int) -> list[int]:
    """The first index of each of ``num_bands`` bands of descending ``singular_values`` (module docstring)."""
    energy = singular_values.to(torch.float64).square()
    before = torch.cumsum(energy, 0) - energy  # energy of the values ahead of each index
    total = float(energy.sum())
    starts = [0]
    for band in range(1, num_bands):
        reached = int((before < band / num_bands * total).sum())  # before is non-decreasing
        starts.append(max(starts[-1] + 1, reached))
    return starts


@dataclass(frozen=True)
class BandsFit:
    """A module's ``spectral_bands`` templates.

    Attributes:
        templates: the first ``n - 1`` bands, ``(n - 1, *weight shape)`` float32 on the CPU, in the weight's stored
            layout (the last band is the rest of the weight); ``None`` for one band.
        singular_values: ``(min(out, d),)`` float64, descending.
        starts: the first singular index of each band.
    """

    templates: Optional[torch.Tensor]
    singular_values: torch.Tensor
    starts: tuple[int, ...]
    _on: dict = field(default_factory=dict, compare=False, repr=False)

    def norms(self) -> torch.Tensor:
        """``||T_b||_F`` per band, ``(n,)`` float64 (the root of the band's energy)."""
        energy = self.singular_values.square()
        ends = list(self.starts[1:]) + [len(energy)]
        return torch.stack([energy[start:end].sum() for start, end in zip(self.starts, ends)]).sqrt()

    def fingerprint(self) -> list[float]:
        """The top singular values, rounded to 8 significant digits."""
        return top_values(self.singular_values)

    def group(self, key: str, member: Any, num_templates: int, unit: float) -> tuple[SpectralBands, torch.Tensor]:
        """The module's templates and mixing: :class:`SpectralBands` and ``R`` (``(n, n)``, module docstring), so
        that a unit coefficient moves the weight by ``unit`` along a band."""
        scales = unit / self.norms()
        mixing = torch.diag(scales)
        mixing[-1, :-1] = -scales[-1]
        return SpectralBands(key, member, self), mixing

    def on(self, device: torch.device, dtype: torch.dtype) -> list[torch.Tensor]:
        """The stored bands (all but the last) on ``device`` in ``dtype``, one tensor each: every adapter that shares
        this fit gets the same tensors (kept for the last device and dtype asked for), so their mixed batches share
        products."""
        key = (device, dtype)
        if key not in self._on:
            self._on.clear()
            self._on[key] = list(self.templates.to(device=device, dtype=dtype).unbind(0))
        return self._on[key]


def fit_bands(weight: torch.Tensor, axis: int, num_bands: int) -> BandsFit:
    """The ``num_bands`` band templates of a stored ``weight`` whose output rows lie on ``axis``.

    Raises:
        ValueError: if the weight has fewer nonzero singular values than bands.
    """
    matrix = matrix_of(weight.detach(), axis).to(torch.float64)
    if num_bands == 1:
        singular_values = torch.linalg.svdvals(matrix)
    else:
        left, singular_values, right = torch.linalg.svd(matrix, full_matrices=False)
    available = numerical_rank(singular_values) if singular_values[0] > 0 else 0
    if num_bands > available:
        raise ValueError(
            f"template_family='spectral_bands' cuts a weight's singular values into num_templates={num_bands} bands, "
            f"but a weight of shape {tuple(weight.shape)} has {available} nonzero ones; use fewer num_templates."
        )
    starts = band_starts(singular_values[:available], num_bands)
    if num_bands == 1:
        return BandsFit(templates=None, singular_values=singular_values.cpu(), starts=(0,))
    bands = []
    for start, end in zip(starts[:-1], starts[1:]):  # the last band is the rest of the weight: not stored
        band = (left[:, start:end] * singular_values[start:end]) @ right[start:end]  # (out, d)
        bands.append(stored_layout(band, tuple(weight.shape), axis))
    return BandsFit(templates=torch.stack(bands).float().cpu(), singular_values=singular_values.cpu(),
                    starts=tuple(starts))


class SpectralBands(RecastGroup):
    """One module's ``spectral_bands`` templates: a group of one member whose basis is its ``n`` band templates.

    Args:
        name (`str`): The module's key.
        member (`Any`): Its RECAST layer.
        fit (`BandsFit`): The layer's bands.
    """

    def __init__(self, name: str, member: Any, fit: BandsFit) -> None:
        super().__init__(name, [member])
        self.fit = fit
        self.relative_error = 0.0  # the bands sum to the weight

    def basis(self) -> list[torch.Tensor]:
        """The stored bands on the device and in the dtype of the member's weight, then its pretrained weight."""
        if self.fit.templates is None:
            return super().basis()
        device, dtype = self.members[0].weight_placement()
        return self.fit.on(device, dtype) + super().basis()
