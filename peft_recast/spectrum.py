"""The ``own_spectrum`` template family: rank-one templates from each module's own singular vectors.

A module's weight, as a matrix ``W`` (``out x d``: ``d = in``, or ``in / groups * kh * kw`` for a convolution kernel),
has the SVD ``W = U diag(sigma) V^T``. Its templates are the ``n`` rank-one matrices

    T_k = u_{i_k} v_{j_k}^T        (orthonormal, unit Frobenius norm)

for the first ``n`` index pairs in *shell order*: ``(0, 0)``, then for ``r = 1, 2, ...`` the pair ``(r, r)`` followed
by ``(i, r), (r, i)`` for ``i = 0 .. r - 1``. ``n = r^2`` is the full ``r x r`` core of LoRA-XS (arXiv 2405.17604);
``n = r`` with ``r = 1, 2`` tunes the top singular values. On the output rows of block ``b`` the update is

    delta_W[rows of b] = u * sum_k theta[k, b] U[rows of b, i_k] V[:, j_k]^T,      u = s ||W||_F / sqrt(n)

the same scale as the group span's templates (:func:`peft_recast.planning.coefficient_unit`). It is stored as two
factors, ``left = u U[:, i]`` (``out x n``) and ``right = V[:, j]^T`` (``n x d``), so that

    delta_W = (left * theta[:, block(r)]^T) @ right          and        x delta_W^T = ((x right^T) * theta) left^T

cost ``O(n (out + d))`` per token: nothing of the weight's size is built in training. Signs are canonical (each
``u_i``'s entry of largest magnitude, the first on ties, is positive) so that a saved ``theta`` means the same update
on any machine; the SVD is taken in float64.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Optional

import torch

from .group import RecastGroup
from .mimicry import canonical_signs, numerical_rank

# Singular values written to the base fingerprint per module (enough to tell two bases apart; the config stays small).
FINGERPRINT_VALUES = 8


def shell_pairs(count: int) -> list[tuple[int, int]]:
    """The first ``count`` index pairs ``(i, j)`` (left, right singular vector) in shell order (module docstring)."""
    pairs: list[tuple[int, int]] = []
    shell = 0
    while len(pairs) < count:
        pairs.append((shell, shell))
        for i in range(shell):
            pairs += [(i, shell), (shell, i)]
        shell += 1
    return pairs[:count]


@dataclass(frozen=True)
class SpectrumFit:
    """A module's own spectrum, canonically signed.

    Attributes:
        left: ``(out, r)`` float64, the top ``r`` left singular vectors.
        right: ``(r, d)`` float64, the top ``r`` right singular vectors (as rows).
        singular_values: ``(min(out, d),)`` float64, descending.
    """

    left: torch.Tensor
    right: torch.Tensor
    singular_values: torch.Tensor

    def fingerprint(self) -> list[float]:
        """The top singular values, rounded to 8 significant digits."""
        return top_values(self.singular_values)

    def group(self, key: str, member: Any, num_templates: int, unit: float) -> tuple[OwnSpectrum, torch.Tensor]:
        """The module's templates and mixing: :class:`OwnSpectrum` (``unit`` in its factors) and ``I``
        (``(n, n)``)."""
        return OwnSpectrum(key, member, self, num_templates, unit), torch.eye(num_templates)


def top_values(singular_values: torch.Tensor) -> list[float]:
    """The first :data:`FINGERPRINT_VALUES` of descending ``singular_values``, rounded to 8 significant digits: a
    module's entry in ``RecastConfig.base_fingerprint`` for the families built from its own weight."""
    return [float(f"{value:.8g}") for value in singular_values[:FINGERPRINT_VALUES].tolist()]


def fit_spectrum(weight: torch.Tensor, num_templates: int) -> SpectrumFit:
    """The singular vectors that ``num_templates`` shell-ordered templates of ``weight`` (``out x d``) use.

    Raises:
        ValueError: if the weight is zero, or has fewer nonzero singular values than the templates need.
    """
    matrix = weight.detach().to(torch.float64)
    left, singular_values, right = torch.linalg.svd(matrix, full_matrices=False)
    rank = 1 + max(max(pair) for pair in shell_pairs(num_templates))
    available = numerical_rank(singular_values) if singular_values[0] > 0 else 0
    if rank > available:
        raise ValueError(
            f"template_family='own_spectrum' needs {rank} nonzero singular values for {num_templates} templates, but a "
            f"weight of shape {tuple(weight.shape)} has {available}; use fewer num_templates."
        )
    left, right = left[:, :rank], right[:rank]
    signs = canonical_signs(left)
    return SpectrumFit(left=left * signs, right=right * signs[:, None], singular_values=singular_values)


