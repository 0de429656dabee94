"""`segbook eval --results`, `predict`, `plot`, `viz` and the error contract of `segbook.cli.main`, on a tiny shapes set
(8 + 4 images of 64 px) and a 2-iteration ISTR run shared by the module."""
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

from segbook.cli import main
from segbook.data import coco_paths, find_coco_mini
from segbook.evaluation import perturbed_ground_truth

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def shapes(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli") / "shapes"
    assert main(["data", "synth", "--out", str(root), "--n-train", "8", "--n-val", "4", "--size", "64"]) == 0
    return root


@pytest.fixture(scope="module")
def run(shapes):
    "A 2-iteration ISTR run (what `segbook train` writes), for predict / plot."
    import torch
    from segbook.pipeline import train_command
    n = torch.get_num_threads(); torch.set_num_threads(1)
    out = shapes.parent / "run"
    train_command(REPO / "configs" / "istr_shapes_cpu.yaml", out, data=shapes, device="cpu", max_iters=2, progress=False,
                  overrides=["data.batch_size=2", "data.num_workers=0", "eval_period=0", "log_period=1", "model.num_queries=10",
                             "model.num_stages=2", "data.min_size=[64]", "data.max_size_cap=64"])
    torch.set_num_threads(n)
    return out


def _write(path, obj):
    path.write_text(json.dumps(obj)); return str(path)


def _one_line_error(capsys, argv) -> str:
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("segbook: error: ") and "\n" not in err and "Traceback" not in err, err
    return err


def test_python_m_cli(tmp_path):
    "`python -m segbook.cli` is the entry point torchrun needs; a user error there also exits 2 with one line."
    r = subprocess.run([sys.executable, "-m", "segbook.cli", "--help"], capture_output=True, text=True, cwd=tmp_path)
    assert r.returncode == 0 and "predict" in r.stdout and "plot" in r.stdout and "viz" in r.stdout, r.stderr
    r = subprocess.run([sys.executable, "-m", "segbook.cli", "eval", "--results", "r.json", "--data", str(tmp_path), "--split", "val"],
                       capture_output=True, text=True, cwd=tmp_path)
    assert r.returncode == 2 and r.stderr.startswith("segbook: error: ") and r.stderr.count("\n") == 1, r.stderr


def test_eval_results_table_json_and_per_class(shapes, tmp_path, capsys):
    ann, _ = coco_paths(shapes, "val")
    res = perturbed_ground_truth(ann, 0)  # the ground truth itself: every AP is 1
    out = tmp_path / "ev"
    assert main(["eval", "--results", _write(tmp_path / "r.json", res), "--data", str(shapes), "--split", "val",
                 "--per-class", "--out", str(out)]) == 0
    cap = capsys.readouterr()
    m = json.loads(cap.out)  # stdout stays one JSON line
    assert m == json.loads((out / "metrics.json").read_text())
    assert m["segm_AP"] == pytest.approx(1) and m["bbox_AP"] == pytest.approx(1) and m["detections"] == len(res) and m["images"] == 4
    table = cap.err.splitlines()
    assert table[0].split() == ["AP", "AP50", "AP75", "APs", "APm", "APl"]
    assert table[1].split()[:2] == ["bbox", "100.0"] and table[2].split()[:2] == ["segm", "100.0"] and table[3].split()[0] == "boundary"
    assert f"4 images, {len(res)} detections" in table[4]
    present = {a["category_id"] for a in res}
    rows = {r["id"]: r for r in m["per_class"]}
    assert all(rows[c]["segm"] == pytest.approx(1) for c in present) and all(rows[c]["segm"] == -1 for c in set(rows) - present)
    assert any(l.split()[0] == rows[min(present)]["name"] for l in table[6:])


def test_eval_results_bbox_only_and_mask_errors_lower_mask_ap(shapes, tmp_path, capsys):
    ann, _ = coco_paths(shapes, "val")
    boxes = [{k: v for k, v in r.items() if k != "segmentation"} for r in perturbed_ground_truth(ann, 0)]
    assert main(["eval", "--results", _write(tmp_path / "b.json", boxes), "--data", str(shapes), "--split", "val"]) == 0
    cap = capsys.readouterr()
    m = json.loads(cap.out)
    assert "bbox_AP" in m and "segm_AP" not in m and [l.split()[0] for l in cap.err.splitlines()[1:2]] == ["bbox"]
    eroded = perturbed_ground_truth(ann, -1)  # a 1-pixel boundary error: mask AP drops below 1, Boundary AP at least as much
    assert main(["eval", "--results", _write(tmp_path / "e.json", eroded), "--data", str(shapes), "--split", "val"]) == 0
    m = json.loads(capsys.readouterr().out)
    print({k: round(m[k], 3) for k in ("bbox_AP", "segm_AP", "boundary_AP")})
    assert m["boundary_AP"] <= m["segm_AP"] < 1 and m["segm_AP"] > 0


def _bad_results(res):
    "(name, results, text the error must contain) for each check of `load_results`."
    import copy
    def edit(i, f):
        r = copy.deepcopy(res); f(r[i]); return r
    return [
        ("not a list", {"annotations": res}, "top level must be a list"),
        ("missing score", edit(1, lambda r: r.pop("score")), "results[1]: missing field 'score'"),
        ("missing image_id", edit(0, lambda r: r.pop("image_id")), "results[0]: missing field 'image_id'"),
        ("mixed fields", edit(2, lambda r: r.pop("segmentation")), "results[2]: missing field 'segmentation' (results[0] has one"),
        ("unknown image", edit(1, lambda r: r.update(image_id=10_000)), "results[1]: field 'image_id' 10000 is not an image of split 'val'"),
        ("file name as id", edit(0, lambda r: r.update(image_id="a.png")), "--data ROOT --split SPLIT"),
        ("unknown category", edit(1, lambda r: r.update(category_id=999)), "results[1]: field 'category_id' 999 is not a category"),
        ("rle size", edit(0, lambda r: r["segmentation"].update(size=[32, 64])), "results[0]: field 'segmentation.size' [32, 64] != [height, width] [64, 64]"),
        ("nan score", edit(1, lambda r: r.update(score=math.nan)), "results[1]: field 'score' must be a finite number"),
        ("inf bbox", edit(0, lambda r: r["bbox"].__setitem__(2, math.inf)), "results[0]: field 'bbox' must be 4 finite numbers"),
        ("no geometry", [{"image_id": 1, "category_id": 1, "score": 0.5}], "results[0]: missing field 'bbox' or 'segmentation'"),
    ]


@pytest.mark.parametrize("case", range(11))
def test_eval_results_validation_errors(shapes, tmp_path, capsys, case):
    ann, _ = coco_paths(shapes, "val")
    name, res, text = _bad_results(perturbed_ground_truth(ann, 0))[case]
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(res))  # json writes NaN / Infinity, as Python's json (and so loadRes) reads them
    err = _one_line_error(capsys, ["eval", "--results", str(path), "--data", str(shapes), "--split", "val"])
    assert str(path) in err and text in err, (name, err)


