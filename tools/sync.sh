#!/usr/bin/env bash
# After editing a chapter (its notebook in JupyterLab, or its twin under twins/):
# pair notebooks and twins, export the package, clean the notebooks, regenerate README.md.
set -euo pipefail
cd "$(dirname "$0")/.."
B=.venv/bin
for f in $(find twins -name '*.py' | sort); do
  nb="nbs/${f#twins/}"; nb="${nb%.py}.ipynb"
  if [ ! -e "$nb" ]; then $B/jupytext --quiet --to ipynb -o "$nb" "$f"; fi
done
for nb in $(find nbs -name '*.ipynb' -not -path '*/.ipynb_checkpoints/*' | sort); do
  $B/jupytext --quiet --sync "$nb"
done
$B/nbdev-export
$B/nbdev-clean
# nbdev-clean rewrote the notebooks; re-sync so both twins carry the same timestamps order.
for nb in $(find nbs -name '*.ipynb' -not -path '*/.ipynb_checkpoints/*' | sort); do
  $B/jupytext --quiet --sync "$nb"
done
$B/python tools/make_readme.py
$B/python tools/check_twins.py
