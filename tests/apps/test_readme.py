"""README's quick start really runs, and prints what it claims."""

import re
import subprocess
import sys
from pathlib import Path

from safetensors.torch import load_file

README = Path(__file__).resolve().parents[2] / "README.md"


def test_quick_start_runs(tmp_path):
    code = re.search(r"## Quick start\n.*?```python\n(.*?)```", README.read_text(), re.S).group(1)
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=600,
        env={"HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin"},
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "trainable params: 48 " in result.stdout  # the default: 12 modules x 2 templates x 2 blocks of rows
    assert "48 coefficients in 6 groups" in result.stdout
    saved = load_file(tmp_path / "recast-quickstart" / "adapter_model.safetensors")
    assert all(".recast_coefficients" in key for key in saved)  # coefficients only: no template, no base weight
    assert sum(tensor.numel() for tensor in saved.values()) == 48
    assert any(tensor.abs().sum() > 0 for tensor in saved.values())  # the three training steps moved them
