"Tests of segbook.data: mask decoding, transforms, collate, bad input, browse."
import json
import os
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from pycocotools import mask as mask_utils

from segbook.data import (CocoInstances, Compose, DatasetError, Normalize, RandomHorizontalFlip,
                          ResizeShortestEdge, browse, build_transforms, coco_paths, coco_statistics, collate,
                          mask_boxes)

COCO_MINI = Path(os.environ.get("SEGBOOK_COCO_MINI", Path(__file__).resolve().parents[2] / "shared" / "coco-mini"))
needs_coco_mini = pytest.mark.skipif(not COCO_MINI.exists(), reason=f"{COCO_MINI} not present")


def write_coco(root, anns, images=None, categories=None, split="val", hw=(10, 12)):
    "A small COCO dataset: one image file per entry of `images` (grey unless it already exists)."
    root = Path(root)
    (root / "annotations").mkdir(parents=True, exist_ok=True)
    (root / split).mkdir(exist_ok=True)
    images = images if images is not None else [{"id": 1, "file_name": "a.png", "height": hw[0], "width": hw[1]}]
    for im in images:
        Image.fromarray(np.full((im["height"], im["width"], 3), 100, np.uint8)).save(root / split / im["file_name"])
    d = {"images": images, "annotations": anns, "categories": categories or [{"id": 3, "name": "car"}, {"id": 7, "name": "bus"}]}
    (root / "annotations" / f"instances_{split}.json").write_text(json.dumps(d))
    return root


RECT = np.zeros((10, 12), np.uint8)
RECT[3:7, 2:8] = 1


def test_polygon_and_rle_forms_decode_to_the_same_mask(tmp_path):
    compressed = mask_utils.encode(np.asfortranarray(RECT))
    compressed["counts"] = compressed["counts"].decode()
    anns = [{"id": 1, "image_id": 1, "category_id": 3, "segmentation": [[2, 3, 8, 3, 8, 7, 2, 7]]},
            {"id": 2, "image_id": 1, "category_id": 7,
             "segmentation": {"size": [10, 12], "counts": [23, 4, 6, 4, 6, 4, 6, 4, 6, 4, 6, 4, 43]}},
            {"id": 3, "image_id": 1, "category_id": 3, "segmentation": compressed}]
    _, t = CocoInstances(write_coco(tmp_path, anns), "val")[0]
    assert t["masks"].shape == (3, 10, 12)
    for m in t["masks"]:
        assert torch.equal(m, torch.from_numpy(RECT))
    assert t["boxes"].tolist() == [[2, 3, 8, 7]] * 3
    assert t["labels"].tolist() == [0, 1, 0]


def test_crowd_dropped_in_training_kept_flagged_for_eval(tmp_path):
    anns = [{"id": 1, "image_id": 1, "category_id": 3, "segmentation": [[2, 3, 8, 3, 8, 7, 2, 7]]},
            {"id": 2, "image_id": 1, "category_id": 7, "segmentation": {"size": [10, 12], "counts": [0, 10, 110]}, "iscrowd": 1}]
    root = write_coco(tmp_path, anns)
    _, t = CocoInstances(root, "val", train=True)[0]
    assert t["iscrowd"].tolist() == [False] and t["labels"].tolist() == [0]
    _, t = CocoInstances(root, "val", train=False)[0]
    assert t["iscrowd"].tolist() == [False, True] and t["labels"].tolist() == [0, 1]


def test_image_without_annotations_has_empty_tensors(tmp_path):
    ds = CocoInstances(write_coco(tmp_path, []), "val")
    img, t = ds[0]
    assert img.shape == (3, 10, 12)
    assert t["boxes"].shape == (0, 4) and t["labels"].shape == (0,) and t["masks"].shape == (0, 10, 12)
    img2, t2 = build_transforms(True, min_size=(20,), flip=1.0)(img, t)
    assert t2["masks"].shape == (0, 20, 24) and t2["boxes"].shape == (0, 4) and img2.dtype == torch.float32
    batch, targets = collate([(img, t)])
    assert batch.shape == (1, 3, 32, 32)


