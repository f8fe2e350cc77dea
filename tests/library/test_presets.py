"""The paper's variants as presets: targets per model type, G / n / K, fused q/k/v, the paper's coefficient counts."""

import pytest
import torch
from peft import PeftModel, get_peft_model
from safetensors.torch import load_file
from transformers import ViTModel

from peft_recast import RecastConfig, recast_summary
from peft_recast.layer import RecastLayer
from peft_recast.presets import RECAST_PRESETS

from .. import models
from ..models import model_output, tiny_bert, tiny_gpt2


@pytest.fixture(scope="module")
def vit_small() -> ViTModel:
    return models.vit_small()


# The paper counts K x n coefficients per templated module (official code: num_cf = 2 sets of TEMPLATES = 2 scalars
# per layer and bank; shared/research/recast-paper.md §1.5). RECAST-Att templates the fused qkv weight, one module
# per layer: 12 x 2 x 2 = 48 ("fewer than 50"); RECAST-MLP templates fc1 and fc2: 12 x 2 x 2 x 2 = 96; both: 144.
@pytest.mark.parametrize("preset, expected", [("attention", 48), ("mlp", 96), ("attention+mlp", 144)])
def test_vit_small_presets_count_coefficients_as_the_paper(vit_small, preset, expected):
    model = get_peft_model(vit_small, RecastConfig.from_preset(preset))
    try:
        trainable, _ = model.get_nb_trainable_parameters()
        assert trainable == expected
        assert recast_summary(model).coefficients == expected
        config = model.peft_config["default"]
        assert (config.num_groups, config.num_templates, config.num_coefficient_sets) == (6, 2, 2)
        groups = recast_summary(model).groups
        assert all(group.modules == 2 and group.templates == 2 for group in groups)  # 12 layers / G = 6
    finally:
        model.unload()


def test_attention_preset_fuses_qkv_into_one_coefficient_tensor(vit_small):
    model = get_peft_model(vit_small, RecastConfig.from_preset("attention"))
    try:
        attention = model.base_model.model.layers[3].attention
        q, k, v = attention.q_proj, attention.k_proj, attention.v_proj
        assert q.recast_coefficients["default"] is k.recast_coefficients["default"] is v.recast_coefficients["default"]
        assert q.recast_coefficients["default"].shape == (2, 2, 1)
        assert not isinstance(attention.o_proj, RecastLayer)  # the paper leaves the output projection alone
        assert model.peft_config["default"].fused_modules == ["q_proj", "k_proj", "v_proj"]
        assert "layers.2-3.attention.q_proj+k_proj+v_proj" in model.peft_config["default"].base_fingerprint
    finally:
        model.unload()


def test_fused_adapter_trains_saves_and_reloads_with_the_tie(tmp_path, input_ids):
    config = RecastConfig.from_preset("attention", layers_per_group=2, init_weights=False)
    model = get_peft_model(tiny_bert(), config)
    assert model.get_nb_trainable_parameters()[0] == 4 * 2 * 2  # 4 layers, K = 2, n = 2
    query = model.base_model.model.encoder.layer[0].attention.self.query
    key = model.base_model.model.encoder.layer[0].attention.self.key
    before = key.get_delta_weight("default").clone()
    with torch.no_grad():
        query.recast_coefficients["default"].add_(0.01)  # one tensor drives all three roles
    assert not torch.equal(key.get_delta_weight("default"), before)
    expected = model_output(model, input_ids)
    model.save_pretrained(tmp_path)
    tensors = load_file(tmp_path / "adapter_model.safetensors")
    assert all(name.endswith(".recast_coefficients") for name in tensors)
    for low_cpu_mem_usage in (False, True):
        reloaded = PeftModel.from_pretrained(
            tiny_bert(), tmp_path, is_trainable=True, low_cpu_mem_usage=low_cpu_mem_usage
        )
        torch.testing.assert_close(model_output(reloaded, input_ids), expected)
        assert reloaded.get_nb_trainable_parameters()[0] == 16
        layer = reloaded.base_model.model.encoder.layer[2].attention.self
        assert layer.query.recast_coefficients["default"] is layer.value.recast_coefficients["default"]


def test_preset_targets_follow_the_model_type():
    bert = get_peft_model(tiny_bert(), RecastConfig.from_preset("mlp", layers_per_group=2))
    targets = {key.split(".", 3)[-1] for key in bert.targeted_module_names}  # "encoder.layer.0.output.dense"
    assert targets == {"intermediate.dense", "output.dense"}  # not attention.output.dense
    gpt2 = get_peft_model(tiny_gpt2(), RecastConfig.from_preset("attention", layers_per_group=2,
                                                                 **models.CONFIG_FIELDS["gpt2"]))
    assert all(name.endswith("attn.c_attn") for name in gpt2.targeted_module_names)  # GPT-2's qkv is fused already
    assert gpt2.get_nb_trainable_parameters()[0] == 4 * 2 * 2


