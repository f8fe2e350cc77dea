"""RecastConfig: PEFT conventions, validation, serialisation."""

import pytest
from peft import PeftConfig
from peft.utils import PeftType

import peft_recast
from peft_recast import RECAST, RecastConfig


def test_registered_as_a_real_peft_type():
    assert PeftType.RECAST is RECAST
    assert PeftType("RECAST") is RECAST
    assert RECAST.value == "RECAST"
    assert RecastConfig().peft_type is RECAST


def test_lists_become_sets_like_other_peft_configs():
    config = RecastConfig(target_modules=["query", "value"], exclude_modules=["pooler"])
    assert config.target_modules == {"query", "value"}
    assert config.exclude_modules == {"pooler"}


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"layers_per_group": 2, "num_groups": 3}, "either `layers_per_group`"),
        ({"num_templates": 0}, "`num_templates` must be a positive integer"),
        ({"num_coefficient_sets": -1}, "`num_coefficient_sets` must be a positive integer"),
        ({"layers_per_group": 1.5}, "`layers_per_group` must be a positive integer"),
        ({"num_groups": True}, "`num_groups` must be a positive integer"),
        ({"coefficient_scale": 0}, "`coefficient_scale` must be a positive finite number"),
        ({"coefficient_scale": float("nan")}, "`coefficient_scale` must be a positive finite number"),
        ({"layers_pattern": "layer"}, "`layers_to_transform` must also be specified"),
        ({"bias": "lora_only"}, "`bias` must be"),
    ],
)
def test_bad_values_are_refused_with_a_clear_message(kwargs, message):
    with pytest.raises(ValueError, match=message):
        RecastConfig(**kwargs)


def test_layers_are_cut_into_groups_of_two_by_default():
    from peft_recast.planning import split_layers

    assert split_layers(list(range(5)), RecastConfig()) == [[0, 1], [2, 3], [4]]
    assert split_layers(list(range(5)), RecastConfig(layers_per_group=3)) == [[0, 1, 2], [3, 4]]
    assert split_layers(list(range(5)), RecastConfig(num_groups=2)) == [[0, 1, 2], [3, 4]]


def test_round_trip_through_adapter_config_json(tmp_path):
    config = RecastConfig(
        target_modules=["query"], layers_per_group=3, num_templates=3, num_coefficient_sets=2,
        base_fingerprint={"encoder.layer.0-2.attention.self.query": [3.0, 2.0, 1.0]},
    )
    config.save_pretrained(tmp_path)
    loaded = PeftConfig.from_pretrained(tmp_path)
    assert isinstance(loaded, RecastConfig)
    assert loaded.to_dict() == config.to_dict()


def test_public_api_is_small():
    assert set(peft_recast.__all__) == {
        "RECAST", "RECOMMENDED_LR", "RecastConfig", "RecastModel", "RecastSummary", "add_channels",
        "check_fsdp_wrapping", "fsdp_auto_wrap_policy", "hotswap_adapter", "load_adapters", "prune_gates", "rank_channels", "recast_summary",
        "recommended_lr", "save_adapters",
    }
