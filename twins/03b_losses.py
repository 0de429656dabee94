# ---
# jupyter:
#   jupytext:
#     text_representation:
#       extension: .py
#       format_name: percent
#       format_version: '1.3'
#       jupytext_version: 1.19.7
#   kernelspec:
#     display_name: python3
#     language: python
#     name: python3
# ---

# %% [markdown]
# # The set loss
#
# > ISTR Eqs. 8–9: with the matching of chapter 03 fixed, regress every matched prediction onto its ground truth and teach the rest "no object" — at every refinement stage.

# %%
#| default_exp losses

# %% [markdown]
# ## The set loss (Eqs. 8–9)
#
# With σ* fixed, Eq. 8 averages the per-GT losses over the n GT instances,
#
# $$\mathcal{L}_{set}(\mathbf{Y}, \tilde{\mathbf{Y}}, \sigma^*) = \frac{1}{n}\sum_{i=1}^n \Big(\mathcal{L}_{box}(\mathbf{b}_i, \tilde{\mathbf{b}}_{\sigma^*(i)})
# + \mathcal{L}_{cls}(\mathbf{c}_i, \tilde{\mathbf{c}}_{\sigma^*(i)}) + \mathcal{L}_{mask}(\mathbf{m}_i, \tilde{\mathbf{r}}_{\sigma^*(i)})\Big), \tag{8}$$
#
# $$\mathcal{L}_{mask}(\mathbf{m}_i, \tilde{\mathbf{r}}_{\sigma^*(i)}) = \lambda_{mask}\Big(\mathcal{L}_{L2}\big(g(\mathbf{m}_i), \tilde{\mathbf{r}}_{\sigma^*(i)}\big)
# + \mathcal{L}_{dice}\big(\mathbf{m}_i, f(\tilde{\mathbf{r}}_{\sigma^*(i)})\big)\Big), \tag{9}$$
#
# and the code's forms of the two mask terms, for an l-dimensional embedding and s×s decoded probabilities p against the GT crop t:
#
# $$\mathcal{L}_{L2} = \frac{1}{l}\,\|g(\mathbf{m}) - \tilde{\mathbf{r}}\|_2^2, \qquad
# \mathcal{L}_{dice} = 1 - \frac{2\sum p\,t}{\sum p^2 + \sum t^2 + 10^{-5}}.$$
#
# Term by term:
#
# - **L_cls**: sigmoid focal loss (α=0.25, γ=2; `torchvision.ops.sigmoid_focal_loss`) summed over
#   **all** Q×C logits — unmatched queries learn "no object" from all-zero targets — then /n.
# - **L_box** "defined the same as C_box": L1 on image-normalised xyxy boxes and 1 − GIoU
#   (`torchvision.ops.generalized_box_iou_loss`), each summed over matched pairs, /n.
# - **L_mask** (Eq. 9) = λ_mask·(L_L2(g(m), r̃) + L_dice(m, f(r̃))). In the code, L_L2 is the squared
#   error averaged over the l dimensions (MSE), and L_dice = 1 − 2Σpt/(Σp² + Σt² + 1e−5) on the
#   decoded s×s probabilities against the binary GT crop; `mask_loss` selects Table 1c's rows
#   ('dice', 'l2', 'l2+dice'). Eq. 9's single λ_mask multiplies both terms; here each has its own
#   weight (both 2 by default) so they can be tuned apart, as the later official code does.
#
# The focal, L1 and GIoU losses are torchvision's. Only the two mask terms are written by hand:
# torchvision has no dice loss, and the "L2" of Eq. 9 is one line of `F.mse_loss`.
#
# Eq. 8 writes 1/n per image; the code (and this chapter) divides by n, the number of GT in the
# whole batch — summed over GPUs and averaged per GPU under
# `torch.distributed`, at least 1 — so images with many objects weigh more, as in the code.
# Each of the 6 refinement stages is matched and supervised on its own with the same weights
# (deep supervision); the result holds `loss_ce_s1` … `loss_dice_s6` and their λ-weighted sum `loss`.

# %%
#| export
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torchvision.ops import generalized_box_iou_loss, sigmoid_focal_loss

from segbook.matching import (MatchingConfig, hungarian_match, normalize_boxes, pred_mask_embed,
                              prepare_targets, uses_codec)


