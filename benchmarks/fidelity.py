"""Closed-form vs gradient Neural Mimicry on the real MiniLM-L6: README's fidelity table.

    python benchmarks/fidelity.py [--steps 1000]

Runs ``peft-recast fidelity`` (attention preset: q/k/v fused, K = 2) for two groupings: 2 layers per group with
n = 2 templates (exact for the closed form) and 3 layers per group with n = 2 (compressing). Each prints per group the
relative reconstruction error, 1 - cosine of generated vs pretrained weights and of layer outputs, and the wall time
of each method; results go to ``runs/fidelity/<setting>.json``. Gradient mimicry at the paper's 1000 steps takes
several minutes per setting on a 2-core CPU.
"""

from __future__ import annotations

import argparse
import os
import sys

from peft_recast.apps.cli import main

SETTINGS = {
    "exact": ["--layers-per-group", "2", "--num-templates", "2"],
    "compressing": ["--layers-per-group", "3", "--num-templates", "2"],
}

if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=1000, help="gradient mimicry steps (paper: 1000)")
    parser.add_argument("--output-dir", default=os.path.join("runs", "fidelity"))
    args = parser.parse_args()
    for name, extra in SETTINGS.items():
        print(f"== {name}: {' '.join(extra)}", flush=True)
        code = main([
            "fidelity", "--steps", str(args.steps), "--bank-dir", os.path.join(args.output_dir, name),
            "--json", os.path.join(args.output_dir, f"{name}.json"), *extra,
        ])
        if code:
            sys.exit(code)
