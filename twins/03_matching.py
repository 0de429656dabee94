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
# # Matching and the set loss
#
# > ISTR §3.2: pair the k predictions of a stage with the n ground-truth instances by a minimum-cost bipartite matching (Eqs. 4–7), then regress the matched pairs (Eqs. 8–9).

# %%
#| default_exp matching

# %% [markdown]
# ISTR predicts a fixed set of k = 300 instances per image and has no NMS. Training has to decide
# which prediction answers for which ground-truth (GT) instance; the answer is the permutation σ*
# of Eq. 4 that minimises a summed pairwise cost, found with the Hungarian algorithm. The loss of
# Eq. 8 then pulls each matched prediction towards its GT and pushes every other query towards
# "no object". ISTR's twist on DETR / Sparse R-CNN is the **mask cost** of Eq. 7: it compares mask
# *embeddings* (chapter 02) instead of 28×28 masks.
#
# Shapes used throughout: B images, Q queries per image, C classes, l embedding dimensions,
# s×s mask crops, N_b GT instances in image b and G = Σ_b N_b in the batch.
#
# **What comes in.** One refinement stage's predictions as a dict: `logits` [B,Q,C] (sigmoid
# classification, no background class), `boxes` [B,Q,4] xyxy in pixels, and `mask_embed` [B,Q,l]
# (or `mask_logits` [B,Q,s,s] for the raw-mask ablation of Table 1a). Targets are the list of dicts
# `segbook.data.collate` makes: `boxes` [N,4] xyxy pixels, `labels` [N], `size` (h,w) and `masks`
# [N,h,w] (or precomputed `masks_crop` [N,s,s]). A mask codec turns crops into embeddings:
# `codec.encode([N,s,s]) -> [N,l]`, `codec.decode([N,l]) -> [N,s,s]` probabilities.

# %%
#| export
import dataclasses
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from scipy.optimize import linear_sum_assignment

from segbook.embeddings import crop_and_resize_masks


# %% [markdown]
# ## The knobs
#
# The weights are the paper's λs (λ_cls=2, λ_L1=5, λ_iou=2, λ_mask=2, `ISTR@967c901:istr/config.py`).
# Two switches reproduce ablations and paper-vs-code differences:
#
# - `class_cost`: Eq. 6 as printed is −p̃(c), the probability of the GT class (`'prob'`). The
#   official code uses a focal-style cost with α=0.25, γ=2 (`'focal'`, the default here because
#   the whole book trains the classifier with sigmoid focal loss, as the code does).
# - `mask_cost`: the four rows of Table 1b — `'none'`, `'dice'` (on decoded masks), `'l1'` (on
#   embeddings) and `'cosine'` (Eq. 7, the paper's choice).

# %%
#| export
@dataclass
class MatchingConfig:
    "Weights and switches of the matching cost (ISTR Eqs. 4–7, Table 1b)."
    weight_class: float = 2.0 # λ_cls, Eq. 6
    weight_l1: float = 5.0 # λ_L1, Eq. 5
    weight_giou: float = 2.0 # λ_iou, Eq. 5
    weight_mask: float = 2.0 # λ_mask, Eq. 7
    class_cost: str = "focal" # 'focal' (official code) | 'prob' (Eq. 6 as printed)
    mask_cost: str = "cosine" # Table 1b: 'none' | 'dice' | 'l1' | 'cosine' (Eq. 7)
    focal_alpha: float = 0.25 # α of the focal-style class cost
    focal_gamma: float = 2.0 # γ of the focal-style class cost
    mask_size: int = 28 # s: GT masks are cropped to their box at s×s
    cost_layout: str = "auto" # 'batched' (one [B·Q,G] matrix, DETR) | 'compact' (one [G,Q] row per GT, own image only) | 'auto' = 'compact'
    cost_kernel: str = "auto" # compact layout's weighted sum: 'eager' | 'compiled' (torch.compile, one fused loop) | 'auto' (compiled on CPU for ≥ 64k pairs)

    def __post_init__(self):
        if self.class_cost not in ("focal", "prob"):
            raise ValueError(f"MatchingConfig.class_cost must be 'focal' or 'prob', got {self.class_cost!r}")
        if self.mask_cost not in ("none", "dice", "l1", "cosine"):
            raise ValueError(f"MatchingConfig.mask_cost must be 'none', 'dice', 'l1' or 'cosine', got {self.mask_cost!r}")
        if self.cost_layout not in ("auto", "batched", "compact"):
            raise ValueError(f"MatchingConfig.cost_layout must be 'auto', 'batched' or 'compact', got {self.cost_layout!r}")
        if self.cost_kernel not in ("auto", "eager", "compiled"):
            raise ValueError(f"MatchingConfig.cost_kernel must be 'auto', 'eager' or 'compiled', got {self.cost_kernel!r}")


# %% [markdown]
# ## Ground-truth masks as crops and embeddings
#
# Eq. 7 needs g(m_i), the embedding of the GT mask. As in the official code, a GT mask is cropped
# to its **GT box** and resampled to s×s, then binarised at 0.5. We reuse chapter 02's
# `crop_and_resize_masks` (torchvision `roi_align`, aligned=True, all instances of an image in one
# call) on purpose: the codec was fitted on exactly these crops, so training targets and codec
# agree. The loop is over images, not instances (image sizes differ).
#
# All crops of the batch are encoded in one codec call. The GT embeddings are computed once per
# training step and shared by the matcher and the loss of every stage (the official code re-encodes
# with fresh noise each time; noisy encoding, if wanted, belongs to the codec).
#
# For the raw-mask ablation (predictions carry `mask_logits`), the "embedding" is the flattened
# mask itself (l = s²) and no codec is used.

# %%
#| export
def prepare_targets(targets:list, # per-image dicts with `boxes`, `labels` and `masks` [N,h,w] or `masks_crop` [N,s,s]
                    mask_size:int=28, # s
                    codec=None, # mask codec with `encode([N,s,s]) -> [N,l]`; None: the flattened crop is the embedding
                    ) -> list: # shallow copies with `masks_crop` [N,s,s] and `mask_embed` [N,l] added
    "Add GT mask crops and their embeddings g(m) to each target (batched: one codec call for the whole batch)."
    if all("masks_crop" in t and "mask_embed" in t for t in targets):
        return targets
    crops = []
    for b, t in enumerate(targets):
        if "masks_crop" in t:
            crops.append(t["masks_crop"].float())
        elif "masks" in t:
            if t["masks"].shape[0] != t["boxes"].shape[0]:
                raise ValueError(f"target {b}: field 'masks' has {t['masks'].shape[0]} masks but 'boxes' has {t['boxes'].shape[0]}")
            crops.append(crop_and_resize_masks(t["masks"], t["boxes"], mask_size))
        else:
            raise ValueError(f"target {b}: needs field 'masks' [N,h,w] or 'masks_crop' [N,s,s] for the mask cost/loss")
    sizes = [c.shape[0] for c in crops]
    with torch.no_grad():
        flat = torch.cat(crops)
        embed = codec.encode(flat) if codec is not None else flat.flatten(1)
    return [dict(t, masks_crop=c, mask_embed=e.detach())
            for t, c, e in zip(targets, crops, embed.split(sizes))]


