"""A bad-input corpus of COCO annotation files, generated on the fly (issue #16 items 1 and 9).

Every case starts from one valid file (two 32x32 images, one category, three annotations) and breaks one thing.
Each must end the same way through all four readers of annotation files — the training data set
(`CocoInstances`), the PCA fit (`iter_coco_masks`), the evaluator (`evaluate_coco`) and `predict --data --split`
(`image_ids_by_file`): accepted, a counted skip with
its reason, or one `DatasetError` naming the file, the record and the field. Never a crash inside pycocotools,
never a silently different number."""
import copy
import json
import warnings

import numpy as np
import pytest
from PIL import Image

from segbook.data import CocoInstances, DatasetError
from segbook.data import iter_coco_masks
from segbook.evaluation import evaluate_coco
from segbook.pipeline import image_ids_by_file

SQUARE = [[4, 4, 20, 4, 20, 20, 4, 20]]


def valid():
    return {"images": [{"id": 1, "file_name": "1.png", "height": 32, "width": 32},
                       {"id": 2, "file_name": "2.png", "height": 32, "width": 32}],
            "categories": [{"id": 7, "name": "thing"}],
            "annotations": [{"id": 10, "image_id": 1, "category_id": 7, "bbox": [4, 4, 16, 16], "iscrowd": 0, "area": 256,
                             "segmentation": copy.deepcopy(SQUARE)},
                            {"id": 11, "image_id": 2, "category_id": 7, "bbox": [0, 0, 8, 8], "iscrowd": 0, "area": 64,
                             "segmentation": {"size": [32, 32], "counts": [0, 8, 24] * 8 + [32 * 24]}},
                            {"id": 12, "image_id": 2, "category_id": 7, "bbox": [16, 16, 8, 8], "iscrowd": 1, "area": 64,
                             "segmentation": {"size": [32, 32], "counts": [512, 16, 496]}}]}


def ann(d, i=0):
    return d["annotations"][i]


