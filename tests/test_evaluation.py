"""segbook.evaluation: COCO results, COCO AP and Boundary AP (Boundary IoU, Cheng et al. 2021)."""
import contextlib
import io
import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from pycocotools import mask as mask_utils
from pycocotools.cocoeval import COCOeval
from scipy import ndimage

from faster_coco_eval import COCOeval_faster

from segbook.evaluation import (IOU_TYPES, BoundaryCOCOeval, _detections, boundary_band, boundary_dilation,
                                boundary_iou, coco_evaluator, encode_masks, evaluate_coco, load_coco,
                                perturbed_ground_truth, predictions_to_coco, run_cocoeval, save_coco_results,
                                squares_dataset)

COCO_MINI = Path(os.environ.get("SEGBOOK_COCO_MINI", Path(__file__).resolve().parents[2] / "shared" / "coco-mini"))
VAL_JSON = COCO_MINI / "annotations" / "instances_val2017.json"


def official_band(mask, d):
    "The official recipe, written with scipy: zero-pad 1 px, erode d times with 3x3 (no erosion from beyond), crop, subtract."
    padded = np.pad(mask.astype(bool), 1)
    eroded = ndimage.binary_erosion(padded, np.ones((3, 3), bool), iterations=d, border_value=1)[1:-1, 1:-1]
    return mask.astype(bool) & ~eroded


def set_iou(a, b):
    u = (a | b).sum()
    return (a & b).sum() / u if u else 0.0


def blobs(rng, n, h, w):
    "n random blob masks [n,h,w] bool (smoothed noise, some touching the border)."
    out = []
    for _ in range(n):
        m = ndimage.gaussian_filter(rng.random((h, w)), 3) > rng.uniform(0.5, 0.55)
        out.append(ndimage.binary_opening(m) if m.any() else m)
    return np.stack(out)


# ---------------------------------------------------------------- predictions -> COCO results
def test_predictions_to_coco_roundtrip():
    rng = np.random.default_rng(0)
    masks = torch.as_tensor(rng.random((3, 1, 24, 32)), dtype=torch.float32)
    pred = {"boxes": torch.tensor([[1., 2, 11, 22], [0, 0, 32, 24], [5, 5, 6, 7]]),
            "labels": torch.tensor([2, 0, 1]), "scores": torch.tensor([0.9, 0.05, 0.5]), "masks": masks}
    res = predictions_to_coco([pred], [42], coco_ids={0: 1, 1: 3, 2: 90}, score_threshold=0.1)
    assert [r["category_id"] for r in res] == [90, 3]
    assert res[0]["bbox"] == [1.0, 2.0, 10.0, 20.0] and res[0]["image_id"] == 42
    assert np.isclose(res[1]["score"], 0.5)
    for r, i in zip(res, [0, 2]):
        assert (mask_utils.decode(r["segmentation"]) == (masks[i, 0].numpy() > 0.5)).all()
    json.loads(json.dumps(res))
    # [N,H,W] bool masks and a tensor coco_ids
    boolres = predictions_to_coco([{**pred, "masks": masks[:, 0] > 0.7}], [42], torch.tensor([1, 3, 90]))
    assert (mask_utils.decode(boolres[2]["segmentation"]) == (masks[2, 0].numpy() > 0.7)).all()
    # boxes only
    assert "segmentation" not in predictions_to_coco([{k: v for k, v in pred.items() if k != "masks"}], [42], [1, 3, 90])[0]


def test_predictions_to_coco_errors():
    pred = {"boxes": torch.zeros(1, 4), "labels": torch.tensor([5]), "scores": torch.ones(1)}
    with pytest.raises(ValueError, match="coco_ids"):
        predictions_to_coco([pred], [1], [1, 2])
    with pytest.raises(ValueError, match="image_ids"):
        predictions_to_coco([pred], [1, 2], list(range(6)))


def test_save_coco_results_atomic(tmp_path):
    out = save_coco_results([{"image_id": 1, "score": 0.5}], tmp_path / "sub" / "res.json")
    assert json.loads(out.read_text()) == [{"image_id": 1, "score": 0.5}]
    assert [p.name for p in out.parent.iterdir()] == ["res.json"]  # no temp file left