# %% [markdown]
# Predicted masks come in two forms: the embedding r̃ (decoded by the codec, f(r̃)) or, for the
# raw-mask ablation, logits of the s×s mask itself.

# %%
#| export
def pred_mask_embed(pred:dict, # one stage's predictions
                   ) -> torch.Tensor: # [B,Q,l]
    "The predicted mask embeddings r̃; for raw `mask_logits` [B,Q,s,s], the flattened mask probabilities."
    if "mask_embed" in pred:
        return pred["mask_embed"]
    if "mask_logits" in pred:
        return pred["mask_logits"].sigmoid().flatten(2)
    raise ValueError("predictions need 'mask_embed' [B,Q,l] or 'mask_logits' [B,Q,s,s] for the mask cost/loss")

def pred_mask_probs(pred:dict, # one stage's predictions
                    codec=None, # codec with `decode([N,l]) -> [N,s,s]`, needed for `mask_embed`
                   ) -> torch.Tensor: # [B,Q,s,s] probabilities
    "The predicted masks f(r̃) (decoded embeddings), or sigmoid of raw `mask_logits`."
    if "mask_logits" in pred and "mask_embed" not in pred:
        return pred["mask_logits"].sigmoid()
    if codec is None:
        raise ValueError("decoding 'mask_embed' predictions into masks needs a codec (codec=None was given)")
    r = pred_mask_embed(pred)
    B, Q = r.shape[:2]
    m = codec.decode(r.flatten(0, 1))
    return m.view(B, Q, *m.shape[-2:])

def uses_codec(pred:dict) -> bool:
    "True when the predictions are embeddings (the codec encodes GT masks), False for raw `mask_logits`."
    return "mask_embed" in pred


# %% [markdown]
# ## Box costs (Eq. 5)
#
# $$\mathcal{C}_{box}(\mathbf{b}_i, \tilde{\mathbf{b}}_{\sigma(i)}) = \lambda_{L1}\,\mathcal{C}_{L1}(\mathbf{b}_i, \tilde{\mathbf{b}}_{\sigma(i)})
# + \lambda_{iou}\,\mathcal{C}_{iou}(\mathbf{b}_i, \tilde{\mathbf{b}}_{\sigma(i)}) \tag{5}$$
#
# with C_L1 the L1 distance of the two boxes and C_iou = −GIoU. The L1 term compares boxes as xyxy **divided by their image's
# width and height** (`ISTR@967c901:istr/loss.py`; DETR uses normalised cxcywh instead), so it is
# scale-free. The IoU term is the negative generalised IoU. The official code takes it on pixel boxes;
# dividing x by w and y by h scales every axis-aligned area by the same 1/(wh), so the GIoU of the
# normalised boxes is the same number and both terms can share one set of coordinates.
#
# They can share more. With d_k = |p_k − g_k| (the four summands of C_L1) and a + b the sum of two
# coordinates, max(a, b) = (a + b + |a − b|)/2 and min(a, b) = (a + b − |a − b|)/2. The intersection
# width is min(p_x1, g_x1) − max(p_x0, g_x0) = (w_p + w_g − d_x0 − d_x1)/2 and the enclosing width
# max(p_x1, g_x1) − min(p_x0, g_x0) = (w_p + w_g + d_x0 + d_x1)/2. So the L1 distances, the two widths
# and the two heights give every area the GIoU needs, without the eight max/min passes of the
# textbook form; `cost_box` returns both terms of Eq. 5 from them (areas ×4, which the ratios cancel).
#
# Every cost term here is written for *pairs that broadcast*: a prediction tensor [...,4] and a GT
# tensor [...,4] give one cost per broadcast pair. `pred[:, None]` against `gt[None]` is DETR's
# all-pairs [P,G] matrix; the compact layout below feeds the same functions other shapes, so each
# equation exists once. The GIoU is torchvision's `generalized_box_iou` written elementwise (that
# function only does all pairs of two box lists); the test below checks the two agree. The
# functions update their temporaries in place (`sub_`, `mul_`, …): on a CPU a fresh tensor of a few
# hundred kB can cost as much in page faults as the arithmetic on it.

# %%
#| export
def normalize_boxes(boxes:torch.Tensor, # [...,4] xyxy pixels
                    size:torch.Tensor, # [...,2] (h,w) of each box's image, broadcastable
                   ) -> torch.Tensor: # [...,4] xyxy in [0,1] for boxes inside the image
    "Divide xyxy pixel boxes by their image's (w,h,w,h)."
    h, w = size[..., 0:1].to(boxes.dtype), size[..., 1:2].to(boxes.dtype)
    return boxes / torch.cat([w, h, w, h], -1)

def cost_box(pred_boxes:torch.Tensor, # [...,4] xyxy, divided by the image's (w,h,w,h) (see `normalize_boxes`)
             gt_boxes:torch.Tensor, # [...,4] likewise, broadcastable against `pred_boxes`
            ) -> tuple: # (C_L1 [...], C_iou [...] in [-1, 1]): one cost per broadcast pair
    "C_L1 and C_iou of Eq. 5 from the same four coordinate distances: Σ|p − g| and −GIoU (torchvision's, elementwise)."
    p, g = pred_boxes.unbind(-1), gt_boxes.unbind(-1)
    d = [(a - b).abs_() for a, b in zip(p, g)]                              # |p_k − g_k| for x0, y0, x1, y1
    dx, dy = d[0].add_(d[2]), d[1].add_(d[3])
    l1 = dx + dy
    pw, ph, gw, gh = p[2] - p[0], p[3] - p[1], g[2] - g[0], g[3] - g[1]
    sx, sy = pw + gw, ph + gh                                               # summed widths and heights
    inter = (sx - dx).clamp_min_(0).mul_((sy - dy).clamp_min_(0))           # 4 × intersection area
    hull = sx.add_(dx).clamp_min_(0).mul_(sy.add_(dy).clamp_min_(0))        # 4 × enclosing-box area
    union = torch.add(pw * ph, gw * gh).mul_(4).sub_(inter)                 # 4 × union area
    return l1, hull.sub(union).div_(hull).sub_(inter.div_(union))           # −GIoU = (hull − union)/hull − IoU