class OwnSpectrum(RecastGroup):
    """One module's ``own_spectrum`` templates, as the factors ``left`` (``out x n``, scale included) and ``right``
    (``n x d``) of the module docstring; a group of one member, whose ``basis()`` is not a list of weights.

    Args:
        name (`str`): The module's key.
        member (`Any`): Its RECAST layer.
        fit (`SpectrumFit`): The layer's spectrum.
        num_templates (`int`): ``n``.
        unit (`float`): ``u``, what a unit coefficient moves the weight by along one template.
    """

    def __init__(self, name: str, member: Any, fit: SpectrumFit, num_templates: int, unit: float) -> None:
        super().__init__(name, [member])
        pairs = shell_pairs(num_templates)
        rows, columns = [i for i, _ in pairs], [j for _, j in pairs]
        self.left = (fit.left[:, rows] * unit).float()
        self.right = fit.right[columns].float()
        # ||W - P(W)||_F / ||W||_F for the projection P onto the templates' span, which holds W's diagonal pairs
        energy = fit.singular_values.square()
        kept = sorted({i for i, j in pairs if i == j})
        self.relative_error = float((1 - energy[kept].sum() / energy.sum()).clamp_min(0).sqrt())
        self._cache: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}

    def basis(self) -> list[torch.Tensor]:
        raise TypeError("own_spectrum templates are factors, not a list of weights: use OwnSpectrum.factors().")

    def factors(self, device: torch.device, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """``left`` and ``right`` on ``device`` in ``dtype`` (kept for the last device and dtype asked for)."""
        key = (device, dtype)
        if key not in self._cache:
            self._cache = {key: (self.left.to(device=device, dtype=dtype), self.right.to(device=device, dtype=dtype))}
        return self._cache[key]

    def delta(self, mix: torch.Tensor, blocks: torch.Tensor, shape: tuple[int, ...], axis: int,
              dtype: torch.dtype) -> torch.Tensor:
        """``delta_W`` for ``mix`` (``n x B``, the layer's effective coefficients) in the stored layout ``shape``
        (output rows on ``axis``; a kernel's other dimensions flattened into ``d``), in ``dtype``."""
        left, right = self.factors(mix.device, dtype)
        return stored_layout((left * mix.to(dtype)[:, blocks].T) @ right, shape, axis)

    def update(self, x: torch.Tensor, mix: torch.Tensor, blocks: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """``x delta_W^T`` of a linear layer, ``(..., out)``: ``x`` is ``(..., in)``; ``mix`` is ``n x B`` for the
        whole batch or ``N x n x B`` per sample (``x`` then ``(N, ..., in)``)."""
        left, right = self.factors(x.device, dtype)
        projected = x.to(dtype) @ right.T  # (..., n)
        per_row = mix.to(dtype)[..., blocks]  # (n, out) or (N, n, out)
        if mix.dim() == 2:
            return projected @ (left * per_row.T).T
        scaled = (left.T[None] * per_row)  # (N, n, out)
        return (projected.reshape(len(x), -1, projected.shape[-1]) @ scaled).reshape(*x.shape[:-1], -1)


def spectrum_of(layer: Any, adapter: str) -> Optional[OwnSpectrum]:
    """The layer's ``own_spectrum`` templates for ``adapter``, or ``None`` for another family."""
    group = layer.recast_group.get(adapter)
    return group if isinstance(group, OwnSpectrum) else None


def spectral_delta(layer: Any, adapter: str, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """``delta_W`` of ``layer``'s ``own_spectrum`` adapter in the stored layout, in ``dtype``."""
    mix = layer._mix(adapter).to(device)
    blocks = layer._blocks(adapter, mix.shape[1], device)
    return spectrum_of(layer, adapter).delta(mix, blocks, layer.weight_shape(), layer.output_axis, dtype)


def spectral_update(layer: Any, x: torch.Tensor, adapter: str) -> torch.Tensor:
    """``x delta_W^T`` of ``layer``'s ``own_spectrum`` adapter (a linear layer), in ``x``'s dtype, with autograd."""
    mix = layer._mix(adapter).to(x.device)
    blocks = layer._blocks(adapter, mix.shape[1], x.device)
    dtype = layer._compute_dtype(x.dtype, x.device)
    return spectrum_of(layer, adapter).update(x, mix, blocks, dtype).to(x.dtype)


def spectrum_update(layer: Any, x: torch.Tensor, adapter_names: list[str], adapters: list[str]) -> torch.Tensor:
    """``x_n delta_W_n^T`` for a batch whose sample ``n`` uses ``adapter_names[n]`` (a linear layer; zero for samples
    whose adapter is not among ``adapters``, all ``own_spectrum`` on ``layer``). Adapters with the same templates, block
    count and channels go through :meth:`OwnSpectrum.update` together, each sample with its own coefficients."""
    dtype = layer._compute_dtype(x.dtype, x.device)
    families: dict[tuple, list[tuple[str, torch.Tensor]]] = {}
    for name in adapters:
        mix = layer._mix(name).to(x.device)
        key = (id(spectrum_of(layer, name)), tuple(mix.shape), layer.recast_channels.get(name, ()))
        families.setdefault(key, []).append((name, mix))
    result = None
    for members in families.values():
        index = {name: i for i, (name, _) in enumerate(members)}
        rows = [i for i, name in enumerate(adapter_names) if name in index]
        mixes = torch.stack([mix for _, mix in members])[[index[adapter_names[i]] for i in rows]]  # (N_f, n, B)
        first = members[0][0]
        blocks = layer._blocks(first, mixes.shape[-1], x.device)
        rows_at = torch.tensor(rows, device=x.device)
        update = spectrum_of(layer, first).update(x[rows_at], mixes, blocks, dtype)
        if result is None:
            result = update.new_zeros(*x.shape[:-1], update.shape[-1])
        result = result.index_add(0, rows_at, update)
    return result


def matrix_of(weight: torch.Tensor, axis: int) -> torch.Tensor:
    """A stored weight as the ``out x d`` matrix whose SVD gives the templates (output rows on ``axis``)."""
    matrix = weight.T if axis == 1 else weight
    return matrix.reshape(matrix.shape[0], math.prod(matrix.shape[1:]))


def stored_layout(matrix: torch.Tensor, shape: tuple[int, ...], axis: int) -> torch.Tensor:
    """The inverse of :func:`matrix_of`: an ``out x d`` matrix in the stored layout ``shape`` (output rows on ``axis``)."""
    return matrix.T.reshape(shape) if axis == 1 else matrix.reshape(shape)