def test_eval_arguments(shapes, tmp_path, capsys):
    for argv in (["eval", "--split", "val"], ["eval", "--checkpoint", "x.pt", "--results", "r.json"]):
        with pytest.raises(SystemExit) as e: main(argv)
        assert e.value.code == 2
    capsys.readouterr()
    assert "--data ROOT and --split" in _one_line_error(capsys, ["eval", "--results", "r.json"])
    assert "results file not found" in _one_line_error(capsys, ["eval", "--results", str(tmp_path / "none.json"), "--data", str(shapes), "--split", "val"])
    assert "annotation file not found" in _one_line_error(capsys, ["eval", "--results", "r.json", "--data", str(shapes), "--split", "test"])


def test_internal_errors_keep_their_traceback(monkeypatch):
    import segbook.pipeline
    def boom(*a, **k): raise RuntimeError("internal")
    monkeypatch.setattr(segbook.pipeline, "eval_results_command", boom)
    with pytest.raises(RuntimeError, match="internal"):
        main(["eval", "--results", "r.json", "--data", "d", "--split", "val"])


def test_predict_ids_threshold_overrides_and_round_trip(run, shapes, tmp_path, capsys):
    images = sorted(str(p) for p in (shapes / "val").glob("*.png"))
    ck = str(run / "last.pt")
    # no detection passes 1.0 (a sigmoid score of a 2-iteration model is below it): one line says so and gives the best score
    assert main(["predict", "--checkpoint", ck, images[0], "--out", str(tmp_path / "p0"), "--threshold", "1"]) == 0
    cap = capsys.readouterr()
    line = [l for l in cap.err.splitlines() if "no detection" in l]
    assert len(line) == 1 and "score >= 1.0 in 1 of 1 image" in line[0] and "best score there 0." in line[0], cap.err
    assert json.loads(cap.out)["detections"] == 0
    # without --data: image_id is the file name; with --data/--split: the data set's id, and the file scores with eval --results
    assert main(["predict", "--checkpoint", ck, *images[:2], "--out", str(tmp_path / "p1"), "--threshold", "0"]) == 0
    recs = json.loads(Path(json.loads(capsys.readouterr().out)["json"]).read_text())
    assert recs and {r["image_id"] for r in recs} == {Path(p).name for p in images[:2]}
    assert main(["predict", "--checkpoint", ck, *images, "data.test_size=64", "--out", str(tmp_path / "p2"), "--threshold", "0",
                 "--data", str(shapes), "--split", "val"]) == 0
    out = json.loads(capsys.readouterr().out)
    recs = json.loads(Path(out["json"]).read_text())
    files = {im["file_name"]: im["id"] for im in json.loads(coco_paths(shapes, "val")[0].read_text())["images"]}
    assert all(r["image_id"] == files[Path(r["file_name"]).name] for r in recs) and len({r["image_id"] for r in recs}) == 4
    assert main(["eval", "--results", out["json"], "--data", str(shapes), "--split", "val"]) == 0
    assert json.loads(capsys.readouterr().out)["detections"] == len(recs)
    # user errors: an unknown override, an image that is not in the split
    assert "no_such_key" in _one_line_error(capsys, ["predict", "--checkpoint", ck, images[0], "model.no_such_key=1", "--out", str(tmp_path / "p3")])
    stranger = tmp_path / "not_in_the_split.png"; stranger.write_bytes(Path(images[0]).read_bytes())
    err = _one_line_error(capsys, ["predict", "--checkpoint", ck, str(stranger), "--out", str(tmp_path / "p4"), "--data", str(shapes), "--split", "val"])
    assert "no image with file_name 'not_in_the_split.png'" in err


