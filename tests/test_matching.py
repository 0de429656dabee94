"Tests for segbook.matching: optimality, the cost terms (ISTR Eqs. 5-7), batching and error messages."
import dataclasses
import itertools

import numpy as np
import pytest
import torch

import torch.nn.functional as F
from torchvision.ops import generalized_box_iou

from segbook.matching import (MatchingConfig, assign, assign_rows, cost_box, cost_class, cost_mask_cosine,
                              cost_mask_dice, hungarian_match, matching_cost, matching_cost_compact, normalize_boxes,
                              pred_mask_embed, pred_mask_probs, prepare_targets)
from stand_ins import OrthoCodec as _OrthoCodec, one_thread, rect_masks  # noqa: F401

pytestmark = pytest.mark.usefixtures("one_thread")


def OrthoCodec(s=8, l=16, seed=0):
    "The shared stand-in codec with this file's default l."
    return _OrthoCodec(s, l, seed)


def random_batch(g, ns, Q=6, C=4, l=16, H=40, W=50):
    targets = []
    for n in ns:
        xy = torch.rand(n, 2, generator=g) * 20
        boxes = torch.cat([xy, xy + 5 + torch.rand(n, 2, generator=g) * 20], 1).round()
        targets.append(dict(boxes=boxes, labels=torch.randint(0, C, (n,), generator=g), size=torch.tensor([H, W]),
                            masks=rect_masks(boxes, H, W)))
    B = len(ns)
    xy = torch.rand(B, Q, 2, generator=g) * 25
    pred = dict(logits=torch.randn(B, Q, C, generator=g),
                boxes=torch.cat([xy, xy + 2 + torch.rand(B, Q, 2, generator=g) * 20], -1),
                mask_embed=torch.randn(B, Q, l, generator=g))
    return pred, targets


def brute_force(c):
    Q, N = c.shape
    return min(sum(c[q, n] for n, q in enumerate(p)) for p in itertools.permutations(range(Q), N))


def test_assign_is_optimal_against_brute_force():
    rng = np.random.default_rng(0)
    for _ in range(60):
        Q = int(rng.integers(1, 7)); N = int(rng.integers(0, min(Q, 4) + 1))
        c = rng.normal(size=(Q, N))
        p, gi = assign(c)
        assert p.dtype == gi.dtype == torch.int64 and len(p) == N
        assert len(set(p.tolist())) == N and sorted(gi.tolist()) == list(range(N))
        assert c[p.numpy(), gi.numpy()].sum() == pytest.approx(brute_force(c) if N else 0.0, abs=1e-9)


def test_hungarian_match_is_optimal_for_the_full_cost():
    "Batched costs split per image give the same optimum as brute force on each image's own total cost."
    g = torch.Generator().manual_seed(1)
    codec = OrthoCodec()
    for mask_cost in ("none", "dice", "l1", "cosine"):
        cfg = MatchingConfig(mask_cost=mask_cost, mask_size=8)
        pred, targets = random_batch(g, [3, 0, 4, 1])
        indices = hungarian_match(pred, targets, cfg, codec)
        for b, (t, (p, gi)) in enumerate(zip(targets, indices)):
            single = {k: v[b:b + 1] for k, v in pred.items()}
            tt = prepare_targets([t], 8, codec)
            c = matching_cost(single, tt, cfg, codec)[0][0].numpy()
            assert c[p.numpy(), gi.numpy()].sum() == pytest.approx(brute_force(c) if len(gi) else 0.0, rel=1e-5, abs=1e-6)


def test_planted_matches_are_found_regardless_of_query_order():
    g = torch.Generator().manual_seed(2)
    codec = OrthoCodec()
    pred, targets = random_batch(g, [3])
    t = prepare_targets(targets, 8, codec)[0]
    slots = torch.tensor([5, 0, 3])
    pred["logits"][0, slots] = -5.0
    pred["logits"][0, slots, t["labels"]] = 5.0
    pred["boxes"][0, slots] = t["boxes"] + 0.5
    pred["mask_embed"][0, slots] = t["mask_embed"]
    p, gi = hungarian_match(pred, targets, MatchingConfig(mask_size=8), codec)[0]
    assert dict(zip(gi.tolist(), p.tolist())) == {0: 5, 1: 0, 2: 3}
    perm = torch.randperm(6, generator=g)
    shuffled = {k: v[:, perm] for k, v in pred.items()}
    p2, gi2 = hungarian_match(shuffled, targets, MatchingConfig(mask_size=8), codec)[0]
    assert {g_: perm[q].item() for g_, q in zip(gi2.tolist(), p2.tolist())} == {0: 5, 1: 0, 2: 3}


