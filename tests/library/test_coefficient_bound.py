"""`RecastConfig.coefficient_bound`: the layer uses b tanh(theta / b) in place of theta, everywhere theta acts."""

import pytest
import torch
from peft import PeftModel, get_peft_model

from peft_recast import RecastConfig

from ..models import model_output, tiny_bert

BOUND = 0.05


def _set_coefficients(model, values):
    for name, parameter in model.named_parameters():
        if "recast_coefficients" in name and name.endswith(".default"):
            parameter.data.copy_(values[name])


def _random_coefficients(model, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return {name: torch.randn(p.shape, generator=generator) * 0.2
            for name, p in model.named_parameters() if "recast_coefficients" in name}


def test_bound_squashes_the_coefficients_in_forward_merge_and_mixed_batches(tmp_path):
    input_ids = torch.randint(0, 100, (3, 7), generator=torch.Generator().manual_seed(1))
    bounded = get_peft_model(tiny_bert(), RecastConfig(coefficient_bound=BOUND)).eval()
    plain = get_peft_model(tiny_bert(), RecastConfig()).eval()
    values = _random_coefficients(bounded)
    assert max(v.abs().max().item() for v in values.values()) > 2 * BOUND  # far into the bound's flat part
    _set_coefficients(bounded, values)
    _set_coefficients(plain, {name: BOUND * torch.tanh(v / BOUND) for name, v in values.items()})
    expected = model_output(plain, input_ids)
    with torch.no_grad():
        unbounded = get_peft_model(tiny_bert(), RecastConfig()).eval()
        _set_coefficients(unbounded, values)
        assert not torch.allclose(model_output(unbounded, input_ids), expected, atol=1e-3)
    torch.testing.assert_close(model_output(bounded, input_ids), expected)
    torch.testing.assert_close(model_output(bounded, input_ids, adapter_names=["default", "__base__", "default"])[0],
                               expected[0])
    # saved and reloaded: the bound travels in the config and keeps the adapter's meaning
    bounded.save_pretrained(tmp_path)
    reloaded = PeftModel.from_pretrained(tiny_bert(), tmp_path).eval()
    assert reloaded.peft_config["default"].coefficient_bound == BOUND
    torch.testing.assert_close(model_output(reloaded, input_ids), expected)
    reloaded.merge_adapter()
    torch.testing.assert_close(model_output(reloaded, input_ids), expected, atol=1e-5, rtol=1e-5)


def test_bound_is_identity_at_init_and_its_gradient_is_the_plain_one_at_zero():
    input_ids = torch.randint(0, 100, (2, 5), generator=torch.Generator().manual_seed(2))
    base = tiny_bert().eval()
    with torch.no_grad():
        reference = model_output(base, input_ids)
    grads = []
    for bound in (BOUND, None):
        model = get_peft_model(tiny_bert(), RecastConfig(coefficient_bound=bound)).eval()
        output = model_output(model, input_ids)
        torch.testing.assert_close(output, reference)
        output.pow(2).sum().backward()
        grads.append(torch.cat([p.grad.flatten() for n, p in model.named_parameters() if p.requires_grad]))
    torch.testing.assert_close(grads[0], grads[1])  # d/dtheta of b tanh(theta / b) is 1 at theta = 0


@pytest.mark.parametrize("bound", [0, -0.1, float("inf"), True, "0.1"])
def test_bad_bound_is_refused(bound):
    with pytest.raises(ValueError, match="`coefficient_bound` must be a positive finite number"):
        RecastConfig(coefficient_bound=bound)


def test_bound_needs_the_residual_form():
    with pytest.raises(ValueError, match="use weight_form='residual' or coefficient_bound=None"):
        RecastConfig(coefficient_bound=0.1, weight_form="replace")


def test_adapters_with_different_bounds_are_not_combined():
    model = get_peft_model(tiny_bert(), RecastConfig(coefficient_bound=BOUND))
    model.add_adapter("other", RecastConfig())
    with pytest.raises(ValueError, match="coefficient_bound"):
        model.add_weighted_adapter(["default", "other"], [0.5, 0.5], "mix")
    assert "mix" not in model.peft_config


def test_bounded_adapters_are_not_combined_even_with_equal_bounds():
    """b tanh(theta / b) is not linear: a weighted sum of coefficients is not the weighted sum of the updates."""
    model = get_peft_model(tiny_bert(), RecastConfig(coefficient_bound=BOUND))
    model.add_adapter("other", RecastConfig(coefficient_bound=BOUND))
    with pytest.raises(ValueError, match="nonlinear function"):
        model.add_weighted_adapter(["default", "other"], [0.5, 0.5], "mix")
    assert "mix" not in model.peft_config
