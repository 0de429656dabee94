"""Build the book as a static site: execute every chapter, render it to HTML with its figures, MathML equations and a
chapter navigation, into an ignored folder (default `_site/`).

    .venv/bin/python tools/build_site.py [--out _site] [--only 03_matching ...] [--timeout 900]

nbdev's own `nbdev-docs` renders through Quarto, whose PyPI package (`quarto-cli`) fetches the Quarto binary from
GitHub while it installs; these machines and CI reach PyPI and Debian but not GitHub, so that install fails. The
same executed notebooks go through nbconvert (its JupyterLab template) instead, and latex2mathml turns the chapters'
`$...$` / `$$...$$` into MathML when the page is built, so a page needs no network to show its equations.

Chapters are executed at build time, each in a fresh kernel with the repository's `segbook` (so every figure is
the one the current code draws). Executed notebooks are cached under `OUT/.cache/`, keyed by the notebook and the
package sources, so a rebuild re-runs only what changed. A cell that raises fails the build and names the chapter.
The chapters' own `save_figure` calls write into a temporary folder, never into the committed `figures/`.
"""
import argparse
import hashlib
import html
import os
import re
import shutil
import sys
import tempfile
import time
from pathlib import Path

import latex2mathml.converter
import nbformat
from nbclient import NotebookClient
from nbclient.exceptions import CellExecutionError
from nbconvert import HTMLExporter

ROOT = Path(__file__).resolve().parents[1]
NBS = ROOT / "nbs"
CSS = """
body { margin: 0; }
.sb-layout { display: flex; align-items: flex-start; }
.sb-nav { position: sticky; top: 0; flex: 0 0 15rem; height: 100vh; overflow-y: auto; padding: 1rem 0.8rem;
          border-right: 1px solid #ddd; font: 14px/1.45 system-ui, sans-serif; background: #fafafa; box-sizing: border-box; }
.sb-nav a { display: block; padding: 2px 4px; color: #234; text-decoration: none; border-radius: 3px; }
.sb-nav a.sb-here { background: #dde7f3; font-weight: 600; }
.sb-main { flex: 1 1 auto; min-width: 0; max-width: 64rem; padding: 0 1.5rem 3rem; }
.sb-pager { display: flex; justify-content: space-between; margin: 2rem 0; font: 15px system-ui, sans-serif; }
a code { color: #1a5fb4; text-decoration: underline; }
math[display="block"] { display: block; margin: 0.8em 0; overflow-x: auto; }
math[display="block"] { display: block math; margin: 0.7em 0; font-size: 1.12em; }
.jp-RenderedMarkdown pre { background: #f4f5f7; padding: 0.6em 0.8em; border-radius: 4px; overflow-x: auto; }
"""


APPENDIX = ["experiments/paper_vs_code.ipynb"]   # experiment notebooks that are also read as appendix chapters (seconds to run)


def chapters() -> list:
    "The chapter notebooks in reading order (their file names sort that way), then the appendix; 00_index becomes index.html."
    return sorted(NBS.glob("*.ipynb")) + [NBS / a for a in APPENDIX]


PAGES = set(p.resolve() for p in chapters())


def page_name(nb: Path) -> str:
    return "index.html" if nb.stem == "00_index" else nb.stem + ".html"


def title_of(nb) -> str:
    for c in nb.cells:
        if c.cell_type == "markdown":
            m = re.search(r"^#\s+(.+)$", c.source, re.M)
            if m:
                return m[1].strip()
    return "segbook"


def source_key(nb_path: Path) -> str:
    "What an executed chapter depends on: the notebook and the package it imports."
    h = hashlib.sha256(nb_path.read_bytes())
    for p in sorted((ROOT / "segbook").glob("*.py")):
        h.update(p.name.encode()); h.update(p.read_bytes())
    return h.hexdigest()[:16]


