"""PEFT's test_encoder_decoder_models.py (TestEncoderDecoderModels) re-parametrised with RECAST; tiny models come from
the local Hugging Face cache built by recast_tiny_models.py. See recast_peft_harness.py."""

from __future__ import annotations

import peft_upstream_tests.test_encoder_decoder_models as te
from recast_model_tests import model_test_class
from recast_peft_gates import COMMON_HELPER_OVERRIDES

from peft_recast import RecastConfig

CONFIGS = [
    (RecastConfig, {"task_type": "SEQ_2_SEQ_LM", "target_modules": None}),
    (RecastConfig, {"task_type": "SEQ_2_SEQ_LM", "target_modules": None, "num_groups": 1, "num_coefficient_sets": 2}),
]

TestRecastEncoderDecoderModels = model_test_class(
    "TestRecastEncoderDecoderModels",
    te.TestEncoderDecoderModels,
    __name__,
    CONFIGS,
    te.PEFT_ENCODER_DECODER_MODELS_TO_TEST,
    helper_overrides=COMMON_HELPER_OVERRIDES,
)
