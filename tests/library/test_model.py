"""RECAST layers and tuner on tiny BERT, GPT-2 (Conv1D) and Llama models."""

import copy
import warnings

import pytest
import torch
from peft import get_peft_model
from peft.tuners.tuners_utils import BaseTunerLayer
from transformers.pytorch_utils import Conv1D

from peft_recast import RecastConfig, recast_summary
from peft_recast.layer import RecastLayer

from ..models import CONFIG_FIELDS, MODEL_BUILDERS, model_output, tiny_bert, tiny_gpt2, tiny_roberta, tiny_vit


def _recast_layers(model):
    return [module for module in model.modules() if isinstance(module, RecastLayer)]


def _randomize(model, adapter="default", std=0.3, seed=0):
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in _recast_layers(model):
            if adapter in layer.recast_coefficients:
                coefficients = layer.recast_coefficients[adapter]
                coefficients.copy_(torch.randn(coefficients.shape, generator=generator) * std)


@pytest.fixture
def base(model_kind):
    return MODEL_BUILDERS[model_kind]()


def test_identity_at_init_is_exact(base, recast_config, input_ids):
    reference = model_output(base, input_ids)
    model = get_peft_model(base, recast_config())
    assert torch.equal(model_output(model, input_ids), reference)


def test_random_init_is_not_identity(base, recast_config, input_ids):
    reference = model_output(base, input_ids)
    model = get_peft_model(base, recast_config(init_weights=False))
    assert not torch.allclose(model_output(model, input_ids), reference, atol=1e-4)


def test_default_targets_and_coefficient_count(model_kind, recast_config):
    model = get_peft_model(MODEL_BUILDERS[model_kind](layers=6), recast_config())
    expected = {"bert": {"query", "value"}, "gpt2": {"c_attn"}, "llama": {"q_proj", "v_proj"}}[model_kind]
    names = {name.rsplit(".", 1)[-1] for name, m in model.named_modules() if isinstance(m, RecastLayer)}
    assert names == expected
    # 6 layers, 2 per group, 2 templates, one coefficient set, 2 blocks of output rows: 2 x 2 per module
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert trainable == 2 * 2 * 6 * len(expected)
    assert all(name.count("recast_coefficients") for name, p in model.named_parameters() if p.requires_grad)


def test_twelve_layer_encoder_trains_ninety_six_coefficients_or_forty_eight_with_one_block():
    """A 12-layer BERT (BERT-base's depth): 24 query/value modules x 2 templates x 2 blocks of rows by default; one
    block (ladder-24) keeps it under fifty."""
    model = get_peft_model(tiny_bert(layers=12), RecastConfig())
    assert recast_summary(model).coefficients == 24 * 2 * 2 == 96
    model = get_peft_model(tiny_bert(layers=12), RecastConfig(coefficient_blocks=1))
    assert recast_summary(model).coefficients == 24 * 2 == 48


def test_groups_follow_layers_per_group_and_num_groups():
    model = get_peft_model(tiny_bert(layers=5), RecastConfig(target_modules=["query"], num_templates=2,
                                                              coefficient_blocks=1))
    summary = recast_summary(model)
    assert [(g.name, g.modules, g.templates) for g in summary.groups] == [
        ("encoder.layer.0-1.attention.self.query", 2, 2),
        ("encoder.layer.2-3.attention.self.query", 2, 2),
        ("encoder.layer.4.attention.self.query", 1, 1),  # a lone module gets one template
    ]
    assert summary.coefficients == 2 + 2 + 2 + 2 + 1

    model = get_peft_model(tiny_bert(layers=5), RecastConfig(target_modules=["query"], num_groups=2, num_templates=3))
    assert [(g.modules, g.templates) for g in recast_summary(model).groups] == [(3, 3), (2, 2)]


def test_templates_are_shared_and_cost_no_memory(input_ids):
    base = tiny_bert()
    base_bytes = sum(t.numel() * t.element_size() for t in list(base.parameters()) + list(base.buffers()))
    model = get_peft_model(base, RecastConfig(target_modules=["query", "value"]))
    total = sum(t.numel() * t.element_size() for t in list(model.parameters()) + list(model.buffers()))
    layers = _recast_layers(model)
    first, second = layers[0], layers[2]  # layer 0 and layer 1 query
    assert first.recast_group["default"] is second.recast_group["default"]
    # only the coefficients (1x2x2: 2 templates x 2 blocks of rows) and the 2x2 mixing matrix per module are added
    assert total - base_bytes == len(layers) * (4 + 4) * 4