def execute(nb_path: Path, cache: Path, timeout: int):
    "The executed notebook (from the cache when neither it nor the package changed); CellExecutionError names the cell."
    cached = cache / f"{nb_path.stem}.{source_key(nb_path)}.ipynb"
    if cached.exists():
        return nbformat.read(cached, as_version=4), True
    nb = nbformat.read(nb_path, as_version=4)
    NotebookClient(nb, timeout=timeout, kernel_name="python3", allow_errors=False,
                   resources={"metadata": {"path": str(nb_path.parent)}}).execute()
    cache.mkdir(parents=True, exist_ok=True)
    for old in cache.glob(f"{nb_path.stem}.*.ipynb"):
        old.unlink()
    tmp = cache / f".{cached.name}.{os.getpid()}.tmp"
    nbformat.write(nb, tmp); os.replace(tmp, cached)
    return nb, False


_CODE = re.compile(r"(```.*?```|`[^`\n]*`)", re.S)
_BLOCK = re.compile(r"\$\$(.+?)\$\$", re.S)
_INLINE = re.compile(r"(?<![\\$\w])\$(?!\s)([^$\n]+?)(?<!\s)\$(?![\w$])")


def math_to_mathml(md: str, where: str) -> str:
    "Replace `$$…$$` (block) and `$…$` (inline) TeX outside code with MathML; a formula it cannot convert fails the build."
    def convert(tex, display):
        tex = re.sub(r"\\arg\s*\\(min|max)", r"\\mathrm{arg\\,\1}", tex.strip())   # latex2mathml lacks \arg
        tex = re.sub(r"\\tag\{([^}]*)\}", r"\\qquad(\1)", tex)   # an equation number: spaced off, as \tag sets it
        try:
            return latex2mathml.converter.convert(tex, display=display)
        except Exception as e:
            raise ValueError(f"{where}: cannot typeset ${tex.strip()}$ ({type(e).__name__}: {e})") from e
    parts = _CODE.split(md)
    for i in range(0, len(parts), 2):   # even parts are outside code
        p = _BLOCK.sub(lambda m: "\n\n" + convert(m[1], "block") + "\n\n", parts[i])
        parts[i] = _INLINE.sub(lambda m: convert(m[1], "inline"), p)
    return "".join(parts)


_LINK = re.compile(r"(\]\()([^)\s]+)(\))")


def rewrite_links(md: str, site: Path, base: Path = NBS) -> str:
    "Links to chapters (relative to `base`, the notebook's folder) go to their pages; other repository files to OUT/assets/."
    def fix(m):
        target = m[2]
        if re.match(r"^(https?:|mailto:|#|data:)", target):
            return m[0]
        path, _, anchor = target.partition("#")
        src = (base / path).resolve()
        if src.suffix == ".ipynb" and src in PAGES:
            new = page_name(src)
        elif src.is_file() and ROOT in src.parents:
            rel = src.relative_to(ROOT)
            (site / "assets" / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, site / "assets" / rel)
            new = f"assets/{rel.as_posix()}"   # not files/: nbconvert strips that prefix from links
        else:
            return m[0]   # left as written: the browser test reports it if it does not resolve
        return f"{m[1]}{new}{'#' + anchor if anchor else ''}{m[3]}"
    return _LINK.sub(fix, md)


def nav_html(pages: list, here: str) -> str:
    links = "".join(f'<a href="{p}"{" class=sb-here" if p == here else ""}>{html.escape(t)}</a>' for p, t in pages)
    return f'<nav class="sb-nav"><a href="index.html"><b>segbook</b></a><hr>{links}</nav>'


def pager_html(pages: list, here: str) -> str:
    names = [p for p, _ in pages]
    i = names.index(here)
    prev = f'<a href="{names[i - 1]}">← {html.escape(pages[i - 1][1])}</a>' if i > 0 else "<span></span>"
    nxt = f'<a href="{names[i + 1]}">{html.escape(pages[i + 1][1])} →</a>' if i + 1 < len(names) else "<span></span>"
    return f'<div class="sb-pager">{prev}{nxt}</div>'


