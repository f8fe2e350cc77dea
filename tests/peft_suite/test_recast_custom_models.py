"""PEFT's test_custom_models.py (TestPeftCustomModel, TestMultipleActiveAdapters, TestMixedAdapterBatches,
TestRequiresGrad, TestDefaultTargetModules) re-parametrised with RECAST cases. See recast_peft_harness.py."""

from __future__ import annotations

import peft_upstream_tests.test_custom_models as tcm
import torch
from recast_peft_exclusions import EXCLUSIONS, EXPECTED_FAILURES, LORA_SUBSTITUTED
from recast_peft_gates import COMMON_HELPER_OVERRIDES
from recast_peft_harness import LORA_SUBSTITUTION, recast_test_class

from peft_recast import RecastConfig
from tests.models import RecastDeepMLP

# --------------------------------------------------------------------------------------------------------------------
# A model where RECAST's template groups are non-trivial (tests/models.py): 4 blocks with same-shaped lin0/lin1 (PEFT's
# own DeepMLP cannot run a forward pass: `X.float(X)`).


class RecastMockTransformerWrapper(tcm.MockTransformerWrapper):
    @classmethod
    def from_pretrained(cls, model_id, dtype=None):
        if model_id == "RecastDeepMLP":
            torch.manual_seed(0)
            return RecastDeepMLP().to(dtype or torch.float32)
        return super().from_pretrained(model_id, dtype=dtype)


# --------------------------------------------------------------------------------------------------------------------
# RECAST cases. `init_weights` stays at its default (True: identity) -- PEFT's tests switch it off where they need a
# non-identity adapter (set_init_weights_false).
TEST_CASES = [
    ("Vanilla MLP 1 RECAST", "MLP", RecastConfig, {"target_modules": "lin0"}),
    ("Vanilla MLP 2 RECAST", "MLP", RecastConfig, {"target_modules": ["lin0"]}),
    ("Vanilla MLP 3 RECAST", "MLP", RecastConfig, {"target_modules": ["lin1"]}),
    ("Vanilla MLP 4 RECAST K=3", "MLP", RecastConfig, {"target_modules": ["lin0", "lin1"], "num_coefficient_sets": 3}),
    ("Vanilla MLP 5 RECAST modules_to_save", "MLP", RecastConfig, {"target_modules": ["lin0"], "modules_to_save": ["lin1"]}),
    ("MLP LayerNorm RECAST", "MLP_LayerNorm", RecastConfig, {"target_modules": ["lin0", "lin1"]}),
    ("Embedding + transformers Conv1D 1 RECAST", "EmbConv1D", RecastConfig, {"target_modules": ["conv1d"]}),
    ("Conv2d 1 RECAST", "Conv2d", RecastConfig, {"target_modules": ["conv2d"]}),
    ("Conv2d 2 RECAST", "Conv2d", RecastConfig, {"target_modules": ["conv2d", "lin0"], "num_coefficient_sets": 2}),
    ("Conv2d Groups RECAST", "Conv2dGroups", RecastConfig, {"target_modules": ["conv2d"]}),
    ("Embedding + transformers Conv1D 2 RECAST", "EmbConv1D", RecastConfig, {"target_modules": ["conv1d", "lin0"]}),
    (
        "Deep MLP RECAST layers_per_group=2 n=2",
        "RecastDeepMLP",
        RecastConfig,
        {"target_modules": ["lin0", "lin1"], "layers_per_group": 2, "num_templates": 2},
    ),
    (
        "Deep MLP RECAST num_groups=1 n=3 K=2 regex",
        "RecastDeepMLP",
        RecastConfig,
        {"target_modules": r".*\.lin0", "num_groups": 1, "num_templates": 3, "num_coefficient_sets": 2},
    ),
    (
        "Deep MLP RECAST layers_to_transform exclude_modules",
        "RecastDeepMLP",
        RecastConfig,
        {
            "target_modules": ["lin0", "lin1"],
            "layers_to_transform": [0, 1, 2],
            "layers_pattern": "layers",
            "exclude_modules": ["layers.1.lin1"],
            "layers_per_group": 3,
            "num_templates": 3,
        },
    ),
]  # fmt: skip

MULTIPLE_ACTIVE_ADAPTERS_TEST_CASES = [
    (
        "RECAST Same",
        "recast",
        RecastConfig,
        {"target_modules": ["lin0"], "init_weights": False},
        {"target_modules": ["lin0"], "init_weights": False},
    ),
    (
        "RECAST Different",
        "recast",
        RecastConfig,
        {"target_modules": ["lin0"], "init_weights": False},
        {"target_modules": ["lin1"], "init_weights": False},
    ),
    (
        "RECAST Overlapping K differs",
        "recast",
        RecastConfig,
        {"target_modules": ["lin0", "lin1"], "init_weights": False, "num_coefficient_sets": 2},
        {"target_modules": ["lin1"], "init_weights": False},
    ),
]


def _mixed(*kwargs_pair, **common_kwargs):
    return tuple(RecastConfig(init_weights=False, **common_kwargs, **kwargs) for kwargs in kwargs_pair)


MIXED_ADAPTER_TEST_CASES = [
    ("RECAST mixed adapter", *_mixed({"target_modules": ["lin0"]}, {"target_modules": ["lin0"], "num_coefficient_sets": 2})),
]  # fmt: skip

