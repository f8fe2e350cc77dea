"""``benchmarks/decoder_costs.py --quick``: every measurement is made and recorded, and the outputs it times are the
outputs it should time (mixed-batch rows equal their adapter alone, merged equals unmerged); timings are checked for
being finite and positive, never for their values."""

import contextlib
import io
import json
import math

import pytest
import torch

from ..helpers import import_benchmark


@pytest.fixture(scope="module")
def decoder_costs():
    return import_benchmark("decoder_costs")


@pytest.fixture(scope="module")
def quick_run(decoder_costs, tmp_path_factory):
    """The quick run's JSON (as written) and printed table; torch's thread count (the run sets 1) is restored."""
    path = tmp_path_factory.mktemp("decoder_costs") / "costs.json"
    printed, threads = io.StringIO(), torch.get_num_threads()
    try:
        with contextlib.redirect_stdout(printed):
            decoder_costs.main(["--quick", "--json", str(path)])
    finally:
        torch.set_num_threads(threads)
    return json.loads(path.read_text()), printed.getvalue()


def _positive(value) -> bool:
    return isinstance(value, float) and math.isfinite(value) and value > 0


def test_every_measurement_is_recorded(decoder_costs, quick_run):
    results, _ = quick_run
    quick = decoder_costs.QUICK
    assert results["mode"] == "quick" and results["threads"] == 1 and results["sizes"] == quick
    training = results["training"]
    assert list(training) == ["LoRA r=8", "RECAST default", "RECAST position"]
    # q (64 -> 64) and v (64 -> 32: 2 key/value heads of 16) in each of 4 layers
    assert training["LoRA r=8"]["trainable"] == 4 * 8 * ((64 + 64) + (64 + 32))
    assert training["RECAST default"]["trainable"] == 2 * 4 * 2 * 2  # q, v x 4 layers x 2 templates x 2 blocks
    assert training["RECAST position"]["trainable"] == 2 * 2 * 2 * 2  # q, v x 2 positions x 2 templates x 2 blocks
    for row in training.values():
        assert all(_positive(row[key]) for key in ("step_seconds", "step_ratio", "memory_ratio"))
        assert isinstance(row["memory_bytes"], int) and row["memory_bytes"] > 0
    assert training["LoRA r=8"]["step_ratio"] == training["LoRA r=8"]["memory_ratio"] == 1.0
    generation = results["generation"]
    for key in ("bare_tokens_per_second", "merged_tokens_per_second", "unmerged_tokens_per_second", "merged_ratio",
                "unmerged_ratio"):
        assert _positive(generation[key]), key
    assert list(results["mixed"]) == [str(n) for n in quick["mixed"]]
    for count, row in results["mixed"].items():
        assert row["rows"] == int(count) and row["checked_rows"] == [0, int(count) - 1]
        assert all(_positive(row[key]) for key in ("tokens_per_second", "one_adapter_tokens_per_second", "ratio"))
        assert math.isclose(row["ratio"], row["tokens_per_second"] / row["one_adapter_tokens_per_second"])
    adapters = results["adapters"]
    assert adapters["added"] == adapters["loaded"] == quick["count"]
    assert all(_positive(adapters[key]) for key in ("add_seconds", "add_ms_per_adapter", "load_seconds",
                                                    "load_ms_per_adapter"))
    assert len(results["targets"]) == 6 and all(_positive(row["value"]) for row in results["targets"].values())


def test_timed_outputs_are_the_right_outputs(quick_run):
    results, _ = quick_run
    merged = results["generation"]["merged_vs_unmerged"]
    assert merged["tokens_equal"] and merged["max_abs_logit_diff"] < 1e-4
    for row in results["mixed"].values():  # the first and last row of the mixed batch against that adapter alone
        assert row["tokens_equal"] and row["max_abs_logit_diff"] < 1e-4
    assert results["adapters"]["loaded_equal_saved"] is True  # every loaded coefficient equals the one saved


def test_training_memory_is_counted_exactly(quick_run):
    """The two RECAST configs keep the same activations for backward, so their bytes differ by the trainable
    numbers alone: 12 bytes each (gradient, AdamW's two moments) plus AdamW's 4-byte step per tensor."""
    training = quick_run[0]["training"]
    default, position = training["RECAST default"], training["RECAST position"]
    tensors = {"default": 2 * 4, "position": 2 * 2}  # per module; per role and position of the 2-layer groups
    expected = 12 * (default["trainable"] - position["trainable"]) + 4 * (tensors["default"] - tensors["position"])
    assert default["memory_bytes"] - position["memory_bytes"] == expected


def test_table_prints_every_figure_and_verdict(quick_run):
    results, printed = quick_run
    lines = [line for line in printed.splitlines() if line.startswith("| ") and "---" not in line]
    assert len(lines) == 2 + 3 + 3 + len(results["mixed"]) + 2 + len(results["targets"])  # 2 header lines
    for target, row in results["targets"].items():
        assert f"| {target} | {row['value']:.3f} | {'yes' if row['met'] else 'no'} |" in lines
    for name, row in results["training"].items():
        assert any(line.startswith(f"| training step, {name} ({row['trainable']:,} trainable)") for line in lines)
