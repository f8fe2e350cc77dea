"""``template_family="spectral_bands"``: each module's own weight cut into bands of its singular spectrum
(``peft_recast/bands.py``), through every path the group-span family has."""

import copy
import math

import pytest
import torch
from peft import get_peft_model
from torch import nn

import peft_recast
from peft_recast import RecastConfig
from peft_recast.bands import SpectralBands, band_starts, fit_bands

from ..models import MODEL_BUILDERS, model_output, randomize_coefficients, tiny_bert

BANDS = {"template_family": "spectral_bands"}  # 2 bands x 2 blocks of rows, as the default's 2 templates x 2 blocks


def _layers(model, adapter="default"):
    return {key: module for key, module in model.named_modules()
            if isinstance(getattr(module, "recast_group", {}).get(adapter), SpectralBands)}


def _all_bands(fit, weight):
    """Every band of ``fit``, ``(n, *weight shape)`` float64: the stored ones and the rest of ``weight``."""
    stored = fit.templates.double()
    return torch.cat([stored, (weight.double() - stored.sum(0))[None]])


def test_bands_hold_equal_energy_and_sum_to_the_weight():
    values = torch.tensor([4.0, 2.0, 2.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0])  # energy 16, 4, 4, 1 x 7: total 31
    assert band_starts(values, 1) == [0]
    assert band_starts(values, 2) == [0, 1]  # 16 of 31 already ahead of index 1
    assert band_starts(values, 3) == [0, 1, 3]  # ahead of index 1: 16 >= 10.3; of index 2: 20 < 20.7; of 3: 24
    assert band_starts(torch.tensor([10.0, 1.0, 1.0]), 3) == [0, 1, 2]  # every band keeps at least one value
    weight = torch.randn(24, 16, generator=torch.Generator().manual_seed(0))
    fit = fit_bands(weight, 0, 3)
    assert fit.templates.shape == (2, 24, 16)  # the last band is the rest of the weight: not stored
    flat = _all_bands(fit, weight).reshape(3, -1)
    gram = flat @ flat.T
    torch.testing.assert_close(gram, torch.diag(fit.norms().square()), rtol=1e-5, atol=1e-4)  # orthogonal bands
    energy = fit.norms().square() / weight.double().square().sum()
    assert energy[0] >= 1 / 3 and energy[:2].sum() >= 2 / 3 and (energy > 0).all()
    # independent of the SVD's signs: the bands of -W are minus those of W; a Conv1D layout is the transpose
    torch.testing.assert_close(fit_bands(-weight, 0, 3).templates, -fit.templates)
    torch.testing.assert_close(fit_bands(weight.T, 1, 3).templates, fit.templates.transpose(1, 2))
    with pytest.raises(ValueError, match="num_templates=3 bands, but a weight of shape \\(5, 4\\) has 1 nonzero"):
        fit_bands(torch.outer(torch.ones(5), torch.ones(4)), 0, 3)


def test_update_is_the_documented_combination(model_kind, recast_config):
    """delta_W[rows of r] = sum_b theta[b, r] (s ||W||_F / sqrt(n) / ||T_b||_F) T_b[rows of r]."""
    model = get_peft_model(MODEL_BUILDERS[model_kind](), recast_config(**BANDS, num_templates=3))
    randomize_coefficients(model)
    layers = _layers(model)
    assert layers
    for layer in layers.values():
        weight = layer.get_base_layer().weight.detach().double()
        matrix = weight.T if layer.fan_in_fan_out else weight
        u, s, vh = torch.linalg.svd(matrix, full_matrices=False)
        starts = band_starts(s, 3) + [len(s)]
        theta = layer.recast_coefficients["default"].detach().double().mean(0)  # (n, B)
        unit = 10.0 * s.norm() / math.sqrt(3)
        rows = torch.tensor_split(torch.arange(matrix.shape[0]), 2)
        expected = torch.zeros_like(matrix)
        for b in range(3):
            band = (u[:, starts[b]:starts[b + 1]] * s[starts[b]:starts[b + 1]]) @ vh[starts[b]:starts[b + 1]]
            for r, block in enumerate(rows):
                expected[block] += unit / band.norm() * theta[b, r] * band[block]
        delta = layer.get_delta_weight("default").double()
        torch.testing.assert_close(delta.T if layer.fan_in_fan_out else delta, expected, rtol=1e-4, atol=1e-6)


