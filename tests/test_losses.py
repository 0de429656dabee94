"Tests for segbook.losses: the ISTR set loss (Eqs. 8-9) with deep supervision."
import pytest
import torch
import torch.distributed as dist
from torchvision.ops import box_iou

from segbook.losses import SetCriterion, SetLossConfig, loss_dice, num_gt_boxes
from segbook.matching import MatchingConfig, prepare_targets
from stand_ins import OrthoCodec as _OrthoCodec, one_thread, rect_masks  # noqa: F401

pytestmark = pytest.mark.usefixtures("one_thread")


def OrthoCodec(s=8, l=64, seed=0):
    "The shared stand-in codec with this file's default l."
    return _OrthoCodec(s, l, seed)


def toy_targets(seed=0, ns=(3, 0, 2), H=48, W=64, C=5):
    g = torch.Generator().manual_seed(seed)
    out = []
    for n in ns:
        xy = torch.rand(n, 2, generator=g) * torch.tensor([W / 2, H / 2])
        boxes = torch.cat([xy, xy + 8 + torch.rand(n, 2, generator=g) * 15], 1).round()
        out.append(dict(boxes=boxes, labels=torch.randint(0, C, (n,), generator=g), size=torch.tensor([H, W]),
                        masks=rect_masks(boxes, H, W)))
    return out


def random_pred(g, B=3, Q=6, C=5, l=64, grad=False):
    xy = torch.rand(B, Q, 2, generator=g) * 30
    p = dict(logits=torch.randn(B, Q, C, generator=g),
             boxes=torch.cat([xy, xy + 4 + torch.rand(B, Q, 2, generator=g) * 20], -1),
             mask_embed=torch.randn(B, Q, l, generator=g))
    if grad:
        for v in p.values(): v.requires_grad_(True)
    return p


def perfect_pred(targets, codec, Q=6, C=5):
    prepared = prepare_targets(targets, 8, codec)
    B = len(targets)
    logits = torch.full((B, Q, C), -20.0)
    boxes = torch.tensor([0., 0, 4, 4]).repeat(B, Q, 1)
    embed = torch.zeros(B, Q, 64)
    for b, t in enumerate(prepared):
        q = torch.arange(len(t["labels"])) + 2
        logits[b, q, t["labels"]] = 20.0
        boxes[b, q] = t["boxes"]
        embed[b, q] = t["mask_embed"]
    return dict(logits=logits, boxes=boxes, mask_embed=embed)


@pytest.fixture
def setup():
    codec = OrthoCodec()
    return codec, toy_targets(), SetCriterion(MatchingConfig(mask_size=8), SetLossConfig(), codec)


def test_perfect_prediction_costs_nothing_and_each_perturbation_costs_something(setup):
    codec, targets, crit = setup
    perfect = perfect_pred(targets, codec)
    losses = crit([perfect], targets)
    assert losses["loss"] < 1e-4
    for key, change in [("loss_ce_s1", lambda p: p["logits"].neg_()), ("loss_bbox_s1", lambda p: p["boxes"].add_(2)),
                        ("loss_giou_s1", lambda p: p["boxes"][..., 2:].add_(5)),
                        ("loss_mask_embed_s1", lambda p: p["mask_embed"].add_(0.3)),
                        ("loss_dice_s1", lambda p: p["mask_embed"].mul_(0.3))]:
        worse = {k: v.clone() for k, v in perfect.items()}
        change(worse)
        assert crit([worse], targets)[key] > 1e-2, key


def test_gradients_are_finite_and_reach_every_prediction(setup):
    _, targets, crit = setup
    g = torch.Generator().manual_seed(1)
    stages = [random_pred(g, grad=True) for _ in range(2)]
    losses = crit(stages, targets)
    losses["loss"].backward()
    for p in stages:
        for name, v in p.items():
            assert torch.isfinite(v.grad).all() and v.grad.abs().sum() > 0, name


def test_deep_supervision_keys_and_weighted_total(setup):
    _, targets, crit = setup
    g = torch.Generator().manual_seed(2)
    losses, indices = crit([random_pred(g) for _ in range(3)], targets, return_indices=True)
    w = SetLossConfig().weights()
    assert set(losses) == {"loss"} | {f"{k}_s{i}" for k in w for i in (1, 2, 3)}
    expected = sum(w[k.rsplit("_s", 1)[0]] * v for k, v in losses.items() if k != "loss")
    assert torch.allclose(losses["loss"], expected)
    assert len(indices) == 3 and [len(p) for p, _ in indices[0]] == [3, 0, 2]
    # a single dict is one stage
    assert set(crit(random_pred(g), targets)) == {"loss"} | {f"{k}_s1" for k in w}


def test_loss_is_invariant_to_query_order(setup):
    _, targets, crit = setup
    g = torch.Generator().manual_seed(3)
    pred = random_pred(g)
    perm = torch.randperm(6, generator=g)
    a = crit([pred], targets)
    b = crit([{k: v[:, perm] for k, v in pred.items()}], targets)
    for k in a:
        assert torch.allclose(a[k], b[k], atol=1e-6), k


