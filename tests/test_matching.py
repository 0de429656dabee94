"Tests for segbook.matching: optimality, the cost terms (ISTR Eqs. 5-7), batching and error messages."
import itertools

import numpy as np
import pytest
import torch

from segbook.matching import (MatchingConfig, assign, cost_box_giou, cost_box_l1, cost_class, cost_mask_cosine,
                              cost_mask_dice, hungarian_match, matching_cost, prepare_targets)
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
    assert cost_box_giou(boxes, boxes).diag().tolist() == [-1.0, -1.0]
    assert (cost_box_giou(boxes, boxes.flip(0)).diag() > 0).all()       # disjoint: GIoU < 0, cost > 0
    assert cost_box_l1(boxes / 100, boxes / 100).diag().abs().max() == 0
    e = torch.randn(3, 7)
    cos = cost_mask_cosine(e, e)
    assert torch.allclose(cos.diag(), torch.full((3,), -1.0)) and (cos >= -1 - 1e-6).all() and (cos <= 1e-6).all()
    assert torch.allclose(cost_mask_cosine(e, -e).diag(), torch.zeros(3), atol=1e-6)   # opposite: 0
    assert torch.allclose(cost_mask_cosine(2 * e, e).diag(), torch.full((3,), -1.0))   # scale-free
    m = (torch.rand(3, 8, 8) > 0.5).float()
    assert cost_mask_dice(m, m).diag().max() < 1e-5 and cost_mask_dice(m, 1 - m).diag().min() > 0.999
    logits = torch.tensor([[4.0, -4.0], [-4.0, 4.0]])
    for kind in ("focal", "prob"):
        c = cost_class(logits, torch.tensor([0, 1]), kind)
        assert c[0, 0] < c[1, 0] and c[1, 1] < c[0, 1], kind                # the confident query is cheaper
    assert torch.allclose(cost_class(logits, torch.tensor([0]), "prob")[:, 0], -logits.sigmoid()[:, 0])


def test_focal_class_cost_matches_the_official_formula():
    logits = torch.randn(5, 3)
    p = logits.sigmoid()
    pos = 0.25 * (1 - p) ** 2 * -(p + 1e-8).log()
    neg = 0.75 * p ** 2 * -(1 - p + 1e-8).log()
    labels = torch.tensor([2, 0, 0])
    assert torch.allclose(cost_class(logits, labels), (pos - neg)[:, labels], atol=1e-5)


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


def test_batched_and_per_image_layouts_agree():
    g = torch.Generator().manual_seed(7)
    codec = OrthoCodec()
    pred, targets = random_batch(g, [3, 0, 4, 1, 2])
    a = hungarian_match(pred, targets, MatchingConfig(mask_size=8, cost_layout="batched"), codec)
    b = hungarian_match(pred, targets, MatchingConfig(mask_size=8, cost_layout="per_image"), codec)
    assert all(torch.equal(x[0], y[0]) and torch.equal(x[1], y[1]) for x, y in zip(a, b))
    pred["boxes"][3, 2, 1] = float("nan")
    for layout in ("batched", "per_image"):
        with pytest.raises(ValueError, match=r"image 3 from term\(s\) \['l1', 'giou'\]"):
            hungarian_match(pred, targets, MatchingConfig(mask_size=8, cost_layout=layout), codec)
