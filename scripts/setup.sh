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
step() { echo "setup: $* ($(date +%H:%M:%S))" >&2; }
step "1/3 upgrading pip in .venv"
.venv/bin/python -m pip install --quiet --upgrade pip
step "2/3 installing torch==${TORCH_VERSION} (the largest package: a minute or two)"
.venv/bin/python -m pip install --quiet --progress-bar on "torch==${TORCH_VERSION}"
step "3/3 installing pretrain and its dependencies (lightning, tokenizers, datasets, transformers, ...)"
.venv/bin/python -m pip install --quiet --progress-bar on -e ".[dev]"
step "done: $(.venv/bin/python -c 'import torch, lightning; print(f"torch {torch.__version__}, lightning {lightning.__version__}")')"