# %%
#| export
def loss_ce(logits:torch.Tensor, # [B,Q,C] class logits
            target_classes:torch.Tensor, # [B,Q,C] one-hot targets (all zero for unmatched queries)
            num_gt:float, # n, the normaliser
            alpha:float=0.25, # focal α
            gamma:float=2.0, # focal γ
           ) -> torch.Tensor: # scalar
    "L_cls of Eq. 8: sigmoid focal loss summed over all Q×C logits, divided by n."
    return sigmoid_focal_loss(logits, target_classes.to(logits.dtype), alpha, gamma, reduction="sum") / num_gt

def loss_bbox(pred_boxes:torch.Tensor, # [M,4] matched predictions, image-normalised xyxy
              gt_boxes:torch.Tensor, # [M,4] their GT, image-normalised xyxy
              num_gt:float) -> torch.Tensor:
    "L_L1 of Eq. 8 (L_box = C_box): summed L1 distance of matched normalised boxes, /n."
    return F.l1_loss(pred_boxes, gt_boxes, reduction="sum") / num_gt

def loss_giou(pred_boxes:torch.Tensor, # [M,4] matched predictions, xyxy pixels
              gt_boxes:torch.Tensor, # [M,4] their GT, xyxy pixels
              num_gt:float) -> torch.Tensor:
    "L_iou of Eq. 8: Σ(1 − GIoU) over matched pairs, /n."
    return generalized_box_iou_loss(pred_boxes, gt_boxes, reduction="sum") / num_gt

def loss_mask_embed(pred_embed:torch.Tensor, # [M,l] matched r̃
                    gt_embed:torch.Tensor, # [M,l] g(m) of their GT
                    num_gt:float) -> torch.Tensor:
    "L_L2 of Eq. 9: squared error averaged over the l dimensions, summed over pairs, /n."
    return F.mse_loss(pred_embed, gt_embed.to(pred_embed.dtype), reduction="none").mean(-1).sum() / num_gt

def loss_dice(pred_masks:torch.Tensor, # [M,s,s] probabilities f(r̃)
              gt_masks:torch.Tensor, # [M,s,s] binary GT crops
              num_gt:float,
              eps:float=1e-5) -> torch.Tensor:
    "L_dice of Eq. 9: Σ [1 − 2Σpt/(Σp² + Σt² + ε)] over pairs, /n (squared denominator, as in the code)."
    p, t = pred_masks.flatten(1), gt_masks.flatten(1).to(pred_masks.dtype)
    dice = 2 * (p * t).sum(1) / ((p * p).sum(1) + (t * t).sum(1) + eps)
    return (1 - dice).sum() / num_gt


# %% [markdown]
# The normaliser n, and the criterion that wires matching and losses together per stage.

# %%
#| export
def num_gt_boxes(targets:list, # B target dicts
                 device=None) -> float: # n ≥ 1 (a tensor under torch.distributed)
    "n of Eq. 8: GT instances in the batch; under torch.distributed summed over ranks / world size. At least 1."
    n = sum(len(t["labels"]) for t in targets)
    if dist.is_available() and dist.is_initialized():
        t = torch.tensor(float(n), device=device)
        dist.all_reduce(t)
        return (t / dist.get_world_size()).clamp(min=1)
    return max(float(n), 1.0)

@dataclass
class SetLossConfig:
    "Weights and switches of the set loss (ISTR Eqs. 8–9, Table 1c)."
    weight_ce: float = 2.0 # λ_cls
    weight_bbox: float = 5.0 # λ_L1
    weight_giou: float = 2.0 # λ_iou
    weight_mask_embed: float = 2.0 # λ_mask on L_L2
    weight_dice: float = 2.0 # λ_mask on L_dice
    mask_loss: str = "l2+dice" # Table 1c: 'dice' | 'l2' | 'l2+dice'
    focal_alpha: float = 0.25 # α of the focal loss
    focal_gamma: float = 2.0 # γ of the focal loss

    def __post_init__(self):
        if self.mask_loss not in ("dice", "l2", "l2+dice"):
            raise ValueError(f"SetLossConfig.mask_loss must be 'dice', 'l2' or 'l2+dice', got {self.mask_loss!r}")

    def weights(self) -> dict:
        "λ of each loss term that `mask_loss` switches on."
        w = {"loss_ce": self.weight_ce, "loss_bbox": self.weight_bbox, "loss_giou": self.weight_giou}
        if "l2" in self.mask_loss: w["loss_mask_embed"] = self.weight_mask_embed
        if "dice" in self.mask_loss: w["loss_dice"] = self.weight_dice
        return w


