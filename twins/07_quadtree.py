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
# # The point quadtree (Mask Transfiner §3.2)
#
# > RoI pyramid levels, a quadtree of incoherent nodes over the 28/56/112 grids as boolean masks, node sequences for training and inference, coarse-to-fine propagation, and the oracle half of Transfiner Table 1. Sampling FPN features at the nodes is the next chapter, `07b_gather`.

# %%
#| default_exp quadtree

# %%
#| export
from typing import NamedTuple, Optional

import torch
import torch.nn.functional as F
from torchvision.models.detection.roi_heads import paste_masks_in_image
from torchvision.ops.poolers import LevelMapper

from segbook.incoherent import crop_masks, incoherent_pyramid


# %% [markdown]
# ## The RoI feature pyramid: which FPN level feeds which grid
#
# Transfiner pools an RoI at three sizes, 28², 56², 112², from three FPN levels $\{P_i, P_{i-1}, P_{i-2}\}$.
# The starting level is FPN's rule (FPN Eq. 1, restated in Transfiner §3.3):
# $i = \lfloor i_0 + \log_2(\sqrt{WH}/224) \rfloor$ with $i_0 = 4$, clamped to the available $P_2$–$P_5$.
# torchvision's `LevelMapper` already implements that rule (with its small epsilon against
# round-off), so we use it and only add the two finer levels, clamped at $P_2$ as the official
# code does (method-details §8). Note the code pools one level further down (14² at $P_i$, then
# 28/56/112 at $P_{i-1..i-3}$); the offset is the `first_offset` switch.

# %%
#| export
def roi_pyramid_levels(boxes:torch.Tensor, # [R,4] xyxy in input-image pixels
                       num_levels:int=3, # grids 28, 56, 112, ...
                       first_offset:int=0, # 0: paper (28² from P_i); 1: official code (28² from P_{i-1})
                       canonical_size:int=224, canonical_level:int=4, # FPN Eq. 1 constants
                       min_level:int=2, max_level:int=5, # available FPN levels P2..P5
                      ) -> torch.Tensor: # [R,num_levels] int64 FPN level numbers k of P_k, coarse grid first
    "FPN level feeding each grid of the RoI pyramid: P_i, P_{i-1}, ... from the FPN rule, clamped to P_min."
    mapper = LevelMapper(min_level, max_level, canonical_size, canonical_level)
    i = mapper([boxes]) + min_level                                       # [R] in min..max
    steps = torch.arange(num_levels, device=boxes.device) + first_offset
    return (i[:, None] - steps[None]).clamp(min=min_level)


# %%
b = torch.tensor([[0, 0, 224, 224], [0, 0, 112, 112], [0, 0, 32, 32], [0, 0, 900, 900.]])
print(roi_pyramid_levels(b))

# %%
lv = roi_pyramid_levels(b)
assert lv.tolist() == [[4, 3, 2], [3, 2, 2], [2, 2, 2], [5, 4, 3]]
assert roi_pyramid_levels(b, first_offset=1).tolist() == [[3, 2, 2], [2, 2, 2], [2, 2, 2], [4, 3, 2]]
assert roi_pyramid_levels(torch.tensor([[0, 0, 223.9, 224.1]]))[0, 0] == 4  # sqrt area ~224 stays on P4


# %% [markdown]
# ## Building the tree with boolean masks
#
# The roots are the incoherent cells of the coarsest grid; a cell of the next grid is a node when it is
# incoherent **and** its parent (the cell `(y//2, x//2)` one level up) is a node — "the expansion of
# incoherent tree nodes is restricted in regions corresponding to the incoherent predictions at the
# previous coarse level" (§3.2). As masks:
#
# $$\text{node}_1 = \text{inc}_1,\qquad \text{node}_{l+1} = \text{inc}_{l+1} \wedge \mathcal{S}_\uparrow(\text{node}_l)\qquad (\text{subdivision rule, §3.2})$$
#
# That is a whole tree for a batch of RoIs with two tensor ops per level and no host sync; the tree
# structure is implicit, since the parent of node $(l, y, x)$ is $(l-1, \lfloor y/2\rfloor, \lfloor x/2\rfloor)$
# and is guaranteed to be a node.

