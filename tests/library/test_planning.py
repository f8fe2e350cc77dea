"""Planning on a bare model (what gradient mimicry and fidelity reports use) finds the groups injection builds."""

import copy

import pytest
import torch
from peft import get_peft_model

from peft_recast import RecastConfig
from peft_recast.planning import GroupFits, plan_model_groups

from ..models import tiny_bert, tiny_gpt2, tiny_llama, tiny_resnet

CASES = [
    ("bert default", tiny_bert, RecastConfig()),
    ("bert attention preset, fused q/k/v", tiny_bert, RecastConfig.from_preset("attention")),
    ("bert ladder-648, all linear", tiny_bert, RecastConfig.from_preset("ladder-648")),
    ("bert excluded layer", tiny_bert,
     RecastConfig(target_modules=["query"], exclude_modules=["encoder.layer.1.attention.self.query"])),
    ("gpt2 Conv1D", tiny_gpt2, RecastConfig(num_groups=1, fan_in_fan_out=True)),
    ("llama mlp preset", tiny_llama, RecastConfig.from_preset("mlp", layers_per_group=2)),
    ("resnet conv preset", tiny_resnet, RecastConfig.from_preset("conv")),
]


@pytest.mark.parametrize("name, builder, config", CASES, ids=[case[0] for case in CASES])
def test_a_bare_model_plans_the_groups_and_fingerprint_that_injection_builds(name, builder, config):
    model = builder()
    state = {key: value.clone() for key, value in model.state_dict().items()}
    before = copy.deepcopy(config)
    plans = plan_model_groups(model, config)
    assert config == before  # the caller's config is not resolved in place
    assert all(torch.equal(value, state[key]) for key, value in model.state_dict().items())
    fits = GroupFits()
    fingerprint = {plan.name: fits.fit(plan, config.num_templates, plan.weights()).fingerprint() for plan in plans}
    injected = get_peft_model(model, config).peft_config["default"]
    assert fingerprint == injected.base_fingerprint
    keys = sorted(key for plan in plans for unit in plan.units for key, _ in unit)
    adapted = sorted(key for key, module in model.named_modules() if hasattr(module, "recast_coefficients")
                     or hasattr(module, "recast_group"))
    assert keys == adapted


def test_planning_a_model_without_the_targets_says_so():
    with pytest.raises(ValueError, match=r"Target modules \{'nothing'\} not found in the base model"):
        plan_model_groups(tiny_bert(), RecastConfig(target_modules=["nothing"]))
