"""What every template family of a module's own weight (``own_spectrum``, ``spectral_bands``) shares with the group
span: exact merge and unmerge, save and load with a per-module fingerprint, mixed batches beside other adapters and
families, ``load_adapters``, weighted combines within a family, and the options a family refuses."""

import copy
import json

import pytest
import torch
from peft import PeftModel, get_peft_model
from torch import nn

import peft_recast
from peft_recast import RecastConfig, load_adapters

from ..models import model_output, randomize_coefficients, tiny_bert

FAMILIES = {
    "own_spectrum": {"template_family": "own_spectrum", "num_templates": 4, "coefficient_blocks": 1},
    "spectral_bands": {"template_family": "spectral_bands"},  # 2 bands x 2 blocks of rows
    "one_band": {"template_family": "spectral_bands", "num_templates": 1},  # the weight itself, not stored
}


@pytest.fixture(params=sorted(FAMILIES))
def family(request) -> dict:
    return FAMILIES[request.param]


def _adapted_keys(model, adapter="default"):
    return [key for key, module in model.named_modules() if adapter in getattr(module, "recast_group", {})]


def test_merge_unmerge_save_load_and_fingerprint(family, tmp_path, input_ids):
    base = tiny_bert().eval()
    model = get_peft_model(copy.deepcopy(base), RecastConfig(**family)).eval()
    randomize_coefficients(model)
    with torch.no_grad():
        adapted = model_output(model, input_ids)
        weights = {k: v.clone() for k, v in model.state_dict().items() if "base_layer.weight" in k}
        model.merge_adapter()
        torch.testing.assert_close(model_output(model, input_ids), adapted, rtol=1e-5, atol=1e-5)
        model.unmerge_adapter()
        assert all(torch.equal(v, model.state_dict()[k]) for k, v in weights.items())  # bit for bit
    model.save_pretrained(tmp_path / "adapter")
    saved = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert saved["template_family"] == family["template_family"]
    assert set(saved["base_fingerprint"]) == set(_adapted_keys(model.base_model.model))  # per module: its spectrum
    loaded = PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "adapter").eval()
    with torch.no_grad():
        torch.testing.assert_close(model_output(loaded, input_ids), adapted, rtol=0, atol=0)
    with pytest.raises(ValueError, match="does not belong to this base model"):
        PeftModel.from_pretrained(tiny_bert(seed=1), tmp_path / "adapter")
    config = RecastConfig(**family)
    per_module = config.num_templates * config.coefficient_blocks  # 4 (own spectrum, 2 bands), 2 (one band)
    assert {group.coefficients for group in peft_recast.recast_summary(loaded).groups} == {per_module}


def test_mixed_batch_with_blocks_channels_and_many_adapters(family, input_ids):
    config = {**family, "coefficient_blocks": 3}
    model = get_peft_model(tiny_bert(), RecastConfig(**config)).eval()
    randomize_coefficients(model)
    key = _adapted_keys(model.base_model.model)[0]
    for seed, name in enumerate(["b", "d"], start=1):
        model.add_adapter(name, RecastConfig(**config))
        randomize_coefficients(model, name, seed)
    model.add_adapter("rows", RecastConfig(**config, channels={key: [1, 4]}))
    randomize_coefficients(model, "rows", 5)
    names = ["b", "rows", "__base__", "default"]
    with torch.no_grad():
        mixed = model_output(model, input_ids, adapter_names=names)
        for row, name in enumerate(names):
            if name == "__base__":
                with model.disable_adapter():
                    alone = model_output(model, input_ids)
            else:
                model.set_adapter(name)
                alone = model_output(model, input_ids)
            torch.testing.assert_close(mixed[row], alone[row], rtol=1e-5, atol=1e-5)