def test_zero_gt_batch_gives_finite_loss_that_pushes_logits_down(setup):
    _, targets, crit = setup
    g = torch.Generator().manual_seed(4)
    pred = random_pred(g, grad=True)
    empty = [dict(t, boxes=t["boxes"][:0], labels=t["labels"][:0], masks=t["masks"][:0]) for t in targets]
    out = crit([pred], empty)
    assert torch.isfinite(out["loss"]) and out["loss_ce_s1"] > 0
    assert out["loss_bbox_s1"] == 0 and out["loss_giou_s1"] == 0 and out["loss_dice_s1"] == 0
    out["loss"].backward()
    assert (pred["logits"].grad > 0).all()


def test_mask_loss_switch_table_1c(setup):
    codec, targets, _ = setup
    g = torch.Generator().manual_seed(5)
    pred = random_pred(g)
    keys = lambda ml: set(SetCriterion(MatchingConfig(mask_size=8), SetLossConfig(mask_loss=ml), codec)([pred], targets))
    assert "loss_dice_s1" in keys("dice") and "loss_mask_embed_s1" not in keys("dice")
    assert "loss_mask_embed_s1" in keys("l2") and "loss_dice_s1" not in keys("l2")
    assert {"loss_dice_s1", "loss_mask_embed_s1"} <= keys("l2+dice")
    with pytest.raises(ValueError, match="mask_loss"):
        SetLossConfig(mask_loss="bce")


def test_raw_mask_logits_path():
    targets = toy_targets()
    g = torch.Generator().manual_seed(6)
    pred = random_pred(g)
    raw = dict(logits=pred["logits"], boxes=pred["boxes"], mask_logits=torch.randn(3, 6, 8, 8, generator=g, requires_grad=True))
    out = SetCriterion(MatchingConfig(mask_size=8), SetLossConfig(), codec=None)([raw], targets)
    assert out["loss_dice_s1"] > 0 and out["loss_mask_embed_s1"] > 0
    out["loss"].backward()
    assert torch.isfinite(raw["mask_logits"].grad).all() and raw["mask_logits"].grad.abs().sum() > 0


def test_embedding_predictions_without_codec_is_an_error():
    g = torch.Generator().manual_seed(7)
    with pytest.raises(ValueError, match="no codec"):
        SetCriterion(MatchingConfig(mask_size=8))([random_pred(g)], toy_targets())


def test_dice_uses_squared_denominator():
    p = torch.full((1, 2, 2), 0.5)
    t = torch.tensor([[[1., 1], [0, 0]]])
    # 1 - 2*(0.5+0.5) / (4*0.25 + 2) = 1 - 2/3
    assert loss_dice(p, t, 1.0).item() == pytest.approx(1 / 3, abs=1e-5)


def test_normaliser_is_all_reduced_under_torch_distributed(tmp_path):
    targets = toy_targets(ns=(0, 0))
    assert num_gt_boxes(targets) == 1.0            # at least 1
    assert num_gt_boxes(toy_targets(ns=(3, 2))) == 5.0
    dist.init_process_group("gloo", init_method=f"file://{tmp_path/'pg'}", rank=0, world_size=1)
    try:
        n = num_gt_boxes(toy_targets(ns=(3, 2)))
        assert torch.is_tensor(n) and n.item() == 5.0
    finally:
        dist.destroy_process_group()


def test_learning_free_predictions_converge_to_the_ground_truth(setup):
    "Minimising the set loss over free prediction tensors drives matched queries onto their GT."
    codec, targets, crit = setup
    g = torch.Generator().manual_seed(8)
    xy = torch.rand(3, 6, 2, generator=g) * 30
    params = dict(logits=torch.randn(3, 6, 5, generator=g), boxes=torch.cat([xy, xy + 10], -1),
                  mask_embed=0.1 * torch.randn(3, 6, 64, generator=g))
    for v in params.values(): v.requires_grad_(True)
    opt = torch.optim.Adam([{"params": [params["boxes"]], "lr": 1.0},
                            {"params": [params["logits"], params["mask_embed"]], "lr": 0.1}])
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, 120)
    first = None
    for _ in range(120):
        losses = crit([params], targets)
        first = first if first is not None else losses["loss"].item()
        opt.zero_grad(); losses["loss"].backward(); opt.step(); sched.step()
    losses, indices = crit([params], targets, return_indices=True)
    assert losses["loss"].item() < 0.02 * first
    for b, (t, (qi, gi)) in enumerate(zip(targets, indices[0])):
        if len(gi):
            assert box_iou(params["boxes"][b, qi].detach(), t["boxes"][gi]).diag().min() > 0.9
            assert (params["logits"][b, qi].argmax(-1) == t["labels"][gi]).all()


def test_works_with_chapter_02_pca_codec_in_the_official_noisy_logit_whitened_mode():
    from segbook.embeddings import PCACodec
    g = torch.Generator().manual_seed(9)
    comps = torch.linalg.qr(torch.randn(64, 20, generator=g))[0].T.contiguous()
    codec = PCACodec(comps, torch.zeros(64), torch.full((20,), 3.0), torch.ones(64), size=8, logit=True)
    targets = toy_targets()
    pred = random_pred(g, l=20, grad=True)
    losses = SetCriterion(MatchingConfig(mask_size=8), SetLossConfig(), codec)([pred, pred], targets)
    assert torch.isfinite(losses["loss"]) and losses["loss_dice_s2"] > 0
    losses["loss"].backward()
    assert torch.isfinite(pred["mask_embed"].grad).all() and pred["mask_embed"].grad.abs().sum() > 0
