"The papermill driver: a failing notebook is reported, the others still run, results.json is stamped and atomic."
import json

import nbformat
import pytest

from segbook.reproduce import reproduce_command, run_notebook

PARAMS = "profile = 'x'\nout_dir = None\nseed = 0\ndevice = 'cpu'\nshapes_root = None\ncoco_root = None\nk = 1"

def _nb(path, body):
    nb = nbformat.v4.new_notebook()
    p = nbformat.v4.new_code_cell(PARAMS); p.metadata["tags"] = ["parameters"]
    nb.cells = [p, nbformat.v4.new_code_cell(body)]
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "python3", "language": "python"}
    nbformat.write(nb, path)

def test_failure_reported_and_others_run(tmp_path):
    nbs = tmp_path / "nbs"; nbs.mkdir()
    _nb(nbs / "a_bad.ipynb", "raise ValueError('broken on purpose')")
    _nb(nbs / "b_good.ipynb", "import json, pathlib\npathlib.Path(out_dir, 'results.json').write_text(json.dumps({'k': k, 'profile': profile}))")
    stale = tmp_path / "out" / "figures" / "tables" / "from_an_earlier_run.md"
    stale.parent.mkdir(parents=True); stale.write_text("old numbers")
    (tmp_path / "out" / "figures" / ".made-by-segbook-reproduce").write_text("")   # made by an earlier reproduce
    res = reproduce_command("t", tmp_path / "out", notebooks_dir=nbs, profiles={"t": {"a_bad": {}, "b_good": {"k": 5}}},
                            figures=tmp_path / "figs", progress=False)
    assert not (tmp_path / "figs" / "tables" / "from_an_earlier_run.md").exists()  # a reused --out gathers only this run's
    assert not (tmp_path / "figs" / ".made-by-segbook-reproduce").exists()         # the marker stays in OUT
    assert res["failed"] == ["a_bad"]
    bad = res["notebooks"]["a_bad"]
    assert bad["status"] == "failed" and bad["error"] == "ValueError" and "broken on purpose" in bad["message"]
    assert "raise ValueError" in bad["cell_source"]
    good = res["notebooks"]["b_good"]
    assert good["status"] == "ok" and good["results"] == {"k": 5, "profile": "t"}  # parameters reached the notebook
    on_disk = json.loads((tmp_path / "figs" / "results.json").read_text())
    assert on_disk["profile"] == "t" and on_disk["seed"] == 0 and on_disk["finished"] is True
    assert {"commit", "dirty"} <= set(on_disk["git"]) and "torch" in on_disk["device"]
    assert all("seconds" in r for r in on_disk["notebooks"].values())
    assert not list((tmp_path / "figs").glob("*.tmp")) and not list((tmp_path / "out").glob("*.tmp"))
    again = reproduce_command("t", tmp_path / "out", notebooks_dir=nbs, profiles={"t": {"b_good": {"k": 6}}}, progress=False)
    assert "figures" not in again and (tmp_path / "out" / "results.json").exists()   # without --figures: only OUT
    assert json.loads((tmp_path / "figs" / "results.json").read_text())["notebooks"].keys() == {"a_bad", "b_good"}

def test_refuses_in_place(tmp_path):
    _nb(tmp_path / "x.ipynb", "pass")
    with pytest.raises(ValueError, match="in place"):
        run_notebook(tmp_path / "x.ipynb", tmp_path / "x.ipynb", {})

def test_unknown_profile_and_notebook(tmp_path):
    with pytest.raises(ValueError, match="profile"):
        reproduce_command("nope", tmp_path / "o", progress=False)
    (tmp_path / "nbs").mkdir()
    with pytest.raises(ValueError, match="no such notebook"):
        reproduce_command("t", tmp_path / "o", only=["missing"], notebooks_dir=tmp_path / "nbs", profiles={"t": {}}, progress=False)


def test_out_figures_it_did_not_make_are_refused_not_deleted(tmp_path):
    from segbook.reproduce import fresh_figures_dir
    mine = tmp_path / "figures"; mine.mkdir(); (mine / "paper_draft.png").write_bytes(b"\x89PNG")
    with pytest.raises(FileExistsError, match="did not write"):
        fresh_figures_dir(mine)
    assert (mine / "paper_draft.png").exists()
    made = fresh_figures_dir(tmp_path / "out" / "figures")        # its own folder: emptied on the next run
    (made / "table.md").write_text("old")
    assert list(fresh_figures_dir(made).iterdir()) == [made / ".made-by-segbook-reproduce"]


def test_shapes_made_for_another_profile_is_not_reused(tmp_path):
    from segbook.reproduce import shapes_mismatch
    from segbook.shapes import write_shapes_dataset
    write_shapes_dataset(tmp_path, n_train=3, n_val=2, size=64, seed=0)
    assert shapes_mismatch(tmp_path, seed=0, n_train=3, n_val=2, size=64) is None
    assert "(0, 64, 3, 'default')" in shapes_mismatch(tmp_path, seed=0, n_train=5, n_val=2, size=64)
    assert "'large'" in shapes_mismatch(tmp_path, seed=0, n_train=3, n_val=2, size=64, preset="large")
    assert "seed" in shapes_mismatch(tmp_path, seed=1, n_train=3, n_val=2, size=64)
    assert "no instances_train.json" in shapes_mismatch(tmp_path / "none", seed=0, n_train=3, n_val=2, size=64)

def test_run_finished_needs_the_last_iteration_of_its_own_schedule(tmp_path):
    from segbook.reproduce import run_finished
    run = tmp_path / "run"; run.mkdir()
    assert not run_finished(run)                                   # nothing there
    (run / "config.yaml").write_text("solver:\n  max_iters: 20\n")
    (run / "last.pt").write_bytes(b"x")
    (run / "metrics.jsonl").write_text('{"iter": 10, "loss": 1.0}\n')
    assert not run_finished(run)                                   # killed half-way: resume, don't reuse
    (run / "metrics.jsonl").write_text('{"iter": 10, "loss": 1.0}\n{"iter": 20, "loss": 0.5}\n')
    assert run_finished(run) and not run_finished(run, evaluated=True)
    (run / "metrics.jsonl").write_text('{"iter": 20, "loss": 0.5}\n{"iter": 20, "eval": {"segm_AP": 0.1}}\n')
    assert run_finished(run, evaluated=True)
    (run / "last.pt").unlink()
    assert not run_finished(run, evaluated=True)                   # no checkpoint, nothing to evaluate