def test_cost_terms_have_the_paper_ranges_and_order():
    boxes = torch.tensor([[0., 0, 10, 10], [20, 20, 30, 30]])
    pairs = lambda f, a, b: f(a[:, None], b[None])                       # all pairs [P,G] by broadcasting
    l1, giou = pairs(cost_box, boxes, boxes)
    assert giou.diag().tolist() == [-1.0, -1.0] and l1.diag().abs().max() == 0
    assert (pairs(cost_box, boxes, boxes.flip(0))[1].diag() > 0).all()   # disjoint: GIoU < 0, cost > 0
    assert torch.allclose(pairs(cost_box, boxes / 100, boxes.flip(0) / 100)[0].diag(), torch.full((2,), 0.8))
    e = torch.randn(3, 7)
    cos = cost_mask_cosine(e, e)
    assert torch.allclose(cos.diag(), torch.full((3,), -1.0)) and (cos >= -1 - 1e-6).all() and (cos <= 1e-6).all()
    assert torch.allclose(cost_mask_cosine(e, -e).diag(), torch.zeros(3), atol=1e-6)   # opposite: 0
    assert torch.allclose(cost_mask_cosine(2 * e, e).diag(), torch.full((3,), -1.0))   # scale-free
    m = (torch.rand(3, 8, 8) > 0.5).float()
    assert cost_mask_dice(m, m).diag().max() < 1e-5 and cost_mask_dice(m, 1 - m).diag().min() > 0.999
    logits = torch.tensor([[4.0, -4.0], [-4.0, 4.0]])
    for kind in ("focal", "prob"):
        c = cost_class(logits[:, [0, 1]], kind)
        assert c[0, 0] < c[1, 0] and c[1, 1] < c[0, 1], kind                # the confident query is cheaper
    assert torch.allclose(cost_class(logits[:, [0]], "prob")[:, 0], -logits.sigmoid()[:, 0])


def test_focal_class_cost_matches_the_official_formula():
    logits = torch.randn(5, 3)
    p = logits.sigmoid()
    pos = 0.25 * (1 - p) ** 2 * -(p + 1e-8).log()
    neg = 0.75 * p ** 2 * -(1 - p + 1e-8).log()
    labels = torch.tensor([2, 0, 0])
    assert torch.allclose(cost_class(logits[:, labels]), (pos - neg)[:, labels], atol=1e-5)
    big = torch.tensor([-120.0, -30.0, 0.0, 30.0, 120.0])                  # saturated logits stay finite
    assert torch.isfinite(cost_class(big)).all()


def test_zero_gt_and_raw_mask_logits():
    g = torch.Generator().manual_seed(3)
    pred, targets = random_batch(g, [0, 0])
    out = hungarian_match(pred, targets, MatchingConfig(mask_size=8), OrthoCodec())
    assert all(p.numel() == 0 and gi.numel() == 0 and p.dtype == torch.int64 for p, gi in out)
    pred, targets = random_batch(g, [2, 0, 1])
    raw = dict(logits=pred["logits"], boxes=pred["boxes"], mask_logits=torch.randn(3, 6, 8, 8, generator=g))
    for mc in ("dice", "cosine", "l1"):
        out = hungarian_match(raw, targets, MatchingConfig(mask_cost=mc, mask_size=8), None)
        assert [len(p) for p, _ in out] == [2, 0, 1]


def test_too_many_gt_is_a_clear_error():
    g = torch.Generator().manual_seed(4)
    pred, targets = random_batch(g, [1, 7], Q=6)
    with pytest.raises(ValueError, match=r"image 1 has 7 ground-truth instances but only 6 queries"):
        hungarian_match(pred, targets, MatchingConfig(mask_size=8), OrthoCodec())


@pytest.mark.parametrize("field,term", [("mask_embed", "mask"), ("logits", "class"), ("boxes", "l1")])
def test_non_finite_cost_names_the_term_and_image(field, term):
    g = torch.Generator().manual_seed(5)
    pred, targets = random_batch(g, [1, 2])
    pred[field][1, 4, 0] = float("nan")
    with pytest.raises(ValueError, match=rf"image 1 from term\(s\) \[.*'{term}'"):
        hungarian_match(pred, targets, MatchingConfig(mask_size=8), OrthoCodec())