# %% [markdown]
# ## Class cost (Eq. 6)
#
# Eq. 6 as printed (left, `kind='prob'`) and the official code's form (right, `kind='focal'`, the
# default), with p = σ(z) the sigmoid of the query's logit z for the GT class c_i:
#
# $$\mathcal{C}_{cls}(\mathbf{c}_i, \tilde{\mathbf{c}}_{\sigma(i)}) = -\lambda_{cls}\,\tilde{p}_{\sigma(i)}(\mathbf{c}_i) \tag{6}
# \qquad\text{vs.}\qquad
# \mathcal{C}^{code}_{cls} = \lambda_{cls}\big(\alpha(1-p)^\gamma(-\log p) - (1-\alpha)\,p^\gamma(-\log(1-p))\big)$$
#
# The code's form is the change in focal loss when that query's target for class c flips from 0 to 1. Only the
# logits of GT classes enter, so `cost_class` takes those logits (gathered by the caller: a [P,G]
# matrix of logit[q, c_g], or any other shape) — the official code evaluates all P×C and gathers
# afterwards. One `logsigmoid` gives both logarithms: log p = logsigmoid(z) and
# log(1−p) = logsigmoid(z) − z, exact where the code adds 1e−8 inside the log.

# %%
#| export
def cost_class(logits:torch.Tensor, # [...] logit of the GT class c for each pair (sigmoid classification)
               kind:str="focal", # 'focal' (official code) or 'prob' (Eq. 6 as printed)
               alpha:float=0.25, # focal α
               gamma:float=2.0, # focal γ
              ) -> torch.Tensor: # [...] one cost per pair
    "C_cls of Eq. 6: −p̃(c) ('prob') or the focal-style cost of the official code ('focal')."
    p = logits.sigmoid()
    if kind == "prob":
        return p.neg_()
    # log p as the log of the sigmoid, clamped at the smallest normal float (a logit below about −87 costs as −87):
    # 8x faster on the CPU than F.logsigmoid, whose kernel is not vectorised; log(1 − p) = log p − z
    log_p = p.clamp_min(torch.finfo(p.dtype).tiny).log_()
    neg = (logits - log_p).mul_(p.pow(gamma))                     # p^γ·(−log(1−p))
    pos = torch.rsub(p, 1).pow_(gamma).mul_(log_p)                # −(1−p)^γ·(−log p)
    return pos.mul_(-alpha).sub_(neg, alpha=1 - alpha)            # α·(1−p)^γ·(−log p) − (1−α)·p^γ·(−log(1−p))


# %% [markdown]
# ## Mask costs (Eq. 7 and Table 1b)
#
# Eq. 7 is a cosine similarity between the predicted embedding r̃ and the encoded GT g(m), shifted
# and halved into [0,1] and negated:
#
# $$\mathcal{C}_{mask}(\mathbf{m}_i, \tilde{\mathbf{r}}_{\sigma(i)}) = -\frac{1}{2}\lambda_{mask}\left(\langle
# \frac{\tilde{\mathbf{r}}_{\sigma(i)}}{\|\tilde{\mathbf{r}}_{\sigma(i)}\|_2}, \frac{g(\mathbf{m}_i)}{\|g(\mathbf{m}_i)\|_2}\rangle + 1\right) \tag{7}$$
#
# The official code
# computes exactly this (`ISTR@967c901:istr/loss.py`). It ignores the embeddings' lengths, so it
# compares mask *shapes* while the L2 loss takes care of magnitudes.
#
# The other rows of Table 1b: the L1 distance between embeddings (here averaged over the l
# dimensions so it does not grow with l), and the dice loss between the decoded masks f(r̃) and
# the GT crops, for all pairs at once via one matrix product: 1 − 2Σpt / (Σp² + Σt² + ε) — the
# squared-denominator dice of the code's `loss_dice` (Eq. 9), evaluated for every pair.

# %%
#| export
def cost_mask_cosine(pred_embed:torch.Tensor, # [...,P,l] predicted embeddings r̃
                     gt_embed:torch.Tensor, # [...,G,l] GT embeddings g(m) (leading dims broadcast, as in `torch.matmul`)
                    ) -> torch.Tensor: # [...,P,G] in [-1, 0]
    "C_mask of Eq. 7 (without λ): −(cos(r̃, g(m)) + 1)/2 for every (prediction, GT) pair."
    # the dot products of the raw embeddings divided by the product of their norms (each clamped as F.normalize does):
    # the same cosine as normalising first, and a compiler can fuse the division into the loop that reads the product
    eps = 1e-12
    norm_p = torch.linalg.vector_norm(pred_embed, dim=-1).clamp_min(eps)
    norm_g = torch.linalg.vector_norm(gt_embed, dim=-1).clamp_min(eps)
    cos = (pred_embed @ gt_embed.mT).div_(norm_p[..., :, None] * norm_g[..., None, :])
    return cos.mul_(-0.5).sub_(0.5)                               # = −(cos + 1)/2 to the last bit (×0.5 is exact)

def cost_mask_l1(pred_embed:torch.Tensor, # [P,l]
                 gt_embed:torch.Tensor, # [G,l]
                ) -> torch.Tensor: # [P,G]
    "Table 1b 'L1': mean absolute difference between embeddings."
    return torch.cdist(pred_embed, gt_embed, p=1) / pred_embed.shape[-1]

def cost_mask_dice(pred_masks:torch.Tensor, # [P,s,s] probabilities f(r̃)
                   gt_masks:torch.Tensor, # [G,s,s] binary GT crops
                   eps:float=1e-5, # keeps empty-vs-empty finite
                  ) -> torch.Tensor: # [P,G] in [0, 1]
    "Table 1b 'dice': squared-denominator dice loss between every predicted and every GT mask."
    p, t = pred_masks.flatten(1), gt_masks.flatten(1).to(pred_masks.dtype)
    inter = p @ t.T
    return 1 - 2 * inter / ((p * p).sum(1)[:, None] + (t * t).sum(1)[None, :] + eps)


