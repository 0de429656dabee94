"Tests of segbook.shapes: determinism, classes, counts, occlusion, COCO validity."
import contextlib
import io
import json
from pathlib import Path

import numpy as np
import pytest
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from segbook.data import CocoInstances
from segbook.shapes import CLASSES, SHAPES, area_thresholds, make_shapes_image, rasterize, write_shapes_dataset


@pytest.fixture(scope="module")
def shapes(tmp_path_factory):
    out = tmp_path_factory.mktemp("shapes")
    return write_shapes_dataset(out / "a", n_train=60, n_val=12, size=96, seed=0), out


def test_same_seed_same_bytes_different_seed_different(shapes, tmp_path):
    info, _ = shapes
    again = write_shapes_dataset(tmp_path / "b", n_train=60, n_val=12, size=96, seed=0)
    other = write_shapes_dataset(tmp_path / "c", n_train=60, n_val=12, size=96, seed=1)
    for split in ("train", "val"):
        a = Path(info[split]["annotations"]).read_bytes()
        assert Path(again[split]["annotations"]).read_bytes() == a
        assert Path(other[split]["annotations"]).read_bytes() != a
    assert (Path(info["train"]["images"]) / "000007.png").read_bytes() == (tmp_path / "b" / "train" / "000007.png").read_bytes()
    json.dumps(info)  # the summary is JSON-serialisable


def test_classes_counts_and_files(shapes):
    info, _ = shapes
    assert len(CLASSES) >= 6 and info["classes"] == list(CLASSES)
    d = json.loads(Path(info["train"]["annotations"]).read_text())
    assert [c["name"] for c in d["categories"]] == list(CLASSES)
    per_image = np.bincount([a["image_id"] for a in d["annotations"]], minlength=61)[1:]
    assert per_image.min() >= 1 and per_image.max() <= 10 and per_image.max() >= 6
    assert {a["category_id"] for a in d["annotations"]} == set(range(1, len(CLASSES) + 1))
    assert all((Path(info["train"]["images"]) / im["file_name"]).exists() for im in d["images"])
    assert len(list(Path(info["val"]["images"]).glob("*.png"))) == 12


def test_visible_masks_never_overlap_and_bbox_area_match_mask(shapes):
    info, _ = shapes
    d = json.loads(Path(info["train"]["annotations"]).read_text())
    by_image = {}
    for a in d["annotations"]:
        by_image.setdefault(a["image_id"], []).append(a)
    for anns in by_image.values():
        m = mask_utils.decode([a["segmentation"] for a in anns]).astype(int)  # [H,W,N]
        assert m.sum(2).max() <= 1, "two visible masks share a pixel"
        for k, a in enumerate(anns):
            ys, xs = np.nonzero(m[..., k])
            assert a["area"] == len(ys) > 0
            assert a["bbox"] == [xs.min(), ys.min(), xs.max() - xs.min() + 1, ys.max() - ys.min() + 1]


def test_later_objects_occlude_earlier_ones():
    occluded = 0
    for seed in range(30):
        _, vis, _, full = make_shapes_image(np.random.default_rng(seed), 96, full=True)
        assert vis.sum(0).max() <= 1 and np.array_equal(vis[-1], full[-1]), "the last-drawn object is never covered"
        for k in range(len(vis)):
            later = full[k + 1:].any(0)
            assert np.array_equal(vis[k], full[k] & ~later), "visible = own shape minus everything drawn later"
            assert vis[k].sum() >= max(0.0008 * 96 * 96, 0.3 * full[k].sum()), "mostly hidden objects are dropped"
            occluded += int(vis[k].sum() < full[k].sum())
    assert occluded >= 10, "occlusion actually happens in the data"


def test_rasterize_shapes_are_distinct_and_ring_has_a_hole():
    covs = {n: rasterize(f, 32, 32, 28, 0.0, 64, np.random.default_rng(0), ss=2)[1] >= 0.5 for n, f in SHAPES.items()}
    assert all(c.sum() > 100 for c in covs.values())
    assert not covs["ring"][32, 32] and covs["ellipse"][32, 32], "ring has a hole at its centre"
    assert not covs["pacman"][32, 50] and covs["pacman"][32, 14], "pacman's mouth opens towards +x"
    names = list(covs)
    for i in range(len(names)):
        for j in range(i):
            assert (covs[names[i]] != covs[names[j]]).sum() > 50, (names[i], names[j])


def test_sizes_cover_coco_buckets(shapes):
    info, _ = shapes
    d = json.loads(Path(info["train"]["annotations"]).read_text())
    t1, t2 = area_thresholds(96)
    assert d["info"]["area_rng"]["small"] == [0, t1] and d["info"]["area_rng"]["large"] == [t2, 1e10]
    areas = np.array([a["area"] for a in d["annotations"]])
    assert (areas < t1).sum() > 0.1 * len(areas) and (areas >= t2).sum() > 0.1 * len(areas)
    assert ((areas >= t1) & (areas < t2)).sum() > 0.2 * len(areas)


def test_gt_against_itself_scores_segm_ap_1_and_loads_in_dataset(shapes):
    info, out = shapes
    with contextlib.redirect_stdout(io.StringIO()):
        gt = COCO(info["val"]["annotations"])
        dets = gt.loadRes([{"image_id": a["image_id"], "category_id": a["category_id"], "segmentation": a["segmentation"],
                            "score": 1.0} for a in gt.dataset["annotations"]])
        ev = COCOeval(gt, dets, "segm")
        ev.evaluate(); ev.accumulate(); ev.summarize()
    assert ev.stats[0] == pytest.approx(1.0)
    ds = CocoInstances(out / "a", "val")
    img, t = ds[0]
    assert img.shape == (3, 96, 96) and len(t["labels"]) >= 1 and t["labels"].max() < len(CLASSES)
    assert not ds.skipped


def test_large_preset_is_deterministic_large_and_detailed(tmp_path):
    from segbook.shapes import PRESETS, at_resolution, mask_iou
    a = write_shapes_dataset(tmp_path / "a", n_train=2, n_val=10, seed=0, preset="large")
    b = write_shapes_dataset(tmp_path / "b", n_train=2, n_val=10, seed=0, preset="large")
    for split in ("train", "val"):
        assert Path(a[split]["annotations"]).read_bytes() == Path(b[split]["annotations"]).read_bytes()
    d = json.loads(Path(a["val"]["annotations"]).read_text())
    assert d["info"]["preset"] == "large" and d["info"]["size"] == PRESETS["large"]["size"] == 320
    assert d["info"]["area_rng"]["large"] == [96.0 ** 2, 1e10] and [c["name"] for c in d["categories"]] == list(CLASSES)
    assert np.mean([x["area"] > 96 ** 2 for x in d["annotations"]]) > 0.5
    _, m, _ = make_shapes_image(np.random.default_rng(0), preset="large")
    assert mask_iou(at_resolution(m, 28), m).mean() < mask_iou(at_resolution(m, 112), m).mean()
    with pytest.raises(ValueError, match="preset"):
        write_shapes_dataset(tmp_path / "c", n_train=1, n_val=1, preset="huge")


def test_cli_synth_presets_match_the_generator(tmp_path):
    from segbook.cli import build_parser
    from segbook.shapes import PRESETS
    synth = build_parser()._subparsers._group_actions[0].choices["data"]._subparsers._group_actions[0].choices["synth"]
    choices = next(a.choices for a in synth._actions if a.dest == "preset")
    assert sorted(choices) == sorted(PRESETS)