def test_eval_checkpoint_plot_and_viz(run, shapes, tmp_path, capsys):
    # --device auto: the machine's CUDA device when it has one, else the CPU (as for train)
    assert main(["eval", "--checkpoint", str(run / "last.pt"), "--split", "val", "--out", str(tmp_path / "ev"), "--per-class",
                 "--device", "auto"]) == 0
    cap = capsys.readouterr()
    m = json.loads(cap.out)
    assert m == json.loads((tmp_path / "ev" / "metrics.json").read_text()) and (tmp_path / "ev" / "results.json").exists()
    err = [l.split("\r")[-1] for l in cap.err.splitlines()]  # the progress bar erases itself with carriage returns
    head = next(i for i, l in enumerate(err) if l.split()[:2] == ["AP", "AP50"])
    assert [l.split()[0] for l in err[head + 1:head + 4]] == ["bbox", "segm", "boundary"] and len(m["per_class"]) == 8
    assert f"4 images, {m['detections']} detections" in cap.err
    assert main(["plot", str(run), "--out", str(tmp_path / "curves.png")]) == 0
    r = json.loads(capsys.readouterr().out)
    assert Path(r["png"]).stat().st_size > 10_000 and r["train_lines"] == 2 and r["last_iter"] == 2
    assert "metrics.jsonl" in _one_line_error(capsys, ["plot", str(tmp_path / "no_run")])
    ann, _ = coco_paths(shapes, "val")
    res = _write(tmp_path / "r.json", perturbed_ground_truth(ann, 1))
    assert main(["viz", "--results", res, "--data", str(shapes), "--split", "val", "--out", str(tmp_path / "viz"), "--n", "3"]) == 0
    written = json.loads(capsys.readouterr().out)["written"]
    assert len(written) == 3 and all(Path(p).exists() for p in written) and not list((tmp_path / "viz").glob("*.tmp"))