# %% [markdown]
# ## The total cost, batched (Eq. 4)
#
# The matching is the permutation of the k predictions that minimises the summed cost over the n GT instances:
#
# $$\sigma^* = \arg\min_{\sigma} \sum_{i=1}^n \Big(\mathcal{C}_{box}(\mathbf{b}_i, \tilde{\mathbf{b}}_{\sigma(i)})
# + \mathcal{C}_{cls}(\mathbf{c}_i, \tilde{\mathbf{c}}_{\sigma(i)}) + \mathcal{C}_{mask}(\mathbf{m}_i, \tilde{\mathbf{r}}_{\sigma(i)})\Big) \tag{4}$$
#
# `matching_cost` builds the summand for every (prediction, GT) pair; `assign` below finds σ*. As in DETR's matcher, all B·Q predictions of the batch are scored against all G GT instances of
# the batch in one go — one [B·Q, G] matrix per term — and each image later keeps its own
# [Q, N_b] block. This is the shortest correct matcher; its off-diagonal blocks are wasted work (a
# factor ≈ B), which the compact layout after the assignment removes.

# %%
#| export
def matching_cost(pred:dict, # one stage: `logits` [B,Q,C], `boxes` [B,Q,4], `mask_embed` [B,Q,l] or `mask_logits` [B,Q,s,s]
                  targets:list, # B dicts: `boxes`, `labels`, `size`; with `masks_crop`/`mask_embed` (see `prepare_targets`) unless mask_cost='none'
                  cfg:MatchingConfig, # weights and switches
                  codec=None, # needed only for mask_cost='dice' with embeddings
                 ) -> tuple: # (total [B,Q,G], dict of unweighted terms, each [B·Q,G])
    "Eq. 4: λ-weighted sum of the class, box and mask costs between all predictions and all GT of the batch."
    B, Q = pred["logits"].shape[:2]
    dev = pred["boxes"].device
    sizes = torch.stack([torch.as_tensor(t["size"]) for t in targets]).to(dev)        # [B,2]
    counts = torch.as_tensor([len(t["labels"]) for t in targets], device=dev)
    gt_boxes = torch.cat([t["boxes"] for t in targets]).to(pred["boxes"].dtype)      # [G,4]
    labels = torch.cat([t["labels"] for t in targets])
    boxes = pred["boxes"].flatten(0, 1)                                              # [B·Q,4]
    terms = {
        "class": cost_class(pred["logits"].flatten(0, 1)[:, labels], cfg.class_cost, cfg.focal_alpha, cfg.focal_gamma),
    }
    terms["l1"], terms["giou"] = cost_box(normalize_boxes(boxes, sizes.repeat_interleave(Q, 0))[:, None],
                                          normalize_boxes(gt_boxes, sizes.repeat_interleave(counts, 0, output_size=len(labels)))[None])
    weights = {"class": cfg.weight_class, "l1": cfg.weight_l1, "giou": cfg.weight_giou, "mask": cfg.weight_mask}
    if cfg.mask_cost in ("cosine", "l1"):
        fn = cost_mask_cosine if cfg.mask_cost == "cosine" else cost_mask_l1
        r = pred_mask_embed(pred).flatten(0, 1)
        g = torch.cat([t["mask_embed"] for t in targets]).to(r.dtype)
        if r.shape[-1] != g.shape[-1]:
            raise ValueError(f"predicted mask embeddings have l={r.shape[-1]} but GT embeddings l={g.shape[-1]} (codec mismatch?)")
        terms["mask"] = fn(r, g)
    elif cfg.mask_cost == "dice":
        m = pred_mask_probs(pred, codec).flatten(0, 1)
        terms["mask"] = cost_mask_dice(m, torch.cat([t["masks_crop"] for t in targets]))
    total = sum(weights[k] * v for k, v in terms.items())
    return total.view(B, Q, -1), terms


# %% [markdown]
# ## The assignment
#
# `scipy.optimize.linear_sum_assignment` solves each image's rectangular [Q, N_b] problem exactly;
# Q ≥ N_b means every GT gets its own query. Guard rails, all raised *before* scipy sees the
# matrix: an image with more GT than queries (no permutation exists), and non-finite costs — the
# error names the image and the cost term that produced them (checked only when the total is bad,
# so the normal path has no extra device→host syncs). An image without GT gets empty index tensors.

# %%
#| export
def _empty_match():
    return torch.zeros(0, dtype=torch.int64), torch.zeros(0, dtype=torch.int64)

def assign(cost:np.ndarray, # [Q,N] one image's cost matrix
          ) -> tuple: # (pred_idx [N] int64, gt_idx [N] int64), sorted by pred_idx
    "The minimum-cost one-to-one assignment of N GT to Q ≥ N predictions (Hungarian algorithm, scipy)."
    if cost.shape[1] == 0:
        return _empty_match()
    rows, cols = linear_sum_assignment(cost)
    return torch.as_tensor(rows, dtype=torch.int64), torch.as_tensor(cols, dtype=torch.int64)

def cost_blocks(total:torch.Tensor, # [B,Q,G] batched total cost from `matching_cost`
                counts:list, # [B] python ints N_b, summing to G
               ) -> list: # B numpy arrays [Q,N_b]
    "Move the batched cost to the CPU once and cut out each image's own [Q,N_b] block."
    c = total.detach().float().cpu().numpy()
    starts = np.cumsum([0] + list(counts))
    return [c[b, :, starts[b]:starts[b + 1]] for b in range(len(counts))]


# %% [markdown]
# ## The same costs, only where they are used
#
# The batched matrix scores every query of the batch against every GT of the batch, but the
# assignment reads only each image's own block: Σ_b Q·N_b = Q·G of the B·Q·G entries, 1/B of them.
# The compact layout computes exactly those: one row per GT instance g (in image b_g) against the Q
# queries of its own image, a [G, Q] matrix whose rows are grouped by image. Every term is the same
# function as above, fed per-GT shapes:
#
# - class (Eq. 6): `logits[b_g, :, c_g]` — the GT class's logit of each query of g's image, [G,Q];
#   only these G·Q focal costs are computed, not all B·Q·C.
# - boxes (Eq. 5): the image's query boxes gathered per GT as [G,4,Q] (coordinates outermost, so
#   each coordinate is a contiguous [G,Q] plane) against the GT box [G,1,4].
# - mask (Eq. 7): the cosine needs l-dimensional dot products, a matrix product per image. The GT
#   embeddings are padded to [B, N_max, l] and multiplied with the queries [B, Q, l] in one batched
#   product; the valid rows are then picked out. The padding costs (B·N_max − G)·Q entries of one
#   term; the other terms have none.
#
# **One loop instead of thirty.** On a CPU the class and box terms are some thirty elementwise passes over [G,Q]
# planes (the profile of the benchmark batch: `sub`, `add`, `mul` and their temporaries take most of the eager cost),
# each reading and writing memory. `weighted_cost` writes Eq. 4's weighted sum as one expression of the same functions,
# and `torch.compile` (inductor's C++ backend, dynamic shapes so a new G does not recompile) turns it into one fused loop.
# The mask cosine goes into the same compiled function: its batched product stays a library call, while the division by
# the two norms, the affine map of Eq. 7 and the pick of each GT's row are read inside the loop, with no [B, N_max, Q]
# temporaries. (The class logits are gathered before it: an indexed read with stride C inside the loop was slower than
# the eager gather of `logits[b_g, :, c_g]`.)
# `cost_kernel='auto'` uses it on the CPU for problems of at least 64k pairs (a COCO batch has ~130k), where it pays for
# its one-time compile (tens of seconds per process and config); smaller problems, CUDA (not measured here) and a
# machine without a C++ compiler use the eager sum, which gives the same numbers (the test below pins them to 1e−5).
# torchvision has no fused pairwise GIoU + L1 + focal cost, so this is the one place the book asks a compiler for speed.
#
# It is still a handful of large tensor operations with no per-image Python and no device→host
# copy until the final [G,Q] total, so it suits a GPU as well as a CPU (where
# `benchmarks/bench_matching.py` measures it; `cost_layout='auto'` picks it everywhere). Each row
# block [N_b, Q] is the transpose of the batched layout's [Q, N_b] block, and scipy transposes a
# tall matrix to exactly this wide form before solving it, so the assignment is the same
# computation, not just the same optimum.