def test_only_coefficients_train_and_receive_gradients(base, recast_config, input_ids):
    model = get_peft_model(base, recast_config(init_weights=False))
    model.train()
    model_output(model, input_ids).pow(2).mean().backward()
    trainable = {name: p for name, p in model.named_parameters() if p.requires_grad}
    assert trainable and all("recast_coefficients" in name for name in trainable)
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in trainable.values())


def test_training_recovers_coefficients_of_a_teacher(input_ids):
    model = get_peft_model(tiny_bert(), RecastConfig(target_modules=["query", "key", "value", "dense"]))
    _randomize(model, std=0.2)
    with torch.no_grad():
        target = model_output(model, input_ids)
        for layer in _recast_layers(model):
            layer.recast_coefficients["default"].zero_()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=0.02)
    losses = []
    for _ in range(60):
        loss = (model_output(model, input_ids) - target).pow(2).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.1 * losses[0]


def test_merge_unmerge_restores_base_weights_exactly(base, recast_config, input_ids):
    model = get_peft_model(base, recast_config(init_weights=False))
    before = {name: p.detach().clone() for name, p in model.named_parameters() if "base_layer" in name}
    adapted = model_output(model, input_ids)
    model.merge_adapter()
    torch.testing.assert_close(model_output(model, input_ids), adapted, atol=1e-5, rtol=1e-5)
    changed = [name for name, p in model.named_parameters() if "base_layer.weight" in name and not torch.equal(p, before[name])]
    assert changed
    model.unmerge_adapter()
    for name, p in model.named_parameters():
        if name in before:
            assert torch.equal(p, before[name]), name
    torch.testing.assert_close(model_output(model, input_ids), adapted)


def test_merging_one_layer_keeps_its_siblings_right(input_ids):
    model = get_peft_model(tiny_bert(), RecastConfig(init_weights=False, target_modules=["query"]))
    adapted = model_output(model, input_ids)
    _recast_layers(model)[0].merge()  # only layer 0: its sibling (layer 1) still reads layer 0's pretrained weight
    torch.testing.assert_close(model_output(model, input_ids), adapted, atol=1e-5, rtol=1e-5)


def test_merge_and_unload_and_unload(base, recast_config, input_ids):
    reference = model_output(base, input_ids)
    model = get_peft_model(copy.deepcopy(base), recast_config(init_weights=False))
    adapted = model_output(model, input_ids)
    merged = model.merge_and_unload()
    assert not any(isinstance(m, BaseTunerLayer) for m in merged.modules())
    torch.testing.assert_close(model_output(merged, input_ids), adapted, atol=1e-5, rtol=1e-5)

    model = get_peft_model(copy.deepcopy(base), recast_config(init_weights=False))
    plain = model.unload()
    assert not any(isinstance(m, BaseTunerLayer) for m in plain.modules())
    assert torch.equal(model_output(plain, input_ids), reference)


def test_safe_merge_refuses_non_finite_coefficients():
    model = get_peft_model(tiny_bert(), RecastConfig())
    with torch.no_grad():
        _recast_layers(model)[0].recast_coefficients["default"].fill_(float("nan"))
    with pytest.raises(ValueError, match="NaNs detected in the merged weights. The adapter default seems to be broken"):
        model.merge_adapter(safe_merge=True)


def test_disable_adapter_gives_base_outputs(base, recast_config, input_ids):
    reference = model_output(base, input_ids)
    model = get_peft_model(base, recast_config(init_weights=False))
    with model.disable_adapter():
        assert torch.equal(model_output(model, input_ids), reference)
    model.merge_adapter()
    with model.disable_adapter():
        torch.testing.assert_close(model_output(model, input_ids), reference)


def test_several_adapters_switch_and_delete(base, recast_config, input_ids):
    model = get_peft_model(base, recast_config(init_weights=False))
    out_a = model_output(model, input_ids)
    model.add_adapter("b", recast_config(init_weights=False, num_coefficient_sets=2))
    assert model.active_adapter == "default"
    assert torch.equal(model_output(model, input_ids), out_a)
    model.set_adapter("b")
    out_b = model_output(model, input_ids)
    assert not torch.allclose(out_a, out_b, atol=1e-4)
    trainable = [name for name, p in model.named_parameters() if p.requires_grad]
    assert trainable and all(name.endswith(".b") for name in trainable)
    model.delete_adapter("default")
    for layer in _recast_layers(model):
        for container in (layer.recast_coefficients, layer.recast_mixing, layer.recast_group):
            assert "default" not in container
    assert torch.equal(model_output(model, input_ids), out_b)