# ---------------------------------------------------------------- the band and Boundary IoU
def test_boundary_dilation():
    assert boundary_dilation(480, 640) == 16 and boundary_dilation(100, 100) == 3
    assert boundary_dilation(10, 10) == 1  # round(0.28) = 0 -> at least 1
    assert boundary_dilation(100, 100, dilation_ratio=0.05) == 7


def test_band_matches_official_recipe_and_chessboard_distance():
    rng = np.random.default_rng(1)
    masks = blobs(rng, 12, 40, 50)
    for m in masks:
        cdt = ndimage.distance_transform_cdt(np.pad(m, 1), metric="chessboard")[1:-1, 1:-1]
        for d in (1, 2, 4, 7, 30):
            ref = official_band(m, d)
            assert (boundary_band(m, d) == ref).all()
            assert ((m & (cdt <= d)) == ref).all()  # chessboard distance <= d  <=>  removed by d 3x3 erosions


def test_band_counts_image_border_and_handles_empty():
    full = np.ones((30, 40), bool)
    assert boundary_band(full, 2).sum() == 30 * 40 - 26 * 36
    corner = np.zeros((30, 40), bool); corner[:10, :10] = True
    band = boundary_band(corner, 2)
    assert band[0, :10].all() and band[:10, 0].all() and not band[2:8, 2:8].any()
    assert not boundary_band(np.zeros((5, 5), bool), 3).any()


@pytest.mark.parametrize("n,size", [(20, 100), (30, 200), (40, 300)])
def test_shifted_square_by_hand(n, size):
    d = boundary_dilation(size, size)
    masks = np.zeros((2, size, size), bool)
    o = size // 3
    masks[0, o:o + n, o:o + n] = True
    masks[1, o:o + n, o + 1:o + n + 1] = True
    band = n * n - (n - 2 * d) ** 2                       # ring of width d
    inter = n * (n - 1) - (n - 2 * d) * (n - 2 * d + 1)   # overlap region minus both inner squares
    expected = inter / (2 * band - inter)
    got = boundary_iou(masks, masks)
    assert np.isclose(got[0, 1], expected) and np.isclose(got[1, 0], expected)
    assert np.allclose(np.diag(got), 1)
    assert expected < (n * (n - 1)) / (n * (n + 1))  # boundary IoU is stricter than mask IoU here


def test_small_object_boundary_iou_equals_mask_iou():
    masks = np.zeros((2, 100, 100), bool)
    masks[0, 10:15, 10:16] = True; masks[1, 11:16, 10:15] = True  # both thinner than 2d = 6
    m_iou = set_iou(masks[0], masks[1])
    assert np.isclose(boundary_iou(masks[:1], masks[1:])[0, 0], m_iou)


def test_boundary_iou_against_brute_force():
    rng = np.random.default_rng(2)
    a, b = blobs(rng, 4, 60, 70), blobs(rng, 3, 60, 70)
    d = boundary_dilation(60, 70)
    got = boundary_iou(a, b)
    want = np.array([[set_iou(official_band(x, d), official_band(y, d)) for y in b] for x in a])
    assert np.allclose(got, want)


# ---------------------------------------------------------------- COCOeval subclass
def blob_dataset(seed=3, n_images=3, h=60, w=70):
    rng = np.random.default_rng(seed)
    images, anns, dets, aid = [], [], [], 0
    for i in range(n_images):
        images.append({"id": i + 1, "height": h, "width": w})
        gts = blobs(rng, 3, h, w)
        for j, m in enumerate(gts):
            aid += 1
            rle = encode_masks(m[None])[0]
            anns.append({"id": aid, "image_id": i + 1, "category_id": 1, "iscrowd": int(j == 2),
                         "area": int(m.sum()), "bbox": mask_utils.toBbox(rle).tolist(), "segmentation": rle})
        for m in blobs(rng, 4, h, w):
            dets.append({"image_id": i + 1, "category_id": 1, "score": float(rng.random()),
                         "segmentation": encode_masks(m[None])[0]})
    gt = {"images": images, "annotations": anns, "categories": [{"id": 1, "name": "blob"}]}
    return gt, dets