def test_beside_the_other_families_and_weighted_combine(family, input_ids):
    family = {**family, "layers_per_group": 4}  # one group of q (and of v) over the 4 layers: 4 span templates
    model = get_peft_model(tiny_bert(), RecastConfig(**family)).eval()
    randomize_coefficients(model)
    same_layout = {key: value for key, value in family.items() if key != "template_family"}
    model.add_adapter("span", RecastConfig(init_weights=False, **same_layout))
    other = "spectral_bands" if family["template_family"] == "own_spectrum" else "own_spectrum"
    model.add_adapter("other", RecastConfig(**FAMILIES[other]))
    randomize_coefficients(model, "other", 3)
    names = ["span", "default", "other", "default"]
    with torch.no_grad():
        mixed = model_output(model, input_ids, adapter_names=names)
        for adapter, rows in (("default", [1, 3]), ("span", [0]), ("other", [2])):
            model.set_adapter(adapter)
            torch.testing.assert_close(mixed[rows], model_output(model, input_ids)[rows], rtol=1e-5, atol=1e-5)
        model.base_model.add_weighted_adapter(["default", "default"], [0.5, 1.5], "sum")
        layer = model.base_model.model.get_submodule(_adapted_keys(model.base_model.model)[0])
        torch.testing.assert_close(layer.get_delta_weight("sum"), 2 * layer.get_delta_weight("default"))
    name = family["template_family"]
    with pytest.raises(ValueError, match=f"`template_family` is '{name}' for one and 'group_span'"):
        model.base_model.add_weighted_adapter(["default", "span"], [1.0, 1.0], "bad")


def test_load_adapters_fast_path(family, tmp_path, input_ids):
    model = get_peft_model(tiny_bert(), RecastConfig(**family)).eval()
    paths = []
    for i in range(3):
        model.add_adapter(f"task{i}", RecastConfig(**family))
        randomize_coefficients(model, f"task{i}", i)
        model.save_pretrained(tmp_path, selected_adapters=[f"task{i}"])
        paths.append(str(tmp_path / f"task{i}"))
    with torch.no_grad():
        expected = []
        for i in range(3):
            model.set_adapter(f"task{i}")
            expected.append(model_output(model, input_ids))
    server = PeftModel.from_pretrained(tiny_bert(), paths[0], adapter_name="first").eval()
    assert load_adapters(server, paths, ["t0", "t1", "t2"]) == ["t0", "t1", "t2"]
    with torch.no_grad():
        mixed = model_output(server, input_ids, adapter_names=["t2", "t0", "t1", "t2"])
    for row, task in enumerate([2, 0, 1, 2]):
        torch.testing.assert_close(mixed[row], expected[task][row], rtol=1e-5, atol=1e-5)


def test_conv2d_training_matches_the_cached_weight(family):
    torch.manual_seed(0)
    convs = nn.Sequential(nn.Conv2d(4, 6, 3, padding=1), nn.Tanh(), nn.Conv2d(6, 6, 3, padding=1))
    config = RecastConfig(target_modules=["0", "2"], **{**family, "coefficient_blocks": 1})
    model = get_peft_model(convs, config).eval()
    randomize_coefficients(model)
    pixels = torch.randn(2, 4, 5, 5, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        cached = model(pixels)  # the adapted kernel, rebuilt and cached
        with model.disable_adapter():
            assert not torch.allclose(model(pixels), cached, atol=1e-4)
    model.train()
    output = model(pixels)  # with gradients
    torch.testing.assert_close(output, cached, rtol=1e-5, atol=1e-6)
    output.sum().backward()
    for layer in (model.base_model.model[0], model.base_model.model[2]):
        assert layer.recast_coefficients["default"].grad.abs().sum() > 0


@pytest.mark.parametrize("field, value", [
    ("template_bank", "some/bank"), ("fused_modules", ["query", "key", "value"]),
    ("share_across_module_types", True), ("weight_form", "replace"),
])
def test_clashing_options_are_refused(family, field, value):
    name = family["template_family"]
    with pytest.raises(ValueError, match=f"template_family='{name}' builds each module's templates"):
        RecastConfig(template_family=name, **{field: value})


def test_unknown_family_and_configs_without_the_field(tmp_path):
    with pytest.raises(ValueError, match="`template_family` must be 'group_span', 'own_spectrum' or 'spectral_bands'"):
        RecastConfig(template_family="spectrum")
    model = get_peft_model(tiny_bert(), RecastConfig())
    model.save_pretrained(tmp_path)
    path = tmp_path / "adapter_config.json"
    saved = json.loads(path.read_text())
    del saved["template_family"]
    path.write_text(json.dumps(saved))
    assert RecastConfig.from_pretrained(tmp_path).template_family == "group_span"
