"""Closed-form Neural Mimicry: exactness, determinism, rank handling, fingerprints."""

import pytest
import torch

from peft_recast import mimicry
from peft_recast.mimicry import fingerprint_mismatch, fit_group, gram_matrix, reconstruction_error


def _weights(m: int, shape=(6, 5), seed: int = 0) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return [torch.randn(shape, generator=generator) for _ in range(m)]


def _templates(fit, weights):
    stacked = torch.stack([w.reshape(-1) for w in weights]).double()
    return fit.mixing @ stacked


def test_full_rank_group_is_reproduced_exactly_by_orthonormal_templates():
    weights = _weights(3)
    fit = fit_group(weights, num_templates=3)
    templates = _templates(fit, weights)
    torch.testing.assert_close(templates @ templates.T, torch.eye(3, dtype=torch.float64))
    stacked = torch.stack([w.reshape(-1) for w in weights]).double()
    coefficients = stacked @ templates.T  # least-squares coefficients of each weight on the orthonormal templates
    torch.testing.assert_close(coefficients @ templates, stacked)
    assert fit.relative_error == 0.0
    torch.testing.assert_close(fit.member_norms, stacked.norm(dim=1))


def test_fewer_templates_give_the_truncated_svd_error():
    weights = _weights(4)
    fit = fit_group(weights, num_templates=2)
    stacked = torch.stack([w.reshape(-1) for w in weights]).double()
    templates = _templates(fit, weights)
    residual = stacked - (stacked @ templates.T) @ templates
    svd = torch.linalg.svdvals(stacked)
    expected = (svd[2:].square().sum() / svd.square().sum()).sqrt().item()
    assert fit.num_templates == 2
    assert fit.relative_error == pytest.approx(expected, rel=1e-9)
    assert (residual.norm() / stacked.norm()).item() == pytest.approx(expected, rel=1e-9)
    torch.testing.assert_close(fit.singular_values, svd)


def test_signs_are_canonical_and_fit_is_deterministic():
    weights = _weights(3)
    first, second = fit_group(weights, 2), fit_group([w.clone() for w in weights], 2)
    assert torch.equal(first.mixing, second.mixing)
    # the largest entry of each template's combination vector is positive
    for row in first.mixing:
        assert row[row.abs().argmax()] > 0


def test_templates_are_capped_by_group_size_and_rank():
    assert fit_group(_weights(2), num_templates=5).num_templates == 2
    weight = _weights(1)[0]
    duplicated = fit_group([weight, 2 * weight, -weight], num_templates=3)
    assert duplicated.num_templates == 1  # rank one: one template reproduces all three
    assert duplicated.relative_error < 1e-6


def test_all_zero_group_is_refused():
    with pytest.raises(ValueError, match="zero"):
        fit_group([torch.zeros(3, 3), torch.zeros(3, 3)], 2)


def test_mixed_shapes_are_refused():
    with pytest.raises(ValueError, match="one shape"):
        fit_group([torch.ones(3, 3), torch.ones(3, 4)], 2)


def test_chunked_gram_matches_direct_product(monkeypatch):
    weights = _weights(3, shape=(7, 11))
    stacked = torch.stack([w.reshape(-1) for w in weights]).double()
    monkeypatch.setattr(mimicry, "_GRAM_CHUNK", 10)  # 77 elements in 8 chunks
    torch.testing.assert_close(gram_matrix(weights), stacked @ stacked.T)


def test_reconstruction_error_from_singular_values():
    assert reconstruction_error([3.0, 4.0], 1) == pytest.approx(0.8)
    assert reconstruction_error([3.0, 4.0], 2) == 0.0


def test_fingerprint_mismatch_reports_what_differs():
    saved = {"a": [2.0, 1.0], "b": [1.0]}
    assert fingerprint_mismatch(saved, {"a": [2.0, 1.0000001], "b": [1.0]}) is None
    assert "relative difference" in fingerprint_mismatch(saved, {"a": [2.0, 1.01], "b": [1.0]})
    assert "not in this model" in fingerprint_mismatch(saved, {"a": [2.0, 1.0]})
    assert "not in the adapter" in fingerprint_mismatch(saved, {**saved, "c": [1.0]})
    assert "2 modules here but 1" in fingerprint_mismatch(saved, {"a": [2.0, 1.0], "b": [1.0, 0.5]})
