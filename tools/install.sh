#!/usr/bin/env bash
# Install segbook and its dev tools into ./.venv (created if missing).
# torch/torchvision are pinned through constraints.txt so pip takes the builds served on segbook's
# machines instead of downloading a newer multi-GB CUDA build; pyproject keeps open ranges for users.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q -c constraints.txt -e ".[dev]"
echo "segbook installed in $(pwd)/.venv"
