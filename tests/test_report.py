"""segbook.report: the AP tables print what the evaluation measured, the curves read what the engine logs, viz draws
what a results file holds. Fast: hand-made squares and a 4-image shapes set, no model."""
import json
from pathlib import Path

import numpy as np
import pytest

from segbook.evaluation import evaluate_coco, perturbed_ground_truth, squares_dataset
from segbook.pipeline import flatten_metrics
from segbook.report import ap_table, per_class_table, plot_command, plot_run, read_metrics_log, viz_command


def _two_class_squares():
    gt = squares_dataset(6, 40, size=100)
    for a in gt["annotations"][3:]: a["category_id"] = 2
    gt["categories"].append({"id": 2, "name": "other"})
    return gt


def test_ap_table_prints_the_measured_numbers():
    gt = _two_class_squares()
    res = perturbed_ground_truth(gt, 2)
    m = {**flatten_metrics(evaluate_coco(gt, res)), "images": 6, "detections": len(res), "split": "val"}
    lines = ap_table(m).splitlines()
    for row, t in zip(lines[1:4], ("bbox", "segm", "boundary")):
        cells = row.split()
        assert cells[0] == t and len(cells) == 7
        assert [float(c) if c != "–" else -1 for c in cells[1:]] == pytest.approx(
            [round(100 * m[f"{t}_{k}"], 1) if m[f"{t}_{k}"] >= 0 else -1 for k in ("AP", "AP50", "AP75", "APs", "APm", "APl")])
    assert lines[4] == f"6 images, {len(res)} detections (val)"
    only_box = ap_table({"bbox_AP": 0.5, "bbox_AP50": 0.7}).splitlines()
    assert len(only_box) == 2 and only_box[1].split()[:3] == ["bbox", "50.0", "70.0"] and "–" in only_box[1]
    with pytest.raises(ValueError, match="no '<iou type>_AP'"): ap_table({"images": 3})


def test_per_class_rows_average_to_the_overall_ap():
    gt = _two_class_squares()
    res = [r for r in perturbed_ground_truth(gt, 1) if r["category_id"] == 2] + \
          [r for r in perturbed_ground_truth(gt, 3) if r["category_id"] == 1]
    m = flatten_metrics(evaluate_coco(gt, res, per_class=True), {1: "square", 2: "other"})
    rows = {r["name"]: r for r in m["per_class"]}
    for t in ("bbox", "segm", "boundary"):
        assert np.isclose((rows["square"][t] + rows["other"][t]) / 2, m[f"{t}_AP"])
    assert rows["other"]["boundary"] > rows["square"]["boundary"]  # the 1-pixel error is the smaller one
    table = per_class_table(m["per_class"]).splitlines()
    assert table[0].split() == ["category", "bbox", "AP", "segm", "AP", "boundary", "AP"]
    assert {l.split()[0] for l in table[1:]} == {"square", "other"}


def test_read_metrics_log_and_plot(tmp_path):
    lines = [{"iter": i, "lr": 0.01, "loss": 5.0 / i, "loss_ce": 1.0 / i, "time": 0.1} for i in (1, 2, 3, 4)]
    lines.insert(2, {"iter": 2, "eval": {"bbox_AP": 0.1, "segm_AP": 0.2, "images": 3}})
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(l) + "\n" for l in lines))
    train, evals = read_metrics_log(tmp_path)
    assert [r["iter"] for r in train] == [1, 2, 3, 4] and evals[0]["eval"]["segm_AP"] == 0.2
    fig = plot_run(tmp_path)
    loss_ax, lr_ax, ap_ax = fig.axes
    assert {l.get_label() for l in loss_ax.lines} == {"loss", "loss_ce"} and loss_ax.get_yscale() == "log"
    assert {l.get_label() for l in ap_ax.lines} == {"bbox_AP", "segm_AP"}
    assert list(ap_ax.lines[1].get_ydata()) == [20.0]  # AP plotted in percent
    r = plot_command(tmp_path)
    assert r["png"] == str(tmp_path / "curves.png") and Path(r["png"]).stat().st_size > 10_000
    (tmp_path / "e").mkdir(); (tmp_path / "e" / "metrics.jsonl").write_text("\n")
    with pytest.raises(ValueError, match="empty"): read_metrics_log(tmp_path / "e")
    with pytest.raises(FileNotFoundError, match="metrics.jsonl"): read_metrics_log(tmp_path / "missing")


def test_viz_draws_the_detections_above_the_threshold(tmp_path):
    from segbook.data import coco_paths
    from segbook.shapes import write_shapes_dataset
    write_shapes_dataset(tmp_path / "s", n_train=1, n_val=4, size=64, seed=3)
    res = perturbed_ground_truth(coco_paths(tmp_path / "s", "val")[0], 0)
    for r in res: r["score"] = 0.9
    ids = sorted({r["image_id"] for r in res})
    res = [r for r in res if r["image_id"] != ids[0]]  # one image without detections is left out of the panels
    (tmp_path / "r.json").write_text(json.dumps(res))
    v = viz_command(tmp_path / "r.json", tmp_path / "s", "val", tmp_path / "viz", n=8, progress=False)
    assert v["images"] == len(ids) - 1 and [Path(p).name for p in v["written"]] == [f"val_{i}.png" for i in ids[1:]]
    for r in res: r["score"] = 0.1
    (tmp_path / "low.json").write_text(json.dumps(res))
    hi = viz_command(tmp_path / "low.json", tmp_path / "s", "val", tmp_path / "v2", n=1, threshold=0.05, progress=False)
    lo = viz_command(tmp_path / "low.json", tmp_path / "s", "val", tmp_path / "v3", n=1, threshold=0.5, progress=False)
    from PIL import Image
    a, b = (np.asarray(Image.open(x["written"][0])) for x in (hi, lo))
    assert a.shape == b.shape and (a != b).any()  # the detections under the threshold are not drawn
