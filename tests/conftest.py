"""Shared fixtures; tiny models come from `tiny_models` (built from configs, no downloads)."""

import os

import pytest
import torch

from .tiny_models import MODEL_BUILDERS

os.environ.setdefault("HF_HUB_OFFLINE", "1")


@pytest.fixture
def input_ids() -> torch.Tensor:
    return torch.randint(1, 100, (4, 9), generator=torch.Generator().manual_seed(1))


@pytest.fixture(params=sorted(MODEL_BUILDERS))
def model_kind(request) -> str:
    return request.param