# %%
#| export
def _gt_index(counts:list, # [B] python ints N_b
              device, # where the index tensors go
             ) -> tuple: # (image of each GT [G], flat row of each GT in a [B·N_max] padding [G], N_max)
    "Which image each GT belongs to and where it sits in a per-image padding (host-side arithmetic, no device sync)."
    counts = np.asarray(counts, dtype=np.int64)
    n_max = int(counts.max(initial=0))
    image = np.repeat(np.arange(len(counts)), counts)
    within = np.arange(len(image)) - np.repeat(np.cumsum(counts) - counts, counts)
    as_t = lambda a: torch.from_numpy(a).to(device, non_blocking=True)
    return as_t(image), as_t(image * n_max + within), n_max

def weighted_cost(class_logits:torch.Tensor, # [G,Q] logit of each GT's class for each query of its image
                  pred_boxes:torch.Tensor, # [G,Q,4] normalised query boxes (see `cost_box`)
                  gt_boxes:torch.Tensor, # [G,1,4] normalised GT boxes
                  mask_cost:torch.Tensor|None, # [G,Q] unweighted C_mask, or None
                  cfg:MatchingConfig, # weights and the class-cost switch
                 ) -> torch.Tensor: # [G,Q] the total of Eq. 4
    "Eq. 4's weighted sum of the class, box and mask terms in one expression (what `fused_weighted_cost` compiles)."
    total = cost_class(class_logits, cfg.class_cost, cfg.focal_alpha, cfg.focal_gamma) * cfg.weight_class
    l1, giou = cost_box(pred_boxes, gt_boxes)
    total = total + l1 * cfg.weight_l1 + giou * cfg.weight_giou
    return total if mask_cost is None else total + mask_cost * cfg.weight_mask

def gathered_weighted_cost(class_logits:torch.Tensor, # [G,Q] logit of each GT's class for each query of its image
                           box_planes:torch.Tensor, # [B,4,Q] normalised query boxes, coordinates before queries
                           image:torch.Tensor, # [G] image of each GT
                           gt_boxes:torch.Tensor, # [G,1,4] normalised GT boxes
                           gt_embed_padded:torch.Tensor|None, # [B,N_max,l] GT embeddings in a per-image padding; None: no mask cost
                           pred_embed:torch.Tensor|None, # [B,Q,l] predicted embeddings r̃
                           padded_row:torch.Tensor, # [G] row of each GT in the flattened [B·N_max] padding
                           cfg:MatchingConfig,
                          ) -> torch.Tensor: # [G,Q]
    "`weighted_cost` with its per-GT gathers and the mask cost inside, so that a compiler reads the rows in the loop it fuses."
    mask = None
    if gt_embed_padded is not None:   # both mask costs are symmetric: GT first gives GT-major [B,N_max,Q] directly
        fn = cost_mask_cosine if cfg.mask_cost == "cosine" else cost_mask_l1
        mask = fn(gt_embed_padded, pred_embed).flatten(0, 1)[padded_row]
    return weighted_cost(class_logits, box_planes[image].transpose(1, 2), gt_boxes, mask, cfg)

_COMPILED = {}   # device type -> `gathered_weighted_cost` through torch.compile, or None once compiling failed there

def fused_weighted_cost(*args, device:torch.device) -> torch.Tensor|None: # `gathered_weighted_cost(*args)`, or None
    "`gathered_weighted_cost` compiled by `torch.compile` (dynamic shapes: one compile per process and config)."
    if device.type not in _COMPILED:
        _COMPILED[device.type] = torch.compile(gathered_weighted_cost, dynamic=True, fullgraph=True)
    fn = _COMPILED[device.type]
    if fn is None:
        return None
    try:
        with torch.no_grad():   # a matching cost needs no gradient, and one grad mode means one compiled graph per config
            return fn(*args)
    except Exception as e:   # no C++ compiler, or an unsupported platform: the eager sum gives the same numbers
        import warnings
        warnings.warn(f"segbook.matching: torch.compile failed ({type(e).__name__}: {str(e)[:160]}); "
                      "using the eager matching cost from now on")
        _COMPILED[device.type] = None
        return None