# %%
#| export
class SetCriterion(nn.Module):
    "Deep-supervised ISTR set loss: Hungarian matching (Eq. 4) and the loss of Eqs. 8–9 at every stage."
    def __init__(self, matching:MatchingConfig=None, # matching cost weights/switches
                 loss:SetLossConfig=None, # loss weights/switches
                 codec=None, # mask codec (encode GT crops, decode r̃); None for raw `mask_logits`
                ):
        super().__init__()
        self.matching, self.loss_cfg, self.codec = matching or MatchingConfig(), loss or SetLossConfig(), codec

    def stage_losses(self, pred:dict, # one stage's predictions
                     targets:list, # prepared targets (with `masks_crop`, `mask_embed`)
                     indices:list, # `hungarian_match` output for this stage
                     num_gt) -> dict:
        "The unweighted loss terms of one stage, given its matching."
        cfg, dev = self.loss_cfg, pred["logits"].device
        B, Q, C = pred["logits"].shape
        bi = torch.cat([torch.full_like(p, b) for b, (p, _) in enumerate(indices)]).to(dev)
        qi = torch.cat([p for p, _ in indices]).to(dev)
        gi = [g.to(t["labels"].device) for (_, g), t in zip(indices, targets)]
        gt_labels = torch.cat([t["labels"][g] for t, g in zip(targets, gi)]).to(dev)
        gt_boxes = torch.cat([t["boxes"][g] for t, g in zip(targets, gi)]).to(dev, pred["boxes"].dtype)
        sizes = torch.stack([torch.as_tensor(t["size"]) for t in targets]).to(dev)[bi]
        onehot = torch.zeros(B, Q, C, device=dev, dtype=pred["logits"].dtype)
        onehot[bi, qi, gt_labels] = 1
        boxes = pred["boxes"][bi, qi]
        out = {"loss_ce": loss_ce(pred["logits"], onehot, num_gt, cfg.focal_alpha, cfg.focal_gamma),
               "loss_bbox": loss_bbox(normalize_boxes(boxes, sizes), normalize_boxes(gt_boxes, sizes), num_gt),
               "loss_giou": loss_giou(boxes, gt_boxes, num_gt)}
        if "l2" in cfg.mask_loss:
            gt_embed = torch.cat([t["mask_embed"][g] for t, g in zip(targets, gi)]).to(dev)
            out["loss_mask_embed"] = loss_mask_embed(pred_mask_embed(pred)[bi, qi], gt_embed, num_gt)
        if "dice" in cfg.mask_loss:
            gt_masks = torch.cat([t["masks_crop"][g] for t, g in zip(targets, gi)]).to(dev)
            probs = (self.codec.decode(pred["mask_embed"][bi, qi]) if uses_codec(pred)
                     else pred["mask_logits"][bi, qi].sigmoid())
            out["loss_dice"] = loss_dice(probs, gt_masks, num_gt)
        return out

    def forward(self, stages, # list of per-stage prediction dicts (or one dict)
                targets:list, # B target dicts
                return_indices:bool=False, # also return each stage's matching
               ):
        "Match and score every stage. Returns {'loss', 'loss_ce_s1', ...} (and the per-stage indices if asked)."
        stages = [stages] if isinstance(stages, dict) else list(stages)
        if "mask_embed" in stages[0] and self.codec is None:
            raise ValueError("SetCriterion got 'mask_embed' predictions but no codec to encode GT masks")
        targets = prepare_targets(targets, self.matching.mask_size, self.codec if uses_codec(stages[0]) else None)
        num_gt = num_gt_boxes(targets, stages[0]["logits"].device)
        weights, losses, all_indices = self.loss_cfg.weights(), {}, []
        total = 0.0
        for k, pred in enumerate(stages, start=1):
            indices = hungarian_match(pred, targets, self.matching, self.codec)
            for name, value in self.stage_losses(pred, targets, indices, num_gt).items():
                losses[f"{name}_s{k}"] = value
                total = total + weights[name] * value
            all_indices.append(indices)
        losses = {"loss": total, **losses}
        return (losses, all_indices) if return_indices else losses


# %% [markdown]
# ## Example: a perfect prediction costs nothing
#
# A stand-in codec with a *complete* orthonormal basis (l = s², so decode(encode(m)) = m) lets us
# build a prediction that is exactly right: very confident logits for the GT class at three
# queries, the GT boxes and the GT embeddings. Every term is then ≈ 0; moving any one input away
# makes its own term positive.

