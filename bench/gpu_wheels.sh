#!/usr/bin/env bash
# Wheels the lent GPU machine lacks, for the GPU benches. That machine has python3 3.12 with torch,
# transformers, peft, accelerate, OpenCV, scikit-image, rich and typer, reaches no package index,
# and takes at most 64 MiB of carried files: PyAV (abi3, so this CPython 3.11 build loads on 3.12),
# diffusers and importlib_metadata fit. Run here, then see bench/RESULTS.md for the device command.
set -euo pipefail
cd "$(dirname "$0")/.."
py=.venv/bin/python
mkdir -p .gpu-wheels
"$py" -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 -d .gpu-wheels \
    "av==$("$py" -c 'import av; print(av.__version__)')" \
    "diffusers==$("$py" -c 'import diffusers; print(diffusers.__version__)')" \
    importlib_metadata
du -sh .gpu-wheels