def render(nb, name: str, pages: list, site: Path, base: Path = NBS) -> str:
    "One chapter page: nbconvert's lab template without remote scripts, math as MathML, the chapter nav around it."
    for c in nb.cells:
        if c.cell_type == "markdown":
            c.source = rewrite_links(math_to_mathml(c.source, name), site, base)
        elif c.cell_type == "code":
            for o in c.get("outputs", []):   # tables a cell displays as Markdown link to chapters too
                if "text/markdown" in o.get("data", {}):
                    o["data"]["text/markdown"] = rewrite_links(o["data"]["text/markdown"], site, base)   # nbdev's directives (#| export, #| hide ...) are for the tools, not the reader
            if re.match(r"^#\|\s*hide\b", c.source): c.source, c.outputs = "", []
            c.source = "\n".join(l for l in c.source.splitlines() if not l.startswith("#|")).strip("\n")
    nb.cells = [c for c in nb.cells if c.source.strip() or c.get("outputs")]
    exporter = HTMLExporter(template_name="lab", exclude_input_prompt=True, exclude_output_prompt=True)
    body, _ = exporter.from_notebook_node(nb)
    body = re.sub(r'<script[^>]+src="https?://[^"]*"[^>]*>\s*</script>', "", body)       # require.js, MathJax CDN
    body = re.sub(r'<script type="text/x-mathjax-config">.*?</script>', "", body, flags=re.S)
    body = re.sub(r"<script>\s*MathJax.*?</script>", "", body, flags=re.S)
    title = dict(pages)[name]
    body = re.sub(r"<title>.*?</title>", f"<title>{html.escape(title)} · segbook</title>", body, count=1, flags=re.S)
    body = body.replace("</head>", f"<style>{CSS}</style></head>", 1)
    body = re.sub(r"(<body[^>]*>)", r'\1<div class="sb-layout">' + nav_html(pages, name).replace("\\", "\\\\") + '<div class="sb-main">',
                  body, count=1)
    return body.replace("</body>", pager_html(pages, name) + "</div></div></body>", 1)


def build(out: Path, only=None, timeout: int = 900) -> dict:
    site, t0 = Path(out), time.perf_counter()
    site.mkdir(parents=True, exist_ok=True)
    nbs = chapters()
    pages = [(page_name(p), title_of(nbformat.read(p, as_version=4))) for p in nbs]
    os.environ.setdefault("SEGBOOK_FIGURES", tempfile.mkdtemp(prefix="segbook-site-figures-"))
    os.environ.setdefault("MPLBACKEND", "Agg")
    os.environ.setdefault("TQDM_DISABLE", "1")   # progress bars are for live runs; a static page would keep their last frame
    report, failed = [], []
    for p in nbs:
        if only and p.stem not in only:
            continue
        t = time.perf_counter()
        try:
            nb, cached = execute(p, site / ".cache", timeout)
        except CellExecutionError as e:
            failed.append(p.stem)
            print(f"build_site: {p.name}: a cell failed:\n{str(e)[-1500:]}", file=sys.stderr)
            continue
        text = render(nb, page_name(p), pages, site, p.parent)
        tmp = site / f".{page_name(p)}.{os.getpid()}.tmp"
        tmp.write_text(text); os.replace(tmp, site / page_name(p))
        report.append((p.stem, round(time.perf_counter() - t, 1), cached))
        print(f"build_site: {page_name(p):32s} {report[-1][1]:7.1f} s{' (cached)' if cached else ''}", flush=True)
    total = round(time.perf_counter() - t0, 1)
    print(f"build_site: {len(report)} page(s) in {total} s -> {site}/index.html" + (f"; FAILED: {failed}" if failed else ""))
    return {"pages": report, "failed": failed, "seconds": total}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=str(ROOT / "_site"), help="site folder (ignored by git)")
    ap.add_argument("--only", nargs="*", help="chapters to (re)build, by notebook name without .ipynb")
    ap.add_argument("--timeout", type=int, default=900, help="seconds a cell may run")
    a = ap.parse_args(argv)
    return 1 if build(Path(a.out), a.only, a.timeout)["failed"] else 0


if __name__ == "__main__":
    sys.exit(main())
