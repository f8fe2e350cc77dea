"""PEFT's test_decoder_models.py (TestDecoderModels) re-parametrised with RECAST; tiny models come from the local
Hugging Face cache built by recast_tiny_models.py. See recast_peft_harness.py."""

from __future__ import annotations

import peft_upstream_tests.test_decoder_models as td
from recast_model_tests import model_test_class
from recast_peft_gates import COMMON_HELPER_OVERRIDES, mixed_batch_test_globals

from peft_recast import RecastConfig

CONFIGS = [
    (RecastConfig, {"task_type": "CAUSAL_LM", "target_modules": None}),
    # one group per role over all layers, K=3 coefficient sets, one block of output rows: the suite thus covers both
    # the default (2 blocks, config 0) and one block (config 1). (A 1-layer group with 1 template is a pure rescaling
    # of the layer, which Gemma3's q/k-norm cancels for q_proj: the "adapter changes the output" sanity checks then
    # fail by construction, so that corner is left to RECAST's own tests.)
    (
        RecastConfig,
        {"task_type": "CAUSAL_LM", "target_modules": None, "num_groups": 1, "num_templates": 2,
         "num_coefficient_sets": 3, "coefficient_blocks": 1},
    ),
]  # fmt: skip

TestRecastDecoderModels = model_test_class(
    "TestRecastDecoderModels",
    td.TestDecoderModels,
    __name__,
    CONFIGS,
    td.PEFT_DECODER_MODELS_TO_TEST,
    helper_overrides=COMMON_HELPER_OVERRIDES,
    extra_globals=mixed_batch_test_globals(),
)
