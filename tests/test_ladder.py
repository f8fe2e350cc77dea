"""Capacity knobs of the budget ladder: coefficient blocks (per head) and banks shared across module types."""

import pytest
import torch
from peft import PeftModel, get_peft_model

from peft_recast import RecastConfig
from peft_recast.layer import RecastLayer

from .tiny_models import model_output, tiny_bert, tiny_gpt2


def _layers(model) -> list[RecastLayer]:
    return [module for module in model.modules() if isinstance(module, RecastLayer)]


@pytest.mark.parametrize("builder, target", [(tiny_bert, "query"), (tiny_gpt2, "c_attn")])
def test_coefficient_blocks_give_each_block_of_output_rows_its_own_coefficients(builder, target):
    config = RecastConfig(target_modules=[target], num_templates=2, coefficient_blocks=4)
    model = get_peft_model(builder(), config)
    layer = _layers(model)[0]
    assert layer.recast_coefficients["default"].shape == (1, 2, 4)
    plain = get_peft_model(builder(), RecastConfig(target_modules=[target], num_templates=2))
    plain_layer = _layers(plain)[0]
    theta = torch.tensor([0.03, -0.02])
    with torch.no_grad():
        layer.recast_coefficients["default"][0, :, 1] = theta  # block 1 only
        plain_layer.recast_coefficients["default"][0] = theta
    delta, full = layer.get_delta_weight("default"), plain_layer.get_delta_weight("default")
    out_axis = 1 if layer.fan_in_fan_out else 0
    rows = full.shape[out_axis] // 4
    block = torch.arange(full.shape[out_axis]) // rows
    for b in range(4):
        got, expected = delta.index_select(out_axis, torch.where(block == b)[0]), full.index_select(
            out_axis, torch.where(block == b)[0]
        )
        if b == 1:
            torch.testing.assert_close(got, expected)
            assert got.abs().sum() > 0
        else:
            assert torch.equal(got, torch.zeros_like(got))


def test_coefficient_blocks_keep_identity_merge_and_save_guarantees(tmp_path, input_ids):
    base_output = model_output(tiny_bert(), input_ids)
    model = get_peft_model(tiny_bert(), RecastConfig(target_modules=["query", "value"], coefficient_blocks=4))
    torch.testing.assert_close(model_output(model, input_ids), base_output, atol=0, rtol=0)
    assert model.get_nb_trainable_parameters()[0] == 4 * 2 * 2 * 4  # 4 layers x 2 types x 2 templates x 4 blocks
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for layer in _layers(model):
            layer.recast_coefficients["default"].copy_(torch.randn(1, 2, 4, generator=generator) * 0.05)
    adapted = model_output(model, input_ids)
    assert not torch.allclose(adapted, base_output, atol=1e-3)
    model.merge_adapter()
    torch.testing.assert_close(model_output(model, input_ids), adapted, atol=1e-5, rtol=1e-5)
    model.unmerge_adapter()
    model.save_pretrained(tmp_path)
    reloaded = PeftModel.from_pretrained(tiny_bert(), tmp_path)
    torch.testing.assert_close(model_output(reloaded, input_ids), adapted, atol=1e-6, rtol=1e-6)


def test_coefficient_blocks_must_divide_the_output_rows():
    with pytest.raises(ValueError, match="`coefficient_blocks`=5 must divide the output features"):
        get_peft_model(tiny_bert(), RecastConfig(target_modules=["query"], coefficient_blocks=5))


def test_banks_shared_across_module_types_span_every_module_of_the_layers(input_ids):
    config = RecastConfig(target_modules=["query", "key", "value"], layers_per_group=2, num_templates=6,
                          share_across_module_types=True)
    model = get_peft_model(tiny_bert(), config)
    groups = {layer.recast_group["default"].name: layer.recast_group["default"] for layer in _layers(model)}
    assert sorted(groups) == ["encoder.layer.0-1.*", "encoder.layer.2-3.*"]
    assert all(len(group.members) == 6 for group in groups.values())  # q, k, v of two layers
    assert model.get_nb_trainable_parameters()[0] == 12 * 6
    layer = _layers(model)[0]
    assert all(l.recast_coefficients["default"].shape == (1, 6) for l in _layers(model))
    assert [m.get_base_layer() for m in layer.recast_group["default"].members] == [
        model.base_model.model.encoder.layer[i].attention.self.get_submodule(kind).get_base_layer()
        for i in (0, 1) for kind in ("key", "query", "value")
    ]
    assert torch.equal(model_output(model, input_ids), model_output(tiny_bert(), input_ids))
    per_type = get_peft_model(tiny_bert(), RecastConfig(target_modules=["query", "key", "value"], layers_per_group=2))
    assert sorted({l.recast_group["default"].name for l in _layers(per_type)}) == [
        f"encoder.layer.{span}.attention.self.{kind}" for span in ("0-1", "2-3") for kind in ("key", "query", "value")
    ]
    assert layer.recast_mixing["default"].shape == (6, 6)