def matching_cost_compact(pred:dict, # one stage: `logits` [B,Q,C], `boxes` [B,Q,4], `mask_embed` [B,Q,l] or `mask_logits` [B,Q,s,s]
                          targets:list, # as for `matching_cost`
                          cfg:MatchingConfig, # weights and switches
                          codec=None, # needed only for mask_cost='dice' with embeddings
                         ) -> tuple: # (total [G,Q], dict of unweighted terms, each [G,Q]); rows grouped by image
    "Eq. 4 for each GT against the queries of its own image only: the diagonal blocks of `matching_cost`, transposed."
    B, Q = pred["logits"].shape[:2]
    dev, dtype = pred["boxes"].device, pred["boxes"].dtype
    image, padded_row, n_max = _gt_index([len(t["labels"]) for t in targets], dev)
    labels = torch.cat([t["labels"] for t in targets]).to(dev)
    gt_boxes = torch.cat([t["boxes"] for t in targets]).to(dev, dtype)                   # [G,4]
    sizes = torch.stack([torch.as_tensor(t["size"]) for t in targets]).to(dev)           # [B,2]
    box_planes = normalize_boxes(pred["boxes"], sizes[:, None]).transpose(1, 2).contiguous()   # [B,4,Q]
    gt_n = normalize_boxes(gt_boxes, sizes[image])[:, None]                                  # [G,1,4]
    kernel = cfg.cost_kernel
    if kernel == "auto":
        kernel = "compiled" if dev.type == "cpu" and len(labels) * Q >= 65536 else "eager"
    if cfg.mask_cost == "dice":   # the Table 1b ablation decodes masks per image: always the eager sum
        kernel = "eager"
    terms, mask_padded, g_pad, r = {}, None, None, None
    if cfg.mask_cost in ("cosine", "l1"):
        r = pred_mask_embed(pred)                                                        # [B,Q,l]
        g = torch.cat([t["mask_embed"] for t in targets]).to(dev, r.dtype)               # [G,l]
        if r.shape[-1] != g.shape[-1]:
            raise ValueError(f"predicted mask embeddings have l={r.shape[-1]} but GT embeddings l={g.shape[-1]} (codec mismatch?)")
        g_pad = g.new_zeros(B * n_max, g.shape[-1]).index_copy_(0, padded_row, g).view(B, n_max, -1)
    class_logits = pred["logits"][image, :, labels]                                          # [G,Q]: 3x faster than via [B,C,Q]
    if kernel == "compiled":   # one fused loop; the unweighted terms are not kept (`hungarian_match` recomputes them on error)
        total = fused_weighted_cost(class_logits, box_planes, image, gt_n, g_pad, r, padded_row, cfg, device=dev)
        if total is not None:
            return total, {}
    if g_pad is not None:
        fn = cost_mask_cosine if cfg.mask_cost == "cosine" else cost_mask_l1
        # both mask costs are symmetric in their two arguments: GT first gives GT-major [B,N_max,Q] directly
        mask_padded = fn(g_pad, r).view(B * n_max, Q)
    elif cfg.mask_cost == "dice":                                                        # Table 1b ablation: per image
        m, gt = pred_mask_probs(pred, codec), torch.cat([t["masks_crop"] for t in targets]).to(dev)
        starts = np.cumsum([0] + [len(t["labels"]) for t in targets])
        terms["mask"] = torch.cat([cost_mask_dice(m[b], gt[starts[b]:starts[b + 1]]).T for b in range(B)])
    if mask_padded is not None and "mask" not in terms:
        terms["mask"] = mask_padded.index_select(0, padded_row)                              # index_select: 7x faster than [ ] here
    # query boxes gathered for each GT's image, coordinates outermost: four contiguous [G,Q] planes
    boxes = box_planes.index_select(0, image).transpose(1, 2)
    terms["class"] = cost_class(class_logits, cfg.class_cost, cfg.focal_alpha, cfg.focal_gamma)
    terms["l1"], terms["giou"] = cost_box(boxes, gt_n)
    weights = {"class": cfg.weight_class, "l1": cfg.weight_l1, "giou": cfg.weight_giou, "mask": cfg.weight_mask}
    total = terms["class"] * weights["class"]
    for k in ("l1", "giou", "mask"):
        if k in terms:
            total.add_(terms[k], alpha=weights[k])
    return total, {k: terms[k] for k in ("class", "l1", "giou", "mask") if k in terms}

def assign_rows(cost:np.ndarray, # [N,Q] one image's cost matrix, one row per GT (a compact-layout block)
               ) -> tuple: # (pred_idx [N] int64, gt_idx [N] int64), sorted by pred_idx
    "`assign(cost.T)` without its transposed copy: the same Hungarian solve on the wide [N,Q] form."
    if cost.shape[0] == 0:
        return _empty_match()
    gt, q = linear_sum_assignment(cost)
    order = np.argsort(q)
    return torch.from_numpy(q[order].astype(np.int64)), torch.from_numpy(gt[order].astype(np.int64))


# %% [markdown]
# `hungarian_match` runs either layout; both end in one device→host copy of the total cost.

# %%
#| export
@torch.no_grad()
def hungarian_match(pred:dict, # one stage's predictions (see `matching_cost`)
                    targets:list, # B target dicts
                    cfg:MatchingConfig=None, # defaults to `MatchingConfig()`
                    codec=None, # mask codec (encodes GT crops; decodes r̃ for mask_cost='dice')
                   ) -> list: # B tuples (pred_idx [N_b] int64, gt_idx [N_b] int64)
    "σ* of Eq. 4 for every image of the batch: costs in one layout (compact or batched), one assignment per image."
    cfg = cfg or MatchingConfig()
    B, Q = pred["logits"].shape[:2]
    if len(targets) != B:
        raise ValueError(f"predictions are for {B} images but {len(targets)} targets were given")
    counts = [len(t["labels"]) for t in targets]
    for b, n in enumerate(counts):
        if n > Q:
            raise ValueError(f"image {b} has {n} ground-truth instances but only {Q} queries: "
                             "a one-to-one matching needs Q >= N (raise the number of queries)")
    if sum(counts) == 0:
        return [_empty_match() for _ in range(B)]
    if cfg.mask_cost != "none":
        targets = prepare_targets(targets, cfg.mask_size, codec if uses_codec(pred) else None)
    starts = np.cumsum([0] + counts)
    if cfg.cost_layout == "batched":
        total, terms = matching_cost(pred, targets, cfg, codec)
        blocks, solve = cost_blocks(total, counts), assign
        terms_of = lambda b: {k: v.view(B, Q, -1)[b, :, starts[b]:starts[b + 1]] for k, v in terms.items()}
    else:
        total, terms = matching_cost_compact(pred, targets, cfg, codec)
        whole = total.detach().cpu().numpy()                                       # the one device→host copy (scipy solves in float64)
        blocks, solve = [whole[starts[b]:starts[b + 1]] for b in range(B)], assign_rows
        if not terms and not np.isfinite(whole).all():                              # the fused kernel kept no terms: name them now
            terms = matching_cost_compact(pred, targets, dataclasses.replace(cfg, cost_kernel="eager"), codec)[1]
        terms_of = lambda b: {k: v[starts[b]:starts[b + 1]] for k, v in terms.items()}
    if cfg.cost_layout == "batched" or not np.isfinite(whole).all():           # compact: one check of the whole [G,Q]
        for b, c in enumerate(blocks):
            if not np.isfinite(c).all():
                bad = [k for k, v in terms_of(b).items() if not torch.isfinite(v).all()]
                raise ValueError(f"non-finite matching cost for image {b} from term(s) {bad or ['weighted sum']}: "
                                 "check that image's predictions (NaN logits/boxes/embeddings?) and GT boxes")
    return [solve(c) for c in blocks]


