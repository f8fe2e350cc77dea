"""``benchmarks/scale.py --quick`` runs and prints sane figures (counts and exactness checked, never timings)."""

import json
import math
import os
import subprocess
import sys

from ..helpers import REPO, import_benchmark


def _llama_targets(hidden: int, intermediate: int, layers: int, heads: int, kv_heads: int) -> dict[str, int]:
    """Weight elements per role of a Llama layer stack."""
    kv = kv_heads * hidden // heads
    return {
        "q_proj": layers * hidden * hidden,
        "k_proj": layers * hidden * kv,
        "v_proj": layers * hidden * kv,
        "o_proj": layers * hidden * hidden,
        "mlp": layers * 3 * hidden * intermediate,
    }


def test_quick_scale_benchmark(tmp_path):
    scale = import_benchmark("scale")
    output = tmp_path / "scale.json"
    result = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / "scale.py"), "--quick", "--threads", "1", "--json", str(output)],
        cwd=REPO, capture_output=True, text=True, timeout=600, env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )
    assert result.returncode == 0, result.stderr[-3000:]
    results = json.loads(output.read_text())
    assert [p.name for p in tmp_path.iterdir()] == ["scale.json"]  # written atomically: no temporary file left
    assert results["mode"] == "quick" and results["threads"] == 1

    hidden, intermediate, layers, heads, kv_heads, vocab = scale.QUICK_MODEL
    roles = _llama_targets(hidden, intermediate, layers, heads, kv_heads)
    inject = results["inject"]
    assert inject["identity_at_init"] is True
    assert inject["targeted_params"] == sum(roles.values())
    assert inject["groups"] == 7 * math.ceil(layers / 2)  # 7 linear roles, 2 layers per group
    assert inject["coefficients"] == 7 * layers * 2 * 2  # 2 templates x 2 blocks of output rows per module
    assert inject["params"] > inject["targeted_params"]
    assert "identity at init (logits bit-identical): True" in result.stdout

    adapters = results["adapters"]
    assert adapters["adapters_loaded"] == scale.QUICK_ADAPTERS
    assert adapters["reload_max_abs_diff"] < 1e-3
    assert adapters["mixed_batch_max_abs_diff"] < 1e-2
    # per adapter and default target (q_proj, v_proj of every layer): its coefficients (1 x 2 x 2 blocks); the mixing
    # (2 x 2) is one tensor shared by every adapter of the grouping, held once
    # float32
    assert adapters["tensor_bytes_per_adapter"] == 2 * layers * 4 * 4
    targeted_bytes = (roles["q_proj"] + roles["v_proj"]) * 2  # bfloat16
    assert adapters["rss_per_extra_adapter_bytes"] < targeted_bytes  # no adapter holds a copy of the weights
    assert 0 < adapters["adapter_file_bytes"] < 4096

    sizes = results["sizes"]
    assert [row["shape"] for row in sizes] == [list(shape) for shape in [*scale.QUICK_SIZES, scale.QUICK_MODEL]]
    assert [row["params"] for row in sizes] == sorted(row["params"] for row in sizes)
    for row in sizes:  # every size is counted as the big one is
        hidden, intermediate, layers, heads, kv_heads, vocab = row["shape"]
        assert row["targeted_params"] == sum(_llama_targets(hidden, intermediate, layers, heads, kv_heads).values())
        assert row["groups"] == 7 * math.ceil(layers / 2) and row["coefficients"] == 7 * layers * 2 * 2
        assert row["identity_at_init"] is True
    table = result.stdout.split("== sizes:")[1].strip().splitlines()
    assert len(table) == 2 + len(sizes)  # title line, header, one row per size