# %%
#| export
def build_quadtree(incoherent_maps:list, # per level, coarse to fine: [N,s,s] bool with s doubling (28, 56, 112)
                  ) -> list: # per level: [N,s,s] bool node masks
    "Quadtree node masks: roots = incoherent cells of the coarsest grid; finer nodes only under node parents."
    nodes = [incoherent_maps[0].bool()]
    for inc in incoherent_maps[1:]:
        prev = nodes[-1]
        if inc.shape[-2:] != (2 * prev.shape[-2], 2 * prev.shape[-1]) or inc.shape[0] != prev.shape[0]:
            raise ValueError(f"incoherent_maps: level of shape {tuple(inc.shape)} is not twice {tuple(prev.shape)}")
        parent = prev.repeat_interleave(2, -2).repeat_interleave(2, -1)          # S_up, nearest
        nodes.append(inc.bool() & parent)
    return nodes


# %%
g = torch.Generator().manual_seed(0)
inc = [torch.rand(2, s, s, generator=g) < 0.3 for s in (4, 8, 16)]
tree = build_quadtree(inc)
assert all(t.shape == i.shape for t, i in zip(tree, inc))
assert torch.equal(tree[0], inc[0])
for l in (1, 2):
    ys, xs = torch.meshgrid(torch.arange(tree[l].shape[-1]), torch.arange(tree[l].shape[-1]), indexing="ij")
    n, y, x = tree[l].nonzero().unbind(1)
    assert tree[l - 1][n, y // 2, x // 2].all()                      # every node has a node parent
    assert (tree[l] <= inc[l]).all() and tree[l].sum() < inc[l].sum()  # a subset, strictly smaller here
try: build_quadtree([inc[0], inc[2]]); raise AssertionError
except ValueError as e: assert "twice" in str(e)


# %% [markdown]
# ## One node sequence per RoI
#
# All levels of one RoI are refined jointly, as a single sequence. A `NodeSequence` is a padded batch:
# `[N,K]` tensors giving each token its RoI, level, grid cell `(y, x)` and whether it is real. A detector
# consumes it directly (flatten it for `gather_points`, use `~valid` as the attention padding mask).
#
# **Training** (supp. §A): a random permutation of each level's nodes, the first 100 kept (the code
# keeps 150: `num_per_level`), tiled when there are fewer, so every RoI has the same length. We draw
# random scores, keep the top `num_per_level` (ties impossible), and index them modulo the node count —
# fixed shapes, no host sync. An RoI with fewer than `min_nodes` on some level is marked invalid
# (the code skips such RoIs with `min_nodes=10`).

# %%
#| export
class NodeSequence(NamedTuple):
    "A padded batch of quadtree nodes: one row of K tokens per RoI, all levels in one sequence."
    roi: torch.Tensor    # [N,K] int64 RoI index
    level: torch.Tensor  # [N,K] int64 level index into sizes (0 = coarsest)
    yx: torch.Tensor     # [N,K,2] int64 cell in that level's grid
    valid: torch.Tensor  # [N,K] bool, False for padding
    score: Optional[torch.Tensor] = None    # [N,K] confidence used for selection (inference)
    dropped: Optional[torch.Tensor] = None  # [] int64 nodes dropped by the caps (inference)

def sample_nodes(node_masks:list, # per level [N,s,s] bool (from build_quadtree)
                 num_per_level:int=100, # paper 100, official code 150
                 min_nodes:int=1, # an RoI with fewer nodes on any level is invalid (code: 10)
                 generator:Optional[torch.Generator]=None,
                ) -> NodeSequence: # K = levels * num_per_level
    "Training sampling: per level a random permutation of the nodes, first `num_per_level`, tiled when fewer."
    rois, levels, yxs, valids, counts = [], [], [], [], []
    n = node_masks[0].shape[0]
    dev = node_masks[0].device
    for l, m in enumerate(node_masks):
        s = m.shape[-1]
        flat = m.reshape(n, -1)
        r = torch.rand(flat.shape, generator=generator, device="cpu").to(dev)
        top = torch.where(flat, r, r - 2.0).topk(min(num_per_level, flat.shape[1]), dim=1).indices  # nodes first, shuffled
        count = flat.sum(1)                                                                           # [N]
        j = torch.arange(num_per_level, device=dev)[None] % count.clamp(min=1)[:, None]              # tile
        cell = top.gather(1, j.clamp(max=top.shape[1] - 1))
        rois.append(torch.arange(n, device=dev)[:, None].expand(n, num_per_level))
        levels.append(torch.full((n, num_per_level), l, device=dev))
        yxs.append(torch.stack([cell // s, cell % s], -1))
        valids.append((count > 0)[:, None].expand(n, num_per_level))
        counts.append(count)
    roi_ok = (torch.stack(counts, 1) >= min_nodes).all(1)
    valid = torch.cat(valids, 1) & roi_ok[:, None]
    return NodeSequence(torch.cat(rois, 1), torch.cat(levels, 1), torch.cat(yxs, 1), valid)


# %%
seq = sample_nodes(tree, num_per_level=20, generator=torch.Generator().manual_seed(1))
print(seq.yx.shape, seq.valid.float().mean().item())

# %%
assert seq.roi.shape == (2, 60) and seq.yx.shape == (2, 60, 2)
for i in range(2):
    for l in range(3):
        sel = seq.level[i] == l
        y, x = seq.yx[i, sel].unbind(-1)
        assert tree[l][i, y, x].all()                                   # only nodes are sampled
        k = int(tree[l][i].sum())
        assert len(set(zip(y.tolist(), x.tolist()))) == min(k, 20)      # distinct until the level runs out, then tiled
one = [torch.zeros(1, 4, 4, dtype=torch.bool), torch.zeros(1, 8, 8, dtype=torch.bool)]
one[0][0, 1, 1] = True; one[1][0, 2, 3] = True
s1 = sample_nodes(one, num_per_level=5)
assert s1.valid.all() and (s1.yx[0, :5] == torch.tensor([1, 1])).all() and (s1.yx[0, 5:] == torch.tensor([2, 3])).all()
assert not sample_nodes(one, num_per_level=5, min_nodes=2).valid.any()  # code-style skip of sparse RoIs


# %% [markdown]
# **Inference** refines every detected node. For a memory-safe batch we pad to a static length with two
# optional caps: `max_per_roi` (tokens per RoI) and `max_total` (tokens in the whole batch). Past a cap,
# the **lowest-confidence** nodes are dropped (confidence = the incoherence detector's probability;
# without scores coarser levels win, since they cover more pixels) and the number dropped is returned
# in `dropped` so the caller can log it; dropped nodes keep their propagated coarse value. Without
# `max_per_roi` the padded length is the largest node count in the batch, which needs one host sync
# (reading that count); with it, shapes are static and nothing syncs. Selected nodes are ordered
# coarse to fine, row-major, padding last.

# %%
#| export
def select_nodes(node_masks:list, # per level [N,s,s] bool
                 scores:Optional[list]=None, # per level [N,s,s] confidence (e.g. detector probabilities)
                 max_per_roi:Optional[int]=None, # cap on tokens per RoI; None = all (one host sync for the length)
                 max_total:Optional[int]=None, # cap on valid tokens in the batch (memory budget)
                ) -> NodeSequence:
    "Inference node sequence: all nodes of every RoI (coarse to fine), optionally capped by confidence."
    n = node_masks[0].shape[0]
    dev = node_masks[0].device
    sizes = [m.shape[-1] for m in node_masks]
    flat = torch.cat([m.reshape(n, -1) for m in node_masks], 1)                       # [N,T]
    if scores is None:
        sc = torch.cat([torch.full((n, s * s), -float(l), device=dev) for l, s in enumerate(sizes)], 1)
    else:
        sc = torch.cat([p.reshape(n, -1).float() for p in scores], 1)
    sc = torch.where(flat, sc, torch.full_like(sc, -float("inf")))
    total = flat.sum(1)
    k = int(total.max()) if max_per_roi is None else min(max_per_roi, flat.shape[1])  # host sync only without a cap
    k = max(k, 1)
    top = sc.topk(k, dim=1)
    valid = top.values > -float("inf")
    if max_total is not None and max_total < valid.numel():
        keep = torch.zeros(valid.numel(), dtype=torch.bool, device=dev)
        keep[top.values.flatten().topk(max_total).indices] = True
        valid = valid & keep.view_as(valid)
    dropped = total.sum() - valid.sum()
    big = flat.shape[1]
    idx = torch.where(valid, top.indices, torch.full_like(top.indices, big)).sort(1).values  # coarse->fine, padding last
    valid = idx < big
    idx = idx.clamp(max=big - 1)
    offsets = torch.tensor([0] + [s * s for s in sizes], device=dev).cumsum(0)
    level = torch.bucketize(idx, offsets[1:], right=True)
    cell = idx - offsets[level]
    size = torch.tensor(sizes, device=dev)[level]
    score = sc.gather(1, idx)
    return NodeSequence(torch.arange(n, device=dev)[:, None].expand(n, k), level,
                        torch.stack([cell // size, cell % size], -1), valid, score, dropped)

def trim_padding(nodes:NodeSequence) -> NodeSequence: # the same nodes, K cut to the longest RoI's count
    "Drop the padding columns `select_nodes` leaves under a cap (it pads every RoI to the cap): one host sync."
    k = max(1, int(nodes.valid.sum(1).max()))
    return NodeSequence(*(t[:, :k] if t is not None and t.dim() >= 2 else t for t in nodes))

def nodes_to_masks(nodes:NodeSequence, # a node sequence
                   sizes, # grid side per level, e.g. (28, 56, 112)
                  ) -> list: # per level [N,s,s] bool
    "Dense masks of the valid nodes of `nodes` (the inverse of selection)."
    n = nodes.roi.shape[0]
    out = []
    for l, s in enumerate(sizes):
        on = nodes.valid & (nodes.level == l)
        idx = torch.where(on, nodes.yx[..., 0] * s + nodes.yx[..., 1], torch.full_like(nodes.roi, s * s))
        m = torch.zeros(n, s * s + 1, dtype=torch.bool, device=nodes.roi.device).scatter(1, idx, True)
        out.append(m[:, :-1].view(n, s, s))
    return out

def values_at_nodes(grids:list, # per level [N,s,s] values (e.g. GT mask crops, coarse probabilities)
                    nodes:NodeSequence,
                   ) -> torch.Tensor: # [N,K] value of each token's cell on its own level (0 for padding)
    "Read per-level dense grids at the nodes: e.g. the GT labels of the nodes for the refinement loss."
    out = grids[0].new_zeros(nodes.valid.shape)
    for l, g in enumerate(grids):
        s = g.shape[-1]
        on = nodes.valid & (nodes.level == l)
        idx = torch.where(on, nodes.yx[..., 0] * s + nodes.yx[..., 1], torch.zeros_like(nodes.roi))
        out = torch.where(on, g.reshape(g.shape[0], -1).gather(1, idx), out)
    return out


# %%
allnodes = select_nodes(tree)
print(allnodes.yx.shape, int(allnodes.dropped))

# %%
assert all(torch.equal(a, b) for a, b in zip(nodes_to_masks(allnodes, (4, 8, 16)), tree))  # nothing lost
grids = [torch.arange(2 * s * s, dtype=torch.float).view(2, s, s) for s in (4, 8, 16)]
v = values_at_nodes(grids, allnodes)
i, k = allnodes.valid.nonzero()[-1].tolist()
l, (y, x) = int(allnodes.level[i, k]), allnodes.yx[i, k].tolist()
assert v[i, k] == grids[l][i, y, x] and (v[~allnodes.valid] == 0).all()
assert int(allnodes.dropped) == 0 and allnodes.valid.sum() == sum(t.sum() for t in tree)
lvl0 = allnodes.level[0][allnodes.valid[0]]
assert (lvl0.diff() >= 0).all()                                             # ordered coarse to fine
probs = [torch.rand(t.shape, generator=g) for t in tree]
capped = select_nodes(tree, probs, max_per_roi=10, max_total=15)
assert capped.yx.shape == (2, 10, 2) and int(capped.valid.sum()) == 15
assert int(capped.dropped) == int(sum(t.sum() for t in tree)) - 15
per_roi = [torch.cat([p[i][t[i]] for p, t in zip(probs, tree)]).sort(descending=True).values for i in range(2)]
for i in range(2):                                       # within each RoI, the highest-confidence nodes were kept
    kept = capped.score[i][capped.valid[i]]
    assert kept.min() >= per_roi[i][min(10, len(per_roi[i])) - 1] - 1e-7
padded = select_nodes(tree, probs, max_per_roi=400)                     # a cap pads every RoI to 400 tokens
short = trim_padding(padded)
assert short.valid.shape[1] == int(padded.valid.sum(1).max()) < 400 and torch.equal(short.valid.sum(1), padded.valid.sum(1))
assert torch.equal(short.yx[short.valid], padded.yx[padded.valid]) and short.dropped == padded.dropped


# %% [markdown]
# ## Propagation, coarse to fine
#
# At inference the refined node values are written back level by level (§3.2 "Quadtree Propagation",
# supp. Fig. 8): correct the root nodes in the 28² coarse mask, up-sample to 56² by **nearest**
# neighbour (each corrected parent's value is duplicated into its four quadrants), overwrite the 56²
# nodes, up-sample, overwrite the 112² nodes. With $\hat y_l$ the refined values at the level-l nodes:
#
# $$M_{l+1}(p) = \begin{cases}\hat y_{l+1}(p) & p \in \text{node}_{l+1}\\ \mathcal{S}_\uparrow(M_l)(p) & \text{otherwise}\end{cases},
# \qquad M_0 = M_{coarse}\qquad (\text{propagation rule, §3.2, levels } l = 0, 1, 2)$$
#
# The official code up-samples **bilinearly with align_corners=True** instead (method-details §12); that is the
# `mode` switch.

# %%
#| export
def propagate(coarse:torch.Tensor, # [N,s0,s0] coarse mask probabilities on the first grid
              nodes:NodeSequence, # nodes whose values are refined
              values:torch.Tensor, # [N,K] refined probabilities of the nodes
              sizes=(28, 56, 112), # grid side per level
              mode:str="nearest", # "nearest" (paper) or "bilinear" (official code, align_corners=True)
             ) -> torch.Tensor: # [N,s_last,s_last]
    "Write node values into each level's grid, up-sample to the next level, repeat; returns the finest grid."
    if mode not in ("nearest", "bilinear"):
        raise ValueError(f"mode: expected 'nearest' or 'bilinear', got {mode!r}")
    if coarse.shape[-1] != sizes[0]:
        raise ValueError(f"coarse: grid {tuple(coarse.shape[-2:])} does not match sizes[0]={sizes[0]}")
    n = coarse.shape[0]
    grid = coarse.to(values.dtype)
    for l, s in enumerate(sizes):
        if l:
            grid = (F.interpolate(grid[:, None], size=(s, s), mode="nearest") if mode == "nearest" else
                    F.interpolate(grid[:, None], size=(s, s), mode="bilinear", align_corners=True))[:, 0]
        on = nodes.valid & (nodes.level == l)
        idx = torch.where(on, nodes.yx[..., 0] * s + nodes.yx[..., 1], torch.full_like(nodes.roi, s * s))
        flat = torch.cat([grid.reshape(n, s * s), grid.new_zeros(n, 1)], 1).scatter(1, idx, values)
        grid = flat[:, :-1].view(n, s, s)
    return grid


# %%
c = torch.zeros(1, 2, 2)
ns = NodeSequence(roi=torch.zeros(1, 3, dtype=torch.long), level=torch.tensor([[0, 1, 2]]),
                  yx=torch.tensor([[[0, 0], [1, 1], [3, 3]]]), valid=torch.tensor([[True, True, True]]))
out = propagate(c, ns, torch.tensor([[1.0, 0.0, 0.5]]), sizes=(2, 4, 8))
print(out[0])

# %%
# the root's value 1 spreads to its 16 leaf cells, except the corrected 4x4 sub-block of node (1,1) at 4x4,
# which is 0 except its own corrected leaf (3,3) = 0.5
exp = torch.zeros(8, 8); exp[:4, :4] = 1; exp[2:4, 2:4] = 0; exp[3, 3] = 0.5
assert torch.equal(out[0], exp)
nv = ns._replace(valid=torch.tensor([[True, False, True]]))                    # a padding token is ignored
exp2 = torch.zeros(8, 8); exp2[:4, :4] = 1; exp2[3, 3] = 0.5
assert torch.equal(propagate(c, nv, torch.tensor([[1.0, 0.0, 0.5]]), sizes=(2, 4, 8))[0], exp2)
bil = propagate(c, ns, torch.tensor([[1.0, 0.0, 0.5]]), sizes=(2, 4, 8), mode="bilinear")
assert bil[0, 0, 0] == 1 and 0 < bil[0, 0, 5] < 1                            # bilinear blends across cells

# %% [markdown]
# ## On real masks: how many nodes, and the oracle half of Table 1
#
# We build the tree from the **ground-truth** incoherence maps (Eq. 1 at 28/56/112) of coco-mini
# instances. The node counts tell the sequence lengths a detector will meet, and set the benchmark's
# sizes. Then the oracle of Transfiner Table 1: keep the coarse 28² mask (here the GT itself cropped
# to 28², i.e. only the resolution loss, since this chapter has no detector), and fill the quadtree
# nodes with the ground-truth labels of their level, propagated to 112² and pasted into the image.
# The paper reports AP (35.5 → 51.0 with a Mask R-CNN's coarse masks); we report **mask mIoU**
# against the full-resolution GT, with the 112² GT crop as the ceiling of a 112² output.

# %%
import os
from pathlib import Path
import numpy as np
import matplotlib
matplotlib.use("Agg")
import matplotlib.pyplot as plt
from segbook.incoherent import load_instance_masks
from segbook.viz import save_figure, figures_dir

from segbook.data import find_coco_mini

COCO_MINI = find_coco_mini() or Path("shared/coco-mini")  # absent: the cells that need it skip


# %%
#| export
def quadtree_oracle(masks:torch.Tensor, # [N,H,W] full-image GT masks of one image
                    boxes:torch.Tensor, # [N,4] xyxy
                    sizes=(28, 56, 112), mode:str="nearest") -> dict:
    "Node counts of the GT quadtree and mask IoU of coarse 28², oracle-filled quadtree and GT 112² pasted masks."
    crops = [crop_masks(masks, boxes, s).float() for s in sizes]
    inc = incoherent_pyramid(masks, boxes, sizes)
    tree = build_quadtree(inc)
    nodes = select_nodes(tree)
    values = values_at_nodes(crops, nodes)                               # GT label of each node at its level
    flat_nodes = select_nodes(inc)                                       # every incoherent cell, no parent rule
    up = lambda m: F.interpolate(m[:, None], size=(sizes[-1],) * 2, mode="nearest" if mode == "nearest" else "bilinear")[:, 0]
    variants = {"coarse_28": up(crops[0]), "oracle_quadtree": propagate(crops[0], nodes, values, sizes, mode),
                "oracle_no_tree": propagate(crops[0], flat_nodes, values_at_nodes(crops, flat_nodes), sizes, mode),
                "gt_112": crops[-1]}
    gt = masks.bool().flatten(1)
    iou = {}
    for k, m in variants.items():
        pasted = paste_masks_in_image(m[:, None], boxes, masks.shape[-2:], padding=1)[:, 0] >= 0.5
        p = pasted.flatten(1)
        iou[k] = (p & gt).sum(1) / (p | gt).sum(1).clamp(min=1)
    return {"nodes": torch.stack([t.flatten(1).sum(1) for t in tree], 1), "iou": iou}


# %%
if COCO_MINI.exists():
    res = [quadtree_oracle(m, b) for _, m, b in load_instance_masks(COCO_MINI / "annotations" / "instances_val2017.json", max_images=8)]
    nodes = torch.cat([r["nodes"] for r in res]).float()
    miou = {k: torch.cat([r["iou"][k] for r in res]).mean().item() for k in res[0]["iou"]}
    print("mean nodes per RoI at 28/56/112:", nodes.mean(0).tolist(), "mIoU:", miou)
    assert (nodes[:, 0] <= 28 * 28).all() and nodes.mean() > 10
    assert miou["coarse_28"] < miou["oracle_quadtree"] <= miou["oracle_no_tree"] + 1e-6   # filling the nodes helps
    assert miou["oracle_no_tree"] <= miou["gt_112"] + 1e-6

# %% [markdown]
# A figure: a real instance, its quadtree nodes per level, and the coarse / oracle / GT 112² masks.

# %%
if COCO_MINI.exists():
    for img_id, masks, boxes in load_instance_masks(COCO_MINI / "annotations" / "instances_val2017.json", max_images=5):
        area = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
        fill = masks.flatten(1).sum(1) / area
        if ((fill < 0.6) & (area > 5000)).any():
            k = int((area * (fill < 0.6)).argmax()); break
    m, b = masks[k:k+1], boxes[k:k+1]
    crops = [crop_masks(m, b, s).float() for s in (28, 56, 112)]
    tree = build_quadtree(incoherent_pyramid(m, b))
    nodes = select_nodes(tree)
    vals = values_at_nodes(crops, nodes)
    fig, ax = plt.subplots(1, 6, figsize=(15, 3.1))
    for l, s in enumerate((28, 56, 112)):
        ax[l].imshow(crops[l][0], cmap="gray", alpha=0.5)
        ax[l].imshow(np.ma.masked_where(~tree[l][0].numpy(), tree[l][0].numpy()), cmap="autumn", vmin=0, vmax=1)
        ax[l].set_title(f"level {l + 1} ({s}²):\n{int(tree[l].sum())} nodes", fontsize=10)
    ax[3].imshow(F.interpolate(crops[0][None], size=(112, 112))[0, 0], cmap="gray"); ax[3].set_title("coarse 28²\n(nearest to 112²)", fontsize=10)
    ax[4].imshow(propagate(crops[0], nodes, vals)[0], cmap="gray"); ax[4].set_title("oracle nodes,\npropagated", fontsize=10)
    ax[5].imshow(crops[2][0], cmap="gray"); ax[5].set_title("GT\n112²", fontsize=10)
    for a in ax: a.set_xticks([]); a.set_yticks([])
    print(save_figure(fig, "quadtree_nodes.png"))


# %% [markdown]
# The full oracle over coco-mini val (the experiment `experiments/transfiner_table1` writes it as
# `figures/tables/transfiner_table1_oracle.md`):

# %%
#| export
def table1_oracle(coco_root, # folder with annotations/instances_{split}.json
                  split:str="val2017",
                  mode:str="nearest", # propagation, as `propagate`
                 ) -> dict: # instances, nodes_mean/p90/max per level, miou_<variant>
    "Run `quadtree_oracle` over a split: node statistics per level and the mean IoU of each variant."
    from pathlib import Path
    from segbook.incoherent import load_instance_masks
    res = [quadtree_oracle(m, b, mode=mode) for _, m, b in
           load_instance_masks(Path(coco_root) / "annotations" / f"instances_{split}.json")]
    nodes = torch.cat([r["nodes"] for r in res]).float()
    miou = {k: float(torch.cat([r["iou"][k] for r in res]).mean()) for k in res[0]["iou"]}
    return {"instances": len(nodes), "nodes_mean": nodes.mean(0).tolist(), "nodes_p90": nodes.quantile(0.9, 0).tolist(),
            "nodes_max": nodes.max(0).values.tolist(), "mode": mode} | {f"miou_{k}": v for k, v in miou.items()}


# %%
#| slow
if COCO_MINI.exists():
    print(table1_oracle(COCO_MINI))