# %% [markdown]
# ## Example: a batch of two images
#
# A stand-in codec (`PCACodec.random_orthonormal`: a random orthonormal basis D, encode = flatten·D,
# decode = clamp(r·Dᵀ)) keeps this chapter independent of any fitted codec. Image 0 has three objects; queries 4, 1 and 6 are noisy
# copies of them, everything else is random. Image 1 has no objects.

# %%
torch.set_num_threads(1)  # the examples are tiny: one thread avoids OpenMP overhead on small CPUs

def rect_masks(boxes, h, w):
    "Binary masks filling each box (a toy GT)."
    ys, xs = torch.arange(h)[:, None] + 0.5, torch.arange(w)[None] + 0.5
    return torch.stack([((xs >= x0) & (xs < x1) & (ys >= y0) & (ys < y1)) for x0, y0, x1, y1 in boxes.tolist()]).to(torch.uint8)

torch.manual_seed(0)
from segbook.embeddings import PCACodec
codec = PCACodec.random_orthonormal(size=28, dim=16)
H, W, Q, C = 64, 96, 8, 5
gt_boxes = torch.tensor([[4., 4, 30, 40], [40, 10, 90, 30], [20, 35, 60, 62]])
targets = [dict(boxes=gt_boxes, labels=torch.tensor([1, 3, 0]), size=torch.tensor([H, W]), masks=rect_masks(gt_boxes, H, W)),
           dict(boxes=torch.zeros(0, 4), labels=torch.zeros(0, dtype=torch.int64), size=torch.tensor([H, W]),
                masks=torch.zeros(0, H, W, dtype=torch.uint8))]
gt_embed = prepare_targets(targets, 28, codec)[0]["mask_embed"]

def noisy_prediction(targets, slots, Q, C, l, noise=0.1):
    "A batch of predictions: random, except query slots[b][i] ≈ GT i of image b."
    B = len(targets)
    logits = torch.randn(B, Q, C) - 3
    boxes = torch.rand(B, Q, 2).mul(40).repeat(1, 1, 2) + torch.tensor([0., 0, 20, 20])
    embed = torch.randn(B, Q, l)
    for b, (t, sl) in enumerate(zip(targets, slots)):
        if len(sl):
            e = prepare_targets([t], 28, codec)[0]["mask_embed"]
            logits[b, sl, t["labels"]] = 4.0
            boxes[b, sl] = t["boxes"] + noise * 20 * torch.randn_like(t["boxes"])
            embed[b, sl] = e + noise * torch.randn_like(e)
    return dict(logits=logits, boxes=boxes, mask_embed=embed)

pred = noisy_prediction(targets, [[4, 1, 6], []], Q, C, 16)
indices = hungarian_match(pred, targets, MatchingConfig(), codec)
indices

# %%
assert indices[0][0].tolist() == [1, 4, 6] and indices[0][1].tolist() == [1, 0, 2]  # query 4 ↔ GT 0, 1 ↔ 1, 6 ↔ 2
assert indices[1][0].numel() == 0 and indices[1][0].dtype == torch.int64            # image without GT
for mc in ("none", "dice", "l1", "cosine"):                                         # every Table 1b cost finds the planted pairs
    assert hungarian_match(pred, targets, MatchingConfig(mask_cost=mc), codec)[0][0].tolist() == [1, 4, 6], mc
assert hungarian_match(pred, targets, MatchingConfig(class_cost="prob"), codec)[0][0].tolist() == [1, 4, 6]

# %% [markdown]
# The two layouts agree: the compact rows are the batched matrix's diagonal blocks, transposed, and
# give the same assignment; the elementwise GIoU is torchvision's.

# %%
from torchvision.ops import generalized_box_iou

tt = prepare_targets(targets, 28, codec)
full, _ = matching_cost(pred, tt, MatchingConfig(), codec)
rows, _ = matching_cost_compact(pred, tt, MatchingConfig(), codec)
assert rows.shape == (3, Q) and torch.allclose(rows, full[0, :, :3].T, atol=1e-5)
for mc in ("none", "dice", "l1", "cosine"):
    a = hungarian_match(pred, targets, MatchingConfig(mask_cost=mc, cost_layout="batched"), codec)
    b = hungarian_match(pred, targets, MatchingConfig(mask_cost=mc, cost_layout="compact"), codec)
    assert all(torch.equal(x, y) for u, v in zip(a, b) for x, y in zip(u, v)), mc
assert torch.allclose(-cost_box(pred["boxes"][0][:, None], gt_boxes[None])[1], generalized_box_iou(pred["boxes"][0], gt_boxes), atol=1e-6)

# %% [markdown]
# The assignment is optimal: on small random problems, brute force over every injective map from
# GT to queries finds no cheaper one.

# %%
import itertools

def brute_force_cost(c):
    "Minimum total cost over all injective GT→query maps of a [Q,N] matrix."
    Q, N = c.shape
    return min(sum(c[q, n] for n, q in enumerate(perm)) for perm in itertools.permutations(range(Q), N))

g = torch.Generator().manual_seed(1)
for trial in range(20):
    Q_, N_ = int(torch.randint(1, 7, (1,), generator=g)), 0
    N_ = int(torch.randint(0, min(Q_, 4) + 1, (1,), generator=g))
    c = torch.rand(Q_, N_, generator=g).numpy()
    p, gi = assign(c)
    assert len(set(p.tolist())) == N_ and sorted(gi.tolist()) == list(range(N_))
    assert abs(c[p, gi].sum() - (brute_force_cost(c) if N_ else 0.0)) < 1e-9


# %% [markdown]
# Bad input fails with a message that says what and where.

# %%
def raises(fn, *words):
    try: fn()
    except ValueError as e:
        assert all(w in str(e) for w in words), str(e); return True
    return False

few = {k: v[:, :2] for k, v in pred.items()}  # 2 queries, 3 GT
assert raises(lambda: hungarian_match(few, targets, MatchingConfig(), codec), "image 0", "3 ground-truth", "2 queries")
bad = dict(pred, mask_embed=pred["mask_embed"].clone()); bad["mask_embed"][0, 5] = float("nan")
assert raises(lambda: hungarian_match(bad, targets, MatchingConfig(), codec), "image 0", "mask")
bad = dict(pred, boxes=pred["boxes"].clone()); bad["boxes"][0, 2, 0] = float("inf")
assert raises(lambda: hungarian_match(bad, targets, MatchingConfig(), codec), "image 0", "l1")

# %% [markdown]
# ## Figure: the cost terms on a real COCO image
#
# One coco-mini val image. "Predictions" are its GT instances with jittered boxes, noisy class
# logits and noisy embeddings, plus four random queries, in shuffled order. The codec is a quick
# PCA (l = 20, closed-form `eigh` of the covariance of the split's 28×28 GT-box crops, mean
# subtracted; chapter 02 builds the real one). Each heat-map is one term of Eq. 4 over
# queries × GT; the red rings mark σ*.