# %%
torch.set_num_threads(1)  # the examples are tiny: one thread avoids OpenMP overhead on small CPUs

def rect_masks(boxes, h, w):
    "Binary masks filling each box (a toy GT)."
    ys, xs = torch.arange(h)[:, None] + 0.5, torch.arange(w)[None] + 0.5
    return torch.stack([((xs >= x0) & (xs < x1) & (ys >= y0) & (ys < y1)) for x0, y0, x1, y1 in boxes.tolist()]).to(torch.uint8)

def toy_batch(seed=0, H=48, W=64, C=5, ns=(3, 0, 2)):
    "Targets for len(ns) images with ns[b] random rectangles each."
    g = torch.Generator().manual_seed(seed)
    out = []
    for n in ns:
        xy = torch.rand(n, 2, generator=g) * torch.tensor([W / 2, H / 2])
        wh = 8 + torch.rand(n, 2, generator=g) * torch.tensor([W / 2 - 8, H / 2 - 8])
        boxes = torch.cat([xy, xy + wh], 1).round()
        out.append(dict(boxes=boxes, labels=torch.randint(0, C, (n,), generator=g), size=torch.tensor([H, W]),
                        masks=rect_masks(boxes, H, W) if n else torch.zeros(0, H, W, dtype=torch.uint8)))
    return out

def perfect_prediction(targets, codec, Q=6, C=5, s=8):
    "Logits ±20, exact boxes and exact GT embeddings at queries 1, 3, 5, …; random elsewhere."
    B = len(targets)
    prepared = prepare_targets(targets, s, codec)
    logits = torch.full((B, Q, C), -20.0)
    boxes = torch.tensor([0., 0, 4, 4]).repeat(B, Q, 1) + torch.arange(Q)[None, :, None]
    embed = torch.zeros(B, Q, codec.dim)
    for b, t in enumerate(prepared):
        q = torch.arange(len(t["labels"])) * 2 + 1
        logits[b, q, t["labels"]] = 20.0
        boxes[b, q] = t["boxes"]
        embed[b, q] = t["mask_embed"]
    return dict(logits=logits, boxes=boxes, mask_embed=embed)

from segbook.embeddings import PCACodec
codec = PCACodec.random_orthonormal(size=8, dim=64)
targets = toy_batch()
criterion = SetCriterion(MatchingConfig(mask_size=8), SetLossConfig(), codec)
perfect = perfect_prediction(targets, codec)
losses, indices = criterion([perfect], targets, return_indices=True)
{k: round(float(v), 6) for k, v in losses.items()}

# %%
assert losses["loss"] < 1e-4, losses
assert indices[0][0][0].tolist() == [1, 3, 5] and indices[0][1][0].numel() == 0  # image 1 has no GT
for key, change in [("loss_ce_s1", lambda p: p["logits"].neg_()), ("loss_bbox_s1", lambda p: p["boxes"].add_(3)),
                    ("loss_giou_s1", lambda p: p["boxes"][..., 2:].add_(9)),
                    ("loss_mask_embed_s1", lambda p: p["mask_embed"].mul_(0.5)),
                    ("loss_dice_s1", lambda p: p["mask_embed"].mul_(0.5))]:
    worse = {k: v.clone() for k, v in perfect.items()}; change(worse)
    assert criterion([worse], targets)[key] > 1e-2, key

# %% [markdown]
# Deep supervision: each stage is matched and scored on its own, and `loss` is the λ-weighted sum of
# every term of every stage. Table 1c's switch drops the embedding or the dice term. Gradients
# reach every prediction tensor and are finite; the matching itself is not differentiated.

# %%
g = torch.Generator().manual_seed(3)
def random_prediction(B=3, Q=6, C=5, l=64, g=g):
    xy = torch.rand(B, Q, 2, generator=g) * 30
    return dict(logits=torch.randn(B, Q, C, generator=g), boxes=torch.cat([xy, xy + 4 + torch.rand(B, Q, 2, generator=g) * 20], -1),
                mask_embed=torch.randn(B, Q, l, generator=g))
stages = [random_prediction() for _ in range(3)]
for p in stages:
    for v in p.values(): v.requires_grad_(True)
losses = criterion(stages, targets)
w = SetLossConfig().weights()
assert set(losses) == {"loss"} | {f"{k}_s{i}" for k in w for i in (1, 2, 3)}
assert torch.allclose(losses["loss"], sum(w[k.rsplit("_s", 1)[0]] * v for k, v in losses.items() if k != "loss"))
losses["loss"].backward()
for p in stages:
    for name, v in p.items():
        assert torch.isfinite(v.grad).all() and v.grad.abs().sum() > 0, name
