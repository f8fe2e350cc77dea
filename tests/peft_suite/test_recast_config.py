"""PEFT's test_config.py (TestPeftConfig) re-parametrised with RECAST. See recast_peft_harness.py."""

from __future__ import annotations

import peft_upstream_tests.test_config as tc
from recast_peft_exclusions import AS_IS, EXCLUSIONS
from recast_peft_harness import recast_test_class

from peft_recast import RecastConfig

CONFIG_CASES = [
    (RecastConfig, {}),
    (RecastConfig, {"num_groups": 3, "num_templates": 4, "num_coefficient_sets": 2, "init_weights": False}),
]

TestRecastPeftConfig = recast_test_class(
    "TestRecastPeftConfig",
    tc.TestPeftConfig,
    __name__,
    recast_params={("config_class", "mandatory_kwargs"): CONFIG_CASES, ("config_class",): [RecastConfig]},
    exclusions=EXCLUSIONS,
    as_is=AS_IS,
)
