"""PEFT's allow-list gates opened for RECAST where RECAST supports the feature (listed in GATE_OVERRIDES)."""

from __future__ import annotations

import peft_upstream_tests.testing_common as common
from recast_peft_harness import clone_function

from peft_recast import RecastConfig


def _skip_if_conv1d_not_supported(model_id, config_cls, config_kwargs):
    # RECAST supports transformers Conv1D: open PEFT's allow-list gate for it (GATE_OVERRIDES)
    if config_cls is RecastConfig:
        return
    return common._skip_if_conv1d_not_supported(model_id, config_cls, config_kwargs)


# PeftCommonTester helpers with their method allow-lists opened for RECAST (see GATE_OVERRIDES)
COMMON_HELPER_OVERRIDES = {
    name: clone_function(
        getattr(common.PeftCommonTester, name), {"_skip_if_conv1d_not_supported": _skip_if_conv1d_not_supported}
    )
    for name in dir(common.PeftCommonTester)
    if name.startswith("_test_")
}
COMMON_HELPER_OVERRIDES["_test_mixed_adapter_batches"] = clone_function(
    common.PeftCommonTester._test_mixed_adapter_batches, {"RoadConfig": RecastConfig}
)
COMMON_HELPER_OVERRIDES["_test_generate_with_mixed_adapter_batches_and_beam_search"] = clone_function(
    common.PeftCommonTester._test_generate_with_mixed_adapter_batches_and_beam_search, {"LoraConfig": RecastConfig}
)
# `issubclass(config_cls, (LoraConfig, IA3Config))` gate -> RECAST implements add_weighted_adapter; with IA3Config read
# as RecastConfig it takes IA3's branch, the method-independent one: add_weighted_adapter(adapters, weights, name) for
# one and for several adapters, positive and negative weights, then a forward pass through each new adapter
COMMON_HELPER_OVERRIDES["_test_weighted_combination_of_adapters"] = clone_function(
    common.PeftCommonTester._test_weighted_combination_of_adapters,
    {"IA3Config": RecastConfig, "_skip_if_conv1d_not_supported": _skip_if_conv1d_not_supported},
)


def check_beft_config(config_cls, model_id, config_kwargs):
    # test_decoder_models.check_beft_config is meant for BEFT only but its isinstance() test is always False, so it
    # skips / retargets every method on Llama, Gemma3 and GPT-J; applied to BEFT only it is a no-op here.
    return


def decoder_test_globals():
    return {"check_beft_config": check_beft_config}


def mixed_batch_test_globals():
    # test_decoder_models' `if config_cls != LoraConfig: pytest.skip(...)` gate on the mixed-batch tests
    return {"LoraConfig": RecastConfig, "check_beft_config": check_beft_config}