def test_two_active_adapters_add_their_updates(input_ids):
    model = get_peft_model(tiny_bert(), RecastConfig(init_weights=False))
    model.add_adapter("b", RecastConfig(init_weights=False))
    model.base_model.set_adapter(["default", "b"])
    both = model_output(model, input_ids)
    model.merge_adapter(["default", "b"])
    torch.testing.assert_close(model_output(model, input_ids), both, atol=1e-5, rtol=1e-5)


def test_coefficient_sets_act_through_their_mean(input_ids):
    two_sets = get_peft_model(tiny_bert(), RecastConfig(num_coefficient_sets=2))
    one_set = get_peft_model(tiny_bert(), RecastConfig(num_coefficient_sets=1))
    _randomize(two_sets)
    with torch.no_grad():
        for many, one in zip(_recast_layers(two_sets), _recast_layers(one_set)):
            one.recast_coefficients["default"].copy_(many.recast_coefficients["default"].mean(0, keepdim=True))
    torch.testing.assert_close(model_output(two_sets, input_ids), model_output(one_set, input_ids))
    assert recast_summary(two_sets).coefficients == 2 * recast_summary(one_set).coefficients


def test_coefficient_sets_train_along_the_path_of_one_set_with_adamw(input_ids):
    """From the identity start, the K sets get equal gradients (each 1/K of the mean's), so they stay equal and AdamW,
    blind to a gradient's scale, moves their mean as it moves one set: K is a reparametrisation in training too."""
    outputs = []
    for sets in (1, 3):
        model = get_peft_model(tiny_bert(), RecastConfig(num_coefficient_sets=sets))
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
        for _ in range(5):
            loss = model_output(model, input_ids)[..., :4].mean()
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        outputs.append(model_output(model, input_ids))
        coefficients = _recast_layers(model)[0].recast_coefficients["default"].detach()
        assert coefficients.abs().sum() > 0 and torch.equal(coefficients, coefficients[:1].expand_as(coefficients))
    torch.testing.assert_close(outputs[1], outputs[0], atol=1e-5, rtol=1e-5)
    assert not torch.allclose(outputs[0], model_output(tiny_bert(), input_ids), atol=1e-3)


@pytest.mark.parametrize("scale", [None, 1.0, 3.0])
def test_coefficient_means_scaled_fraction_of_weight_norm(scale):
    extra = {} if scale is None else {"coefficient_scale": scale}
    model = get_peft_model(tiny_bert(), RecastConfig(target_modules=["query"], num_templates=2, coefficient_blocks=1,
                                                     **extra))
    layer = _recast_layers(model)[0]
    with torch.no_grad():
        layer.recast_coefficients["default"].copy_(torch.tensor([[[0.03], [-0.04]]]))
    delta = layer.get_delta_weight("default")
    ratio = (delta.norm() / layer.get_base_layer().weight.norm()).item()
    # templates are orthonormal: |delta| = s * |W| * |theta| / sqrt(n), s = 10 by default, n = 2
    assert ratio == pytest.approx(0.05 * (10.0 if scale is None else scale) / 2**0.5, rel=1e-4)


def test_conv1d_is_handled_with_fan_in_fan_out(input_ids):
    base = tiny_gpt2()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model = get_peft_model(base, RecastConfig(target_modules=["c_attn", "c_proj"], init_weights=False))
    assert any("fan_in_fan_out is set to False" in str(w.message) for w in caught)
    layers = _recast_layers(model)
    assert layers and all(isinstance(l.get_base_layer(), Conv1D) and l.fan_in_fan_out for l in layers)
    adapted = model_output(model, input_ids)
    model.merge_adapter()
    torch.testing.assert_close(model_output(model, input_ids), adapted, atol=1e-4, rtol=1e-4)


def test_unsupported_layer_is_refused():
    with pytest.raises(TypeError, match="RECAST supports `torch.nn.Linear`"):
        get_peft_model(tiny_bert(), RecastConfig(target_modules=["word_embeddings"]))


def test_targets_by_regex_exclusion_andlayer_index():
    model = get_peft_model(
        tiny_bert(layers=4),
        RecastConfig(target_modules=r".*\.(query|key)", exclude_modules=["encoder.layer.0.attention.self.key"]),
    )
    keys = sorted(name for name, m in model.named_modules() if isinstance(m, RecastLayer))
    assert len(keys) == 7 and not any("layer.0.attention.self.key" in k for k in keys)
    model = get_peft_model(tiny_bert(layers=4), RecastConfig(layers_to_transform=[2, 3], layers_pattern="layer"))
    keys = [name for name, m in model.named_modules() if isinstance(m, RecastLayer)]
    assert len(keys) == 4 and all(".layer.2." in k or ".layer.3." in k for k in keys)
    assert [g.name for g in recast_summary(model).groups] == [
        "encoder.layer.2-3.attention.self.query", "encoder.layer.2-3.attention.self.value"
    ]