assert "loss_dice_s1" not in SetCriterion(MatchingConfig(mask_size=8), SetLossConfig(mask_loss="l2"), codec)(stages, targets)
assert "loss_mask_embed_s1" not in SetCriterion(MatchingConfig(mask_size=8), SetLossConfig(mask_loss="dice"), codec)(stages, targets)

# %% [markdown]
# The loss does not care in which order the queries come (the matching follows them), and a batch
# without any object still gives a finite loss that teaches every query "no object".

# %%
pred = {k: v.detach() for k, v in stages[0].items()}
perm = torch.randperm(6, generator=g)
shuffled = {k: v[:, perm] for k, v in pred.items()}
a, b = criterion([pred], targets), criterion([shuffled], targets)
assert all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)

empty = [dict(t, boxes=t["boxes"][:0], labels=t["labels"][:0], masks=t["masks"][:0]) for t in targets]
logits = pred["logits"].clone().requires_grad_(True)
out = criterion([dict(pred, logits=logits)], empty)
assert out["loss_ce_s1"] > 0 and out["loss_bbox_s1"] == 0 and out["loss_dice_s1"] == 0
out["loss"].backward()
assert (logits.grad > 0).all()  # every logit is pushed down

# %% [markdown]
# ## Learning: the loss pulls free predictions onto the ground truth
#
# The strongest end-to-end check of matching + loss: treat one stage's outputs as free parameters
# and minimise the set loss with Adam. The matched queries must converge to the GT boxes, classes
# and masks, and the others to "no object".

# %%
from torchvision.ops import box_iou

def fit_free_predictions(targets, codec, steps=150, Q=6, C=5, seed=0):
    "Optimise free logits/boxes/embeddings under `SetCriterion`; returns the final prediction and the loss history."
    g = torch.Generator().manual_seed(seed)
    B = len(targets)
    xy = torch.rand(B, Q, 2, generator=g) * 30
    params = dict(logits=torch.randn(B, Q, C, generator=g), boxes=torch.cat([xy, xy + 10], -1),
                  mask_embed=0.1 * torch.randn(B, Q, codec.dim, generator=g))
    for v in params.values(): v.requires_grad_(True)
    opt = torch.optim.Adam([{"params": [params["boxes"]], "lr": 1.0},
                            {"params": [params["logits"], params["mask_embed"]], "lr": 0.1}])
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
    crit, history = SetCriterion(MatchingConfig(mask_size=8), SetLossConfig(), codec), []
    for _ in range(steps):
        losses = crit([params], targets)
        opt.zero_grad(); losses["loss"].backward(); opt.step(); sched.step()
        history.append({k: float(v.detach()) for k, v in losses.items()})
    return {k: v.detach() for k, v in params.items()}, history

fitted, history = fit_free_predictions(targets, codec)
final = SetCriterion(MatchingConfig(mask_size=8), SetLossConfig(), codec)([fitted], targets, return_indices=True)
(history[0]["loss"], history[-1]["loss"])

# %%
assert history[-1]["loss"] < 0.01 * history[0]["loss"]
for b, (t, (qi, gi)) in enumerate(zip(targets, final[1][0])):
    if len(gi):
        assert box_iou(fitted["boxes"][b, qi], t["boxes"][gi]).diag().min() > 0.9
        assert (fitted["logits"][b, qi].argmax(-1) == t["labels"][gi]).all()
scores = fitted["logits"].sigmoid().amax(-1)
matched = torch.zeros_like(scores, dtype=torch.bool)
for b, (qi, _) in enumerate(final[1][0]): matched[b, qi] = True
assert scores[matched].min() > 0.5 > scores[~matched].max()

# %%
import matplotlib.pyplot as plt
from segbook.viz import save_figure

fig, ax = plt.subplots(figsize=(6, 3.2))
for k in w:
    ax.semilogy([h[f"{k}_s1"] * w[k] for h in history], label=f"{w[k]:g}·{k}")
ax.semilogy([h["loss"] for h in history], "k", lw=2, label="loss (Eq. 8)")
ax.set_xlabel("Adam step"); ax.set_ylabel("weighted term"); ax.legend(fontsize=7, ncol=2)
ax.set_title("Set loss minimised over free predictions (toy batch of 3 images, 5 GT)", fontsize=9)
save_figure(fig, "matching_setloss_fit.png");
