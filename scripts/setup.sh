#!/usr/bin/env bash
# Create .venv (if missing) and install torch==2.13.0 first, then pretrain with its dev extras.
# Installing torch pinned *before* the package keeps pip from resolving an unpinned torch
# (which would pull gigabytes of CUDA packages).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
TORCH_VERSION=${TORCH_VERSION:-2.13.0}
if [ ! -x .venv/bin/python ]; then
    if ! "$PYTHON" -m venv .venv; then
        # Debian's own Python has no ensurepip unless python3-venv is installed: make the
        # environment without pip and install pip into it with the system's pip.
        echo "setup: retrying without ensurepip (system pip installs pip into .venv)" >&2
        rm -rf .venv
        "$PYTHON" -m venv --without-pip .venv
        "$PYTHON" -m pip --python .venv/bin/python install --quiet pip
    fi
fi
.venv/bin/python -m pip install --quiet --upgrade pip
.venv/bin/python -m pip install --quiet "torch==${TORCH_VERSION}"
.venv/bin/python -m pip install --quiet -e ".[dev]"
