#!/usr/bin/env bash
# Build the book's site into _site/ (ignored by git): every chapter executed in a fresh kernel, rendered with its
# figures, MathML equations and a chapter navigation (tools/build_site.py says why not Quarto). Open _site/index.html.
# Extra arguments go to build_site.py, e.g. `--only 03_matching`. The browser test: tools/install_chromium.sh once,
# then `.venv/bin/python -m pytest tests/test_site.py`.
set -euo pipefail
cd "$(dirname "$0")/.."
OMP_NUM_THREADS=${OMP_NUM_THREADS:-1} .venv/bin/python tools/build_site.py --out "${SEGBOOK_SITE:-_site}" "$@"
