"""Fail when a notebook under nbs/ and its py:percent twin under twins/ disagree.

Both files are read with jupytext and compared cell by cell (type and source); outputs and
metadata are ignored, so a notebook with outputs still matches its twin. Run from the repo root.
"""
import sys
from pathlib import Path

import jupytext


def cells(path):
    nb = jupytext.read(path)
    return [(c.cell_type, c.source.strip()) for c in nb.cells]


def main():
    nbs = sorted(p for p in Path("nbs").rglob("*.ipynb") if ".ipynb_checkpoints" not in p.parts)
    twins = sorted(Path("twins").rglob("*.py"))
    problems = []
    for nb in nbs:
        twin = Path("twins") / nb.relative_to("nbs").with_suffix(".py")
        if not twin.exists():
            problems.append(f"{nb}: no twin at {twin} (run tools/sync.sh)")
            continue
        a, b = cells(nb), cells(twin)
        if a != b:
            n = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
            problems.append(f"{nb} and {twin} differ from cell {n} on ({len(a)} vs {len(b)} cells)")
    for twin in twins:
        nb = Path("nbs") / twin.relative_to("twins").with_suffix(".ipynb")
        if not nb.exists():
            problems.append(f"{twin}: twin without a notebook at {nb}")
    for p in problems:
        print("twin drift:", p, file=sys.stderr)
    print(f"checked {len(nbs)} notebooks against their twins: {len(problems)} problem(s)")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