def test_label_mapping_is_contiguous_and_invertible(tmp_path):
    cats = [{"id": 90, "name": "z"}, {"id": 1, "name": "a"}, {"id": 44, "name": "m"}]
    anns = [{"id": 1, "image_id": 1, "category_id": 90, "segmentation": [[2, 3, 8, 3, 8, 7, 2, 7]]}]
    ds = CocoInstances(write_coco(tmp_path, anns, categories=cats), "val")
    assert ds.coco_ids == [1, 44, 90] and ds.class_names == ["a", "m", "z"]
    assert all(ds.coco_ids[ds.label_of[c]] == c for c in ds.coco_ids)
    assert ds[0][1]["labels"].tolist() == [2]


def test_coco_paths_falls_back_to_2017_names(tmp_path):
    write_coco(tmp_path, [], split="train2017")
    ann, img = coco_paths(tmp_path, "train")
    assert ann.name == "instances_train2017.json" and img.name == "train2017"
    with pytest.raises(DatasetError, match="instances_val.json"):
        coco_paths(tmp_path, "val")


def _random_instances(seed, n=4, h=37, w=53):
    g = np.random.default_rng(seed)
    masks = np.zeros((n, h, w), np.uint8)
    for k in range(n):
        y0, x0 = g.integers(0, h - 6), g.integers(0, w - 6)
        masks[k, y0:g.integers(y0 + 3, h), x0:g.integers(x0 + 3, w)] = 1
    masks = torch.from_numpy(masks)
    img = torch.from_numpy(g.integers(0, 255, (3, h, w), dtype=np.uint8))
    t = {"boxes": mask_boxes(masks), "labels": torch.zeros(n, dtype=torch.int64), "masks": masks,
         "iscrowd": torch.zeros(n, dtype=torch.bool), "image_id": 1,
         "orig_size": torch.tensor([h, w]), "size": torch.tensor([h, w])}
    return img, t


@pytest.mark.parametrize("seed", range(4))
def test_resize_and_flip_keep_boxes_on_their_masks(seed):
    img, t = _random_instances(seed)
    g = torch.Generator().manual_seed(seed)
    for tf in [ResizeShortestEdge((20, 64, 100), max_size_cap=120, generator=g),
               ResizeShortestEdge(30, 90, generator=g),
               RandomHorizontalFlip(1.0),
               Compose([ResizeShortestEdge(70), RandomHorizontalFlip(1.0)])]:
        img2, t2 = tf(img, t)
        assert tuple(img2.shape[1:]) == tuple(t2["masks"].shape[1:]) == tuple(t2["size"].tolist())
        assert (t2["boxes"] - mask_boxes(t2["masks"])).abs().max() <= 1.0, tf


def test_flip_is_exact_and_an_involution():
    img, t = _random_instances(0)
    f = RandomHorizontalFlip(1.0)
    img2, t2 = f(img, t)
    assert torch.equal(t2["boxes"], mask_boxes(t2["masks"]))  # exact in pixel-edge coordinates
    img3, t3 = f(img2, t2)
    assert torch.equal(img3, img) and torch.equal(t3["boxes"], t["boxes"]) and torch.equal(t3["masks"], t["masks"])
    _, t4 = RandomHorizontalFlip(0.0)(img, t)
    assert t4 is t


def test_resize_caps_the_long_side_and_is_seeded():
    img, t = _random_instances(1, h=40, w=200)
    _, t2 = ResizeShortestEdge(100, max_size_cap=300)(img, t)
    assert t2["size"].tolist() == [60, 300]
    r1 = ResizeShortestEdge((10, 20, 30, 40), generator=torch.Generator().manual_seed(5))
    r2 = ResizeShortestEdge((10, 20, 30, 40), generator=torch.Generator().manual_seed(5))
    a, b = [r1.short_side() for _ in range(20)], [r2.short_side() for _ in range(20)]
    assert a == b and set(a) > {10} and set(a) <= {10, 20, 30, 40}
    r = ResizeShortestEdge(10, 13, generator=torch.Generator().manual_seed(0))
    assert {r.short_side() for _ in range(200)} == {10, 11, 12, 13}