MIXED_PER_TEST = {
    "test_mixed_adapter_batches_different_target_layers": [
        ("RECAST mixed adapter with different target layers", *_mixed({"target_modules": ["lin0"]}, {"target_modules": ["lin1"]})),
    ],
    "test_mixed_adapter_batches_multiple_modules_to_save": [
        ("RECAST mixed adapter with modules to save", *_mixed({"target_modules": ["lin0"]}, {"target_modules": ["lin0"]}, modules_to_save=["lin1"])),
    ],
    "test_mixed_adapter_batches_unsupported_layer_raises": [
        ("RECAST mixed adapter with unsupported layer", *_mixed({"target_modules": ["lin0"]}, {"target_modules": ["lin0"]}, modules_to_save=["gru"])),
    ],
    "test_mixed_adapter_batches_partly_overlapping_target_layers": [
        ("RECAST mixed adapter with overlapping layers", *_mixed({"target_modules": ["lin0"]}, {"target_modules": ["lin0", "lin1"]})),
    ],
    "test_mixed_adapter_batches_lora_conv2d": [
        ("RECAST mixed adapter with Conv2d", *_mixed({"target_modules": ["conv2d"]}, {"target_modules": ["conv2d", "lin0"], "num_coefficient_sets": 2})),
    ],
    "test_mixed_adapter_batches_lora_conv1d_emb": [
        ("RECAST mixed adapter with conv1d", *_mixed({"target_modules": ["conv1d"]}, {"target_modules": ["conv1d", "lin0"]})),
    ],
    "test_mixed_adapter_batches_lora_conv1d_emb_multiple_modules_to_save": [
        ("RECAST mixed adapter with conv1d and modules to save", *_mixed({"target_modules": ["conv1d"]}, {"target_modules": ["conv1d"]}, modules_to_save=["lin0"])),
    ],
}  # fmt: skip

KEY_TEST_CASES = ("test_name", "model_id", "config_cls", "config_kwargs")
KEY_MULTI = ("test_name", "tuner_method", "config_cls", "config_kwargs_1", "config_kwargs_2")
KEY_MIXED = ("test_name", "config0", "config1")


def _seeded(model_cls):
    """``model_cls`` whose weights are always the same (global RNG untouched), like MockTransformerWrapper's models.

    Some PEFT tests build a base model class directly twice (no seed): once to create and save an adapter, once to
    load it. They stand for "the same pretrained model" (MockTransformerWrapper seeds for exactly this reason). A
    RECAST adapter is bound to its base weights -- templates are built from them and a base fingerprint check refuses
    other weights by design -- so these constructors get a fixed seed (see BASE_MODEL_SEEDING in
    recast_peft_exclusions.py). Nothing else in the tests changes.
    """

    class Seeded(model_cls):
        def __init__(self, *args, **kwargs):
            with torch.random.fork_rng():
                torch.manual_seed(0)
                super().__init__(*args, **kwargs)

    Seeded.__name__ = Seeded.__qualname__ = model_cls.__name__
    return Seeded


SEEDED_BASE_MODELS = {name: _seeded(getattr(tcm, name)) for name in ("DeepMLP", "ModelEmbWithSibling")}

TestRecastCustomModel = recast_test_class(
    "TestRecastCustomModel",
    tcm.TestPeftCustomModel,
    __name__,
    recast_params={
        KEY_TEST_CASES: TEST_CASES,
        ("config_cls",): [RecastConfig],
        ("config0",): [RecastConfig(target_modules=["lin0"], init_weights=False)],
    },
    exclusions=EXCLUSIONS,
    substituted=LORA_SUBSTITUTED,
    substitution_overrides=LORA_SUBSTITUTION,
    expected_failures=EXPECTED_FAILURES,
    test_global_overrides=SEEDED_BASE_MODELS,
    attrs={"transformers_class": RecastMockTransformerWrapper, **COMMON_HELPER_OVERRIDES},
)

TestRecastMultipleActiveAdapters = recast_test_class(
    "TestRecastMultipleActiveAdapters",
    tcm.TestMultipleActiveAdapters,
    __name__,
    recast_params={KEY_MULTI: MULTIPLE_ACTIVE_ADAPTERS_TEST_CASES},
    exclusions=EXCLUSIONS,
)

TestRecastMixedAdapterBatches = recast_test_class(
    "TestRecastMixedAdapterBatches",
    tcm.TestMixedAdapterBatches,
    __name__,
    recast_params={
        KEY_MIXED: MIXED_ADAPTER_TEST_CASES,
        ("test_name", "config"): [("RECAST mixed batch wrong adapter name", RecastConfig(target_modules=["lin0"], init_weights=False))],
    },
    per_test_params={name: {KEY_MIXED: cases} for name, cases in MIXED_PER_TEST.items()},
    exclusions=EXCLUSIONS,
)  # fmt: skip

TestRecastRequiresGrad = recast_test_class(
    "TestRecastRequiresGrad",
    tcm.TestRequiresGrad,
    __name__,
    recast_params={("config_cls",): [RecastConfig]},
    exclusions=EXCLUSIONS,
    test_global_overrides=SEEDED_BASE_MODELS,
)

TestRecastDefaultTargetModules = recast_test_class(
    "TestRecastDefaultTargetModules",
    tcm.TestDefaultTargetModules,
    __name__,
    recast_params={("config_cls",): [RecastConfig]},
    exclusions=EXCLUSIONS,
)

TestRecastPeftFsdpStateDict = recast_test_class(
    "TestRecastPeftFsdpStateDict",
    tcm.TestPeftFsdpStateDict,
    __name__,
    recast_params={KEY_TEST_CASES: TEST_CASES},
    exclusions=EXCLUSIONS,
    attrs={"transformers_class": RecastMockTransformerWrapper},
)
