"""Which layers need coefficients? Keep a trained RECAST adapter's modules with the largest updates, zero the others.

A proxy for a task-adaptive layer choice (TAPS: a sparsity penalty decides per layer which layers get task-specific
weights), without its penalty: for every run of ``--method`` in a ``peft-recast bench`` output dir, the modules are
ranked by their relative weight change ``||delta_W|| / ||W||`` and only the top (or, as a control, the bottom) share
keeps its coefficients; test accuracy is measured again. Pruning without retraining bounds what a penalty trained
for the choice would reach from below.

Run: `.venv/bin/python benchmarks/layer_choice.py runs/bench --method recast [--keep 1 0.5 0.25]`.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics

import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from peft_recast.apps import bench
from peft_recast.apps.encoder import load_tokenizer
from peft_recast.apps.tasks import load_task_data
from peft_recast.layer import RecastLayer


def relative_changes(encoder: torch.nn.Module) -> dict[str, float]:
    """``||delta_W|| / ||W||`` of the active adapter, per RECAST module (module name -> ratio)."""
    adapter = encoder.active_adapter
    return {
        name: (module.get_delta_weight(adapter).norm() / module.pristine_weight().norm()).item()
        for name, module in encoder.named_modules()
        if isinstance(module, RecastLayer) and adapter in module.recast_coefficients
    }


def accuracy_keeping(encoder, head, data, kept: set[str], batch_size: int) -> float:
    """Test accuracy with the coefficients of every RECAST module outside ``kept`` set to zero (restored after)."""
    adapter = encoder.active_adapter
    saved = {}
    with torch.no_grad():
        for name, module in encoder.named_modules():
            if isinstance(module, RecastLayer) and name not in kept:
                coefficients = module.recast_coefficients[adapter]
                saved[name] = coefficients.clone()
                coefficients.zero_()
    try:
        predicted = bench.predictions(encoder, head, data.test, batch_size, "test")
    finally:
        with torch.no_grad():
            for name, module in encoder.named_modules():
                if name in saved:
                    module.recast_coefficients[adapter].copy_(saved[name])
    return (predicted == data.test_labels).float().mean().item()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("output_dir", help="a `peft-recast bench` output dir (results.json and runs/)")
    parser.add_argument("--method", default="recast", help="RECAST method whose runs to prune (default: recast)")
    parser.add_argument("--keep", type=float, nargs="+", default=[1.0, 0.5, 0.25, 0.0],
                        help="shares of the modules that keep their coefficients (default: 1 0.5 0.25 0)")
    args = parser.parse_args()
    from peft import PeftModel

    from peft_recast.apps.encoder import load_encoder

    with open(os.path.join(args.output_dir, bench.RESULTS_FILE)) as handle:
        records = [r for r in json.load(handle)["runs"].values() if r["method"] == args.method]
    device, tokenizer = torch.device("cpu"), load_tokenizer()
    choices = [(share, "top") for share in args.keep] + [(0.5, "bottom")]
    table: dict[tuple[float, str], dict[str, float]] = {choice: {} for choice in choices}
    numbers: dict[tuple[float, str], int] = {}
    for record in records:
        run_dir = os.path.join(args.output_dir, "runs", record["key"])
        if not os.path.isdir(run_dir):
            continue
        data = load_task_data(record["task"], tokenizer, device)
        encoder = PeftModel.from_pretrained(load_encoder(device), run_dir).eval()
        head = bench.load_head(run_dir, device)
        changes = relative_changes(encoder)
        ranked = sorted(changes.items(), key=lambda item: -item[1])
        sizes = {name: module.recast_coefficients[encoder.active_adapter].numel()
                 for name, module in encoder.named_modules() if name in changes}
        for share, end in choices:
            count = round(share * len(ranked))
            kept = {name for name, _ in (ranked[:count] if end == "top" else ranked[len(ranked) - count:])}
            table[(share, end)][record["task"]] = 100 * accuracy_keeping(encoder, head, data, kept, 32)
            numbers[(share, end)] = sum(sizes[name] for name in kept)
        print(f"{record['task']}: relative weight change per module, largest first: "
              + ", ".join(f"{name.split('encoder.')[-1]} {ratio:.3f}" for name, ratio in ranked[:4]) + ", ...")
    tasks = sorted({task for row in table.values() for task in row})
    print(f"\n| modules kept | numbers kept | {' | '.join(tasks)} | mean |")
    print("|---|---|" + "---|" * (len(tasks) + 1))
    for (share, end), row in table.items():
        label = {1.0: "all", 0.0: "none"}.get(share, f"{end} {share:g}")
        print(f"| {label} | {numbers[(share, end)]} | "
              + " | ".join(f"{row[t]:.1f}" for t in tasks) + f" | {statistics.mean(row.values()):.1f} |")


if __name__ == "__main__":
    main()