# (name, how to break the valid file, expected outcome): 'ok', ('skip', reason) or ('error', [words in the message])
CASES = [
    ("valid", lambda d: None, "ok"),
    ("annotation_not_object", lambda d: d["annotations"].__setitem__(0, 5), ("error", ["annotations[0]", "not an object"])),
    ("missing_image_id", lambda d: ann(d).pop("image_id"), ("error", ["annotations[0] (id=10)", "'image_id'"])),
    ("missing_category_id", lambda d: ann(d).pop("category_id"), ("error", ["(id=10)", "'category_id'"])),
    ("missing_segmentation", lambda d: ann(d).pop("segmentation"), ("error", ["(id=10)", "'segmentation'"])),
    ("unknown_image_id", lambda d: ann(d).update(image_id=99), ("error", ["(id=10)", "image_id 99"])),
    ("unknown_category_id", lambda d: ann(d).update(category_id=3), ("error", ["(id=10)", "category_id 3"])),
    ("segmentation_is_a_number", lambda d: ann(d).update(segmentation=5), ("error", ["(id=10)", "'segmentation'"])),
    ("polygon_with_string", lambda d: ann(d).update(segmentation=[[4, 4, "a", 4, 20, 20]]), ("error", ["(id=10)", "polygon"])),
    ("polygon_odd_length", lambda d: ann(d).update(segmentation=[[4, 4, 20, 4, 20]]), ("error", ["(id=10)", "polygon"])),
    ("polygon_not_nested", lambda d: ann(d).update(segmentation=[4, 4, 20, 4, 20, 20]), ("error", ["(id=10)", "polygon"])),
    ("polygon_nan", lambda d: ann(d).update(segmentation=[[4, 4, float("nan"), 4, 20, 20]]), ("error", ["(id=10)", "non-finite"])),
    ("polygon_inf", lambda d: ann(d).update(segmentation=[[4, 4, float("inf"), 4, 20, 20]]), ("error", ["(id=10)", "non-finite"])),
    ("polygon_bool", lambda d: ann(d).update(segmentation=[[True, 4, 20, 4, 20, 20]]), ("error", ["(id=10)", "polygon"])),
    ("polygon_two_points", lambda d: ann(d).update(segmentation=[[4, 4, 20, 4]]), ("skip", "degenerate_polygon")),
    ("polygon_empty_list", lambda d: ann(d).update(segmentation=[]), ("skip", "degenerate_polygon")),
    ("rle_missing_counts", lambda d: ann(d, 1)["segmentation"].pop("counts"), ("error", ["(id=11)", "'counts'"])),
    ("rle_missing_size", lambda d: ann(d, 1)["segmentation"].pop("size"), ("error", ["(id=11)", "'size'"])),
    ("rle_size_other_image", lambda d: ann(d, 1)["segmentation"].update(size=[16, 16]), ("error", ["(id=11)", "segmentation.size"])),
    ("rle_size_not_a_list", lambda d: ann(d, 1)["segmentation"].update(size="32x32"), ("error", ["(id=11)", "segmentation.size"])),
    ("rle_counts_too_few_pixels", lambda d: ann(d, 1)["segmentation"].update(counts=[0, 8, 24]), ("error", ["(id=11)", "covers 32 pixels"])),
    ("rle_counts_too_many_pixels", lambda d: ann(d, 1)["segmentation"].update(counts=[1024, 8]), ("error", ["(id=11)", "covers 1032"])),
    ("rle_counts_negative", lambda d: ann(d, 1)["segmentation"].update(counts=[1030, -6]), ("error", ["(id=11)", "non-negative"])),
    ("rle_counts_float", lambda d: ann(d, 1)["segmentation"].update(counts=[1023.5, 0.5]), ("error", ["(id=11)", "non-negative integers"])),
    ("rle_counts_a_number", lambda d: ann(d, 1)["segmentation"].update(counts=1024), ("error", ["(id=11)", "string or a list"])),
    ("bbox_three_numbers", lambda d: ann(d).update(bbox=[4, 4, 16]), ("error", ["(id=10)", "'bbox'"])),
    ("bbox_string", lambda d: ann(d).update(bbox="4,4,16,16"), ("error", ["(id=10)", "'bbox'"])),
    ("bbox_nan", lambda d: ann(d).update(bbox=[4, 4, float("nan"), 16]), ("error", ["(id=10)", "'bbox'"])),
    ("bbox_inf", lambda d: ann(d).update(bbox=[4, 4, 16, float("inf")]), ("error", ["(id=10)", "'bbox'"])),
    ("bbox_with_string", lambda d: ann(d).update(bbox=[4, "4", 16, 16]), ("error", ["(id=10)", "'bbox'"])),
    ("bbox_zero_width", lambda d: ann(d).update(bbox=[4, 4, 0, 16]), ("skip", "zero_area_box")),
    ("bbox_negative_height", lambda d: ann(d).update(bbox=[4, 4, 16, -3]), ("skip", "zero_area_box")),
    ("iscrowd_two", lambda d: ann(d).update(iscrowd=2), ("error", ["(id=10)", "'iscrowd'"])),
    ("iscrowd_string", lambda d: ann(d).update(iscrowd="yes"), ("error", ["(id=10)", "'iscrowd'"])),
    ("image_not_object", lambda d: d["images"].__setitem__(1, "2.png"), ("error", ["images[1]", "not an object"])),
    ("image_missing_height", lambda d: d["images"][0].pop("height"), ("error", ["images[0] (id=1)", "'height'"])),
    ("image_zero_width", lambda d: d["images"][0].update(width=0), ("error", ["images[0] (id=1)", "positive integers"])),
    ("image_float_height", lambda d: d["images"][0].update(height=32.5), ("error", ["images[0] (id=1)", "positive integers"])),
    ("image_duplicate_id", lambda d: d["images"][1].update(id=1), ("error", ["images[1]", "duplicate image id 1"])),
    ("category_without_name", lambda d: d["categories"][0].pop("name"), ("error", ["categories[0]", "'name'"])),
    ("category_duplicate", lambda d: d["categories"].append({"id": 7, "name": "again"}), ("error", ["categories[1]", "duplicate"])),
    ("images_not_a_list", lambda d: d.update(images={"id": 1}), ("error", ["'images'", "not a list"])),
    ("categories_missing", lambda d: d.pop("categories"), ("error", ["'categories'", "missing"])),
    ("annotations_not_a_list", lambda d: d.update(annotations={"id": 10}), ("error", ["'annotations'", "not a list"])),
]