def test_all_linear_targets_every_linear_layer_but_the_head():
    model = get_peft_model(tiny_gpt2(), RecastConfig(target_modules="all-linear", **CONFIG_FIELDS["gpt2"]))
    keys = {name.rsplit(".", 1)[-1] for name, m in model.named_modules() if isinstance(m, RecastLayer)}
    assert keys == {"c_attn", "c_proj", "c_fc"}


def test_half_precision_base_stays_finite_and_close(input_ids):
    reference = model_output(get_peft_model(tiny_bert(), RecastConfig(init_weights=False)), input_ids)
    for dtype in (torch.float16, torch.bfloat16):
        model = get_peft_model(tiny_bert().to(dtype), RecastConfig(init_weights=False))
        assert model.base_model.model.encoder.layer[0].attention.self.query.recast_coefficients["default"].dtype == torch.float32
        out = model_output(model, input_ids).float()
        assert torch.isfinite(out).all()
        torch.testing.assert_close(out, reference, atol=0.1, rtol=0.1)
        model.merge_adapter()
        model.unmerge_adapter()


def test_default_targets_for_roberta_and_vit():
    roberta, vit = tiny_roberta(), tiny_vit()
    pixels = torch.randn(2, 3, 8, 8)
    reference = vit(pixel_values=pixels).last_hidden_state
    for base, expected in ((roberta, {"query", "value"}), (vit, {"q_proj", "v_proj"})):
        model = get_peft_model(base, RecastConfig())
        names = {n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, RecastLayer)}
        assert names == expected
    assert torch.equal(model(pixel_values=pixels).last_hidden_state, reference)


def test_large_models_show_a_mimicry_progress_bar(monkeypatch, capsys):
    from peft_recast import planning

    monkeypatch.setattr(planning, "PROGRESS_MIN_NUMEL", 0)
    get_peft_model(tiny_bert(), RecastConfig())
    assert "RECAST mimicry" in capsys.readouterr().err
    monkeypatch.setattr(planning, "PROGRESS_MIN_NUMEL", 10**9)
    get_peft_model(tiny_bert(), RecastConfig())
    assert "RECAST mimicry" not in capsys.readouterr().err


@pytest.mark.parametrize(
    "shape, axis, blocks",
    [
        ((6, 4), 0, 1), ((6, 4), 0, 3), ((4, 6), 1, 2), ((6, 2, 3, 3), 0, 2),
        # uneven blocks (torch.tensor_split sizes): 3, 2, 2 rows; 2, 2, 1, 1, 1 rows; every row its own block
        ((7, 4), 0, 3), ((4, 7), 1, 3), ((7, 3), 0, 5), ((3, 7), 1, 5), ((5, 4), 0, 5), ((7, 2, 3, 3), 0, 3),
    ],
)
def test_basis_combination_is_the_blockwise_weighted_sum_with_its_exact_gradient(shape, axis, blocks):
    """``delta = sum_j mix[j, b] W_j`` on block ``b`` of the output rows (axis 1 for ``fan_in_fan_out``, conv kernels
    included), blocks cut as ``torch.tensor_split`` cuts them (sizes differ by at most one row when ``B`` does not
    divide them); its backward is checked against finite differences."""
    from peft_recast.combination import combine, row_blocks

    generator = torch.Generator().manual_seed(0)
    basis = [torch.randn(shape, dtype=torch.double, generator=generator) for _ in range(3)]
    mix = torch.randn(3, blocks, dtype=torch.double, generator=generator, requires_grad=True)
    expected = sum(
        torch.cat([mix[j, b] * rows for b, rows in enumerate(torch.tensor_split(basis[j], blocks, dim=axis))], dim=axis)
        for j in range(3)
    )
    rows = row_blocks(shape[axis], blocks)

    def combined_of(m: torch.Tensor) -> torch.Tensor:
        return combine(None, [m], [basis], [rows], axis, torch.double)

    combined = combined_of(mix)
    assert combined.shape == shape
    torch.testing.assert_close(combined, expected)
    assert torch.autograd.gradcheck(combined_of, (mix,))