def test_bad_config_and_missing_masks_are_named():
    with pytest.raises(ValueError, match="mask_cost"):
        MatchingConfig(mask_cost="dot")
    g = torch.Generator().manual_seed(6)
    pred, targets = random_batch(g, [1, 1])
    del targets[1]["masks"]
    with pytest.raises(ValueError, match=r"target 1: needs field 'masks'"):
        hungarian_match(pred, targets, MatchingConfig(mask_size=8), OrthoCodec())
    # mask_cost='none' needs no masks at all
    assert [len(p) for p, _ in hungarian_match(pred, targets, MatchingConfig(mask_cost="none"), None)] == [1, 1]


def test_batched_and_compact_layouts_agree():
    g = torch.Generator().manual_seed(7)
    codec = OrthoCodec()
    pred, targets = random_batch(g, [3, 0, 4, 1, 2])
    a = hungarian_match(pred, targets, MatchingConfig(mask_size=8, cost_layout="batched"), codec)
    b = hungarian_match(pred, targets, MatchingConfig(mask_size=8, cost_layout="compact"), codec)
    assert all(torch.equal(x[0], y[0]) and torch.equal(x[1], y[1]) for x, y in zip(a, b))
    for mask_cost in ("none", "dice", "l1", "cosine"):                     # compact rows = batched diagonal blocks
        cfg = MatchingConfig(mask_size=8, mask_cost=mask_cost)
        tt = prepare_targets(targets, 8, codec)
        full, _ = matching_cost(pred, tt, cfg, codec)
        rows, _ = matching_cost_compact(pred, tt, cfg, codec)
        starts = np.cumsum([0] + [len(t["labels"]) for t in targets])
        for b_, (s0, s1) in enumerate(zip(starts[:-1], starts[1:])):
            assert torch.allclose(rows[s0:s1], full[b_, :, s0:s1].T, atol=1e-5), (mask_cost, b_)
    pred["boxes"][3, 2, 1] = float("nan")
    for layout in ("batched", "compact"):
        with pytest.raises(ValueError, match=r"image 3 from term\(s\) \['l1', 'giou'\]"):
            hungarian_match(pred, targets, MatchingConfig(mask_size=8, cost_layout=layout), codec)


def previous_cost(pred, targets, cfg, codec):
    "The matching cost as segbook computed it before the compact layout: all B·Q×G pairs, all-class focal cost."
    B, Q = pred["logits"].shape[:2]
    sizes = torch.stack([torch.as_tensor(t["size"]) for t in targets])
    counts = torch.as_tensor([len(t["labels"]) for t in targets])
    gt_boxes = torch.cat([t["boxes"] for t in targets]).float()
    labels = torch.cat([t["labels"] for t in targets])
    logits, boxes = pred["logits"].flatten(0, 1), pred["boxes"].flatten(0, 1)
    p = logits.sigmoid()
    if cfg.class_cost == "prob":
        c_cls = -p[:, labels]
    else:
        pos = cfg.focal_alpha * (1 - p) ** cfg.focal_gamma * -F.logsigmoid(logits)
        neg = (1 - cfg.focal_alpha) * p ** cfg.focal_gamma * -F.logsigmoid(-logits)
        c_cls = (pos - neg)[:, labels]
    total = (cfg.weight_class * c_cls
             + cfg.weight_l1 * torch.cdist(normalize_boxes(boxes, sizes.repeat_interleave(Q, 0)),
                                           normalize_boxes(gt_boxes, sizes.repeat_interleave(counts, 0)), p=1)
             + cfg.weight_giou * -generalized_box_iou(boxes, gt_boxes))
    if cfg.mask_cost in ("cosine", "l1"):
        r, g_ = pred_mask_embed(pred).flatten(0, 1), torch.cat([t["mask_embed"] for t in targets])
        m = (-(F.normalize(r, dim=-1) @ F.normalize(g_, dim=-1).T + 1) / 2 if cfg.mask_cost == "cosine"
             else torch.cdist(r, g_, p=1) / r.shape[-1])
        total = total + cfg.weight_mask * m
    elif cfg.mask_cost == "dice":
        total = total + cfg.weight_mask * cost_mask_dice(pred_mask_probs(pred, codec).flatten(0, 1),
                                                         torch.cat([t["masks_crop"] for t in targets]))
    return total.view(B, Q, -1)