def test_boundary_cocoeval_ious_are_min_of_mask_and_boundary_iou_with_crowd_rule():
    gt, dets = blob_dataset()
    coco_gt = load_coco(gt)
    coco_dt = _detections(coco_gt, dets, "boundary")
    ev = BoundaryCOCOeval(coco_gt, coco_dt)
    ev.evaluate()
    for img in gt["images"]:
        h, w = img["height"], img["width"]
        d = boundary_dilation(h, w)
        g = [a for a in gt["annotations"] if a["image_id"] == img["id"]]
        ds = sorted([x for x in dets if x["image_id"] == img["id"]], key=lambda x: -x["score"])
        want = np.zeros((len(ds), len(g)))
        for i, x in enumerate(ds):
            pm = mask_utils.decode(x["segmentation"]).astype(bool)
            for j, a in enumerate(g):
                gm = mask_utils.decode(a["segmentation"]).astype(bool)
                if a["iscrowd"]:
                    want[i, j] = (pm & gm).sum() / max(pm.sum(), 1)
                else:
                    want[i, j] = min(set_iou(pm, gm), set_iou(official_band(pm, d), official_band(gm, d)))
        assert np.allclose(ev.ious[img["id"], 1], want)


def test_boundary_error_lowers_boundary_ap_only_on_large_objects():
    large, small = squares_dataset(10, 100), squares_dataset(10, 8)
    ap = evaluate_coco(large, perturbed_ground_truth(large, 3), ("segm", "boundary"))
    assert np.isclose(ap["segm"]["AP"], 0.8, atol=0.01)  # IoU 0.89 passes 8 of 10 thresholds
    assert ap["boundary"]["AP"] < 0.1
    ap = evaluate_coco(small, perturbed_ground_truth(small, 1), ("segm", "boundary"))
    assert ap["segm"]["AP"] > 0 and np.isclose(ap["segm"]["AP"], ap["boundary"]["AP"])
    exact = evaluate_coco(large, perturbed_ground_truth(large, 0))
    assert all(np.isclose(exact[t]["AP"], 1) for t in IOU_TYPES)


def test_empty_results_and_bad_input():
    large = squares_dataset(3, 100)
    none = evaluate_coco(large, [])
    assert all(none[t]["AP"] == 0 and len(none[t]["stats"]) == 12 for t in IOU_TYPES)
    good = perturbed_ground_truth(large, 0)
    with pytest.raises(ValueError, match="image_id 999"):
        evaluate_coco(large, [{**good[0], "image_id": 999}])
    with pytest.raises(ValueError, match="segmentation size"):
        evaluate_coco(large, [{**good[0], "segmentation": encode_masks(np.ones((1, 50, 50), bool))[0]}])
    with pytest.raises(ValueError, match="no 'segmentation'"):
        evaluate_coco(large, [{k: v for k, v in good[0].items() if k != "segmentation"}], ("segm",))
    with pytest.raises(ValueError, match="iou_types"):
        evaluate_coco(large, good, ("mask",))
    with pytest.raises(FileNotFoundError, match="nothing.json"):
        evaluate_coco("nothing.json", good)


def test_mask_ap_uses_mask_area_not_box_area():
    # one small GT; a correct detection, and a higher-scored false positive whose mask is small but whose box
    # claims the whole image. With the box area the false positive would be "large" and ignored for APs.
    m = np.zeros((1, 200, 200), bool); m[0, 10:20, 10:20] = True
    fp = np.zeros((1, 200, 200), bool); fp[0, 150:160, 150:160] = True
    gt = {"images": [{"id": 1, "height": 200, "width": 200}], "categories": [{"id": 1, "name": "x"}],
          "annotations": [{"id": 1, "image_id": 1, "category_id": 1, "iscrowd": 0, "area": 100,
                           "bbox": [10, 10, 10, 10], "segmentation": encode_masks(m)[0]}]}
    res = [{"image_id": 1, "category_id": 1, "score": 0.9, "bbox": [0, 0, 200, 200], "segmentation": encode_masks(fp)[0]},
           {"image_id": 1, "category_id": 1, "score": 0.5, "bbox": [10, 10, 10, 10], "segmentation": encode_masks(m)[0]}]
    ours = evaluate_coco(gt, res, ("segm",))["segm"]
    coco_gt = load_coco(gt)
    naive = COCOeval(coco_gt, coco_gt.loadRes([dict(r) for r in res]), "segm")
    with contextlib.redirect_stdout(io.StringIO()):
        naive.evaluate(); naive.accumulate(); naive.summarize()
    assert np.isclose(naive.stats[3], 1.0)           # box area: the false positive is ignored for APs
    assert ours["APs"] < 0.6               # mask area: it counts