def test_normalize_and_collate_pad_to_multiple_of_32():
    a, ta = _random_instances(0, h=37, w=53)
    b, tb = _random_instances(1, h=70, w=20)
    images, targets = collate([(a, ta), (b, tb)])
    assert images.shape == (2, 3, 96, 64) and images.dtype == torch.float32
    assert torch.allclose(images[0, :, :37, :53], Normalize()(a, None)[0])
    assert images[0, :, 37:].abs().sum() == 0 and images[1, :, :, 20:].abs().sum() == 0
    assert [t["size"].tolist() for t in targets] == [[37, 53], [70, 20]]
    assert collate([(a, ta)], size_divisibility=1)[0].shape == (1, 3, 37, 53)


# ---- bad input -------------------------------------------------------------------------------------
POLY = [[0, 0, 6, 0, 6, 6]]


def test_unknown_image_id_is_a_clear_error(tmp_path):
    root = write_coco(tmp_path, [{"id": 9, "image_id": 5, "category_id": 3, "segmentation": POLY}])
    with pytest.raises(DatasetError, match=r"instances_val\.json.*id=9.*image_id 5"):
        CocoInstances(root, "val")


def test_unknown_category_id_is_a_clear_error(tmp_path):
    root = write_coco(tmp_path, [{"id": 9, "image_id": 1, "category_id": 99, "segmentation": POLY}])
    with pytest.raises(DatasetError, match=r"instances_val\.json.*category_id 99"):
        CocoInstances(root, "val")


def test_malformed_json_names_file_and_position(tmp_path):
    root = write_coco(tmp_path, [])
    (root / "annotations" / "instances_val.json").write_text('{"images": [}')
    with pytest.raises(DatasetError, match=r"instances_val\.json: malformed JSON at line 1"):
        CocoInstances(root, "val")


def test_missing_field_is_named(tmp_path):
    root = write_coco(tmp_path, [{"id": 4, "image_id": 1, "category_id": 3}])
    with pytest.raises(DatasetError, match=r"id=4.*'segmentation'"):
        CocoInstances(root, "val")
    root = write_coco(tmp_path / "b", [], images=[{"id": 1, "file_name": "a.png", "height": 10, "width": 12}])
    d = json.loads((root / "annotations" / "instances_val.json").read_text())
    del d["images"][0]["height"]
    (root / "annotations" / "instances_val.json").write_text(json.dumps(d))
    with pytest.raises(DatasetError, match=r"images\[0\].*'height'"):
        CocoInstances(root, "val")


def test_rle_size_mismatch_is_an_error(tmp_path):
    root = write_coco(tmp_path, [{"id": 4, "image_id": 1, "category_id": 3, "segmentation": {"size": [5, 5], "counts": [25]}}])
    with pytest.raises(DatasetError, match=r"segmentation\.size"):
        CocoInstances(root, "val")


def test_missing_image_file_raises_or_is_skipped(tmp_path):
    images = [{"id": 1, "file_name": "a.png", "height": 10, "width": 12}, {"id": 2, "file_name": "b.png", "height": 10, "width": 12}]
    root = write_coco(tmp_path, [], images=images)
    (root / "val" / "a.png").unlink()
    with pytest.raises(DatasetError, match=r"a\.png: image file missing.*file_name"):
        CocoInstances(root, "val")
    with pytest.warns(UserWarning, match="missing"):
        ds = CocoInstances(root, "val", on_missing="skip")
    assert len(ds) == 1 and ds.image_ids == [2] and ds.skipped["missing_image"] == 1


def test_degenerate_polygon_and_zero_area_box_are_counted_skips(tmp_path):
    anns = [{"id": 1, "image_id": 1, "category_id": 3, "segmentation": [[0, 0, 4, 4]]},  # 2 points
            {"id": 2, "image_id": 1, "category_id": 3, "segmentation": [[1, 2]]},
            {"id": 3, "image_id": 1, "category_id": 3, "segmentation": POLY, "bbox": [0, 0, 6, 0]},
            {"id": 4, "image_id": 1, "category_id": 7, "segmentation": POLY, "bbox": [0, 0, 6, 6]}]
    with pytest.warns(UserWarning) as rec:
        ds = CocoInstances(write_coco(tmp_path, anns), "val")
    assert ds.skipped == {"degenerate_polygon": 2, "zero_area_box": 1}
    assert any("degenerate_polygon" in str(w.message) and "instances_val.json" in str(w.message) for w in rec)
    assert ds[0][1]["labels"].tolist() == [1]