# %%
import os
from pathlib import Path

from segbook.data import find_coco_mini

COCO_MINI = find_coco_mini() or Path("shared/coco-mini")  # absent: the cells that need it skip
COCO_MINI.exists()

# %%
if COCO_MINI.exists():
    from PIL import Image
    from pycocotools.coco import COCO
    from segbook.embeddings import crop_and_resize_masks
    import contextlib, io
    with contextlib.redirect_stdout(io.StringIO()):
        coco = COCO(str(COCO_MINI / "annotations" / "instances_val2017.json"))
    cat_index = {c: i for i, c in enumerate(sorted(coco.getCatIds()))}

    def coco_target(img_id):
        "GT boxes (xyxy), contiguous labels and full-image masks of one image, crowd excluded."
        info = coco.loadImgs(img_id)[0]
        anns = [a for a in coco.loadAnns(coco.getAnnIds(imgIds=img_id, iscrowd=False)) if a["bbox"][2] > 1 and a["bbox"][3] > 1]
        boxes = torch.tensor([a["bbox"] for a in anns], dtype=torch.float32).view(-1, 4)
        boxes[:, 2:] += boxes[:, :2]
        masks = torch.from_numpy(np.stack([coco.annToMask(a) for a in anns])) if anns else torch.zeros(0, info["height"], info["width"], dtype=torch.uint8)
        return dict(boxes=boxes, labels=torch.tensor([cat_index[a["category_id"]] for a in anns], dtype=torch.int64),
                    size=torch.tensor([info["height"], info["width"]]), masks=masks), info

    crops = torch.cat([crop_and_resize_masks(t["masks"], t["boxes"], 28) for t, _ in map(coco_target, coco.getImgIds())])
    from segbook.embeddings import MaskMoments
    pca = PCACodec.from_moments(MaskMoments(28).update(crops), dim=20, mean=True)  # Eq. 3, centred (code switch)
    img_id = next(i for i in sorted(coco.getImgIds()) if 5 <= len(coco.getAnnIds(imgIds=i, iscrowd=False)) <= 7)
    target, info = coco_target(img_id)
    crops.shape, len(target["labels"])

# %%
if COCO_MINI.exists():
    g = torch.Generator().manual_seed(0)
    t = prepare_targets([target], 28, pca)[0]
    N, C, extra = len(t["labels"]), 80, 4
    Q = N + extra
    wh = (t["boxes"][:, 2:] - t["boxes"][:, :2]).repeat(1, 2)
    H_, W_ = info["height"], info["width"]
    logits = torch.randn(Q, C, generator=g) - 4
    logits[torch.arange(N), t["labels"]] = 1.5 + torch.randn(N, generator=g)
    jittered = t["boxes"] + 0.12 * wh * torch.randn(N, 4, generator=g)
    xy = torch.rand(extra, 2, generator=g) * torch.tensor([W_ * 0.6, H_ * 0.6])
    boxes = torch.cat([jittered, torch.cat([xy, xy + torch.tensor([W_ * 0.3, H_ * 0.3])], 1)])
    spread = t["mask_embed"].std()
    embed = torch.cat([t["mask_embed"] + 0.5 * spread * torch.randn(N, 20, generator=g), spread * torch.randn(extra, 20, generator=g)])
    order = torch.randperm(Q, generator=g)                  # query q holds planted object order[q] (≥ N: random)
    fig_pred = {k: v[order][None] for k, v in dict(logits=logits, boxes=boxes, mask_embed=embed).items()}
    total, terms = matching_cost(fig_pred, [t], MatchingConfig(), pca)
    q_idx, g_idx = hungarian_match(fig_pred, [t], MatchingConfig(), pca)[0]
    assert (order[q_idx] == g_idx).all()                    # σ* finds every planted query
    list(zip(q_idx.tolist(), g_idx.tolist()))

# %%
if COCO_MINI.exists():
    import matplotlib.pyplot as plt
    from matplotlib.patches import Rectangle
    from segbook.viz import draw_instances, save_figure

    cfg = MatchingConfig()
    names = [c["name"] for c in coco.loadCats(sorted(coco.getCatIds()))]
    panels = [("class (Eq. 6, focal)", cfg.weight_class, terms["class"]), ("L1 (Eq. 5)", cfg.weight_l1, terms["l1"]),
              ("−GIoU (Eq. 5)", cfg.weight_giou, terms["giou"]), ("mask cosine (Eq. 7)", cfg.weight_mask, terms["mask"]),
              ("total (Eq. 4)", 1.0, total[0])]
    fig, axes = plt.subplots(2, 3, figsize=(12, 7.5))
    image = np.asarray(Image.open(COCO_MINI / "val2017" / info["file_name"]).convert("RGB"))
    ax = axes[0, 0]
    ax.imshow(draw_instances(image, t["masks"], t["boxes"], [f"GT{i} {names[c]}" for i, c in enumerate(t["labels"].tolist())]))
    for q, gi in zip(q_idx.tolist(), g_idx.tolist()):
        x0, y0, x1, y1 = fig_pred["boxes"][0, q].tolist()
        ax.add_patch(Rectangle((x0, y0), x1 - x0, y1 - y0, fill=False, ls="--", lw=1.2, ec="white"))
        ax.text(x0, y1, f"q{q}→GT{gi}", color="white", fontsize=7, va="top", bbox=dict(fc="black", alpha=0.5, lw=0, pad=1))
    ax.set_title(f"coco val {img_id}: GT (colour), matched queries (dashed)", fontsize=9); ax.axis("off")
    for ax, (title, w_, m) in zip(axes.flat[1:], panels):
        im = ax.imshow((w_ * m).numpy(), cmap="viridis", aspect="auto")
        ax.scatter(g_idx, q_idx, s=90, facecolors="none", edgecolors="red", lw=1.5)
        ax.set_title(f"{w_:g} · {title}" if w_ != 1 else title, fontsize=9)
        ax.set_xlabel("GT instance"); ax.set_ylabel("query")
        ax.set_xticks(range(N)); ax.set_yticks(range(Q))
        fig.colorbar(im, ax=ax, fraction=0.046)
    fig.tight_layout()
    save_figure(fig, "matching_costs.png");

# %% [markdown]
# What to see: one row per query and one column per GT; the red circles mark σ*, computed from the total, and in every
# column they fall on one of its darkest (lowest) cells. The class term alone cannot separate two GT of the same class —
# it depends only on the query's logit for that class, so their columns are identical — which is why Eq. 4 adds the box
# and mask terms.