def test_compact_layout_gives_the_previous_assignments():
    "On random batches the default matcher returns exactly the assignments of the previous all-pairs formulation."
    g = torch.Generator().manual_seed(8)
    codec = OrthoCodec()
    configs = [MatchingConfig(mask_size=8)] + [MatchingConfig(mask_size=8, mask_cost=m) for m in ("none", "dice", "l1")] \
        + [MatchingConfig(mask_size=8, class_cost="prob")]
    for trial in range(12):
        ns = torch.randint(0, 9, (int(torch.randint(1, 6, (1,), generator=g)),), generator=g).tolist()
        pred, targets = random_batch(g, ns, Q=12, C=7, l=16)
        for cfg in configs:
            got = hungarian_match(pred, targets, cfg, codec)
            tt = prepare_targets(targets, 8, codec)
            old = previous_cost(pred, tt, cfg, codec).numpy()
            starts = np.cumsum([0] + ns)
            for b, (p, gi) in enumerate(got):
                want = assign(old[b, :, starts[b]:starts[b + 1]])
                assert torch.equal(p, want[0]) and torch.equal(gi, want[1]), (trial, b, cfg)


def test_elementwise_giou_is_torchvisions():
    g = torch.Generator().manual_seed(9)
    xy = torch.rand(40, 2, generator=g) * 50
    boxes = torch.cat([xy, xy + torch.rand(40, 2, generator=g) * 30], 1)
    boxes[:3, 2:] = boxes[:3, :2]                                           # zero-size predictions
    gt = boxes[10:25] + 1.0
    assert torch.allclose(-cost_box(boxes[:, None], gt[None])[1], generalized_box_iou(boxes, gt), atol=1e-6, equal_nan=True)
    gt_rows = gt[torch.randint(0, 15, (40,), generator=g)]                  # one GT per prediction: elementwise pairs
    assert torch.allclose(-cost_box(boxes, gt_rows)[1], generalized_box_iou(boxes, gt_rows).diag(), atol=1e-6, equal_nan=True)
    l1 = cost_box(boxes[:, None], gt[None])[0]
    assert torch.allclose(l1, torch.cdist(boxes, gt, p=1), atol=1e-4)                # C_L1: the summed |p_k − g_k|


def test_assign_rows_is_assign_of_the_transpose():
    rng = np.random.default_rng(10)
    for _ in range(40):
        Q = int(rng.integers(1, 30)); N = int(rng.integers(0, Q + 1))
        c = rng.normal(size=(N, Q)).round(1)                                 # rounded: ties happen
        a, b = assign_rows(c), assign(np.ascontiguousarray(c.T))
        assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) and a[0].dtype == torch.int64


def test_compiled_cost_kernel_equals_the_eager_sum():
    "cost_kernel='compiled' (one torch.compile'd loop) gives the eager total to 1e-5 and the same assignments, for every "
    "class and mask cost; 'auto' picks it on the CPU only at benchmark scale (>= 64k pairs); a NaN still names its term."
    g = torch.Generator().manual_seed(11)
    codec = OrthoCodec()
    pred, targets = random_batch(g, [40, 0, 25, 60], Q=300, C=9, l=16)        # 125 GT x 300 queries: 37.5k pairs
    for cfg in [MatchingConfig(mask_size=8, class_cost=c, mask_cost=m) for c in ("focal", "prob") for m in ("cosine", "none", "l1")]:
        tt = prepare_targets(targets, 8, codec)
        eager, terms = matching_cost_compact(pred, tt, dataclasses.replace(cfg, cost_kernel="eager"), codec)
        fused, none = matching_cost_compact(pred, tt, dataclasses.replace(cfg, cost_kernel="compiled"), codec)
        assert not none and terms                                             # compiled: no terms kept
        assert torch.allclose(fused, eager, atol=1e-5, rtol=1e-5), cfg
        a = hungarian_match(pred, targets, dataclasses.replace(cfg, cost_kernel="eager"), codec)
        b = hungarian_match(pred, targets, dataclasses.replace(cfg, cost_kernel="compiled"), codec)
        assert all(torch.equal(x, y) for u, v in zip(a, b) for x, y in zip(u, v)), cfg
    small = matching_cost_compact(pred, prepare_targets(targets, 8, codec), MatchingConfig(mask_size=8), codec)[1]
    assert set(small) == {"class", "l1", "giou", "mask"}                         # auto: 37.5k pairs stay eager
    pred["logits"][2, 7, 0] = float("nan")
    with pytest.raises(ValueError, match=r"image 2 from term\(s\) \[.*'class'"):
        hungarian_match(pred, targets, MatchingConfig(mask_size=8, cost_kernel="compiled"), codec)
    with pytest.raises(ValueError, match="cost_kernel"):
        MatchingConfig(cost_kernel="fast")
