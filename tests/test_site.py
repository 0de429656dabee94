"""The built site in a real browser (issue #15): every page of `tools/build_site.py`'s output opened in headless Chromium.

Runs when a built site is there (`SEGBOOK_SITE`, default `_site/`) and Chromium is installed (Debian's `chromium`,
driven by Playwright with `executable_path`); `.ci/run` builds the site and installs Chromium, so CI runs it. Each
page: every image decoded (natural width > 0), the chapter's equations present as MathML elements, no error output,
no script or stylesheet fetched from the network, every relative link resolving to a file of the site. Two
screenshots per run go to `SEGBOOK_SITE_SHOTS` (default: a temporary folder), outside the repository."""
import os
import re
import shutil
import tempfile
from pathlib import Path
from urllib.parse import unquote, urlparse

import nbformat
import pytest

REPO = Path(__file__).resolve().parents[1]
SITE = Path(os.environ.get("SEGBOOK_SITE", REPO / "_site")).resolve()   # a relative path (CI: _site) has no file URI
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")

_missing = not (SITE / "index.html").exists() or CHROMIUM is None
if _missing and os.environ.get("SEGBOOK_REQUIRE_SITE"):   # CI: a missing site or browser is a failure, not a skip
    raise RuntimeError(f"SEGBOOK_REQUIRE_SITE is set but {'chromium is not installed' if CHROMIUM is None else f'{SITE}/index.html is missing'}")
pytestmark = pytest.mark.skipif(_missing, reason="no built site (tools/docs.sh) or no chromium")


def expected_pages():
    from importlib.util import module_from_spec, spec_from_file_location
    spec = spec_from_file_location("build_site", REPO / "tools" / "build_site.py")
    m = module_from_spec(spec); spec.loader.exec_module(m)
    return {m.page_name(p): p for p in m.chapters()}


def n_equations(nb_path):
    "Display and inline formulas in the chapter's markdown (outside code), as build_site finds them."
    text = "\n".join(c.source for c in nbformat.read(nb_path, as_version=4).cells if c.cell_type == "markdown")
    text = re.sub(r"```.*?```|`[^`\n]*`", "", text, flags=re.S)
    return len(re.findall(r"\$\$.+?\$\$", text, flags=re.S))


@pytest.fixture(scope="module")
def browser():
    from playwright.sync_api import sync_playwright
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox", "--disable-gpu"])
        yield b
        b.close()


def test_every_chapter_has_a_page():
    missing = sorted(set(expected_pages()) - {p.name for p in SITE.glob("*.html")})
    assert not missing, f"pages not built: {missing}"


@pytest.mark.parametrize("name", sorted(expected_pages()))
def test_page_in_chromium(browser, name):
    page = browser.new_page(viewport={"width": 1400, "height": 1000})
    remote = []
    page.on("request", lambda r: remote.append(r.url) if not r.url.startswith(("file:", "data:", "about:")) else None)
    page.goto((SITE / name).as_uri(), wait_until="load")
    widths = page.eval_on_selector_all("img", "els => els.map(e => [e.complete, e.naturalWidth])")
    assert all(done and w > 0 for done, w in widths), f"{name}: images that did not load: {widths}"
    src = expected_pages()[name]
    blocks = n_equations(src)
    maths = page.eval_on_selector_all("math", "els => els.length")
    assert maths >= blocks, f"{name}: {blocks} display equations in the chapter, {maths} <math> elements on the page"
    if blocks:   # Chromium lays MathML out itself (MathML Core): a rendered formula has a height
        assert page.eval_on_selector("math[display=block]", "e => e.getBoundingClientRect().height") > 5
    errors = page.eval_on_selector_all('[data-mime-type="application/vnd.jupyter.error"], .jp-OutputArea-output.jp-mod-error',
                                       "els => els.length")
    assert errors == 0 and "Traceback (most recent call last)" not in page.inner_text("body"), f"{name}: error output"
    assert not remote, f"{name}: fetched from the network: {remote[:3]}"
    for href in page.eval_on_selector_all("a[href]", "els => els.map(e => e.getAttribute('href'))"):
        u = urlparse(href)
        if u.scheme or not u.path:
            continue
        target = (SITE / name).parent / unquote(u.path)
        assert target.exists(), f"{name}: link {href} does not resolve"
    if name in ("02_mask_embeddings.html", "05_istr.html"):
        shots = Path(os.environ.get("SEGBOOK_SITE_SHOTS", tempfile.gettempdir()) ) / "segbook-site-shots"
        shots.mkdir(parents=True, exist_ok=True)
        page.screenshot(path=str(shots / name.replace(".html", ".png")), full_page=False)
    page.close()
