"""Shared set-up for PEFT's transformers-model test classes (decoder, encoder-decoder, feature extraction)."""

from __future__ import annotations

import peft_upstream_tests.testing_utils as testing_utils
from recast_peft_exclusions import EXCLUSIONS, EXPECTED_FAILURES, LORA_SUBSTITUTED
from recast_peft_harness import LORA_SUBSTITUTION, recast_test_class


class _AlwaysCached(dict):
    """`hub_online_once` treats a model id seen before as cached and switches offline for it; with the tiny models in
    a local cache every id is cached, so every access is offline (no first "online" access to an unreachable Hub)."""

    def __contains__(self, key):
        return True

    def __missing__(self, key):
        return 0


testing_utils._HUB_MODEL_ACCESSES = _AlwaysCached()


def model_test_class(name, parent, module_name, configs, models, *, helper_overrides, extra_globals=None):
    return recast_test_class(
        name,
        parent,
        module_name,
        recast_params={("config_cls", "config_kwargs"): configs},
        kept_params={("model_id",): models},
        exclusions=EXCLUSIONS,
        substituted=LORA_SUBSTITUTED,
        substitution_overrides=LORA_SUBSTITUTION,
        expected_failures=EXPECTED_FAILURES,
        test_global_overrides=extra_globals,
        attrs=helper_overrides,
    )