def test_eval_results_on_coco_mini(tmp_path, capsys):
    "Real COCO masks (skipped without coco-mini): the ground truth dilated by 2 px scores below 1, lower in Boundary AP; 80 per-class rows."
    root = find_coco_mini(REPO)
    if root is None or not (root / "annotations" / "instances_val2017.json").exists():
        pytest.skip("coco-mini not found (../shared/coco-mini or $SEGBOOK_COCO_MINI)")
    ann, _ = coco_paths(root, "val2017")
    res = perturbed_ground_truth(ann, 2)
    assert main(["eval", "--results", _write(tmp_path / "r.json", res), "--data", str(root), "--split", "val2017", "--per-class"]) == 0
    cap = capsys.readouterr()
    m = json.loads(cap.out)
    assert m["images"] == 100 and m["detections"] == len(res) and 0 < m["boundary_AP"] < m["segm_AP"] < 1
    assert len(m["per_class"]) == 80 and "person" in cap.err


def test_unreadable_val_image_is_excluded_not_replaced(tmp_path):
    "A corrupt val image is left out of GT and predictions (counted), never scored as the next image in its place."
    import json, warnings
    import torch
    from segbook.config import load_config
    from segbook.pipeline import eval_dataset, evaluate_model, predict_dataset
    from segbook.shapes import write_shapes_dataset
    write_shapes_dataset(tmp_path / "d", n_train=2, n_val=4, size=64, seed=1)
    cfg = load_config(None, [f"data.root={tmp_path / 'd'}", "data.val_split=val"])
    records = json.loads((tmp_path / "d" / "annotations" / "instances_val.json").read_text())["images"]
    bad = records[1]
    (tmp_path / "d" / "val" / bad["file_name"]).write_bytes(b"not an image")

    class NoDetections(torch.nn.Module):
        def predict(self, images, sizes, orig, topk=100):
            return [{"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.int64), "scores": torch.zeros(0)}
                    for _ in range(len(images))]

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _, ids = predict_dataset(NoDetections(), eval_dataset(cfg), batch_size=2, progress=False)
        m = evaluate_model(NoDetections(), eval_dataset(cfg), iou_types=("bbox",), progress=False)
    assert ids == [r["id"] for r in records if r["id"] != bad["id"]]       # each readable image once, the bad one absent
    assert m["images"] == 3 and m["images_excluded"] == 1
    assert any("excluded from the evaluation" in str(w.message) and bad["file_name"] in str(w.message) for w in caught)


def test_pretrain_exports_a_backbone_every_model_loads(shapes, tmp_path, capsys):
    "`segbook pretrain` trains the dense pretext task, writes the fp16 body + FPN with a card whose sha256 matches, and the"
    " file loads through `pretrained:` (ISTR, FPN included and frozen) and through Mask R-CNN's config."
    import torch
    from segbook.istr import ISTRConfig, build_resnet_fpn
    from segbook.pretrain import sha256_file
    from segbook.transfiner import TransfinerConfig, build_transfiner
    n = torch.get_num_threads(); torch.set_num_threads(1)
    w = tmp_path / "w.pt"
    assert main(["pretrain", "--config", str(REPO / "configs" / "pretrain_shapes_cpu.yaml"), "--data", str(shapes), "--out", str(tmp_path / "run"),
                 "--export", str(w), "--max-iters", "2", "data.batch_size=2", "data.num_workers=0", "log_period=1",
                 "data.min_size=[64]", "data.max_size_cap=64", "data.test_size=64"]) == 0
    torch.set_num_threads(n)
    card = json.loads(w.with_suffix(".json").read_text())
    assert card["sha256"] == sha256_file(w) and card["iterations"] == 2 and card["data"]["generator_seed"] == 0
    assert 0 <= card["val"]["eval"]["semantic_miou"] <= 1 and card["data"]["n_val"] == 4
    state = torch.load(w, weights_only=True)
    assert state["conv1.weight"].dtype == torch.float16 and any(k.startswith("fpn.") for k in state)
    bb = build_resnet_fpn(ISTRConfig(backbone="resnet18", hidden=64, pretrained=str(w), pretrained_fpn=True, freeze_fpn=True,
                                     trainable_layers=0, cache_backbone_mb=16))
    assert torch.equal(bb.body.conv1.weight, state["conv1.weight"].float()) and bb.body_is_frozen()
    assert not any(p.requires_grad for p in bb.fpn.parameters())
    m = build_transfiner(TransfinerConfig(detector="maskrcnn", backbone="resnet18", fpn_dim=64, pretrained=str(w), pretrained_fpn=True,
                                          num_classes=8), with_head=False)
    assert m is not None
    with pytest.raises(ValueError, match="does not fit hidden"):
        build_resnet_fpn(ISTRConfig(backbone="resnet18", hidden=32, pretrained=str(w), pretrained_fpn=True))
    capsys.readouterr()
    assert "does not train" in _one_line_error(capsys, ["pretrain", "--config", str(REPO / "configs" / "istr_shapes_cpu.yaml"), "--out",
                                                       str(tmp_path / "r2"), "--export", str(tmp_path / "x.pt")])


def _free_port():
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0)); return s.getsockname()[1]


