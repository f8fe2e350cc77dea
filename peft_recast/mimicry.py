"""Closed-form Neural Mimicry: templates that reproduce a group's pretrained weights.

A group holds ``m`` weights of one shape. Stack them flattened as the rows of ``A`` (``m x d``). The best rank-``n``
reconstruction ``A ~ C T`` (least squares, Eckart-Young) is the truncated SVD of ``A``, obtained from the small Gram
matrix ``G = A A^T = U diag(s^2) U^T`` in float64:

    T = diag(1/s_n) U_n^T A      (n x d, orthonormal rows: the templates)
    C = U_n diag(s_n)            (m x n, the mimicked coefficients)

Templates are therefore fixed linear combinations of the group's own weights, ``T = M A`` with the *mixing*
matrix ``M = diag(1/s_n) U_n^T`` (``n x m``). RECAST never stores ``T``: a layer's update is
``sum_k c_k T_k = sum_j (c M)_j W_j``, computed from the live base weights. Cost: ``O(m^2 d)`` for ``G`` and an
``m x m`` eigen-decomposition.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import torch

# Singular values below this fraction of the largest are treated as zero: float32 weights carry ~7 digits.
RANK_RTOL = 1e-6
# Relative tolerance when comparing a saved fingerprint with the one rebuilt from the base weights. Casting MiniLM-L6
# to bfloat16 moves its group singular values by up to 8.6e-5 relative (float16: 6e-6); merging a RECAST adapter or
# fine-tuning moves them by the size of the change (1e-2 and more for a trained adapter).
FINGERPRINT_RTOL = 1e-3
# Elements per member processed at once (float64 transients of m * 256 KiB). Small blocks stay in cache and below
# glibc's mmap threshold, so they are reused rather than left resident: with 1 << 22, every adapter loaded onto a
# bfloat16 Llama-1B kept ~26 MB of freed heap resident (RSS +2.5 GB for 100 adapters), and the Gram matrix of a
# 2048 x 5632 pair took 250 ms instead of 35-45 ms (benchmarks/scale.py, 1 thread).
_GRAM_CHUNK = 1 << 15


@dataclass(frozen=True)
class GroupFit:
    """Result of mimicking one group.

    Attributes:
        mixing: ``(n, m)`` float64, templates as combinations of the member weights: ``T = mixing @ A``.
        singular_values: ``(m,)`` float64, all singular values of ``A``, descending.
        member_norms: ``(m,)`` float64, Frobenius norm of each member weight.
    """

    mixing: torch.Tensor
    singular_values: torch.Tensor
    member_norms: torch.Tensor

    @property
    def num_templates(self) -> int:
        return self.mixing.shape[0]

    @property
    def relative_error(self) -> float:
        """``||A - C T||_F / ||A||_F`` of the rank-``n`` reconstruction."""
        return reconstruction_error(self.singular_values.tolist(), self.num_templates)

    def fingerprint(self) -> list[float]:
        """The singular values, rounded to 8 significant digits (JSON friendly)."""
        return [float(f"{value:.8g}") for value in self.singular_values.tolist()]


def reconstruction_error(singular_values: Sequence[float], num_templates: int) -> float:
    """Relative Frobenius error ``sqrt(sum_{k>n} s_k^2 / sum_k s_k^2)`` of keeping ``num_templates`` templates."""
    energy = [value * value for value in singular_values]
    total = sum(energy)
    return math.sqrt(sum(energy[num_templates:]) / total) if total > 0 else 0.0


def gram_matrix(weights: Sequence[torch.Tensor]) -> torch.Tensor:
    """``A A^T`` in float64 for the flattened ``weights`` (``m`` tensors of one shape); returns ``(m, m)``."""
    flat = [weight.detach().reshape(-1) for weight in weights]
    numel = flat[0].numel()
    gram = torch.zeros(len(flat), len(flat), dtype=torch.float64, device=flat[0].device)
    for start in range(0, numel, _GRAM_CHUNK):
        block = torch.stack([w[start : start + _GRAM_CHUNK] for w in flat]).to(torch.float64)
        gram += block @ block.T
    return gram.cpu()


def numerical_rank(singular_values: torch.Tensor) -> int:
    """How many of the descending ``singular_values`` exceed ``RANK_RTOL`` times the largest."""
    return int((singular_values > RANK_RTOL * singular_values[0]).sum())


def canonical_signs(columns: torch.Tensor) -> torch.Tensor:
    """``(k,)`` signs that make each column of ``columns`` (``d x k``) have its entry of largest magnitude (the first
    on ties) positive: singular vectors are defined up to sign, and coefficients need one fixed choice."""
    pivot = columns.abs().argmax(dim=0)
    return torch.sign(columns[pivot, torch.arange(columns.shape[1])])


def fit_group(weights: Sequence[torch.Tensor], num_templates: int) -> GroupFit:
    """Closed-form mimicry of one group: the rank-``n`` SVD basis of the stacked ``weights``.

    ``n = min(num_templates, m, numerical rank)``. Deterministic: eigenvectors are ordered by decreasing singular
    value and each is signed so that its entry of largest magnitude (the first one on ties) is positive.

    Raises:
        ValueError: if every weight of the group is zero (no template can be built).
    """
    if not weights:
        raise ValueError("A template group needs at least one weight.")
    shapes = {tuple(w.shape) for w in weights}
    if len(shapes) != 1:
        raise ValueError(f"All weights of a template group must have one shape, got {sorted(shapes)}.")
    gram = gram_matrix(weights)
    eigenvalues, eigenvectors = torch.linalg.eigh(gram)
    order = torch.argsort(eigenvalues, descending=True, stable=True)
    singular_values = eigenvalues[order].clamp_min(0).sqrt()
    eigenvectors = eigenvectors[:, order]
    if singular_values[0] <= 0:
        raise ValueError("Every weight of this template group is zero, so RECAST has nothing to build templates from.")
    n = min(num_templates, numerical_rank(singular_values))
    basis = eigenvectors[:, :n]
    basis = basis * canonical_signs(basis)
    mixing = basis.T / singular_values[:n, None]
    return GroupFit(mixing=mixing, singular_values=singular_values, member_norms=gram.diagonal().sqrt())


def fingerprint_mismatch(saved: dict[str, list[float]], current: dict[str, list[float]]) -> str | None:
    """Describe how two base fingerprints differ, or return ``None`` if they agree within ``FINGERPRINT_RTOL``."""
    missing = sorted(set(saved) - set(current))
    extra = sorted(set(current) - set(saved))
    if missing or extra:
        parts = []
        if missing:
            parts.append(f"template groups in the adapter but not in this model: {missing[:5]}")
        if extra:
            parts.append(f"template groups in this model but not in the adapter: {extra[:5]}")
        return "; ".join(parts)
    for name in sorted(saved):
        old, new = saved[name], current[name]
        if len(old) != len(new):
            return f"group '{name}' has {len(new)} modules here but {len(old)} in the adapter"
        scale = max(max(abs(v) for v in old), 1e-30)
        worst = max(abs(a - b) for a, b in zip(old, new)) / scale
        if worst > FINGERPRINT_RTOL:
            return (
                f"group '{name}' has singular values {new[:4]} here but {old[:4]} in the adapter "
                f"(relative difference {worst:.1e} > {FINGERPRINT_RTOL:.0e})"
            )
    return None


@dataclass(frozen=True)
class WrapperPrefix:
    """Two fingerprints that name the same groups, one of them with ``prefix`` (e.g. ``"encoder."``) in front of every
    group name: the adapter's (``on_adapter``, saved from a model that wraps this one) or this model's."""

    prefix: str
    on_adapter: bool


def wrapper_prefix(saved: dict[str, list[float]], current: dict[str, list[float]]) -> WrapperPrefix | None:
    """The :class:`WrapperPrefix` that turns every group name of one fingerprint into the other's, or ``None``."""
    if not saved or not current or set(saved) == set(current) or len(saved) != len(current):
        return None
    for longer, shorter, on_adapter in ((saved, current, True), (current, saved, False)):
        first_long, first_short = sorted(longer)[0], sorted(shorter)[0]
        if first_long.endswith(first_short) and len(first_long) > len(first_short):
            prefix = first_long[: len(first_long) - len(first_short)]
            if prefix.endswith(".") and {prefix + name for name in shorter} == set(longer):
                return WrapperPrefix(prefix, on_adapter)
    return None
