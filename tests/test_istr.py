"Tests for segbook.istr: shapes, switches, query init, detached boxes, configs, and a learning test."
import time
from dataclasses import asdict
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from stand_ins import one_thread  # noqa: F401
from segbook.istr import (ISTR, ISTRConfig, build_istr, build_resnet_fpn, load_istr_config, multilevel_roi_align,
                          paste_masks, postprocess)

REPO = Path(__file__).resolve().parents[1]
TINY = dict(backbone="resnet18", num_classes=3, num_queries=10, num_stages=2, hidden=32, heads=4, dim_dynamic=8,
            ffn=64, mask_head="raw", mask_size=14)


pytestmark = pytest.mark.usefixtures("one_thread")


def tiny(**kw):
    return ISTRConfig(**{**TINY, **kw})


def random_codec(l=12, s=14):
    from segbook.embeddings import PCACodec
    comp = torch.linalg.qr(torch.randn(s * s, l, generator=torch.Generator().manual_seed(0)))[0].T.contiguous()
    return PCACodec(comp, torch.zeros(s * s), torch.ones(l), torch.ones(s * s), s, logit=True)


@pytest.fixture
def batch():
    g = torch.Generator().manual_seed(0)
    return torch.randn(2, 3, 64, 64, generator=g), torch.tensor([[64, 48], [40, 64]])


@pytest.mark.parametrize("mask_head", ["raw", "embedding"])
def test_stage_and_postprocess_shapes(batch, mask_head):
    images, sizes = batch
    codec = random_codec() if mask_head == "embedding" else None
    model = ISTR(tiny(mask_head=mask_head, mask_dim=12), codec=codec).eval()
    with torch.no_grad():
        out = model(images, sizes)
    assert len(out["stages"]) == 2
    for s in out["stages"]:
        assert s["logits"].shape == (2, 10, 3) and s["boxes"].shape == (2, 10, 4)
        if mask_head == "raw":
            assert s["mask_logits"].shape == (2, 10, 14, 14) and "mask_embed" not in s
        else:
            assert s["mask_embed"].shape == (2, 10, 12) and "mask_logits" not in s
    orig = torch.tensor([[128, 96], [80, 128]])
    dets = postprocess(out["stages"][0], sizes, orig, codec, topk=25)
    for d, (H0, W0) in zip(dets, orig.tolist()):
        assert d["boxes"].shape == (25, 4) and d["labels"].shape == (25,) and d["scores"].shape == (25,)
        assert d["masks"].shape == (25, 1, H0, W0) and 0 <= d["masks"].min() and d["masks"].max() <= 1
        assert (d["boxes"][:, 0::2] <= W0).all() and (d["boxes"][:, 1::2] <= H0).all()
        assert (d["scores"][:-1] >= d["scores"][1:]).all()
    # top-k over flattened (query, class) pairs: the best score equals the best sigmoid logit
    assert torch.allclose(dets[1]["scores"][0], out["stages"][0]["logits"][1].sigmoid().max())
    assert model.predict(images, sizes, orig, topk=7)[0]["masks"].shape == (7, 1, 128, 96)


def test_postprocess_scales_boxes_to_original_size():
    stage = dict(logits=torch.tensor([[[5.0, -5.0]]]), boxes=torch.tensor([[[8.0, 4.0, 24.0, 20.0]]]),
                 mask_logits=torch.full((1, 1, 4, 4), 10.0))
    d = postprocess(stage, torch.tensor([[32, 32]]), torch.tensor([[64, 128]]), topk=2)[0]
    assert torch.allclose(d["boxes"][0], torch.tensor([32.0, 8.0, 96.0, 40.0]))
    assert d["labels"].tolist() == [0, 1]  # one query, both classes, ranked
    m = d["masks"][0, 0] > 0.5
    # inside the box (up to the bilinear fall-off at its corners) and nothing outside it
    assert m[12:36, 36:92].all() and m.sum() == m[8:40, 32:96].sum() and m.sum() > 0.95 * 32 * 64


