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
# # Transfiner Tables 1, 3, 5 and 8 on the large preset: two trained models, inference-time switches
#
# > Mask Transfiner's analyses and ablations on the models of `transfiner_large` (torchvision Mask R-CNN + Transfiner,
# > the book's shapes-pretrained ResNet-18 + FPN, trained on the `large` shapes preset, seeds 0 and 1): Table 1's oracle
# > (the incoherent regions filled with GT labels), the incoherence detector (Table 3: recall / accuracy with and
# > without lower-level guidance), the quadtree depth (Table 5: depth 0 = the coarse 28² masks … depth 3 = 112²) and
# > the refinement scheme (Table 8: multi-level joint refinement, MJR, and quadtree mask propagation, QMP). Every
# > number is per seed (s0 / s1).
#
# **Train-time in the paper, inference-time here.** Every row of Tables 3, 5 and 8 is a separately trained model in the
# paper. Here all rows of a seed share one set of weights, trained as the paper (cascade detector, three levels, joint
# refinement, nearest propagation, GT-incoherent training nodes), and differ only at inference; each row says which.
# A row that loses here may win when trained for it; what the rows measure is how much each part of the trained model
# contributes at inference.
#
# **Operating point.** As in `transfiner_large`, the detector's per-level thresholds are chosen on training images to
# reach the paper's 86 % recall (at 0.5 our BCE-trained detector finds a minority of the incoherent cells): an
# inference-time switch shared by every row here.
#
# **Not comparable with the paper in absolute terms:** the paper trains R50-FPN (ImageNet init) on COCO train2017 for
# 12 epochs and reports COCO val (AP* uses LVIS annotations, which shapes has no counterpart of). The smoke profile
# (a few iterations on a handful of images) only proves that every switch runs: its APs are ~0.

# %% tags=["parameters"]
profile = "smoke"
out_dir = None
seed = 0  # seed of the data set when this notebook trains its own models (when runs_from is None)
device = "cpu"
shapes_root = "unused"
coco_root = None
runs_from = None  # experiment whose runs/maskrcnn_s{seed} are evaluated (cpu / gpu: 'transfiner_large'); None: train tiny ones here
seeds = [0]  # training seeds
n_train, n_val, iters = 8, 4, 4  # the models trained here when runs_from is None
calib_images = 4  # training images the operating point is chosen on
calib_recall = 0.86
eval_images = None  # None: the whole val split
refine_topk = 10  # detections refined per image, as the official code at test time; None: all
max_nodes_per_roi = 1024
bench_iters = 3  # timed batch-1 calls per depth for Table 5 speed
refine_gate = 0.5  # refine_min_score of the cost comparison (this book's switch): only detections scoring at least this are refined
sequence_tokens = "trained"  # sequences of the cost rows (this book's switch): "trained" is the training length, levels × nodes_per_level (3 × 64); None: no such rows
bench_images = 4  # val images of benchmarks/bench_refine.py (refined vs coarse time, batch 1)

# %%
import json, os, subprocess, sys, time
from contextlib import contextmanager
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
import torch
import torch.nn.functional as F

from segbook.data import collate
from segbook.config import load_config
from segbook.engine import dist_info, resolve_device
from segbook.pipeline import build_model, eval_dataset, load_weights
from segbook.quadtree import build_quadtree, propagate, roi_pyramid_levels, select_nodes, trim_padding
from segbook.reproduce import (size_ranges, experiment_context, ranking_verdict, run_finished, seconds_per_iter, shapes_mismatch,
                               threshold_verdict, write_json_atomic, write_table, _repo_root)
from segbook.bench import latency_summary, time_alternately
from segbook.evaluation import evaluate_coco, predictions_to_coco
from segbook.shapes import write_shapes_dataset
from segbook.transfiner import (refined_detections, detector_recall, incoherence_scores, incoherent_oracle,
                                thresholds_for_recall)
from segbook.viz import save_figure

ctx = experiment_context(out_dir, None, coco_root, seed, n_train=2, n_val=1)
CONFIG = _repo_root() / "configs" / "transfiner_large_cpu.yaml"
WEIGHTS = _repo_root() / "weights" / "shapes_resnet18.pt"
# evaluation uses the threads experiment_context allows (two); the timings below run on one
dev = resolve_device(device, dist_info())  # 'auto' -> cuda when there is one

# %% [markdown]
# ## The models
#
# With `runs_from` (the cpu and gpu profiles) the Mask R-CNN runs of that experiment, one per seed, trained to the end
# of `configs/transfiner_large_cpu.yaml`'s schedule; run it first (`segbook reproduce --only transfiner_large`).
# Without, this notebook trains its own tiny ones with the same command on a tiny large-preset data set.

# %%
finished = run_finished   # last.pt and the last iteration of the run's own schedule logged

if runs_from:
    runs = {s: ctx.out.parent / runs_from / "runs" / f"maskrcnn_s{s}" for s in seeds}
    missing = [str(r) for r in runs.values() if not finished(r)]
    if missing:
        raise FileNotFoundError(f"transfiner_tables: no finished run in {', '.join(missing)}; "
                                f"run `segbook reproduce --profile {profile} --only {runs_from}` first")
