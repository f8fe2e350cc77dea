"""Set-up for running PEFT's own test suite against RECAST (see recast_peft_harness.py).

At collection time:
1. download and unpack the sdist of exactly the installed PEFT version (outside the repository) and make its
   ``tests/`` importable as ``peft_upstream_tests`` -- failing loudly if that is impossible;
2. build the tiny transformers models PEFT's model tests load by Hub id into a private Hugging Face cache and switch
   the Hub offline (``HF_HUB_OFFLINE=1``).

The tests of this directory get the warning filters of ``PEFT_SUITE_WARNINGS``: warnings that PEFT's own tests raise by
their design, on models and configs we do not choose.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import recast_peft_sdist
import recast_tiny_models

_CACHE_ROOT = recast_peft_sdist.cache_root()

# Must happen before PEFT's test modules (and their `transformers`/`huggingface_hub` imports) are used.
recast_tiny_models.configure_offline_hub(recast_tiny_models.hub_cache_dir(_CACHE_ROOT))

try:
    _PEFT_TESTS_PATH = recast_peft_sdist.ensure_peft_tests()
except recast_peft_sdist.PeftSdistUnavailable as error:  # an error, never a skip
    raise pytest.UsageError(f"RECAST peer suite: PEFT's test suite is unavailable.\n{error}") from error

if str(_PEFT_TESTS_PATH) not in sys.path:
    sys.path.insert(0, str(_PEFT_TESTS_PATH))
pytest.register_assert_rewrite(recast_peft_sdist.PACKAGE)

recast_tiny_models.ensure_tiny_models(_CACHE_ROOT)


def pytest_configure(config):
    config.addinivalue_line("markers", "regression: PEFT regression tests (marker used by PEFT's test files)")
    config.addinivalue_line("markers", "single_gpu_tests: PEFT GPU test marker")
    config.addinivalue_line("markers", "multi_gpu_tests: PEFT GPU test marker")


HERE = Path(__file__).resolve().parent

# Warnings that PEFT's tests raise by their own design (each comment says why), ignored in this directory only. RECAST's
# own tests build models and configs that raise none of them; pyproject.toml turns any other peft_recast warning into
# an error.
PEFT_SUITE_WARNINGS = [
    # PEFT's tests pass one config object to `get_peft_model` for several base models
    r"ignore:The PEFT config's `base_model_name_or_path` was renamed:UserWarning:peft.mapping_func",
    # PEFT's custom models (MLP, EmbConv1D, Conv2d, ...) have one module per role, so every RECAST template group holds
    # one module and the default `num_templates`=2 is capped (tests/library/test_bad_inputs.py checks this warning)
    r"ignore:`num_templates`=\d+ is larger than every template group:UserWarning:peft_recast.planning",
    # one config (PEFT's default targets) serves GPT-2's Conv1D layers and the nn.Linear layers of the other models
    r"ignore:fan_in_fan_out is set to False but the target module is `Conv1D`:UserWarning:peft_recast.model",
    r"ignore:fan_in_fan_out is set to False but the target module is `Conv1D`:UserWarning:peft.tuners.lora",
    # offline, PEFT cannot ask the Hub for a base model's config.json when it saves an adapter
    r"ignore:Could not find a config file in .* - will assume that the vocabulary was not modified:UserWarning:peft",
    # PEFT's generation tests leave the length to the model's default
    r"ignore:Using the model-agnostic default `max_length`:UserWarning:transformers.generation",
    # PEFT's gradient-checkpointing tests call the deprecated transformers API
    r"ignore:`gradient_checkpointing_enable` is deprecated:FutureWarning:transformers.modeling_utils",
    # PEFT's FSDP state-dict tests run FSDP in one process
    r"ignore:FSDP is switching to use `NO_SHARD`:UserWarning:torch",
    r"ignore:When using ``NO_SHARD`` for ``ShardingStrategy``, full_state_dict will be returned:UserWarning:torch",
    # PEFT's tests delete the active adapter and merge adapters on top of merged ones on purpose
    r"ignore:Adapter \S+ was active which is now deleted:UserWarning:peft.tuners",
    r"ignore:Already following adapters were merged:UserWarning:peft.tuners",
    # PEFT's tied-embedding tests adapt a tied layer; PEFT notes that RECAST, like most methods, does not tie adapters
    r"ignore:Model has `tie_word_embeddings=True` and a tied layer is part of the adapter:UserWarning:peft.tuners",
    # PEFT's config tests: forward compatibility (unknown keys, a saved `runtime_config`) and every config class
    # built with its defaults (X-LoRA's)
    r"ignore:Unexpected keyword arguments \[.*\] for class \w+Config, these are ignored:UserWarning:peft.config",
    r"ignore:The configuration file contains a `runtime_config` key:UserWarning:peft.config",
    r"ignore:No value was provided for `(hidden_size|adapters)`:UserWarning:peft.tuners.xlora",
    # PEFT's test classes define class-scoped fixtures as methods (pytest 9 deprecation)
    r"ignore:Class-scoped fixtures defined as instance methods are deprecated:DeprecationWarning",
]


def pytest_collection_modifyitems(config, items):
    for item in items:
        if HERE in Path(item.path).resolve().parents:
            for spec in PEFT_SUITE_WARNINGS:
                item.add_marker(pytest.mark.filterwarnings(spec))