def test_paste_matches_per_instance_interpolate():
    "Inside each box the batched paste equals resizing that mask into the box; outside it is zero."
    import math
    g = torch.Generator().manual_seed(1)
    masks = torch.rand(3, 8, 8, generator=g)
    boxes = torch.tensor([[0.0, 0.0, 16.0, 16.0], [4.0, 8.0, 12.0, 24.0], [10.0, 2.0, 30.0, 6.0]])
    pasted = paste_masks(masks, boxes, 32, 32)
    for m, b, p in zip(masks, boxes.long().tolist(), pasted[:, 0]):
        ref = torch.zeros(32, 32)
        ref[b[1]:b[3], b[0]:b[2]] = F.interpolate(m[None, None], size=(b[3] - b[1], b[2] - b[0]), mode="bilinear",
                                                 align_corners=False)[0, 0]
        ky, kx = math.ceil((b[3] - b[1]) / 16), math.ceil((b[2] - b[0]) / 16)  # half a source pixel: edge fall-off
        inner = (slice(b[1] + ky, b[3] - ky), slice(b[0] + kx, b[2] - kx))
        assert torch.allclose(p[inner], ref[inner], atol=1e-5)
        outside = torch.ones(32, 32, dtype=torch.bool)
        outside[max(b[1] - ky, 0):b[3] + ky, max(b[0] - kx, 0):b[2] + kx] = False
        assert p[outside].abs().max() == 0


@pytest.mark.parametrize("switch", [dict(mask_head="embedding", mask_dim=12), dict(mask_head="raw"),
                                    dict(attention="multihead"), dict(attention="dynamic"), dict(image_pool="max"),
                                    dict(image_pool="none"), dict(image_pool="avg", pos_embed=False),
                                    dict(level_sum=False), dict(frozen_bn=False, trainable_layers=5)])
def test_table1_switches_forward_backward(batch, switch):
    images, sizes = batch
    torch.manual_seed(0)
    cfg = tiny(**{"trainable_layers": 0, **switch})  # frozen ResNet body keeps the backward short
    codec = random_codec() if cfg.mask_head == "embedding" else None
    model = build_istr(cfg, codec=codec)
    targets = [dict(boxes=torch.tensor([[4.0, 6.0, 30.0, 40.0]]), labels=torch.tensor([1]), size=sizes[0],
                    masks=torch.ones(1, 64, 48, dtype=torch.uint8)),
               dict(boxes=torch.tensor([[10.0, 5.0, 60.0, 30.0]]), labels=torch.tensor([2]), size=sizes[1],
                    masks=torch.ones(1, 40, 64, dtype=torch.uint8))]
    losses = model(images, targets)
    assert torch.isfinite(losses["loss"]) and {"loss_ce_s2", "loss_dice_s2", "loss_mask_embed_s2"} <= set(losses)
    losses["loss"].backward()
    for name, p in model.stages.named_parameters():
        assert p.grad is not None, name
    # stage 1 pools whole-image boxes, so every one of its weights gets a gradient (a later stage's dynamic
    # weights can see all-zero RoIs when an untrained box has left the image)
    for name, p in model.stages[0].named_parameters():
        assert p.grad.abs().sum() > 0, name
    if cfg.pos_embed:
        assert model.pos_embed.weight.grad.abs().sum() > 0
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in model.backbone.fpn.parameters())


def test_query_boxes_start_on_the_whole_image(batch):
    images, sizes = batch
    model = ISTR(tiny())
    boxes, feats = model.initial_queries([torch.zeros(2, 32, 8, 8)] * 4, sizes)
    assert torch.equal(boxes[0], torch.tensor([[0.0, 0.0, 48.0, 64.0]]).expand(10, 4))
    assert torch.equal(boxes[1], torch.tensor([[0.0, 0.0, 64.0, 40.0]]).expand(10, 4))
    assert feats.shape == (2, 10, 32) and torch.allclose(feats[0], model.pos_embed.weight)  # zero image features + E


def test_no_gradient_through_boxes_between_stages(batch):
    images, sizes = batch
    model = ISTR(tiny())
    model(images, sizes)["stages"][1]["boxes"].sum().backward()
    # stage 2's boxes depend on stage 1 only through the detached box: nothing upstream receives gradient
    assert model.query_boxes.weight.grad is None
    # stage 1's box head influences later stages only through its (detached) boxes
    assert all(p.grad is None for m in (model.stages[0].box_deltas, model.stages[0].reg_tower) for p in m.parameters())
    model.zero_grad()
    model(images, sizes)["stages"][0]["boxes"].sum().backward()
    assert model.query_boxes.weight.grad.abs().sum() > 0  # stage 1 trains the query boxes
    # features, in contrast, carry gradient from stage 2 back into stage 1
    model.zero_grad()
    model(images, sizes)["stages"][1]["logits"].sum().backward()
    assert model.stages[0].ffn[0].weight.grad.abs().sum() > 0


