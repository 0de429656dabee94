#!/usr/bin/env bash
# Install (if needed) and run every test: the notebooks' own test cells (nbdev-test), then pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
bash tools/install.sh
export MPLBACKEND=Agg
# The chapters save their figures and tables through segbook.viz.figures_dir(): into a temporary folder here, so a
# test run leaves the committed figures/ as it found them. `SEGBOOK_FIGURES=figures bash tools/test.sh` remakes them.
export SEGBOOK_FIGURES="${SEGBOOK_FIGURES:-$(mktemp -d)}"
.venv/bin/nbdev-test --n-workers 2 --timing
set +e
.venv/bin/python -m pytest -q "$@"
rc=$?
set -e
# pytest exit 5 = "no tests collected": treat as failure so an empty suite never passes silently.
if [ $rc -eq 5 ]; then echo "pytest collected no tests" >&2; exit 1; fi
exit $rc