# ---------------------------------------------------------------- real data
@pytest.mark.skipif(not VAL_JSON.exists(), reason="coco-mini not available")
def test_coco_mini_ground_truth_against_itself():
    coco = load_coco(VAL_JSON)
    ap = evaluate_coco(coco, perturbed_ground_truth(coco, 0))
    for t in IOU_TYPES:
        assert np.allclose(ap[t]["stats"][:6], 1.0), (t, ap[t])
    # a 4-px boundary error: boundary AP far below mask AP on large objects, about equal on small ones
    ap = evaluate_coco(coco, perturbed_ground_truth(coco, 4), ("segm", "boundary"))
    assert ap["segm"]["APl"] - ap["boundary"]["APl"] > 0.3
    assert abs(ap["segm"]["APs"] - ap["boundary"]["APs"]) < 0.02


def test_image_ids_restricts_evaluation():
    data = squares_dataset(4, 40)
    res = [r for r in perturbed_ground_truth(data, 0) if r["image_id"] in (1, 2)]  # images 3, 4 get nothing
    assert np.isclose(evaluate_coco(data, res, ("segm",), image_ids=[1, 2])["segm"]["AP"], 1)
    assert evaluate_coco(data, res, ("segm",))["segm"]["AP"] < 0.6  # half the objects missed


def test_size_buckets_follow_the_data_sets_area_rng():
    "A set that states its own `info.area_rng` (shapes: COCO's 32²/96² scaled to 128² images) is bucketed by it."
    gt = squares_dataset(4, 20, size=64)                      # 400-pixel squares: COCO 'small'
    exact = perturbed_ground_truth(gt, 0)
    coco_buckets = evaluate_coco(gt, exact, ("segm",))["segm"]
    assert coco_buckets["APs"] == 1 and coco_buckets["APl"] == -1
    gt["info"] = {"area_rng": {"all": [0, 1e10], "small": [0, 50], "medium": [50, 300], "large": [300, 1e10]}}
    own = evaluate_coco(gt, exact, ("segm", "boundary"))
    assert own["segm"]["APl"] == 1 and own["segm"]["APs"] == -1 and own["boundary"]["APl"] == 1


# ---------------------------------------------------------------- backends: faster-coco-eval vs the references
def reference_stats(coco_gt, results, iou_type):
    "12 stats from the reference: pycocotools' COCOeval (bbox, segm), segbook's BoundaryCOCOeval (boundary)."
    dets = _detections(coco_gt, results, iou_type)
    ev = BoundaryCOCOeval(coco_gt, dets) if iou_type == "boundary" else COCOeval(coco_gt, dets, iouType=iou_type)
    return run_cocoeval(ev)["stats"]


def error_sets(gt):
    "Prediction sets with boundary errors, a shift, missed objects and false positives (duplicates, wrong class)."
    moved = perturbed_ground_truth(gt, -1, seed=5, shift=(5, -6))
    wrong = [{**r, "category_id": c} for i, r in enumerate(perturbed_ground_truth(gt, 0, seed=6)[::3])
             for c in ([3 - r["category_id"]] if i % 2 else [99])]  # the other class, or one without ground truth
    return {"eroded": perturbed_ground_truth(gt, -2, seed=1), "dilated": perturbed_ground_truth(gt, 1, seed=2),
            "shifted": perturbed_ground_truth(gt, 0, seed=3, shift=(1, 1)),
            "noisy": perturbed_ground_truth(gt, 1, seed=4)[3:] + moved + wrong}