def test_images_in_a_batch_do_not_interact(batch):
    images, sizes = batch
    torch.manual_seed(0)
    model = ISTR(tiny()).eval()
    with torch.no_grad():
        both = model(images, sizes)["stages"][-1]
        alone = model(images[:1], sizes[:1])["stages"][-1]
    for k in ("logits", "boxes", "mask_logits"):
        # equal up to float round-off (kernels block differently for batch 1 and 2); leakage would be O(1)
        assert torch.allclose(both[k][:1], alone[k], rtol=1e-3, atol=1e-3), k


def test_roi_align_uses_each_boxs_level():
    levels = [torch.full((1, 1, 64 // 2 ** i, 64 // 2 ** i), float(i + 2)) for i in range(4)]  # P_l filled with l
    boxes = torch.tensor([[[0.0, 0.0, 8.0, 8.0], [0.0, 0.0, 120.0, 120.0], [0.0, 0.0, 224.0, 224.0],
                           [0.0, 0.0, 500.0, 500.0]]])
    pooled = multilevel_roi_align(levels, boxes, 2, 2)
    centre = pooled[:, 0, 0, 0]
    assert centre.tolist() == [2.0, 3.0, 4.0, 5.0]


def test_pretrained_state_dict_is_loaded_from_a_local_file(tmp_path):
    import torchvision
    from torchvision.ops.misc import FrozenBatchNorm2d
    ref = torchvision.models.resnet18(weights=None, norm_layer=FrozenBatchNorm2d)
    with torch.no_grad():
        ref.conv1.weight.fill_(0.123)
    path = tmp_path / "r18.pth"
    torch.save(ref.state_dict(), path)
    body = build_resnet_fpn(tiny(pretrained=str(path))).body
    assert torch.allclose(body.conv1.weight, torch.full_like(body.conv1.weight, 0.123))
    assert not body.conv1.weight.requires_grad and body.layer2[0].conv1.weight.requires_grad  # FREEZE_AT=2
    with pytest.raises(FileNotFoundError, match="pretrained"):
        build_resnet_fpn(tiny(pretrained=str(tmp_path / "missing.pth")))
    torch.save({"conv1.weight": ref.conv1.weight}, tmp_path / "bad.pth")
    with pytest.raises(ValueError, match="bad.pth"):
        build_resnet_fpn(tiny(pretrained=str(tmp_path / "bad.pth")))


def test_config_yaml_files_and_errors(tmp_path):
    files = sorted((REPO / "configs").glob("istr_*.yaml"))
    assert {f.name for f in files} >= {"istr_r50_coco.yaml", "istr_r101_coco.yaml", "istr_shapes_cpu.yaml"}
    for f in files:
        cfg = load_istr_config(f)
        assert cfg.num_classes > 0
    r50 = load_istr_config(REPO / "configs/istr_r50_coco.yaml", ["num_stages=3", "model.attention=multihead"])
    assert (r50.backbone, r50.num_queries, r50.mask_dim, r50.num_stages, r50.attention) == \
        ("resnet50", 300, 60, 3, "multihead")
    bad = tmp_path / "bad.yaml"
    bad.write_text("model:\n  backbone: resnet18\n  num_querys: 5\n")
    with pytest.raises(ValueError, match="bad.yaml.*num_querys"):
        load_istr_config(bad)
    with pytest.raises(ValueError, match="attention"):
        ISTRConfig(attention="linear")
    with pytest.raises(ValueError, match="codec_path"):
        build_istr(tiny(mask_head="embedding"))
    with pytest.raises(ValueError, match="mask_dim"):
        build_istr(tiny(mask_head="embedding", mask_dim=20), codec=random_codec(12))


# ---------------------------------------------------------------- learning test
def _scene(specs, H=64, W=64):
    "An image with rectangles (class 0) and discs (class 1) on a dark background, and its targets."
    img = torch.full((3, H, W), -1.0) + 0.1 * torch.randn(3, H, W, generator=torch.Generator().manual_seed(len(specs)))
    yy, xx = torch.meshgrid(torch.arange(H) + 0.5, torch.arange(W) + 0.5, indexing="ij")
    masks, boxes, labels = [], [], []
    for kind, (x0, y0, x1, y1) in specs:
        if kind == 0:
            m = (xx >= x0) & (xx < x1) & (yy >= y0) & (yy < y1)
        else:
            m = (xx - (x0 + x1) / 2) ** 2 + (yy - (y0 + y1) / 2) ** 2 <= ((x1 - x0) / 2) ** 2
        col = torch.tensor([1.5, -0.5, 0.5]) if kind == 0 else torch.tensor([-0.5, 1.5, 1.0])
        img = torch.where(m, col[:, None, None], img)
        ys, xs = torch.where(m)
        boxes.append([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1])
        masks.append(m.to(torch.uint8))
        labels.append(kind)
    return img, dict(boxes=torch.tensor(boxes, dtype=torch.float32), labels=torch.tensor(labels),
                     masks=torch.stack(masks), size=torch.tensor([H, W]))


def _matched_quality(model, images, targets):
    "Mean mask IoU (pasted at full size, thresholded at 0.5) and mean score at the GT class of the last stage's matched queries."
    model.eval()
    with torch.no_grad():
        out = model(images, torch.stack([t["size"] for t in targets]))
        _, indices = model.criterion(out["stages"], targets, return_indices=True)
    last = out["stages"][-1]
    ious, scores = [], []
    for b, (q, g) in enumerate(indices[-1]):
        t = targets[b]
        probs = paste_masks(last["mask_logits"][b, q].sigmoid(), last["boxes"][b, q], 64, 64)[:, 0] > 0.5
        gt = t["masks"][g].bool()
        ious += ((probs & gt).sum((1, 2)) / (probs | gt).sum((1, 2)).clamp(min=1)).tolist()
        scores += last["logits"][b, q, t["labels"][g]].sigmoid().tolist()
    model.train()
    return sum(ious) / len(ious), sum(scores) / len(scores)


def test_tiny_istr_learns_synthetic_shapes():
    """Shows learning end to end: a tiny ISTR (resnet18 body frozen at random init, trainable FPN and heads,
    2 stages, 10 queries, raw 14x14 masks) trained with the paper's set loss on 3 synthetic images for 120
    AdamW steps. The total loss must fall to under 30% of its start, and on the training images the matched
    queries' pasted-mask IoU must rise above 0.4 (measured: 0.03 -> 0.56) and their score at the GT class above 0.15 (measured: 0.013 -> 0.22; loss 27.0 -> 5.4)."""
    torch.manual_seed(0)
    data = [_scene([(0, (6, 8, 30, 28)), (1, (36, 30, 60, 54))]), _scene([(1, (10, 12, 34, 36))]),
            _scene([(0, (30, 6, 58, 24)), (0, (8, 36, 26, 60))])]
    images, targets = torch.stack([d[0] for d in data]), [d[1] for d in data]
    model = build_istr(tiny(num_classes=2, trainable_layers=0))
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=2e-3, weight_decay=1e-4)
    iou0, score0 = _matched_quality(model, images, targets)
    first = None
    for _ in range(120):
        loss = model(images, targets)["loss"]
        first = float(loss.detach()) if first is None else first
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
    with torch.no_grad():
        last = float(model(images, targets)["loss"])
    iou1, score1 = _matched_quality(model, images, targets)
    print(f"loss {first:.2f} -> {last:.2f}; matched mask IoU {iou0:.2f} -> {iou1:.2f}; score {score0:.3f} -> {score1:.3f}")
    assert last < 0.3 * first
    assert iou1 > 0.4 and iou1 > iou0 + 0.3
    assert score1 > 0.15 and score1 > score0 + 0.1


def paste_masks_grid_sample(masks, boxes, height, width):
    "Reference paste: one grid_sample over the whole canvas of every mask (align_corners=False, zero padding)."
    N = masks.shape[0]
    dt = masks.dtype
    x = torch.arange(width, dtype=dt) + 0.5
    y = torch.arange(height, dtype=dt) + 0.5
    x0, y0, x1, y1 = boxes.to(dt).unbind(-1)
    gx = (x[None] - x0[:, None]) / (x1 - x0).clamp(min=1e-6)[:, None] * 2 - 1
    gy = (y[None] - y0[:, None]) / (y1 - y0).clamp(min=1e-6)[:, None] * 2 - 1
    grid = torch.stack([gx[:, None, :].expand(N, height, width), gy[:, :, None].expand(N, height, width)], -1)
    return F.grid_sample(masks[:, None], grid, mode="bilinear", padding_mode="zeros", align_corners=False)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_paste_equals_grid_sample(dtype):
    "The separable paste R_y M R_x^T gives grid_sample's numbers: boxes inside, across the border, tiny, huge, empty."
    g = torch.Generator().manual_seed(3)
    masks = torch.rand(9, 14, 10, generator=g, dtype=dtype)   # s_h != s_w on purpose
    boxes = torch.tensor([[3.2, 4.7, 20.9, 30.1], [-10.0, -5.0, 15.0, 12.0], [30.0, 40.0, 90.0, 70.0],
                          [5.0, 5.0, 5.4, 5.3], [0.0, 0.0, 48.0, 40.0], [-100.0, -80.0, 200.0, 150.0],
                          [12.0, 12.0, 12.0, 12.0], [47.5, 39.5, 48.0, 40.0], [60.0, 50.0, 70.0, 60.0]], dtype=dtype)
    got, ref = paste_masks(masks, boxes, 40, 48), paste_masks_grid_sample(masks, boxes, 40, 48)
    assert got.shape == ref.shape == (9, 1, 40, 48) and got.dtype == dtype
    assert (got - ref).abs().max() < 1e-6
    assert torch.equal(got == 0, ref.abs() < 1e-7)                   # zero exactly where grid_sample is zero
    assert got[8].abs().max() == 0 and got[0].amax() > 0.5             # box outside the canvas: empty canvas


def _randomise_frozen_bn(model):
    from torchvision.ops.misc import FrozenBatchNorm2d
    g = torch.Generator().manual_seed(5)
    for m in model.modules():
        if isinstance(m, FrozenBatchNorm2d):
            n = m.weight.shape[0]
            m.weight.copy_(torch.rand(n, generator=g) + 0.5); m.bias.copy_(torch.randn(n, generator=g) * 0.1)
            m.running_mean.copy_(torch.randn(n, generator=g) * 0.1); m.running_var.copy_(torch.rand(n, generator=g) + 0.5)


def predict_reference(model, images, sizes, orig, topk, monkeypatch):
    "The inference path without its CPU shortcuts: NCHW, BN unfolded, grid_sample paste."
    import segbook.istr as istr
    with torch.no_grad():
        feats = model.backbone.fpn(model.backbone.body(images))            # NCHW, BN unfolded
        levels = [feats[n] for n in istr.FPN_LEVELS]
        boxes, x = model.initial_queries(levels, sizes)
        for stage in model.stages:
            pred, x = stage(x, multilevel_roi_align(levels, boxes, model.cfg.pooler_resolution, model.cfg.sampling_ratio), boxes)
            boxes = pred["boxes"]
        with monkeypatch.context() as mp:
            mp.setattr(istr, "paste_masks", paste_masks_grid_sample)
            return postprocess(pred, sizes, orig, model.codec, topk)


@pytest.mark.parametrize("mask_head", ["raw", "embedding"])
def test_cpu_inference_path_equals_reference(batch, mask_head, monkeypatch):
    """predict (folded BN, channels-last, separable paste) = the plain path: boxes, scores, labels, pasted masks to 1e-5.

    In float64, so that what is compared is the arithmetic of the two paths, not float32 round-off amplified by
    untrained stages (in float32 the boxes agree to ~1e-5 relative); a wrong fold or paste is off by O(1)."""
    images, sizes = batch
    images = images.double()
    orig = torch.tensor([[96, 72], [60, 96]])
    torch.manual_seed(0)
    cfg = tiny(**(dict(mask_head="embedding", mask_dim=12) if mask_head == "embedding" else {}))
    model = ISTR(cfg, codec=random_codec() if mask_head == "embedding" else None).eval()
    _randomise_frozen_bn(model)
    model.double()
    for step in range(2):
        got = model.predict(images, sizes, orig, topk=12)
        ref = predict_reference(model, images, sizes, orig, 12, monkeypatch)
        for g_, r_ in zip(got, ref):
            assert torch.equal(g_["labels"], r_["labels"])
            assert torch.allclose(g_["scores"], r_["scores"], atol=1e-5, rtol=0)
            assert torch.allclose(g_["boxes"], r_["boxes"], atol=1e-5, rtol=1e-5)
            assert g_["masks"].shape == r_["masks"].shape and (g_["masks"] - r_["masks"]).abs().max() < 1e-5
        # an in-place change of a backbone weight (what an optimiser step does) must reach the folded copy
        folded = model.inference_body()
        with torch.no_grad():
            model.backbone.body.layer1[0].conv1.weight.mul_(1.5)
        assert model.inference_body() is not folded
    assert model.inference_body() is model.inference_body()              # cached while nothing changes
