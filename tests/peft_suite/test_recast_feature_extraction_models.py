"""PEFT's test_feature_extraction_models.py (TestPeftFeatureExtractionModel) re-parametrised with RECAST; tiny models
come from the local Hugging Face cache built by recast_tiny_models.py. See recast_peft_harness.py."""

from __future__ import annotations

import peft_upstream_tests.test_feature_extraction_models as tf
from recast_model_tests import model_test_class
from recast_peft_gates import COMMON_HELPER_OVERRIDES

from peft_recast import RecastConfig

CONFIGS = [
    (RecastConfig, {"task_type": "FEATURE_EXTRACTION", "target_modules": None}),
    (RecastConfig, {"task_type": "FEATURE_EXTRACTION", "target_modules": None, "num_templates": 1, "num_coefficient_sets": 3}),
]  # fmt: skip

TestRecastFeatureExtractionModel = model_test_class(
    "TestRecastFeatureExtractionModel",
    tf.TestPeftFeatureExtractionModel,
    __name__,
    CONFIGS,
    tf.PEFT_FEATURE_EXTRACTION_MODELS_TO_TEST,
    helper_overrides=COMMON_HELPER_OVERRIDES,
)
