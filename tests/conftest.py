"""Shared fixtures; tiny models come from `models` (built from configs, no downloads)."""

import os

import pytest
import torch

from .helpers import require_modules
from .models import CONFIG_FIELDS, MODEL_BUILDERS

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def pytest_configure(config):
    config.addinivalue_line(
        "markers",
        "requires_modules(*names): skip the test when a module is missing, fail it on CI (helpers.require_modules)",
    )


def pytest_runtest_setup(item):
    for mark in item.iter_markers("requires_modules"):
        require_modules(*mark.args)


@pytest.fixture
def input_ids() -> torch.Tensor:
    return torch.randint(1, 100, (4, 9), generator=torch.Generator().manual_seed(1))


@pytest.fixture(params=sorted(MODEL_BUILDERS))
def model_kind(request) -> str:
    return request.param


@pytest.fixture
def recast_config(model_kind):
    """``RecastConfig(**kwargs)`` plus the fields ``model_kind``'s model needs (``models.CONFIG_FIELDS``)."""
    from peft_recast import RecastConfig

    return lambda **kwargs: RecastConfig(**{**CONFIG_FIELDS[model_kind], **kwargs})