def test_torchrun_two_processes_train_tiny_istr_like_one(shapes, tmp_path):
    "The README's torchrun line on a tiny ISTR (gloo, 2 CPU processes x 2 images) == one process x 4 images: losses"
    " equal to 1e-5 (relative) and weights to 1e-4 after 3 AdamW steps; the matching, the set loss and its"
    " normalisation by the number of boxes see the same global batch."
    import os
    import torch
    ov = ["data.num_workers=0", "eval_period=0", "log_period=1", "model.num_queries=10", "model.num_stages=2",
          "data.min_size=[64]", "data.max_size_cap=64", "data.flip=0", "data.batch_size=4", "checkpoint_period=3"]
    args = lambda out: ["-m", "segbook.cli", "train", "--config", str(REPO / "configs" / "istr_shapes_cpu.yaml"),
                        "--data", str(shapes), "--out", str(out), "--max-iters", "3", "--eval-images", "1", *ov]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    one = subprocess.run([sys.executable, *args(tmp_path / "one")], capture_output=True, text=True, timeout=300, env=env)
    assert one.returncode == 0, one.stderr[-2000:]
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
                          "--master_port", str(_free_port()), *args(tmp_path / "two")],
                         capture_output=True, text=True, timeout=300, env=env)
    assert two.returncode == 0, two.stderr[-3000:]
    a, b = (torch.load(tmp_path / f / "last.pt", weights_only=True) for f in ("one", "two"))
    assert (a["data"]["world_size"], a["data"]["per_rank_batch"]) == (1, 4)
    assert (b["data"]["world_size"], b["data"]["per_rank_batch"]) == (2, 2)
    diff = max(float((a["model"][k].float() - b["model"][k].float()).abs().max()) for k in a["model"])
    assert diff <= 1e-4, diff
    losses = lambda f: [r["loss"] for r in map(json.loads, (tmp_path / f / "metrics.jsonl").read_text().splitlines()) if "loss" in r]
    la, lb = losses("one"), losses("two")
    assert len(la) == len(lb) == 3 and la[-1] < la[0]
    assert all(math.isclose(x, y, rel_tol=1e-5) for x, y in zip(la, lb)), (la, lb)