def write_split(root, d, name="instances_val.json"):
    (root / "annotations").mkdir(parents=True, exist_ok=True)
    (root / "val").mkdir(exist_ok=True)
    for i in (1, 2):
        Image.fromarray(np.full((32, 32, 3), 40 * i, np.uint8)).save(root / "val" / f"{i}.png")
    path = root / "annotations" / name
    path.write_text(json.dumps(d))
    return path


def outcome(fn):
    "('ok', warnings) / ('error', message) of calling `fn`."
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            fn()
        except DatasetError as e:
            return "error", str(e)
    return "ok", " ".join(str(w.message) for w in caught)


def perfect_results(d):
    "COCO results equal to the usable ground truth (score 1): AP 1.0 when the evaluator reads the same annotations."
    from pycocotools import mask as mask_utils
    from segbook.data import segmentation_to_rle
    out = []
    for a in d["annotations"]:
        if a.get("iscrowd"):
            continue
        rle = segmentation_to_rle(a["segmentation"], 32, 32)
        rle["counts"] = rle["counts"].decode() if isinstance(rle["counts"], bytes) else rle["counts"]
        out.append({"image_id": a["image_id"], "category_id": a["category_id"], "score": 1.0, "segmentation": rle,
                    "bbox": [float(x) for x in mask_utils.toBbox(rle)]})
    return out


@pytest.mark.parametrize("name,breaker,expected", CASES, ids=[c[0] for c in CASES])
def test_one_verdict_for_every_reader(tmp_path, name, breaker, expected):
    d = valid()
    breaker(d)
    path = write_split(tmp_path, d)
    readers = {
        "dataset": lambda: CocoInstances(tmp_path, "val", train=True),
        "pca-fit": lambda: list(iter_coco_masks(path, size=8, progress=False)),
        "evaluator": lambda: evaluate_coco(path, [], iou_types=("segm",)),
        "predict": lambda: image_ids_by_file(tmp_path, "val", [tmp_path / "val" / "1.png"]),   # predict --data --split
    }
    got = {k: outcome(fn) for k, fn in readers.items()}
    if expected == "ok":
        assert all(kind == "ok" for kind, _ in got.values()), got
    elif expected[0] == "skip":   # predict only looks the image up: a skipped annotation is no concern of it
        assert all(kind == "ok" and (expected[1] in msg or r == "predict") for r, (kind, msg) in got.items()), got
        ds = CocoInstances(tmp_path, "val", train=True)
        assert ds.skipped[expected[1]] == 1
    else:
        for reader, (kind, msg) in got.items():
            assert kind == "error" and "\n" not in msg and str(path) in msg and all(w in msg for w in expected[1]), (reader, msg)


def test_skipped_ground_truth_is_left_out_of_the_evaluation_as_in_training(tmp_path):
    d = valid()
    d["annotations"].append({"id": 13, "image_id": 1, "category_id": 7, "bbox": [1, 1, 2, 2], "iscrowd": 0,
                             "segmentation": [[1, 1, 3, 1]]})            # two points: skipped everywhere
    path = write_split(tmp_path, d)
    with pytest.warns(UserWarning, match="1 ground-truth annotation.*degenerate_polygon"):
        m = evaluate_coco(path, perfect_results(valid()), iou_types=("segm",))
    assert m["segm"]["AP"] == pytest.approx(1.0)             # not penalised for a GT that no model could be trained on
    assert len(CocoInstances(tmp_path, "val", train=False)._anns[1]) == 1


@pytest.mark.parametrize("file_name", ["../1.png", "/etc/passwd", "", "a/../../1.png", 7])
def test_image_path_must_stay_inside_the_split_folder(tmp_path, file_name):
    "Readers that open image files refuse a file_name that leaves the split folder; the evaluator never opens one."
    d = valid()
    d["images"][0]["file_name"] = file_name
    path = write_split(tmp_path, d)
    for fn in (lambda: CocoInstances(tmp_path, "val"), lambda: list(iter_coco_masks(path, size=8, progress=False)),
               lambda: image_ids_by_file(tmp_path, "val", [tmp_path / "val" / "2.png"])):
        kind, msg = outcome(fn)
        assert kind == "error" and "images[0] (id=1)" in msg and "'file_name'" in msg, msg
    assert outcome(lambda: evaluate_coco(path, [], iou_types=("segm",)))[0] == "ok"
