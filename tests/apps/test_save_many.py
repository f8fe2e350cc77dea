"""``benchmarks/save_many.py --quick``: both ways of saving are timed on the same adapters and every figure is
recorded; timings are checked for being finite and positive, never for their values."""

import contextlib
import io
import json
import math

import torch

from ..helpers import import_benchmark


def test_the_quick_run_records_both_ways_for_every_count(tmp_path):
    save_many = import_benchmark("save_many")
    path, printed, threads = tmp_path / "save.json", io.StringIO(), torch.get_num_threads()
    try:
        with contextlib.redirect_stdout(printed):
            save_many.main(["--quick", "--json", str(path)])
    finally:
        torch.set_num_threads(threads)
    results = json.loads(path.read_text())
    assert [row["adapters"] for row in results["rows"]] == save_many.QUICK["adapters"]
    for row in results["rows"]:
        for field in ("save_pretrained_ms_per_adapter", "save_adapters_ms_per_adapter", "save_adapters_all_seconds"):
            assert math.isfinite(row[field]) and row[field] > 0, field
        assert math.isclose(row["ratio"], row["save_pretrained_ms_per_adapter"] / row["save_adapters_ms_per_adapter"])
        assert math.isclose(row["save_pretrained_all_seconds_projected"],
                            row["save_pretrained_ms_per_adapter"] * row["adapters"] / 1e3)
    assert printed.getvalue().count("\n| ") == len(save_many.QUICK["adapters"])  # one row per count