def test_empty_mask_is_a_counted_skip(tmp_path):
    anns = [{"id": 1, "image_id": 1, "category_id": 3, "segmentation": {"size": [10, 12], "counts": [120]}}]
    ds = CocoInstances(write_coco(tmp_path, anns), "val")
    with pytest.warns(UserWarning, match="empty mask"):
        _, t = ds[0]
    assert len(t["labels"]) == 0 and ds.skipped["empty_mask"] == 1


def test_corrupt_image_skipped_with_warning_or_raised(tmp_path):
    images = [{"id": 1, "file_name": "a.png", "height": 10, "width": 12}, {"id": 2, "file_name": "b.png", "height": 10, "width": 12}]
    root = write_coco(tmp_path, [], images=images)
    (root / "val" / "a.png").write_bytes(b"\x89PNG not really")
    ds = CocoInstances(root, "val")
    with pytest.warns(UserWarning, match=r"a\.png: cannot decode image"):
        _, t = ds[0]
    assert t["image_id"] == 2 and ds.skipped["bad_image"] == 1
    with pytest.raises(DatasetError, match=r"a\.png: cannot decode image"):
        CocoInstances(root, "val", on_bad_image="raise")[0]


def test_image_size_disagreeing_with_json_is_reported(tmp_path):
    root = write_coco(tmp_path, [])
    Image.fromarray(np.zeros((11, 12, 3), np.uint8)).save(root / "val" / "a.png")
    with pytest.raises(DatasetError, match=r"a\.png: image is 12x11 .*height=10"):
        CocoInstances(root, "val", on_bad_image="raise")[0]


# ---- browse and statistics --------------------------------------------------------------------------
def test_browse_writes_pngs_for_shapes(tmp_path):
    from segbook.shapes import write_shapes_dataset
    write_shapes_dataset(tmp_path / "s", n_train=2, n_val=5, size=64, seed=1)
    paths = browse(tmp_path / "s", "val", tmp_path / "out", n=3, seed=0)
    assert len(paths) == 3 and all(p.exists() and p.suffix == ".png" for p in paths)
    im = np.asarray(Image.open(paths[0]))
    assert im.shape[0] >= 64 * 4 and im.shape[2] == 3
    again = browse(tmp_path / "s", "val", tmp_path / "out2", n=3, seed=0)
    assert [p.name for p in again] == [p.name for p in paths], "same seed, same images"
    assert [p.read_bytes() for p in again] == [p.read_bytes() for p in paths]


@needs_coco_mini
def test_browse_and_load_coco_mini(tmp_path):
    paths = browse(COCO_MINI, "val2017", tmp_path, n=2, seed=0)
    assert len(paths) == 2 and all(p.stat().st_size > 1000 for p in paths)
    ds = CocoInstances(COCO_MINI, "val2017", train=False)
    assert len(ds) == 100 and len(ds.class_names) == 80
    img, t = ds[0]
    assert t["masks"].shape[1:] == img.shape[1:] and torch.allclose(t["boxes"], mask_boxes(t["masks"]))
    s = coco_statistics(ds.ann_file)
    assert s["n_images"] == 100 and sum(s["size_buckets"].values()) == s["n_instances"]


def test_seeded_dataloader_gives_identical_batches(tmp_path):
    from segbook.shapes import write_shapes_dataset
    write_shapes_dataset(tmp_path / "s", n_train=6, n_val=0, size=64, seed=0)

    def batches(seed):
        g = torch.Generator().manual_seed(seed)
        ds = CocoInstances(tmp_path / "s", "train", transforms=build_transforms(True, min_size=(48, 64, 80), generator=g))
        dl = torch.utils.data.DataLoader(ds, batch_size=3, shuffle=True, collate_fn=collate,
                                         generator=torch.Generator().manual_seed(seed))
        return [(x, [t["image_id"] for t in ts], [t["boxes"] for t in ts]) for x, ts in dl]

    a, b, c = batches(0), batches(0), batches(1)
    assert all(torch.equal(x, y) and i == j and all(torch.equal(p, q) for p, q in zip(bx, by))
               for (x, i, bx), (y, j, by) in zip(a, b))
    assert any(i != j or x.shape != y.shape for (x, i, _), (y, j, _) in zip(a, c)), "another seed changes order or sizes"
