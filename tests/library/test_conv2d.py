"""torch.nn.Conv2d layers: the paper's ResNet setting (shared banks for the blocks after the first of each stage),
identity at init, merge / unmerge, save / load, mixed batches, grouped convs and template banks."""

import pytest
import torch
from peft import PeftModel, get_peft_model
from safetensors.torch import load_file

from peft_recast import RecastConfig, recast_summary
from peft_recast.bank import MimicrySettings, save_template_bank
from peft_recast.gradient_mimicry import mimic_template_bank
from peft_recast.layer import Conv2d

from ..models import GroupedConvNet, tiny_resnet


@pytest.fixture
def pixels() -> torch.Tensor:
    return torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(2))


def _out(model, pixels):
    return model(pixel_values=pixels).pooler_output


def test_conv_preset_templates_the_non_first_blocks_of_each_stage(pixels):
    base = tiny_resnet()
    expected = _out(base, pixels)
    model = get_peft_model(base, RecastConfig.from_preset("conv"))
    names = set(model.targeted_module_names)
    assert names == {
        f"encoder.stages.{s}.layers.{b}.layer.{c}.convolution" for s in (0, 1) for b in (1, 2) for c in (0, 1)
    }
    assert all(isinstance(model.base_model.model.get_submodule(n), Conv2d) for n in names)
    groups = recast_summary(model).groups
    # one bank per stage and conv position, n = blocks - 1 = 2 templates, K = 2
    assert sorted(g.name for g in groups) == sorted(
        f"encoder.stages.{s}.layers.1-2.layer.{c}.convolution" for s in (0, 1) for c in (0, 1)
    )
    assert model.get_nb_trainable_parameters()[0] == 4 * 2 * 2 * 2
    assert torch.equal(_out(model, pixels), expected)  # identity at init, bit for bit


def test_resnet34_layout_counts_168_coefficients():
    # official ResNet-34 code: stages of [3, 4, 6, 3] blocks, banks of n = b - 1 templates for conv1 and conv2 of
    # blocks 2..b, K = 2: 16 + 36 + 100 + 16 = 168 (shared/research/recast-paper.md §1.5)
    base = tiny_resnet(depths=(3, 4, 6, 3), hidden_sizes=(4, 4, 8, 8))
    model = get_peft_model(base, RecastConfig.from_preset("conv"))
    assert model.get_nb_trainable_parameters()[0] == 168


def test_merge_unmerge_save_load(tmp_path, pixels):
    model = get_peft_model(tiny_resnet(), RecastConfig.from_preset("conv", init_weights=False))
    layer = model.base_model.model.encoder.stages[1].layers[2].layer[0].convolution
    original = layer.get_base_layer().weight.clone()
    weights = {n: m.get_base_layer().weight.clone() for n, m in model.named_modules() if isinstance(m, Conv2d)}
    adapted = _out(model, pixels)
    assert not torch.allclose(adapted, _out(tiny_resnet(), pixels))
    model.merge_adapter()
    torch.testing.assert_close(_out(model, pixels), adapted, atol=1e-5, rtol=1e-4)
    assert not torch.equal(layer.get_base_layer().weight, original)
    model.unmerge_adapter()
    for name, module in model.named_modules():
        if isinstance(module, Conv2d):
            assert torch.equal(module.get_base_layer().weight, weights[name])
    model.save_pretrained(tmp_path)
    tensors = load_file(tmp_path / "adapter_model.safetensors")
    assert all(key.endswith(".recast_coefficients") for key in tensors) and len(tensors) == 8
    reloaded = PeftModel.from_pretrained(tiny_resnet(), tmp_path)
    torch.testing.assert_close(_out(reloaded, pixels), adapted)
    with pytest.raises(ValueError, match="does not belong to this base model"):
        PeftModel.from_pretrained(tiny_resnet(seed=1), tmp_path)
    merged = reloaded.merge_and_unload()
    assert not any(isinstance(m, Conv2d) for m in merged.modules())
    torch.testing.assert_close(_out(merged, pixels), adapted, atol=1e-5, rtol=1e-4)


def test_mixed_batch_equals_each_adapter_alone(pixels):
    model = get_peft_model(tiny_resnet(), RecastConfig.from_preset("conv", init_weights=False), adapter_name="task0")
    model.add_adapter("task1", RecastConfig.from_preset("conv", init_weights=False, num_coefficient_sets=1))
    model.eval()  # mixed batches are for inference (and BatchNorm must use its running statistics)
    alone = {}
    for name in ("task0", "task1"):
        model.set_adapter(name)
        alone[name] = _out(model, pixels)
    with model.disable_adapter():
        alone["__base__"] = _out(model, pixels)
    names = ["task0", "task1", "__base__", "task1"]
    mixed = model(pixel_values=pixels, adapter_names=names).pooler_output
    for row, name in enumerate(names):
        torch.testing.assert_close(mixed[row], alone[name][row], atol=1e-5, rtol=1e-4)


def test_grouped_conv_with_gradient_template_bank(tmp_path):
    torch.manual_seed(0)
    net = GroupedConvNet().eval()
    x = torch.randn(2, 6, 8, 8, generator=torch.Generator().manual_seed(3))
    expected = net(x)
    config = RecastConfig(target_modules=["layers.0", "layers.1", "layers.2", "layers.3"], layers_per_group=4,
                          num_templates=3)
    bank = mimic_template_bank(net, config, MimicrySettings.resnet(steps=40, lr_step=20), progress=False)
    path = save_template_bank(bank, str(tmp_path))
    assert bank.groups["layers.0-3"].templates.shape == (3, 6 * 2 * 3 * 3)
    residual = get_peft_model(net, RecastConfig(**{**config.to_dict(), "peft_type": None, "template_bank": path,
                                                   "init_weights": False}))
    residual_out = residual(x)
    assert not torch.allclose(residual_out, expected)
    residual.merge_adapter()
    torch.testing.assert_close(residual(x), residual_out, atol=1e-5, rtol=1e-4)
    residual.unmerge_adapter()
    with residual.disable_adapter():
        assert torch.equal(residual(x), expected)
