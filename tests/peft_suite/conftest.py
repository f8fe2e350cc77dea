"""Set-up for running PEFT's own test suite against RECAST (see recast_peft_harness.py).

At collection time:
1. download and unpack the sdist of exactly the installed PEFT version (outside the repository) and make its
   ``tests/`` importable as ``peft_upstream_tests`` -- failing loudly if that is impossible;
2. build the tiny transformers models PEFT's model tests load by Hub id into a private Hugging Face cache and switch
   the Hub offline (``HF_HUB_OFFLINE=1``).
"""

from __future__ import annotations

import sys

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