def test_from_preset_overrides_and_errors():
    config = RecastConfig.from_preset("attention", layers_per_group=3, num_coefficient_sets=1)
    assert (config.num_groups, config.layers_per_group, config.num_coefficient_sets) == (None, 3, 1)
    assert config.preset == "attention" and RECAST_PRESETS["attention"]["num_groups"] == 6
    with pytest.raises(ValueError, match="Unknown RECAST preset 'qkv'"):
        RecastConfig.from_preset("qkv")
    with pytest.raises(ValueError, match="Unknown RECAST preset"):
        RecastConfig(preset="everything")
    model = torch.nn.Sequential(torch.nn.Linear(4, 4))
    with pytest.raises(ValueError, match="no target modules for model type"):
        get_peft_model(model, RecastConfig.from_preset("attention"))


def test_preset_survives_the_config_round_trip(tmp_path):
    config = RecastConfig.from_preset("attention+mlp", layers_per_group=2)
    config.save_pretrained(tmp_path)
    loaded = RecastConfig.from_pretrained(tmp_path)
    assert (loaded.preset, loaded.num_coefficient_sets, loaded.layers_per_group) == ("attention+mlp", 2, 2)


def test_recommended_lr_is_the_measured_rate_of_each_family():
    """1e-2 for query/value adapters (the default and ladder-24/144/1000), 3e-3 for every linear layer (ladder-216/648,
    or any all-linear config); inversely proportional to ``coefficient_scale``."""
    import peft_recast

    rates = {name: peft_recast.recommended_lr(RecastConfig.from_preset(name))
             for name in ("ladder-24", "ladder-48", "ladder-144", "ladder-216", "ladder-648", "ladder-1000")}
    assert rates == {"ladder-24": 1e-2, "ladder-48": 1e-2, "ladder-144": 1e-2, "ladder-216": 3e-3, "ladder-648": 3e-3,
                     "ladder-1000": 1e-2}
    assert peft_recast.recommended_lr(RecastConfig()) == peft_recast.RECOMMENDED_LR
    assert peft_recast.recommended_lr(RecastConfig(target_modules="all-linear")) == 3e-3
    assert peft_recast.recommended_lr(RecastConfig(template_family="own_spectrum")) == 3e-3
    assert peft_recast.recommended_lr(RecastConfig(template_family="spectral_bands")) == 1e-2
    assert peft_recast.recommended_lr(RecastConfig(coefficient_scale=5.0)) == pytest.approx(2e-2)


def test_ladder_1000_trains_at_most_1000_numbers_on_a_minilm_sized_bert():
    from transformers import BertConfig, BertModel

    base = BertModel(BertConfig(hidden_size=384, num_hidden_layers=6, num_attention_heads=12, intermediate_size=64,
                                vocab_size=32))
    model = get_peft_model(base, RecastConfig.from_preset("ladder-1000"))
    assert model.get_nb_trainable_parameters()[0] == 984  # 12 modules x 2 templates x 41 row blocks


@pytest.mark.parametrize("preset, bands, blocks, rate", [
    ("bands-24-qv-mlp", 1, 1, 3e-3), ("bands-48-qv-mlp", 2, 1, 1e-2), ("bands-144-qv-mlp", 2, 3, 1e-2)])
def test_bands_presets_adapt_query_value_and_the_mlp(vit_small, preset, bands, blocks, rate):
    """``bands-24-qv-mlp`` / ``bands-48-qv-mlp`` / ``bands-144-qv-mlp``: one / two / two spectral bands on one / one /
    three blocks of rows, on each query, value and MLP layer (24 / 48 / 144 numbers on a MiniLM-sized BERT); key and
    attention-output projections stay as they are; other model types resolve their own names."""
    from transformers import BertConfig, BertModel

    import peft_recast

    base = BertModel(BertConfig(hidden_size=384, num_hidden_layers=6, num_attention_heads=12, intermediate_size=64,
                                vocab_size=32))
    config = RecastConfig.from_preset(preset)
    model = get_peft_model(base, config)
    assert model.get_nb_trainable_parameters()[0] == 6 * 4 * bands * blocks  # 6 layers x 4 modules
    suffixes = {name.split("layer.")[1].split(".", 1)[1] for name in model.targeted_module_names}
    assert suffixes == {"attention.self.query", "attention.self.value", "intermediate.dense", "output.dense"}
    adapted = model.peft_config["default"]
    assert (adapted.template_family, adapted.num_templates, adapted.coefficient_blocks) == (
        "spectral_bands", bands, blocks)
    assert peft_recast.recommended_lr(config) == rate  # the rate each preset was measured at
    assert peft_recast.recommended_lr(RecastConfig.from_preset(preset, coefficient_scale=5.0)) == pytest.approx(2 * rate)
    vit = get_peft_model(vit_small, RecastConfig.from_preset(preset))
    assert {name.rsplit(".", 1)[1] for name in vit.targeted_module_names} == {"q_proj", "v_proj", "fc1", "fc2"}
    gpt2 = get_peft_model(tiny_gpt2(), RecastConfig.from_preset(preset, **models.CONFIG_FIELDS["gpt2"]))
    assert {name.rsplit(".", 2)[1] + "." + name.rsplit(".", 1)[1] for name in gpt2.targeted_module_names} == {
        "attn.c_attn", "mlp.c_fc", "mlp.c_proj"}