else:
    root = ctx.shared / f"shapes_large_s{seed}_train{n_train}_val{n_val}"
    if shapes_mismatch(root, seed=seed, n_train=n_train, n_val=n_val, size=320, preset="large") is not None:
        write_shapes_dataset(root, n_train=n_train, n_val=n_val, seed=seed, preset="large")
    runs = {s: ctx.out / "runs" / f"maskrcnn_s{s}" for s in seeds}
    for s, run in runs.items():
        if finished(run): continue
        args = [sys.executable, "-m", "segbook.cli", "train", "--config", str(CONFIG), "--data", str(root), "--out", str(run),
                "--device", device, "--max-iters", str(iters), f"seed={s}"]
        p = subprocess.run(args, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"}, cwd=_repo_root())
        if p.returncode: raise RuntimeError(f"{' '.join(args[2:])} failed ({p.returncode}):\n{p.stderr[-1500:]}")

def model_of(run:Path):
    data = Path(load_config(run / "config.yaml").data.root)   # a relative root is relative to the repository (segbook train's cwd)
    cfg = load_config(run / "config.yaml", [f"model.refine_topk={refine_topk}", f"model.max_nodes_per_roi={max_nodes_per_roi}",
                                            f"model.pretrained={WEIGHTS}", f"data.root={data if data.is_absolute() else _repo_root() / data}"])
    model = build_model(cfg); load_weights(model, run / "last.pt", verbose=False)
    return cfg, model.to(dev).eval()

models, thresholds = {}, {}
for s, run in runs.items():
    cfg, model = models[s] = model_of(run)
    calib = incoherence_scores(model, eval_dataset(cfg, cfg.data.train_split), dev, max_images=calib_images)
    thresholds[s] = thresholds_for_recall(calib, calib_recall) if calib["positives"] else [0.5] * len(model.head.sizes)
    model.cfg.inc_threshold = thresholds[s]   # the operating point (the head reads the same config)
cfg, model = models[seeds[0]]
head, tcfg = model.head, model.cfg
val = eval_dataset(cfg)
print({"runs": {s: str(r) for s, r in runs.items()}, "thresholds": {s: [round(t, 4) for t in v] for s, v in thresholds.items()},
       "s_per_iter": {s: seconds_per_iter(r) for s, r in runs.items()}, "val": val.ann_file})


# %% [markdown]
# ## The switches
#
# `SharedRefinement` holds the inference steps of `TransfinerHead.refine` (chapter 8) for one set of RoIs — the RoI
# pyramid features, the incoherence maps, the quadtree nodes, the node tokens, the transformer's node values — and
# `masks(...)` assembles them with the inference choices of the three tables as arguments:
#
# - `depth` (Table 5): refine only the first `depth` levels of the RoI pyramid (28², 56², 112²) — the detector, the
#   node features and the propagation stop there, so the output grid is 28·2^(depth−1); depth 0 is the coarse mask
#   (`refine` off).
# - `joint` (Table 8, MJR): all levels' nodes in one sequence (paper) or one sequence per level — the same nodes, the
#   same weights, an attention mask that keeps each level to itself.
# - `qmp` (Table 8, QMP): write every level's refined nodes and propagate coarse → fine (paper), or up-sample the coarse
#   mask to the finest grid and write only the finest level's nodes ("only correcting the labels of the finest leaf
#   nodes", §4.2).
# - `propagation`: 'nearest' (the paper's duplication of parent labels) or 'bilinear' (the official code, method-details
#   §12).
# - `detector_mode` (Table 3): 'cascade' (finer levels fused with the up-sampled coarser prediction, Fig. 5) or 'single'
#   (the coarsest 28² map nearest-up-sampled to every level: the official code's detector, with no finer-level
#   detection). The paper's "without guidance" row trains a per-level detector without the up-sampled input, which one
#   set of cascade weights cannot give; 'single' is the closest inference-time ablation.
#
# Each step is computed once and kept, so the nine variants of a batch share the work they have in common (a cascade
# map of level l depends only on levels ≤ l, so a shallower tree reads the first levels of a deeper one). One more
# saving: with a cap (`max_nodes_per_roi`), `select_nodes` pads every RoI's sequence to the cap (512 tokens) even when it
# has a handful of nodes; the sequences are cut to the longest one of the batch. Padding is masked out of attention, so
# this changes the node values only by float rounding (~1e-7) and makes the transformer 5–8× cheaper on the CPU. With
# every switch at the trained value the masks must match `head.refine`'s to that rounding (checked below).

# %%
@contextmanager
def switched(obj, **attrs):
    "Set attributes of `obj` for the duration of a `with` block, then restore them."
    old = {k: getattr(obj, k) for k in attrs}
    for k, v in attrs.items(): setattr(obj, k, v)
    try: yield obj
    finally:
        for k, v in old.items(): setattr(obj, k, v)

class SharedRefinement:
    "`TransfinerHead.refine` for one set of RoIs, step by step, each step computed once and shared by every switch setting."
    def __init__(self, head, # a trained TransfinerHead (eval mode)
                 levels:list, # P2..P5
                 rois:torch.Tensor, # [R,5] (batch index, xyxy)
                 coarse_probs:torch.Tensor): # [R,28,28] coarse mask probabilities
        self.head, self.cfg, self.levels, self.rois, self.coarse = head, head.cfg, levels, rois, coarse_probs
        self.fpn = roi_pyramid_levels(rois[:, 1:], len(head.sizes), head.cfg.first_offset)  # [R,3] FPN level per grid
        self._inc, self._nodes, self._tokens, self._values = {}, {}, {}, {}
        self.counts = {}  # (mode, depth) -> (detected, refined) node totals per level: the cap may drop whole levels

    def inc(self, mode:str, depth:int) -> list: # incoherence probabilities of the first `depth` levels
        if len(self._inc.get(mode, ())) < depth:
            with switched(self.head.detector, mode=mode, num_levels=depth):
                self._inc[mode] = [x.sigmoid() for x in self.head.detector(self.levels, self.rois, self.fpn, self.coarse, self.head.sizes)]
        return self._inc[mode][:depth]

    def nodes(self, mode:str, depth:int): # NodeSequence of the quadtree over the first `depth` levels
        if (mode, depth) not in self._nodes:
            inc = self.inc(mode, depth)
            tree = build_quadtree([p >= t for p, t in zip(inc, self.cfg.inc_threshold)])
            nodes = select_nodes(tree, inc, self.cfg.max_nodes_per_roi, self.cfg.max_nodes_total)
            nodes = trim_padding(nodes)  # with a cap, select_nodes pads every RoI to the cap
            self.counts[mode, depth] = ([int(m.sum()) for m in tree],
                                        [int((nodes.valid & (nodes.level == l)).sum()) for l in range(depth)])
            self._nodes[mode, depth] = nodes
        return self._nodes[mode, depth]

    def values(self, mode:str, depth:int, joint:bool, sequence_tokens=None) -> torch.Tensor: # [R,K] refined node probabilities
        if (mode, depth, joint, sequence_tokens) not in self._values:
            nodes = self.nodes(mode, depth)
            if (mode, depth) not in self._tokens:  # tokens are per node: the same for joint and per-level attention
                self._tokens[mode, depth] = self.head.encoder(self.levels, self.rois, self.fpn[:, :depth], nodes, self.coarse,
                                                              self.head.sizes[:depth])
            run = lambda valid: self.head.transformer(self._tokens[mode, depth], valid, sequence_tokens).sigmoid()
            if joint:
                v = run(nodes.valid)
            else:
                v = torch.zeros(nodes.valid.shape, device=self.rois.device)
                for l in range(depth):
                    on = nodes.level == l
                    v = torch.where(on, run(nodes.valid & on), v)
            self._values[mode, depth, joint, sequence_tokens] = v
        return self._values[mode, depth, joint, sequence_tokens]

    def masks(self, depth:int=3, # levels refined (Table 5), 1..3
              joint:bool=True, # one sequence over all levels (MJR) or one per level
              qmp:bool=True, # propagate every level's nodes (QMP) or write the finest level's only
              propagation:str|None=None, # 'nearest' | 'bilinear' (None: the trained config's)
              detector_mode:str|None=None, # 'cascade' | 'single' (None: the trained config's)
              sequence_tokens:int|None=None, # attention within interleaved sequences of ≤ this many tokens (None: one per RoI)
             ) -> torch.Tensor: # [R,s,s] refined probabilities, s = sizes[depth-1]
        mode = detector_mode or self.head.detector.mode
        nodes, values = self.nodes(mode, depth), self.values(mode, depth, joint, sequence_tokens)
        if not qmp:
            nodes = nodes._replace(valid=nodes.valid & (nodes.level == depth - 1))
        return propagate(self.coarse, nodes, values, self.head.sizes[:depth], propagation or self.cfg.propagation)


# %% [markdown]
# Predictions of every variant for one batch. As `MaskRCNNTransfiner.predict`: detect, refine the coarse masks, scale
# the boxes to the original image and paste the masks — except that only the `topk` best detections of each image are
# refined (the official code's test-time LIMIT = 10, method-details §8; the others keep their coarse mask, up-sampled):
# an undertrained detector keeps 100 boxes per image, refining all of them is what makes a CPU evaluation slow, and the
# masks that decide AP on shapes (5 objects per image on average, at most 10) are among the top 10. With `topk=None`
# every detection is refined, as `predict` does.

# %%
@torch.no_grad()
def predict_batch(model, # trained MaskRCNNTransfiner (eval mode)
                  images:torch.Tensor, sizes:list, orig_sizes:list, # batch, (h,w) seen, (H0,W0) to paste into
                  variants:dict, # name -> switches of SharedRefinement.masks; {'depth': 0}: the coarse masks
                  topk:int|None=10, # detections refined per image
                  max_dets:int=100, # detections kept per image (as `predict`)
                  stats:dict|None=None, # if given: 'mode/depth' -> RoIs and node totals per level, accumulated
                 ) -> dict: # name -> one prediction dict per image (torchvision style, on the CPU)
    "Detections of one batch with the masks of every variant (detection and shared refinement steps computed once)."
    from segbook.istr import paste_masks
    feats, dets, _ = model._detect(images, sizes)
    dets = [{k: v[:max_dets] for k, v in d.items()} for d in dets]
    counts = [len(d["boxes"]) for d in dets]
    coarse = torch.cat([d["masks"][:, 0] for d in dets])
    rois = torch.cat([torch.cat([torch.full_like(d["boxes"][:, :1], b), d["boxes"]], 1) for b, d in enumerate(dets)])
    keep = refined_detections(rois, torch.cat([d["scores"] for d in dets]), topk, model.cfg.refine_min_score)
    keep = torch.ones(len(rois), dtype=torch.bool, device=rois.device) if keep is None else keep
    shared = SharedRefinement(model.head, [feats[k] for k in ("p2", "p3", "p4", "p5")], rois[keep], coarse[keep]) if keep.any() else None
    out = {}
    for name, sw in variants.items():
        depth = sw.get("depth", len(model.head.sizes))
        masks = coarse
        if depth > 0:
            s = model.head.sizes[depth - 1]
            masks = F.interpolate(coarse[:, None], size=(s, s), mode="bilinear", align_corners=False)[:, 0]
            if shared is not None:
                refined = shared.masks(**{k: v for k, v in sw.items() if k != "min_score"}).to(masks.dtype)
                if "min_score" in sw:   # refine_min_score: detections below it keep the up-sampled coarse mask (as refine_some)
                    gate = torch.cat([d["scores"] for d in dets])[keep] >= sw["min_score"]
                    refined = torch.where(gate[:, None, None], refined, masks[keep])
                masks[keep] = refined
        out[name] = []
        for d, m, (h, w), (H0, W0) in zip(dets, masks.split(counts), sizes, orig_sizes):
            bx = d["boxes"] * torch.tensor([W0 / w, H0 / h, W0 / w, H0 / h], device=images.device)
            out[name].append({"boxes": bx.cpu(), "labels": (d["labels"] - 1).cpu(), "scores": d["scores"].cpu(),
                              "masks": paste_masks(m, bx, int(H0), int(W0)).cpu()})
    if stats is not None and shared is not None:
        for (mode, depth), (detected, refined) in shared.counts.items():
            st = stats.setdefault(f"{mode}/{depth}", {"rois": 0, "detected": [0] * depth, "refined": [0] * depth})
            st["rois"] += len(shared.rois)
            st["detected"] = [a + b for a, b in zip(st["detected"], detected)]
            st["refined"] = [a + b for a, b in zip(st["refined"], refined)]
    return out

def batch_of(ds, idx:list, device): # (images, sizes, orig_sizes, targets) of ds[i] for i in idx
    images, targets = collate([ds[i] for i in idx])
    return (images.to(device), [tuple(int(v) for v in t["size"]) for t in targets],
            [tuple(int(v) for v in t["orig_size"]) for t in targets], targets)


# %% [markdown]
# Checks on a few val images: with the trained settings the shared steps give `head.refine`'s masks (to float rounding,
# 1e-5); the coarse
# variant gives exactly `model.predict`'s masks with `refine` off (the pasting above is `predict`'s); and turning MJR off
# changes the masks whenever an RoI refines nodes on more than one level (after the `max_nodes_per_roi` cap, which keeps
# the most confident nodes and may leave a single level).

# %%
images, sizes, orig, _ = batch_of(val, list(range(min(4, len(val)))), dev)
with torch.no_grad():
    feats, dets, _ = model._detect(images, sizes)
    levels = [feats[k] for k in ("p2", "p3", "p4", "p5")]
    rois = torch.cat([torch.cat([torch.full_like(d["boxes"][:, :1], b), d["boxes"]], 1) for b, d in enumerate(dets)])[:8]
    coarse = torch.cat([d["masks"][:, 0] for d in dets])[:8]
    with switched(model, refine=False):
        ref_coarse = model.predict(images, torch.tensor(sizes), torch.tensor(orig))
same_coarse = all(torch.equal(a["masks"].cpu(), b["masks"]) for a, b in
                  zip(ref_coarse, predict_batch(model, images, sizes, orig, {"c": {"depth": 0}})["c"]))
same_as_head, changes = None, {}
if len(rois):
    with torch.no_grad():
        ref, _, node_masks = head.refine(levels, rois, coarse, return_nodes=True)
        sh = SharedRefinement(head, levels, rois, coarse)
        same_as_head = torch.allclose(sh.masks(), ref, rtol=0, atol=1e-5)
        changes = {k: not torch.allclose(sh.masks(**{k: False}), ref, rtol=0, atol=1e-5) for k in ("joint", "qmp")}
        sel = sh.nodes(head.detector.mode, len(head.sizes))
        on_level = torch.stack([(sel.valid & (sel.level == l)).sum(1) for l in range(len(head.sizes))], 1)  # [R,3]
    multi_level = bool(((on_level > 0).sum(1) > 1).any())
    print("RoIs checked:", len(rois), "| shared steps ≈ head.refine (1e-5):", same_as_head, "| coarse == predict(refine off):",
          same_coarse, "| detected nodes per level:", [int(m.sum()) for m in node_masks], "| refined (capped):",
          on_level.sum(0).tolist(), "| switch changes the masks:", changes)
    assert same_as_head
    assert not multi_level or changes["joint"], changes
assert same_coarse

# %% [markdown]
# ## Evaluations
#
# For each seed, one pass over the val images (batches of 8) gives the predictions of every variant; each variant is
# scored with `segbook.evaluation.evaluate_coco` — box, mask and Boundary AP (Boundary IoU, dilation 0.02), as
# `evaluate_model` does. The box AP is the same in every row of a seed (the switches act on the masks only).

# %%
other = "bilinear" if tcfg.propagation == "nearest" else "nearest"
VARIANTS = {  # name: switches
    "depth 3 (as trained)": dict(depth=3),  # first: the shallower trees reuse its levels
    "depth 0 (coarse)": dict(depth=0), "depth 1": dict(depth=1), "depth 2": dict(depth=2),
    "MJR off": dict(joint=False), "QMP off": dict(qmp=False), "MJR off, QMP off": dict(joint=False, qmp=False),
    f"{other} propagation": dict(propagation=other),
    "detector: single 28² map": dict(detector_mode="single"),
    f"depth 3, score ≥ {refine_gate}": dict(min_score=refine_gate),
}
seq_len = len(tcfg.sizes) * tcfg.nodes_per_level if sequence_tokens == "trained" else sequence_tokens
if seq_len:   # attention within interleaved sequences of the training length (chapter 8's `sequence_tokens`)
    VARIANTS |= {f"depth 3, sequences of {seq_len}": dict(sequence_tokens=seq_len),
                 f"depth 3, score ≥ {refine_gate}, sequences of {seq_len}": dict(min_score=refine_gate, sequence_tokens=seq_len)}
def scored(results:list, ids:list) -> dict:
    m = evaluate_coco(val.ann_file, results, iou_types=("bbox", "segm", "boundary"), image_ids=ids)
    return {**{f"{t}_{k}": v for t, r in m.items() for k, v in r.items() if k != "stats"}, "images": len(ids), "detections": len(results)}

n_eval = len(val) if eval_images is None else min(eval_images, len(val))
ev, node_stats, predict_seconds = {}, {}, {}
for s, (_, m_s) in models.items():
    results, ids, node_stats[s] = {n: [] for n in VARIANTS}, [], {}
    t0 = time.perf_counter()
    for start in range(0, n_eval, 8):
        images, sizes, orig, targets = batch_of(val, list(range(start, min(n_eval, start + 8))), dev)
        batch_ids = [int(t["image_id"]) for t in targets]
        for name, preds in predict_batch(m_s, images, sizes, orig, VARIANTS, refine_topk, stats=node_stats[s]).items():
            results[name] += predictions_to_coco(preds, batch_ids, val.coco_ids)  # RLE now: 9 variants of pasted masks would not fit
        ids += batch_ids
    predict_seconds[s] = round(time.perf_counter() - t0, 1)
    ev[s] = {name: scored(results[name], ids) for name in VARIANTS}
    print(f"seed {s}: predictions of {len(VARIANTS)} variants on {len(ids)} images in {predict_seconds[s]:.0f} s")
    for name, e in ev[s].items():
        print(f"  {name:28s} AP^m {100 * e['segm_AP']:5.2f}  AP^B {100 * e['boundary_AP']:5.2f}  AP^b {100 * e['bbox_AP']:5.2f}")
per_roi = lambda s, key, kind: " / ".join(f"{v / max(1, node_stats[s][key]['rois']):.0f}" for v in node_stats[s][key][kind]) if key in node_stats[s] else "–"
nodes_note = ("Nodes per refined RoI as trained (cascade, 3 levels), 28²/56²/112², per seed: detected "
              + ", ".join(f"s{s} {per_roi(s, 'cascade/3', 'detected')}" for s in seeds)
              + f"; refined after the cap of {tcfg.max_nodes_per_roi} per RoI (most confident first) "
              + ", ".join(f"s{s} {per_roi(s, 'cascade/3', 'refined')}" for s in seeds) + ".")
print(nodes_note)

# %% [markdown]
# Speed per depth (Table 5's FPS column): `segbook.bench.time_alternately` calls the depth variants in turn on one val
# image, batch 1, each call from scratch (nothing shared between variants): detection, refinement of the top
# `refine_topk` detections (trimmed node sequences, as above), pasting. Seed 0's model, on the CPU with one thread.
# (`benchmarks/bench_refine.py` measures the same comparison through `model.predict` on many images.)

# %%
DEPTHS = ["depth 0 (coarse)", "depth 1", "depth 2", "depth 3 (as trained)"]
one = batch_of(val, [0], dev)[:3]
threads = torch.get_num_threads(); torch.set_num_threads(1 if dev.type == "cpu" else threads)
timed = time_alternately({n: (lambda x, n=n: predict_batch(model, *x, {n: VARIANTS[n]}, refine_topk)[n]) for n in DEPTHS},
                         one, bench_iters, warmup=1, device=dev)
torch.set_num_threads(threads)
latency = {n: latency_summary(timed[n]["ms"]) for n in DEPTHS}
for n in DEPTHS:
    print(f"{n:22s} {latency[n]['median_ms']:.0f} ms / image")

# %% [markdown]
# ## Refinement cost
#
# `benchmarks/bench_refine.py` on each seed's model: `model.predict` at batch 1 on the first `bench_images` val images,
# coarse (`refine` off) and refined called alternately, refined as evaluated above (the top `refine_topk` detections)
# and with the score gate (`refine_min_score`); the time ratio refined / coarse and the peak memory of a call.
# Each setting also runs with attention in interleaved sequences of the training length (`sequence_tokens`, chapter 8):
# at the operating point an RoI holds about a thousand nodes, five times the 3 × 64 tokens of a training sequence,
# and attention costs K² per sequence. The variant rows above score what that approximation changes in AP.

# %%
cost = {}
for s, run in runs.items():
    out = ctx.out / f"refine_cost_s{s}.json"
    args = [sys.executable, str(_repo_root() / "benchmarks" / "bench_refine.py"), "--checkpoint", str(run / "last.pt"),
            "--device", str(dev), "--images", str(bench_images), "--repeats", str(bench_iters), "--refine-topk", str(refine_topk or 100),
            "--max-nodes", str(max_nodes_per_roi), "--thresholds", ",".join(f"{t:.10f}" for t in thresholds[s]),
            "--min-scores", f"none,{refine_gate}", *(["--sequence-tokens", f"none,{seq_len}"] if seq_len else []), "--out", str(out)]
    p = subprocess.run(args, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"}, cwd=_repo_root())
    if p.returncode: raise RuntimeError(f"bench_refine failed ({p.returncode}):\n{p.stderr[-1500:]}")
    cost[s] = json.loads(out.read_text())
    print(s, {n: (v["ms_per_image_median"], v["ratio_to_coarse"], v["peak_mem_mb_max"]) for n, v in cost[s]["settings"].items()})
TOP, GATED = "refined (min_score=None)", f"refined (min_score={refine_gate})"
TOP_SEQ, GATED_SEQ = (f"refined (min_score=None, sequence_tokens={seq_len})", f"refined (min_score={refine_gate}, sequence_tokens={seq_len})")

# %% [markdown]
# ## Table 3: the incoherence detector's recall and accuracy
#
# On the val images: every detection with IoU ≥ 0.5 to a (non-crowd) ground-truth box is a positive; its targets are
# Eq. 1's incoherent cells of that GT mask cropped to the detected box (`incoherent_pyramid`, the training targets), its
# predictions the detector's maps ≥ the operating point's thresholds. Recall = TP/(TP+FN), accuracy = (TP+TN)/all cells
# (`segbook.transfiner.incoherence_scores` and `detector_recall`, chapter 8), pooled over all positives, per level and
# over the three levels together. The paper does not say which level(s) its numbers pool.

# %%
det = {}
for s, (_, m_s) in models.items():
    sc = incoherence_scores(m_s, val, dev, eval_images, modes=["cascade", "single"])
    det[s] = {"positives": sc["positives"], "incoherent_share": [float(t.float().mean()) for t in sc["targets"]],
              **{m: detector_recall(sc, thresholds[s], m) for m in ("cascade", "single")},
              "cascade@0.5": detector_recall(sc, [0.5] * len(sc["targets"]), "cascade")} if sc["positives"] else {"positives": 0}
print(json.dumps({s: {k: v for k, v in d.items() if k != "incoherent_share"} for s, d in det.items()})[:800])

# %% [markdown]
# ## Table 1: the oracle with the trained detector
#
# `segbook.transfiner.incoherent_oracle` (chapter 8): the same detections and coarse masks, with the quadtree of each
# matched GT's Eq. 1 incoherent cells filled with the GT labels (nearest propagation to 112²). `coarse → 112²` is the
# same propagation with no nodes, so the oracle's gain over it is the incoherent regions' alone; every detection is
# filled (no top-10 limit), as the paper's "for each object".

# %%
t1 = {}
for s, (_, m_s) in models.items():
    orc = incoherent_oracle(m_s, val, dev, eval_images)
    t1[s] = {k: orc[k] for k in ("positives", "percent", "recall_err", "accuracy", "nodes")}
    t1[s].update({key: scored(predictions_to_coco(orc["predictions"][key], orc["image_ids"], val.coco_ids), orc["image_ids"])
                  for key in ("coarse", "coarse_112", "oracle")})
    print(s, {k: round(v, 3) for k, v in t1[s].items() if isinstance(v, float)},
          {key: (round(100 * t1[s][key]["segm_AP"], 1), round(100 * t1[s][key]["boundary_AP"], 1)) for key in ("coarse", "coarse_112", "oracle")})

# %% [markdown]
# ## The tables
#
# Ours beside the paper (COCO val, R50-FPN, 1x), one value per seed (s0 / s1). AP* (LVIS annotations of COCO val) has no
# shapes counterpart and is shown for the paper only; our AP^B is Boundary AP on shapes val. −1 from COCOeval (no
# ground truth of that size) is "n/a".

# %%
pct = lambda v: "n/a" if v is None or v < 0 else f"{100 * v:.1f}"
both = lambda f: " / ".join(f(s) for s in seeds)   # one cell, every seed
ap = lambda var, key="segm_AP": both(lambda s: pct(ev[s][var][key]))
setting = (f"{profile} profile: Mask R-CNN + Transfiner on the large shapes preset ({Path(val.ann_file).parent.parent.name}), "
           f"trained as the paper (configs/{CONFIG.name}: detector '{tcfg.detector_mode}', propagation "
           f"'{tcfg.propagation}', joint refinement, 3 levels {tcfg.sizes}), seeds {' / '.join(map(str, seeds))}; operating point "
           f"chosen on {calib_images} training images ({100 * calib_recall:.0f} % recall per level there; thresholds "
           + ", ".join(f"s{s} " + " / ".join(f"{t:.3g}" for t in thresholds[s]) for s in seeds)
           + f"); evaluated on {ev[seeds[0]]['depth 3 (as trained)']['images']} val images, refining the top "
           f"{refine_topk if refine_topk is not None else 'all'} detections per image")
smoke_note = ("Smoke schedule: the numbers only show that every switch runs; no ranking can be read from them."
              if profile == "smoke" else "Compare the direction of each effect with the paper, not the values.")
TRAINED = "trained as the paper (operating point: inference-time)"
INF = "inference-time switch (paper: a separately trained model)"

# Table 1
share = lambda s, k: f"{100 * t1[s][k]:.1f}%"
lines = [f"Transfiner Table 1 (incoherent regions and the GT oracle) with the trained detector — {setting}.", "",
         "| | Percent | Recall_Err | Acc | AP coarse 28² | AP coarse → 112² (no nodes) | AP_GT (oracle) | AP^B coarse | AP^B oracle |",
         "|---|---|---|---|---|---|---|---|---|",
         "| Transfiner Table 1 (COCO val, Mask R-CNN R50-FPN) | 14% | 43% | 56% | 35.5 | – | 51.0 | – | – |",
         f"| ours, large shapes val, per seed | {both(lambda s: share(s, 'percent'))} | {both(lambda s: share(s, 'recall_err'))} "
         f"| {both(lambda s: share(s, 'accuracy'))} "
         f"| {both(lambda s: pct(t1[s]['coarse']['segm_AP']))} | {both(lambda s: pct(t1[s]['coarse_112']['segm_AP']))} "
         f"| {both(lambda s: pct(t1[s]['oracle']['segm_AP']))} | {both(lambda s: pct(t1[s]['coarse']['boundary_AP']))} "
         f"| {both(lambda s: pct(t1[s]['oracle']['boundary_AP']))} |", "",
         "Over the positive detections (IoU ≥ 0.5 with a GT box; "
         + both(lambda s: str(t1[s]["positives"])) + " per seed), at 112² in the box: Percent = share of the box the quadtree "
         "nodes of the GT's Eq. 1 incoherent cells cover; Recall_Err = share of the coarse mask's wrong cells inside it; "
         "Acc = the coarse mask's accuracy there. Nodes per positive, 28²/56²/112²: "
         + ", ".join(f"s{s} " + " / ".join(f"{v:.0f}" for v in t1[s]["nodes"]) for s in seeds)
         + ". Every detection's GT-incoherent nodes are filled (no top-10 limit). " + smoke_note]
write_table(ctx.tables / "transfiner_table1_detector.md", lines)

# Table 3
P3 = {"cascade": dict(acc=84, rec=86, AP=37.3, APB=24.2), "single": dict(acc=79, rec=73, AP=36.6, APB=23.7)}
rows3 = {"cascade": ("lower-level guidance ✓: cascade, finer levels fused with the up-sampled coarser map", "depth 3 (as trained)", TRAINED),
         "single": ("no finer-level detection: the 28² map nearest-up-sampled (official code's detector; paper row: no guidance, trained)",
                    "detector: single 28² map", INF)}
rec = lambda s, m, part="all", k="recall": "–" if m not in det[s] else f"{100 * det[s][m][part][k]:.0f}%"
lines = [f"Transfiner Table 3 (incoherence detector) on the large preset — {setting}; positive detections (IoU ≥ 0.5) "
         + both(lambda s: str(det[s]["positives"])) + ".", "",
         "| detector | ours recall (all levels) | ours accuracy | ours recall 28²/56²/112² (s0) | ours AP | ours AP^B | paper recall | paper acc | paper AP | paper AP^B | row is |",
         "|---|---|---|---|---|---|---|---|---|---|---|"]
for m, (label, var, kind) in rows3.items():
    per = "–" if m not in det[seeds[0]] else " / ".join(f"{100 * x['recall']:.0f}%" for x in det[seeds[0]][m]["levels"])
    lines.append(f"| {label} | {both(lambda s: rec(s, m))} | {both(lambda s: rec(s, m, k='accuracy'))} | {per} | {ap(var)} | "
                 f"{ap(var, 'boundary_AP')} | {P3[m]['rec']}% | {P3[m]['acc']}% | {P3[m]['AP']} | {P3[m]['APB']} | {kind} |")
per05 = "–" if "cascade@0.5" not in det[seeds[0]] else " / ".join(f"{100 * x['recall']:.0f}%" for x in det[seeds[0]]["cascade@0.5"]["levels"])
lines.append(f"| cascade at the paper's threshold 0.5 | {both(lambda s: rec(s, 'cascade@0.5'))} | {both(lambda s: rec(s, 'cascade@0.5', k='accuracy'))} "
             f"| {per05} | – | – | 86% | 84% | 37.3 | 24.2 | trained as the paper, thresholded as the paper |")
inc_share = det[seeds[0]].get("incoherent_share")
lines += ["", "Targets: Eq. 1 incoherent cells of the matched GT mask cropped to the detected box"
          + (f" (incoherent share of the cells 28²/56²/112², seed 0: {' / '.join(f'{100 * x:.1f}%' for x in inc_share)})." if inc_share else
             " — no detection reached IoU 0.5 with a GT box, so recall and accuracy are undefined (–).")
          + " Paper text: recall 74% → 86% (its table says 73%). " + smoke_note]
write_table(ctx.tables / "transfiner_table3_detector.md", lines)

# Table 5
P5 = {0: (35.2, 37.6, 50.3, 37.7, 17.2, 12.3), 1: (35.5, 38.4, 50.9, 38.1, 17.2, 10.6), 2: (36.2, 39.1, 51.9, 38.7, 17.3, 8.9),
      3: (37.3, 40.5, 52.9, 39.5, 17.5, 7.1), 4: (37.1, 40.7, 53.1, 39.3, 17.4, 5.2)}
lines = [f"Transfiner Table 5 (quadtree depth) on the large preset — {setting}.", "",
         f"| depth | output | ours AP | ours AP^B | ours AP_L | ours AP_M | ours ms / image (s0, {dev.type}, batch 1{', 1 thread' if dev.type == 'cpu' else ''}) | paper AP | paper AP* | paper AP_L | paper AP_M | paper AP_S | paper FPS (GPU) | row is |",
         "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
for k, p in P5.items():
    out = f"{28 * 2 ** max(0, k - 1)}×{28 * 2 ** max(0, k - 1)}"
    if k <= 3:
        var = "depth 0 (coarse)" if k == 0 else ("depth 3 (as trained)" if k == 3 else f"depth {k}")
        ours = f"{ap(var)} | {ap(var, 'boundary_AP')} | {ap(var, 'segm_APl')} | {ap(var, 'segm_APm')} | {latency[var]['median_ms']:.0f}"
        kind = TRAINED if k == 3 else ("the coarse masks of the same model (`refine: false`)" if k == 0 else INF)
    else:
        ours, kind = "not run | – | – | – | –", "needs a 224² level the trained head does not have"
    lines.append(f"| {k} | {out} | {ours} | {' | '.join(str(v) for v in p)} | {kind} |")
lines += ["", "Depth 0 is Mask R-CNN's coarse 28² mask; depth k refines the first k levels of the RoI pyramid. "
          + size_ranges(val.ann_file) + " " + nodes_note + " " + smoke_note]
write_table(ctx.tables / "transfiner_table5_depth.md", lines)

# Table 8
P8 = {(False, False): (36.5, 23.7, 39.6, 59.7), (True, False): (36.9, 23.9, 40.2, 60.2),
      (False, True): (37.0, 24.0, 40.1, 60.2), (True, True): (37.3, 24.2, 40.5, 60.7)}
rows8 = [("MJR off, QMP off", False, False, tcfg.propagation), ("QMP off", True, False, tcfg.propagation),
         ("MJR off", False, True, tcfg.propagation), ("depth 3 (as trained)", True, True, tcfg.propagation),
         (f"{other} propagation", True, True, other)]
lines = [f"Transfiner Table 8 (multi-level joint refinement, quadtree mask propagation) on the large preset — {setting}.", "",
         "| MJR | QMP | propagation | ours AP | ours AP^B | ours AP_50 | paper AP | paper AP^B | paper AP* | paper AP*_50 | row is |",
         "|---|---|---|---|---|---|---|---|---|---|---|"]
for var, mjr, qmp, prop in rows8:
    p = P8.get((mjr, qmp)) if prop == "nearest" else None
    paper = " | ".join(str(v) for v in p) if p else "– | – | – | –"
    lines.append(f"| {'✓' if mjr else ''} | {'✓' if qmp else ''} | {prop} | {ap(var)} | {ap(var, 'boundary_AP')} | "
                 f"{ap(var, 'segm_AP50')} | {paper} | {TRAINED if var == 'depth 3 (as trained)' else INF} |")
lines += ["", "QMP off: the coarse mask up-sampled to 112² with only the finest level's refined nodes written (§4.2); MJR off: "
          "each level's nodes attend only to their own level. The paper propagates by nearest duplication; the official "
          "code up-samples bilinearly (align_corners) and overwrites the nodes — that row has no paper number. " + nodes_note
          + " " + smoke_note]
write_table(ctx.tables / "transfiner_table8_mjr_qmp.md", lines)

# Coarse vs refined, the head's whole contribution
lines = [f"Coarse (`refine: false`) vs refined masks of the same Transfiner — {setting}.", "",
         "| masks | AP^m | AP^m_50 | AP^m_75 | AP^B (boundary) | AP^B_75 | AP^b (box) | paper AP (Table 5) |", "|---|---|---|---|---|---|---|---|"]
for label, var, p in (("coarse 28² (Mask R-CNN head)", "depth 0 (coarse)", 35.2), ("refined 112² (Transfiner)", "depth 3 (as trained)", 37.3)):
    lines.append(f"| {label} | {ap(var)} | {ap(var, 'segm_AP50')} | {ap(var, 'segm_AP75')} | {ap(var, 'boundary_AP')} | "
                 f"{ap(var, 'boundary_AP75')} | {ap(var, 'bbox_AP')} | {p} |")
lines += ["", smoke_note]
write_table(ctx.tables / "transfiner_coarse_vs_refined.md", lines)

# Refinement cost vs gain
_ann = json.loads(Path(val.ann_file).read_text())
objects_per_image = sum(not a.get("iscrowd", 0) for a in _ann["annotations"]) / max(1, len(_ann["images"]))
gv = f"depth 3, score ≥ {refine_gate}"
d_ap = lambda var, key, s: 100 * (ev[s][var][key] - ev[s]["depth 0 (coarse)"][key])
lines = [f"Mask Transfiner's refinement cost vs its gain — {setting}. Time: `benchmarks/bench_refine.py`, `model.predict` at batch 1 "
         f"on {cost[seeds[0]]['images']} val images, {dev.type}{', 1 thread' if dev.type == 'cpu' else ''}, coarse and refined called "
         "alternately on the same checkpoint (same detections).", "",
         "| refined detections | Δ mask AP | Δ boundary AP | ms / image (coarse → refined) | refined / coarse time | peak memory MB (coarse → refined) | row is |",
         "|---|---|---|---|---|---|---|"]
def cost_row(label, var, key, kind):
    dm = both(lambda s: f"{d_ap(var, 'segm_AP', s):+.1f}")
    db = both(lambda s: f"{d_ap(var, 'boundary_AP', s):+.1f}")
    ms = both(lambda s: f"{cost[s]['settings']['coarse']['ms_per_image_median']:.0f} → {cost[s]['settings'][key]['ms_per_image_median']:.0f}")
    ratio = both(lambda s: f"{cost[s]['settings'][key]['ratio_to_coarse']:.2f}×")
    mem = both(lambda s: f"{cost[s]['settings']['coarse']['peak_mem_mb_max']} → {cost[s]['settings'][key]['peak_mem_mb_max']}")
    return f"| {label} | {dm} | {db} | {ms} | {ratio} | {mem} | {kind} |"
lines.append(cost_row(f"top {refine_topk} per image (official code's limit)", "depth 3 (as trained)", TOP, TRAINED))
lines.append(cost_row(f"top {refine_topk}, score ≥ {refine_gate}", gv, GATED, "inference-time switch of this book (refine_min_score)"))
if seq_len:
    lines.append(cost_row(f"top {refine_topk}, sequences of {seq_len}", f"depth 3, sequences of {seq_len}", TOP_SEQ,
                          "inference-time switch of this book (sequence_tokens)"))
    lines.append(cost_row(f"top {refine_topk}, score ≥ {refine_gate}, sequences of {seq_len}", f"{gv}, sequences of {seq_len}",
                          GATED_SEQ, "inference-time switches of this book (refine_min_score, sequence_tokens)"))
lines += ["", f"Refined RoIs per image in the timing (top {refine_topk}): {both(lambda s: str(cost[s]['refined_rois_per_image']))}; "
          f"the val images hold {objects_per_image:.1f} objects on average. Where the refinement time goes (ms / image, seed 0, top "
          f"{refine_topk}): " + ", ".join(f"{k} {v}" for k, v in cost[seeds[0]]["refine_stages_ms_per_image"].items())
          + ". Each rewrite of this book's refinement, previous → current implementation on the same inputs (ms / image, seed 0; "
          "`sequence_tokens` is a switch, not exact, its Δ AP in the rows above): "
          + ", ".join(f"{k} {v['before']} → {v['after']} ({v['speedup']}×)" for k, v in cost[seeds[0]]["fixes_ms_per_image"].items())
          + ". Paper (Titan RTX, Table 5): 12.3 FPS coarse → 7.1 FPS at depth 3, a 1.73× cost. " + smoke_note]
write_table(ctx.tables / "transfiner_refine_cost.md", lines)

# %% [markdown]
# ## Ledger
#
# Each claim compares two rows per seed with `ranking_verdict`: replicated when our mean difference has the paper's sign
# by more than the seed spread (two seeds needed; the smoke profile has one, so its verdicts read "not run").

# %%
per_seed = lambda var, key="segm_AP": [round(100 * ev[s][var][key], 2) for s in seeds]
command = f"segbook reproduce --profile {profile} --only transfiner_tables"
def claim(cid, where, text, metric, a, b, pa, pb, table, note):
    return {"id": cid, "paper": "Mask Transfiner", "where": where, "claim": text, "metric": metric,
            "paper_values": {"a": pa, "b": pb}, "ours": {"a": a, "b": b}, "seeds": seeds, "profile": profile,
            "data": f"shapes large val ({ev[seeds[0]]['depth 0 (coarse)']['images']} images)", **ranking_verdict(a, b, pa, pb),
            "table": f"figures/tables/{table}", "command": command, "note": note}
claims = [
    claim("transfiner.table1.oracle_fill_detector", "Table 1", "filling the incoherent regions of the detector's coarse masks with GT labels raises mask AP (35.5 -> 51.0)",
          "mask AP: a = oracle, b = coarse 28²", [round(100 * t1[s]["oracle"]["segm_AP"], 2) for s in seeds],
          [round(100 * t1[s]["coarse"]["segm_AP"], 2) for s in seeds], 51.0, 35.5, "transfiner_table1_detector.md",
          "GT labels at the quadtree nodes of each matched GT's Eq. 1 cells, trained Mask R-CNN detections"),
    claim("transfiner.table3.lower_level_guidance", "Table 3", "detecting on every level with lower-level guidance finds more incoherent cells than one coarse map (recall 73 -> 86 %)",
          "recall (%) over all levels: a = cascade, b = single 28² map", [round(100 * det[s]["cascade"]["all"]["recall"], 2) if "cascade" in det[s] else None for s in seeds],
          [round(100 * det[s]["single"]["all"]["recall"], 2) if "single" in det[s] else None for s in seeds], 86, 73, "transfiner_table3_detector.md",
          "'single' is an inference-time switch of the cascade-trained detector (the paper trains a detector without guidance)"),
    claim("transfiner.table5.depth3_vs_depth1", "Table 5", "refining down to 112² (depth 3) beats refining the 28² level only (35.5 -> 37.3 AP)",
          "mask AP: a = depth 3, b = depth 1", per_seed("depth 3 (as trained)"), per_seed("depth 1"), 37.3, 35.5, "transfiner_table5_depth.md",
          "depth 1 is an inference-time switch of the depth-3 model"),
    claim("transfiner.table8.mjr_and_qmp", "Table 8", "joint refinement (MJR) with quadtree propagation (QMP) beats neither (36.5 -> 37.3 AP)",
          "mask AP: a = MJR + QMP, b = neither", per_seed("depth 3 (as trained)"), per_seed("MJR off, QMP off"), 37.3, 36.5, "transfiner_table8_mjr_qmp.md",
          "the ablated rows are inference-time switches of the MJR + QMP model"),
    claim("transfiner.table8.mjr", "Table 8", "with QMP, joint refinement across levels beats refining each level alone (37.0 -> 37.3 AP)",
          "mask AP: a = MJR + QMP, b = QMP only", per_seed("depth 3 (as trained)"), per_seed("MJR off"), 37.3, 37.0, "transfiner_table8_mjr_qmp.md",
          "MJR off is an inference-time switch (each level attends to itself)"),
    claim("transfiner.table8.qmp", "Table 8", "with MJR, propagating every level's nodes (QMP) beats writing the finest level's only (36.9 -> 37.3 AP)",
          "mask AP: a = MJR + QMP, b = MJR only", per_seed("depth 3 (as trained)"), per_seed("QMP off"), 37.3, 36.9, "transfiner_table8_mjr_qmp.md",
          "QMP off is an inference-time switch"),
]
ratios = lambda key: [cost[s]["settings"][key]["ratio_to_coarse"] for s in seeds]
CLAIMED = GATED_SEQ if seq_len else GATED   # the setting the ≤ 1.3× target is judged on
gated_var = f"{gv}, sequences of {seq_len}" if seq_len else gv
claims.append({"id": "transfiner.refine_cost.time_ratio", "paper": "Mask Transfiner", "where": "Table 5 (FPS)",
               "claim": "refining to 112² costs 1.73× the coarse model's time (12.3 -> 7.1 FPS); this book's target: ≤ 1.3× on the CPU",
               "metric": "refined / coarse time per image, batch 1, same detections",
               "paper_values": {"refined / coarse": round(12.3 / 7.1, 2)},
               "ours": {**({f"score ≥ {refine_gate}, sequences of {seq_len}": ratios(GATED_SEQ),
                            f"top {refine_topk}, sequences of {seq_len}": ratios(TOP_SEQ)} if seq_len else {}),
                        f"score ≥ {refine_gate}": ratios(GATED), f"top {refine_topk}": ratios(TOP),
                        **{f"Δ {m} AP @{label}": [round(d_ap(var, key, s), 2) for s in seeds]
                           for label, var in ((f"score ≥ {refine_gate}" + (f", sequences of {seq_len}" if seq_len else ""), gated_var),
                                              (f"top {refine_topk}", "depth 3 (as trained)"))
                           for m, key in (("mask", "segm_AP"), ("boundary", "boundary_AP"))}},
               "seeds": seeds, "profile": profile, "data": f"shapes large val ({cost[seeds[0]]['images']} images timed)",
               **threshold_verdict([-r for r in ratios(CLAIMED)], -1.3), "target": "≤ 1.3× per seed (score-gated"
               + (f", sequences of {seq_len})" if seq_len else ")"),
               "table": "figures/tables/transfiner_refine_cost.md", "command": command,
               "note": f"verdict on refine_min_score={refine_gate}" + (f" with attention in interleaved sequences of {seq_len} tokens "
                       "(the training length)" if seq_len else "") + f", switches of this book; the official top-{refine_topk} "
                       "setting with one sequence per RoI is beside it"})
headline = {"refine_time_ratio": ratios(CLAIMED), "refine_time_ratio_top10": ratios(TOP),
            **({"refine_time_ratio_top10_sequences": ratios(TOP_SEQ)} if seq_len else {})}
write_json_atomic({"profile": profile, "runs": {s: str(r) for s, r in runs.items()}, "seeds": seeds, "thresholds": thresholds,
                   "calib_images": calib_images, "calib_recall": calib_recall, "eval_images": eval_images, "refine_topk": refine_topk,
                   "max_nodes_per_roi": max_nodes_per_roi, "variants": {s: {n: {"switches": VARIANTS[n], **e} for n, e in ev[s].items()} for s in seeds},
                   "latency": latency, "detector": det, "table1": t1, "shared_equals_head_refine": same_as_head,
                   "coarse_equals_predict": same_coarse, "switch_changes_masks": changes, "predict_seconds_all_variants": predict_seconds,
                   "node_stats": node_stats, "latency_setting": {"batch": 1, "threads": 1 if dev.type == "cpu" else threads,
                                                                 "iters": bench_iters, "device": str(dev)}, "cost": cost,
                   "claims": claims, "headline": headline},
                  ctx.out / "results.json")
{c["id"]: (c["verdict"], c["ours"]) for c in claims}

# %%
fig, (a0, a1, a2) = plt.subplots(1, 3, figsize=(15, 3.9), layout="constrained")
keys = ["coarse", "coarse_112", "oracle"]
for j, s in enumerate(seeds):
    a0.bar(np.arange(3) + 0.4 * j - 0.2, [100 * max(0, t1[s][k]["segm_AP"]) for k in keys], 0.18, color="tab:blue", alpha=1 - 0.35 * j,
           label=f"AP^m s{s}")
    a0.bar(np.arange(3) + 0.4 * j - 0.02, [100 * max(0, t1[s][k]["boundary_AP"]) for k in keys], 0.18, color="tab:orange", alpha=1 - 0.35 * j,
           label=f"AP^B s{s}")
a0.set_xticks(range(3), ["coarse 28²", "coarse → 112²", "GT in the\nincoherent nodes"]); a0.set_ylabel("AP (%)")
a0.set_title("Table 1: the oracle on the trained detections", fontsize=10)
ks, names = [0, 1, 2, 3], DEPTHS
for s, ls in zip(seeds, ("-", "--")):
    a1.plot(ks, [100 * max(0, ev[s][n]["segm_AP"]) for n in names], "o" + ls, color="tab:blue", label=f"AP^m s{s}")
    a1.plot(ks, [100 * max(0, ev[s][n]["boundary_AP"]) for n in names], "s" + ls, color="tab:orange", label=f"AP^B s{s}")
a1.set_xticks(ks, ["0\n28²", "1\n28²", "2\n56²", "3\n112²"]); a1.set_xlabel("quadtree depth (output)"); a1.set_ylabel("AP (%)")
a1.set_ylim(0, 1.4 * max([1.0] + [100 * ev[s][n]["segm_AP"] for s in seeds for n in names]))   # room for the legend above the lines
a1.legend(fontsize=7, ncol=2, loc="upper left"); a1.set_title("Table 5: depth (inference-time)", fontsize=10)
t8 = [v for v, *_ in rows8]
y8 = np.arange(len(t8))
for j, s in enumerate(seeds):   # side-by-side bars per row and seed (never drawn over each other)
    a2.barh(y8 - 0.3 + 0.15 * j, [100 * max(0, ev[s][v]["segm_AP"]) for v in t8], height=0.15, color="tab:blue", alpha=1 - 0.35 * j, label=f"AP^m s{s}")
    a2.barh(y8 + 0.05 + 0.15 * j, [100 * max(0, ev[s][v]["boundary_AP"]) for v in t8], height=0.15, color="tab:orange", alpha=1 - 0.35 * j, label=f"AP^B s{s}")
a2.set_yticks(y8, t8, fontsize=8); a2.invert_yaxis(); a2.set_xlabel("AP (%)")
a2.set_title("Table 8: MJR / QMP (inference-time)", fontsize=10)
fig.legend(*a0.get_legend_handles_labels(), loc="outside lower center", ncol=2 * len(seeds), fontsize=8, frameon=False)  # bars of
fig.suptitle(f"Transfiner on the large shapes preset, {profile} profile, seeds {' / '.join(map(str, seeds))}")  # both bar panels
save_figure(fig, "transfiner_tables.png")

# %% [markdown]
# What to see: on the left, the GT written into the incoherent nodes lifts both mask AP and Boundary AP far above the
# coarse masks, while resampling the coarse mask to 112² alone changes little — the headroom a perfect refinement of
# those regions would recover. In the middle and on the right, how much each depth and each part of the trained head
# contributes at inference (read the numbers in the tables: the profile's schedule decides whether they separate).

# %%
assert same_as_head is not False and same_coarse
for s in seeds:
    assert all(0 <= e["segm_AP"] <= 1 and 0 <= e["boundary_AP"] <= 1 and e["images"] == ev[s]["depth 0 (coarse)"]["images"]
               for e in ev[s].values()), ev[s]
    assert len({round(e["bbox_AP"], 12) for e in ev[s].values()}) == 1  # the switches change masks only
    assert abs(t1[s]["coarse"]["segm_AP"] - ev[s]["depth 0 (coarse)"]["segm_AP"]) < 0.005   # the oracle's coarse = refine off (two pasting paths)
    if det[s]["positives"]:
        assert all(0 <= det[s][m]["all"][k] <= 1 for m in ("cascade", "single") for k in ("recall", "accuracy"))
        assert det[s]["cascade"]["levels"][0] == det[s]["single"]["levels"][0]  # both modes share the 28² map
