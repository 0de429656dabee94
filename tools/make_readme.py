"""Write README.md from nbs/00_index.ipynb.

nbdev's own `nbdev-readme` renders through Quarto, a separate binary these machines do not carry;
a README needs only the markdown cells and the visible code cells, which nbformat gives directly.
Cells marked `#| hide` are left out. `--check` fails if README.md is stale.
"""
import json
import posixpath
import re
import sys
from pathlib import Path

import nbformat

HEADER = "<!-- Generated from nbs/00_index.ipynb by tools/make_readme.py: edit the notebook, not this file. -->\n\n"


def claims_table(ledger=Path("figures/claims.json")) -> str:
    "The claims ledger as the index's cell displays it (segbook.reproduce.claims_markdown), for readers of the README."
    if not ledger.exists():
        return "(no figures/claims.json yet)"
    from segbook.reproduce import claims_markdown
    return "\n".join(claims_markdown(json.loads(ledger.read_text())))


def render(nb_path="nbs/00_index.ipynb"):
    nb = nbformat.read(nb_path, as_version=4)
    parts = []
    for c in nb.cells:
        src = c.source.strip()
        if not src or src.startswith("#| hide"):
            continue
        if c.cell_type == "markdown":
            parts.append(re.sub(r"\]\((?!https?:|mailto:|#)([^)\s]+)\)",   # links relative to nbs/ -> relative to the root
                                lambda m: f"]({posixpath.normpath(posixpath.join('nbs', m[1]))})", src))
        elif c.cell_type == "code" and "claims_markdown(" in src:   # the ledger cell: its output, as the site shows it
            parts.append(claims_table())
        elif c.cell_type == "code":
            lines = [l for l in src.splitlines() if not l.startswith("#|")]
            parts.append("```python\n" + "\n".join(lines).strip() + "\n```")
    return HEADER + "\n\n".join(parts) + "\n"


def main():
    text = render()
    if "--check" in sys.argv:
        if not Path("README.md").exists() or Path("README.md").read_text() != text:
            print("README.md is stale: run tools/sync.sh", file=sys.stderr)
            return 1
        return 0
    Path("README.md").write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