def mixed_squares():
    "Squares of sides 8..120 in 200x200 images (small, medium and large), two categories, one crowd region."
    gt = squares_dataset(12, 8)
    for i, side in enumerate((20, 40, 60, 90, 120)):
        part = squares_dataset(3, side)
        off = len(gt["images"])
        gt["images"] += [{**im, "id": im["id"] + off} for im in part["images"]]
        gt["annotations"] += [{**a, "id": a["id"] + off, "image_id": a["image_id"] + off,
                               "category_id": 1 + i % 2, "iscrowd": int(i == 4 and a["id"] == 1)} for a in part["annotations"]]
    gt["categories"] = [{"id": 1, "name": "square"}, {"id": 2, "name": "other"}, {"id": 99, "name": "unused"}]
    return gt


@pytest.mark.parametrize("iou_type", IOU_TYPES)
def test_evaluate_coco_backend_equals_reference_on_squares(iou_type):
    gt = mixed_squares()
    coco_gt = load_coco(gt)
    for name, results in error_sets(gt).items():
        ref = reference_stats(coco_gt, results, iou_type)
        got = evaluate_coco(gt, results, (iou_type,))[iou_type]["stats"]
        assert np.allclose(got, ref, atol=1e-4, rtol=0), (name, got, ref)
        assert 0 < ref[0] < 1, (name, ref)  # the set is neither perfect nor empty: the comparison can fail
        if iou_type == "boundary":  # and faster-coco-eval's own boundary agrees with BoundaryCOCOeval
            fast = run_cocoeval(COCOeval_faster(coco_gt, _detections(coco_gt, results, "boundary"), iouType="boundary"))
            assert np.allclose(fast["stats"], ref, atol=1e-4, rtol=0), (name, fast["stats"], ref)


def test_coco_evaluator_picks_the_backend():
    gt = load_coco(squares_dataset(2, 30))
    dets = _detections(gt, perturbed_ground_truth(gt, 0), "segm")
    assert type(coco_evaluator(gt, dets, "segm")) is COCOeval_faster
    assert type(coco_evaluator(gt, dets, "bbox", reference=True)) is COCOeval
    assert type(coco_evaluator(gt, dets, "boundary")) is BoundaryCOCOeval
    with pytest.raises(ValueError, match="iou_type"):
        coco_evaluator(gt, dets, "mask")


def test_perturbed_ground_truth_shift():
    gt = squares_dataset(1, 20, size=50)  # square at rows/cols 15..34
    m = mask_utils.decode(perturbed_ground_truth(gt, 0, shift=(2, -3))[0]["segmentation"]).astype(bool)
    assert m.sum() == 400 and m[17:37, 12:32].all()
    edge = mask_utils.decode(perturbed_ground_truth(gt, 0, shift=(0, 30))[0]["segmentation"]).astype(bool)
    assert edge.sum() == 20 * 5 and edge[15:35, 45:50].all()  # what leaves the image is lost


@pytest.mark.skipif(not VAL_JSON.exists(), reason="coco-mini not available")
def test_coco_mini_backend_equals_reference():
    coco = load_coco(VAL_JSON)
    ids = sorted(coco.getImgIds())[:25]
    sub = {"images": [coco.imgs[i] for i in ids], "categories": coco.dataset["categories"],
           "annotations": [a for a in coco.dataset["annotations"] if a["image_id"] in set(ids)]}
    results = perturbed_ground_truth(sub, 1, seed=7, shift=(1, 2))[5:]
    got = evaluate_coco(sub, results)
    ref_gt = load_coco(sub)
    for t in IOU_TYPES:
        assert np.allclose(got[t]["stats"], reference_stats(ref_gt, results, t), atol=1e-4, rtol=0), t


def test_paste_to_rle_in_chunks_equals_pasting_all_at_once():
    "Large images: pasting a few masks at a time (any budget) gives the RLEs of pasting all N at once."
    import torch
    from segbook.evaluation import encode_masks, paste_to_rle
    from segbook.istr import paste_masks
    g = torch.Generator().manual_seed(0)
    crops = torch.rand(7, 28, 28, generator=g)
    xy = torch.rand(7, 2, generator=g) * torch.tensor([250.0, 150.0])
    boxes = torch.cat([xy, xy + 5 + torch.rand(7, 2, generator=g) * 60], 1)
    full = encode_masks(paste_masks(crops, boxes, 200, 300))
    for budget in (1, 200 * 300 * 2, 10 ** 9):
        assert paste_to_rle(crops, boxes, 200, 300, budget=budget) == full
