#!/usr/bin/env bash
# Create .venv/ at the project root and install cinefx into it (editable, with the diffusion, eval
# and ray extras and the test tools).
# Safe to re-run: it does nothing when pyproject.toml has not changed since the last install.
#
# Machines with an NVIDIA GPU get the normal torch from the package index. Machines without one
# get a CPU-only torch, so the install does not pull gigabytes of CUDA libraries: first the
# version pinned below (the one CI machines carry), else PyTorch's CPU wheel index.
set -euo pipefail
cd "$(dirname "$0")/.."
CPU_TORCH="${CINEFX_CPU_TORCH:-torch==2.13.0}"
PY="${PYTHON:-python3}"
stamp=.venv/.cinefx-installed
want="$(cat pyproject.toml scripts/setup.sh | sha256sum | cut -d' ' -f1)"
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ] && [ -x .venv/bin/cinefx ]; then
  exit 0
fi
[ -x .venv/bin/python ] || "$PY" -m venv .venv
pip() { .venv/bin/python -m pip --disable-pip-version-check -q "$@"; }
if ! .venv/bin/python -c "import torch" 2>/dev/null; then
  if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
    pip install torch
  else
    pip install "$CPU_TORCH" 2>/dev/null \
      || pip install torch --index-url https://download.pytorch.org/whl/cpu
  fi
fi
# Pin whatever torch is now installed, so no dependency can swap it for a CUDA build.
constraints="$(mktemp)"
.venv/bin/python -c "import torch; print('torch==' + torch.__version__.split('+')[0])" > "$constraints"
pip install -c "$constraints" -e ".[diffusion,eval,ray,dev]"
rm -f "$constraints"
echo "$want" > "$stamp"
