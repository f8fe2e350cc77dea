"""``template_family="own_spectrum"``: rank-one templates from each module's own singular pairs
(``peft_recast/spectrum.py``), through every path the group-span family has."""

import copy
import math

import pytest
import torch
from peft import get_peft_model
from torch import nn

from peft_recast import RecastConfig
from peft_recast.spectrum import OwnSpectrum, fit_spectrum, shell_pairs, spectrum_of

from ..models import MODEL_BUILDERS, model_output, randomize_coefficients, tiny_bert

SPECTRUM = {"template_family": "own_spectrum", "num_templates": 4, "coefficient_blocks": 1}


def _spectral(recast_config, **kwargs):
    return recast_config(**{**SPECTRUM, **kwargs})


def _layers(model, adapter="default"):
    return {key: module for key, module in model.named_modules() if spectrum_of_safe(module, adapter)}


def spectrum_of_safe(module, adapter):
    return hasattr(module, "recast_group") and spectrum_of(module, adapter) is not None


def test_shell_order_fills_square_cores():
    assert shell_pairs(4) == [(0, 0), (1, 1), (0, 1), (1, 0)]
    assert shell_pairs(2) == [(0, 0), (1, 1)]  # the top two singular values
    assert sorted(shell_pairs(9)) == [(i, j) for i in range(3) for j in range(3)]
    assert len(set(shell_pairs(81))) == 81 and max(max(p) for p in shell_pairs(81)) == 8


def test_fit_is_canonical_and_exact():
    weight = torch.randn(12, 7, generator=torch.Generator().manual_seed(0))
    fit = fit_spectrum(weight, 9)
    assert fit.left.shape == (12, 3) and fit.right.shape == (3, 7)
    rebuilt = (fit.left * fit.singular_values[:3]) @ fit.right
    full = torch.linalg.svd(weight.double(), full_matrices=False)
    expected = (full.U[:, :3] * full.S[:3]) @ full.Vh[:3]
    torch.testing.assert_close(rebuilt, expected)
    # each left vector's largest entry is positive, so a sign flip of the input gives the same templates
    assert (fit.left.gather(0, fit.left.abs().argmax(0, keepdim=True)) > 0).all()
    flipped = fit_spectrum(-weight, 9)
    torch.testing.assert_close(flipped.left, fit.left)
    torch.testing.assert_close(flipped.right, -fit.right)
    with pytest.raises(ValueError, match="needs 3 nonzero singular values for 9 templates"):
        fit_spectrum(torch.outer(torch.ones(5), torch.ones(4)), 9)


def test_update_is_the_documented_combination(model_kind, recast_config, input_ids):
    """delta_W = s ||W||_F / sqrt(n) sum_k theta_k u_{i_k} v_{j_k}^T, checked against an explicit SVD."""
    model = get_peft_model(MODEL_BUILDERS[model_kind](), _spectral(recast_config, coefficient_blocks=2))
    randomize_coefficients(model)
    for layer in _layers(model).values():
        weight = layer.get_base_layer().weight.detach().double()
        matrix = weight.T if layer.fan_in_fan_out else weight
        u, s, vh = torch.linalg.svd(matrix, full_matrices=False)
        theta = layer.recast_coefficients["default"].detach().double().mean(0)  # (n, B)
        unit = 10.0 * s.norm() / math.sqrt(4)
        rows = torch.tensor_split(torch.arange(matrix.shape[0]), 2)
        expected = torch.zeros_like(matrix)
        for k, (i, j) in enumerate(shell_pairs(4)):
            sign = torch.sign(u[u[:, i].abs().argmax(), i]) * torch.sign(u[u[:, j].abs().argmax(), j])
            for b, block in enumerate(rows):
                expected[block] += unit * theta[k, b] * sign * torch.outer(u[block, i], vh[j])
        delta = layer.get_delta_weight("default").double()
        torch.testing.assert_close(delta.T if layer.fan_in_fan_out else delta, expected, rtol=1e-4, atol=1e-6)


def test_identity_at_init_training_matches_the_rebuilt_weight(model_kind, recast_config, input_ids):
    base = MODEL_BUILDERS[model_kind]().eval()
    reference = model_output(base, input_ids)
    model = get_peft_model(copy.deepcopy(base), _spectral(recast_config, num_templates=9)).eval()
    assert model.get_nb_trainable_parameters()[0] == len(_layers(model)) * 9
    torch.testing.assert_close(model_output(model, input_ids), reference, rtol=0, atol=0)
    randomize_coefficients(model)
    with torch.no_grad():
        cached = model_output(model, input_ids)  # the adapted weight, rebuilt and cached
    low_rank = model_output(model, input_ids)  # with gradients: base output plus (x right^T theta) left^T
    torch.testing.assert_close(low_rank, cached, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(cached, reference, atol=1e-3)
    low_rank.square().sum().backward()
    grads = [p.grad for n, p in model.named_parameters() if "recast_coefficients" in n]
    # the same loss through the rebuilt weight gives the same coefficient gradients
    twin = copy.deepcopy(model)
    for layer in _layers(twin).values():
        layer._adapted_forward = lambda x, adapters, layer=layer: layer._call_base(x, layer._adapted_weight(adapters))
    model_output(twin, input_ids).square().sum().backward()
    twin_grads = [p.grad for n, p in twin.named_parameters() if "recast_coefficients" in n]
    for grad, twin_grad in zip(grads, twin_grads):
        torch.testing.assert_close(grad, twin_grad, rtol=1e-4, atol=1e-5)


def test_relative_error_is_the_energy_off_the_diagonal_pairs():
    model = get_peft_model(tiny_bert(), RecastConfig(**SPECTRUM))  # pairs (0,0), (1,1), (0,1), (1,0)
    for layer in _layers(model).values():
        values = torch.linalg.svd(layer.get_base_layer().weight.double()).S
        group = spectrum_of(layer, "default")
        assert isinstance(group, OwnSpectrum)
        expected = (1 - values[:2].square().sum() / values.square().sum()).sqrt()
        assert group.relative_error == pytest.approx(float(expected))


def test_position_sharing_keeps_the_count_with_depth():
    counts = []
    for layers in (4, 8):
        config = RecastConfig(**SPECTRUM, coefficient_sharing="position")
        counts.append(get_peft_model(tiny_bert(layers=layers), config).get_nb_trainable_parameters()[0])
    assert counts == [2 * 2 * 4, 2 * 2 * 4]  # q, v x 2 positions x 4 templates, on 4 or 8 layers


class Convs(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.layers = nn.ModuleList([nn.ModuleDict({"conv": nn.Conv2d(4, 4, 3, padding=1)}) for _ in range(2)])

    def forward(self, x):
        for layer in self.layers:
            x = torch.tanh(layer["conv"](x))
        return x


def test_conv2d_kernels_flatten_into_the_input_side():
    model = get_peft_model(Convs(), RecastConfig(target_modules=["conv"], **SPECTRUM)).eval()
    randomize_coefficients(model)
    layer = model.base_model.model.layers[0]["conv"]
    delta = layer.get_delta_weight("default")
    assert delta.shape == (4, 4, 3, 3) and torch.linalg.matrix_rank(delta.reshape(4, -1)) == 2  # a 2 x 2 core