def test_one_band_scales_the_weight_per_block_of_rows():
    model = get_peft_model(tiny_bert(), RecastConfig(**BANDS, num_templates=1, coefficient_blocks=2))
    randomize_coefficients(model)
    for layer in _layers(model).values():
        weight = layer.get_base_layer().weight.detach()
        group = layer.recast_group["default"]
        assert group.fit.templates is None  # the one band is the weight itself: no copy is stored
        assert [member.data_ptr() for member in group.basis()] == [weight.data_ptr()]
        singular_values = torch.linalg.svdvals(weight.double())
        torch.testing.assert_close(group.fit.singular_values, singular_values)
        theta = layer.recast_coefficients["default"].detach()[0, 0]  # (B,)
        scale = torch.repeat_interleave(10.0 * theta, weight.shape[0] // 2)
        torch.testing.assert_close(layer.get_delta_weight("default"), scale[:, None] * weight, rtol=1e-5, atol=1e-6)


def test_bands_store_all_but_the_last_and_take_it_from_the_weight():
    model = get_peft_model(tiny_bert(), RecastConfig(**BANDS, num_templates=3, coefficient_blocks=1))
    for layer in _layers(model).values():
        weight = layer.get_base_layer().weight.detach()
        group = layer.recast_group["default"]
        basis = group.basis()
        assert group.fit.templates.shape == (2, *weight.shape)
        assert len(basis) == 3 and basis[-1].data_ptr() == weight.data_ptr()
        mixing = layer.recast_mixing["default"].double()
        scales = mixing.diagonal()
        assert (mixing[-1, :-1] == -scales[-1]).all() and (mixing[:-1].tril(-1) == 0).all()
        # theta @ R weighs (T_0, T_1, W) as theta_b c_b weighs (T_0, T_1, W - T_0 - T_1)
        theta = torch.tensor([0.3, -0.2, 0.5], dtype=torch.float64)
        weights = theta @ mixing
        combined = sum(w * member.double() for w, member in zip(weights, basis))
        bands = _all_bands(group.fit, weight)
        torch.testing.assert_close(combined, sum(t * c * band for t, c, band in zip(theta, scales, bands)))


def test_identity_at_init_training_and_gradients(model_kind, recast_config, input_ids):
    base = MODEL_BUILDERS[model_kind]().eval()
    reference = model_output(base, input_ids)
    model = get_peft_model(copy.deepcopy(base), recast_config(**BANDS)).eval()
    assert model.get_nb_trainable_parameters()[0] == len(_layers(model)) * 4
    torch.testing.assert_close(model_output(model, input_ids), reference, rtol=0, atol=0)
    randomize_coefficients(model)
    with torch.no_grad():
        cached = model_output(model, input_ids)
    training = model_output(model, input_ids)
    torch.testing.assert_close(training, cached, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(cached, reference, atol=1e-3)
    training.square().sum().backward()
    grads = [p.grad for n, p in model.named_parameters() if "recast_coefficients" in n]
    assert grads and all(grad is not None and grad.abs().sum() > 0 for grad in grads)


def test_adapters_share_one_fit_per_module_and_report_no_error():
    model = get_peft_model(tiny_bert(), RecastConfig(**BANDS))
    model.add_adapter("b", RecastConfig(**BANDS, coefficient_blocks=3))
    for layer in _layers(model).values():
        pointers = {tuple(t.data_ptr() for t in layer.recast_group[name].basis()) for name in ("default", "b")}
        assert len(pointers) == 1  # the same template tensors, whatever the number of adapters
    assert {group.relative_error for group in peft_recast.recast_summary(model).groups} == {0.0}  # the bands sum to W


def test_conv2d_kernels():
    torch.manual_seed(0)
    convs = nn.Sequential(nn.Conv2d(4, 6, 3, padding=1), nn.Tanh(), nn.Conv2d(6, 6, 3, padding=1))
    model = get_peft_model(convs, RecastConfig(target_modules=["0", "2"], **BANDS, coefficient_blocks=1)).eval()
    randomize_coefficients(model)
    layer = model.base_model.model[0]
    theta = layer.recast_coefficients["default"].detach()[0, :, 0]
    fit = layer.recast_group["default"].fit
    unit = 10.0 * fit.singular_values.norm() / math.sqrt(2)
    bands = _all_bands(fit, layer.get_base_layer().weight.detach())
    expected = sum(unit / norm * t * band for t, norm, band in zip(theta.double(), fit.norms(), bands))
    torch.testing.assert_close(layer.get_delta_weight("default").double(), expected, rtol=1e-5, atol=1e-6)
