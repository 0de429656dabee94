"""The checks CI relies on must be able to fail: twin drift and a stale README are caught."""
import shutil
import subprocess
import sys
from pathlib import Path

import jupytext
import pytest

REPO = Path(__file__).resolve().parents[1]


def _run(args, cwd):
    return subprocess.run([sys.executable, *args], cwd=cwd, capture_output=True, text=True)


@pytest.fixture
def mini_repo(tmp_path):
    (tmp_path / "nbs").mkdir(); (tmp_path / "twins").mkdir(); (tmp_path / "tools").mkdir()
    for f in ("check_twins.py", "make_readme.py"):
        shutil.copy(REPO / "tools" / f, tmp_path / "tools" / f)
    nb = jupytext.reads("# %% [markdown]\n# # Title\n\n# %%\nx = 1\n", fmt="py:percent")
    jupytext.write(nb, tmp_path / "nbs" / "00_index.ipynb")
    jupytext.write(nb, tmp_path / "twins" / "00_index.py", fmt="py:percent")
    return tmp_path


def test_twins_in_sync_pass(mini_repo):
    r = _run(["tools/check_twins.py"], mini_repo)
    assert r.returncode == 0, r.stderr


def test_twin_drift_fails(mini_repo):
    twin = mini_repo / "twins" / "00_index.py"
    twin.write_text(twin.read_text().replace("x = 1", "x = 2"))
    r = _run(["tools/check_twins.py"], mini_repo)
    assert r.returncode == 1 and "differ" in r.stderr


def test_missing_twin_fails(mini_repo):
    (mini_repo / "twins" / "00_index.py").unlink()
    r = _run(["tools/check_twins.py"], mini_repo)
    assert r.returncode == 1 and "no twin" in r.stderr


def test_readme_check(mini_repo):
    assert _run(["tools/make_readme.py", "--check"], mini_repo).returncode == 1  # no README yet
    assert _run(["tools/make_readme.py"], mini_repo).returncode == 0
    text = (mini_repo / "README.md").read_text()
    assert "# Title" in text and "x = 1" in text
    assert _run(["tools/make_readme.py", "--check"], mini_repo).returncode == 0


def test_repo_readme_is_current():
    assert _run(["tools/make_readme.py", "--check"], REPO).returncode == 0


def test_cli_help_lists_subcommands():
    from segbook.cli import build_parser
    text = build_parser().format_help()
    for cmd in ("data", "pca-fit", "train", "eval", "predict", "bench", "reproduce"):
        assert cmd in text


def test_committed_run_records_are_complete():
    "Every figures/results/*.json is a tools/record_run.py record: commands, commit, device, curve and evaluations."
    import json
    recs = sorted((REPO / "figures" / "results").glob("*.json"))
    assert recs, "no committed run records"
    for p in recs:
        rec = json.loads(p.read_text())
        missing = [k for k in ("commands", "git", "device", "training", "evaluations") if not rec.get(k)]
        assert not missing, f"{p.name}: missing {missing}; write it with tools/record_run.py"
        assert rec["git"].get("commit"), f"{p.name}: no git commit"
        for split, m in rec["evaluations"].items():
            for k in ("bbox_AP", "segm_AP", "boundary_AP"):
                if k in m: assert 0 <= m[k] <= 1, f"{p.name}: evaluations.{split}.{k}={m[k]}"


PAPER_CHAPTERS = {  # chapter: equation numbers it must typeset (paper's numbering), or None for unnumbered rules
    "02_mask_embeddings": ["(1)", "(2)", "(3)"], "03_matching": ["{4}", "{5}", "{6}", "{7}"], "03b_losses": ["{8}", "{9}"],
    "04_dynamic_attention": ["(10)", "(11)"], "05_istr": [], "06_incoherent_regions": ["(1)"], "07_quadtree": [],
    "08_transfiner": []}


@pytest.mark.parametrize("chapter", sorted(PAPER_CHAPTERS))
def test_paper_chapters_typeset_their_equations(chapter):
    "Each paper chapter has display equations (issue #15 item 3), with the paper's numbers where the paper numbers them."
    import nbformat, re
    nb = nbformat.read(REPO / "nbs" / f"{chapter}.ipynb", as_version=4)
    md = "\n".join(c.source for c in nb.cells if c.cell_type == "markdown")
    blocks = re.findall(r"\$\$(.+?)\$\$", re.sub(r"```.*?```", "", md, flags=re.S), flags=re.S)
    assert blocks, f"{chapter}: no display equation"
    for number in PAPER_CHAPTERS[chapter]:
        assert any(number in b for b in blocks), f"{chapter}: equation {number} is not typeset"


def test_coco_mini_recipe_rebuilds_the_shared_copy(tmp_path):
    "tools/make_coco_mini.py, fed the shared copy's own images and panoptic files, writes its instances JSON byte for byte."
    from segbook.data import find_coco_mini
    root = find_coco_mini(REPO)
    if root is None or not (root / "annotations" / "panoptic_val2017.json").exists():
        pytest.skip("no coco-mini with panoptic annotations beside the repository")
    subprocess.run([sys.executable, str(REPO / "tools" / "make_coco_mini.py"), "--coco", str(root), "--out", str(tmp_path)],
                   check=True, capture_output=True)
    for split in ("train2017", "val2017"):
        name = f"annotations/instances_{split}.json"
        assert (tmp_path / name).read_bytes() == (root / name).read_bytes(), f"{name} differs"
        assert sorted(p.name for p in (tmp_path / split).iterdir()) == sorted(p.name for p in (root / split).iterdir())
