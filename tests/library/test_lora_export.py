"""Export to LoRA with PEFT's ``convert_to_lora`` / ``save_as_lora`` (RECAST declares ``supports_lora_conversion``).

A RECAST update ``delta_W = sum_j c_j W_j`` is a combination of pretrained weights, so it is generally full rank: the
LoRA factors are its truncated SVD, exact at full rank and an approximation below it.
"""

from __future__ import annotations

import pytest
import torch
from peft import LoraConfig, PeftModel, convert_to_lora, get_peft_model, save_as_lora, set_peft_model_state_dict

from peft_recast import RecastConfig
from peft_recast.layer import RecastLayer

from ..helpers import MINILM_MODULE
from ..models import MODEL_BUILDERS, minilm, model_output, tiny_bert_classifier


def _relative_errors(recast_model, lora_state: dict[str, torch.Tensor]) -> list[float]:
    """``||delta_W - B A|| / ||delta_W||`` per RECAST layer (Frobenius norms), in the layer's stored layout."""
    errors = []
    for name, module in recast_model.named_modules():
        if isinstance(module, RecastLayer):
            delta = module.get_delta_weight("default").float()
            lora = lora_state[f"{name}.lora_B.weight"].float() @ lora_state[f"{name}.lora_A.weight"].float()
            lora = lora.T if module.fan_in_fan_out else lora
            errors.append(((delta - lora).norm() / delta.norm()).item())
    return errors


# PEFT's conversion does not carry `fan_in_fan_out` into the LoraConfig it builds: LoRA then warns about GPT-2's Conv1D
# layers (and sets it itself) when the exported config is applied
LORA_CONV1D_NOTE = "ignore:fan_in_fan_out is set to False but the target module is `Conv1D`:UserWarning:peft.tuners.lora"


@pytest.mark.filterwarnings(LORA_CONV1D_NOTE)
def test_full_rank_lora_reproduces_the_adapter(model_kind, recast_config, input_ids):
    # one block of rows: PEFT sums the squared singular values in float32, so a float rank of 1.0 drops those whose
    # share is below its rounding (~1e-7); the two-block default's random deltas have such a value in two tiny-BERT
    # layers (rank 31 of 32, error 1.4e-4); the next test exports the default at an integer full rank instead
    config = recast_config(init_weights=False, coefficient_blocks=1)
    model = get_peft_model(MODEL_BUILDERS[model_kind](), config).eval()
    assert model.supports_lora_conversion()
    expected, base = model_output(model, input_ids), None
    with model.disable_adapter():
        base = model_output(model, input_ids)
    # a float rank keeps that share of each delta's squared singular values: 1.0 is full rank, layer by layer
    lora_config, state = convert_to_lora(model, rank=1.0)
    assert isinstance(lora_config, LoraConfig) and lora_config.rank_pattern == lora_config.alpha_pattern
    assert max(_relative_errors(model, state)) < 1e-5
    lora = get_peft_model(MODEL_BUILDERS[model_kind](), lora_config).eval()
    assert not set_peft_model_state_dict(lora, state).unexpected_keys
    out = model_output(lora, input_ids)
    torch.testing.assert_close(out, expected, atol=1e-4, rtol=1e-4)
    assert not torch.allclose(out, base, atol=1e-4)


@pytest.mark.filterwarnings(LORA_CONV1D_NOTE)
@pytest.mark.parametrize("model_kind", ["bert", "gpt2"])  # every targeted delta of these has 32 as its smaller side
def test_default_adapter_exported_at_integer_full_rank_is_exact(model_kind, recast_config, input_ids):
    model = get_peft_model(MODEL_BUILDERS[model_kind](), recast_config(init_weights=False)).eval()
    layer = next(m for m in model.modules() if isinstance(m, RecastLayer))
    assert layer.recast_coefficients["default"].shape == (1, 2, 2)  # the default: 2 blocks of output rows
    expected = model_output(model, input_ids)
    lora_config, state = convert_to_lora(model, rank=32)
    assert max(_relative_errors(model, state)) < 1e-5
    lora = get_peft_model(MODEL_BUILDERS[model_kind](), lora_config).eval()
    assert not set_peft_model_state_dict(lora, state).unexpected_keys
    torch.testing.assert_close(model_output(lora, input_ids), expected, atol=1e-4, rtol=1e-4)


def test_error_shrinks_with_rank_and_equals_the_svd_tail():
    model = get_peft_model(MODEL_BUILDERS["bert"](), RecastConfig(init_weights=False)).eval()
    layer = next(m for m in model.modules() if isinstance(m, RecastLayer))
    singular = torch.linalg.svdvals(layer.get_delta_weight("default").double())
    previous = None
    for rank in (2, 8, 16, 24):
        errors = _relative_errors(model, convert_to_lora(model, rank=rank)[1])
        tail = (singular[rank:].pow(2).sum() / singular.pow(2).sum()).sqrt().item()  # Eckart-Young
        assert errors[0] == pytest.approx(tail, rel=1e-3, abs=1e-6)
        if previous is not None:
            assert all(e < p for e, p in zip(errors, previous))
        previous = errors


def test_save_as_lora_loads_as_a_lora_adapter_with_the_head(tmp_path):
    model = get_peft_model(tiny_bert_classifier(num_labels=3), RecastConfig(task_type="SEQ_CLS", init_weights=False))
    model.eval()
    with torch.no_grad():
        model.base_model.model.classifier.modules_to_save["default"].weight.add_(0.5)
    ids = torch.randint(1, 100, (3, 6), generator=torch.Generator().manual_seed(0))
    expected = model(input_ids=ids).logits
    save_as_lora(tmp_path, model, rank=32)
    loaded = PeftModel.from_pretrained(tiny_bert_classifier(num_labels=3), tmp_path).eval()
    assert isinstance(loaded.peft_config["default"], LoraConfig)
    torch.testing.assert_close(loaded(input_ids=ids).logits, expected, atol=1e-4, rtol=1e-4)


@pytest.mark.requires_modules(MINILM_MODULE)
def test_minilm_export_error_by_rank():
    """On the real MiniLM (384 wide) the default adapter needs most of the rank: error falls to 0 only at 384."""
    torch.manual_seed(0)
    model = get_peft_model(minilm(add_pooling_layer=False), RecastConfig(init_weights=False)).eval()
    means = {}
    for rank in (8, 64, 384):
        errors = _relative_errors(model, convert_to_lora(model, rank=rank)[1])
        assert len(errors) == 12
        means[rank] = sum(errors) / len(errors)
    assert means[8] > means[64] > 0.05 and means[384] < 1e-5


def test_convolution_kernels_are_not_offered_for_conversion():
    """PEFT's conversion factors 2-d updates only; a model with RECAST ``Conv2d`` layers refuses instead of
    exporting a wrong LoRA."""
    torch.manual_seed(0)
    convolutions = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.ReLU(), torch.nn.Conv2d(4, 4, 3))
    # "0" and "2" hold no layer index: each is a group of its own, spanned by one template
    model = get_peft_model(convolutions, RecastConfig(target_modules=["0", "2"], num_templates=1, init_weights=False))
    assert not model.supports_lora_conversion()
    with pytest.raises(TypeError, match="do not support LoRA conversion"):
        convert_to_lora(model, rank=2)
