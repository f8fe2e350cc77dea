"""Capacity knobs of the budget ladder: coefficient blocks (per head) and banks shared across module types."""

import pytest
import torch
from peft import PeftModel, get_peft_model

from peft_recast import RecastConfig
from peft_recast.layer import RecastLayer

from ..models import CONFIG_FIELDS, MODEL_BUILDERS, Narrow, model_output, tiny_bert


def _layers(model) -> list[RecastLayer]:
    return [module for module in model.modules() if isinstance(module, RecastLayer)]


def _assert_merged_and_reloaded_outputs_equal(model, adapted, input_ids, tmp_path) -> None:
    """Merged, and saved then loaded onto a fresh tiny BERT, ``model`` gives ``adapted`` again."""
    model.merge_adapter()
    torch.testing.assert_close(model_output(model, input_ids), adapted, atol=1e-5, rtol=1e-5)
    model.unmerge_adapter()
    model.save_pretrained(tmp_path)
    reloaded = PeftModel.from_pretrained(tiny_bert(), tmp_path)
    torch.testing.assert_close(model_output(reloaded, input_ids), adapted, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("kind, target", [("bert", "query"), ("gpt2", "c_attn")])
def test_coefficient_blocks_give_each_block_of_output_rows_its_own_coefficients(kind, target):
    builder, fields = MODEL_BUILDERS[kind], CONFIG_FIELDS[kind]
    config = RecastConfig(target_modules=[target], num_templates=2, coefficient_blocks=4, **fields)
    model = get_peft_model(builder(), config)
    layer = _layers(model)[0]
    assert layer.recast_coefficients["default"].shape == (1, 2, 4)
    plain = get_peft_model(builder(), RecastConfig(target_modules=[target], num_templates=2, coefficient_blocks=1,
                                                   **fields))
    plain_layer = _layers(plain)[0]
    assert plain_layer.recast_coefficients["default"].shape == (1, 2, 1)
    theta = torch.tensor([0.03, -0.02])
    with torch.no_grad():
        layer.recast_coefficients["default"][0, :, 1] = theta  # block 1 only
        plain_layer.recast_coefficients["default"][0, :, 0] = theta
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
    _assert_merged_and_reloaded_outputs_equal(model, adapted, input_ids, tmp_path)


@pytest.mark.parametrize("kind, target, sizes", [("bert", "query", [7, 7, 6, 6, 6]),
                                                 ("gpt2", "c_attn", [20, 19, 19, 19, 19])])
def test_coefficient_blocks_that_do_not_divide_the_rows_cut_them_as_tensor_split(kind, target, sizes):
    """5 blocks of 32 (query) or 96 (GPT-2's fused c_attn, stored ``(in, out)``) rows: the first ``out % 5`` blocks
    get one row more, in ``torch.tensor_split`` order, and each block's rows of ``delta_W`` follow only that block's
    coefficients, as a one-block layer with the same coefficients gives them."""
    builder, fields = MODEL_BUILDERS[kind], CONFIG_FIELDS[kind]
    model = get_peft_model(builder(), RecastConfig(target_modules=[target], num_templates=2, coefficient_blocks=5,
                                                   **fields))
    layer = _layers(model)[0]
    assert layer.recast_coefficients["default"].shape == (1, 2, 5)
    plain = get_peft_model(builder(), RecastConfig(target_modules=[target], num_templates=2, coefficient_blocks=1,
                                                   **fields))
    plain_layer = _layers(plain)[0]
    out_axis = 1 if layer.fan_in_fan_out else 0
    rows = torch.arange(layer.get_base_layer().weight.shape[out_axis])
    blocks = torch.tensor_split(rows, 5)
    assert [len(block) for block in blocks] == sizes and max(sizes) - min(sizes) == 1
    generator = torch.Generator().manual_seed(0)
    thetas = torch.randn(5, 2, generator=generator) * 0.05
    with torch.no_grad():
        layer.recast_coefficients["default"][0] = thetas.T  # block b: thetas[b]
    delta = layer.get_delta_weight("default")
    for b, block in enumerate(blocks):
        with torch.no_grad():
            plain_layer.recast_coefficients["default"][0, :, 0] = thetas[b]
        full = plain_layer.get_delta_weight("default")
        torch.testing.assert_close(delta.index_select(out_axis, block), full.index_select(out_axis, block))
        assert full.index_select(out_axis, block).abs().sum() > 0
    with torch.no_grad():  # one block at a time: the other blocks' rows stay exactly zero
        layer.recast_coefficients["default"].zero_()
        layer.recast_coefficients["default"][0, :, 2] = thetas[2]
    delta = layer.get_delta_weight("default")
    outside = torch.cat([block for b, block in enumerate(blocks) if b != 2])
    assert torch.equal(delta.index_select(out_axis, outside), torch.zeros_like(delta.index_select(out_axis, outside)))
    assert delta.index_select(out_axis, blocks[2]).abs().sum() > 0


def test_more_coefficient_blocks_than_output_rows_give_one_block_per_row(tmp_path, input_ids):
    """``B`` above a module's output rows caps at the rows (one block per row; a one-row module gets ``K x n x 1``
    coefficients); such adapters train, merge, and save and load."""
    x = torch.randn(5, 8, generator=torch.Generator().manual_seed(0))
    config = RecastConfig(target_modules=[f"layers.{i}" for i in range(4)], coefficient_blocks=5)
    model = get_peft_model(Narrow(), config)
    shapes = {name: layer.recast_coefficients["default"].shape for name, layer in model.named_modules()
              if isinstance(layer, RecastLayer)}
    assert shapes == {"base_model.model.layers.0": (1, 2, 3), "base_model.model.layers.1": (1, 2, 3),
                      "base_model.model.layers.2": (1, 2, 1), "base_model.model.layers.3": (1, 2, 1)}
    assert model.get_nb_trainable_parameters()[0] == 2 * 2 * 3 + 2 * 2
    reference = Narrow()(x)
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for layer in _layers(model):
            coefficients = layer.recast_coefficients["default"]
            coefficients.copy_(torch.randn(coefficients.shape, generator=generator) * 0.1)
    adapted = model(x)
    assert not torch.allclose(adapted, reference, atol=1e-3)
    adapted.pow(2).sum().backward()
    assert all(layer.recast_coefficients["default"].grad.abs().min() > 0 for layer in _layers(model))
    model.merge_adapter()
    torch.testing.assert_close(model(x), adapted, atol=1e-5, rtol=1e-5)
    model.unmerge_adapter()

    model = get_peft_model(tiny_bert(), RecastConfig(target_modules=["query", "value"], coefficient_blocks=40))
    layers = _layers(model)
    assert all(layer.recast_coefficients["default"].shape == (1, 2, 32) for layer in layers)  # 32 rows: 32 blocks
    base_output = model_output(tiny_bert(), input_ids)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=0.05)
    model.train()
    for _ in range(3):
        loss = model_output(model, input_ids)[..., 0].mean()  # push one hidden feature up
        optimizer.zero_grad()
        loss.backward()
        assert all(layer.recast_coefficients["default"].grad.abs().sum() > 0 for layer in layers)
        optimizer.step()
    model.eval()
    adapted = model_output(model, input_ids)
    assert not torch.allclose(adapted, base_output, atol=1e-3)
    plain = get_peft_model(tiny_bert(), RecastConfig(target_modules=["query", "value"], coefficient_blocks=1))
    layer, plain_layer = layers[0], _layers(plain)[0]
    delta = layer.get_delta_weight("default")
    for row in (0, 17, 31):  # row r of delta_W: the one-block update with row r's coefficients
        with torch.no_grad():
            plain_layer.recast_coefficients["default"].copy_(layer.recast_coefficients["default"][:, :, row : row + 1])
        torch.testing.assert_close(delta[row], plain_layer.get_delta_weight("default")[row])
    _assert_merged_and_reloaded_outputs_equal(model, adapted, input_ids, tmp_path)


def test_banks_shared_across_module_types_span_every_module_of_the_layers(input_ids):
    config = RecastConfig(target_modules=["query", "key", "value"], layers_per_group=2, num_templates=6,
                          coefficient_blocks=1, share_across_module_types=True)
    model = get_peft_model(tiny_bert(), config)
    groups = {layer.recast_group["default"].name: layer.recast_group["default"] for layer in _layers(model)}
    assert sorted(groups) == ["encoder.layer.0-1.*", "encoder.layer.2-3.*"]
    assert all(len(group.members) == 6 for group in groups.values())  # q, k, v of two layers
    assert model.get_nb_trainable_parameters()[0] == 12 * 6
    layer = _layers(model)[0]
    assert all(l.recast_coefficients["default"].shape == (1, 6, 1) for l in _layers(model))
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
