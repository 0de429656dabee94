# ---
# jupyter:
#   jupytext:
#     text_representation:
#       extension: .py
#       format_name: percent
#       format_version: '1.3'
#       jupytext_version: 1.19.6
#   kernelspec:
#     display_name: python3
#     language: python
#     name: python3
# ---

# %% [markdown]
# # Transfiner Tables 3, 5 and 8 on shapes: one training run, inference-time switches
#
# > Mask Transfiner's ablations on the incoherence detector (Table 3: recall / accuracy with and without lower-level
# > guidance), the quadtree depth (Table 5: depth 0 = the coarse 28² masks … depth 3 = 112²) and the refinement scheme
# > (Table 8: multi-level joint refinement, MJR, and quadtree mask propagation, QMP). We train one Transfiner on
# > torchvision's Mask R-CNN (`configs/transfiner_shapes_cpu.yaml`: ResNet-18-FPN from scratch, 128 px) and evaluate it
# > on the shapes val split once per switch.
#
# **Train-time in the paper, inference-time here.** Every row of these three tables is a separately trained model in
# the paper. Here all rows share one set of weights and differ only at inference: the model was trained with the cascade
# detector, three levels, joint refinement and the configured propagation, and each other row is that model run
# differently. A row that loses here may win when trained for it; what the rows measure is how much each part of the
# trained model contributes at inference.
#
# **Not comparable with the paper in absolute terms:** the paper trains R50-FPN (ImageNet init) on COCO train2017 for
# 12 epochs (1x) and reports COCO val (AP* uses LVIS annotations, which shapes has no counterpart of). The smoke profile
# (a handful of iterations) only proves that every switch runs: its APs are ~0.

# %% tags=["parameters"]
profile = "smoke"
out_dir = None
seed = 0
device = "cpu"
shapes_root = None
coco_root = None
iters = 1
batch_size = 2
eval_images = 4
refine_topk = 10  # detections refined per image, as the official code at test time; None: all
finetune_iters = 0  # > 0: stage 2 of configs/transfiner_shapes_cpu_finetune.yaml (predicted training nodes) for this many iterations
bench_iters = 3  # timed batch-1 calls per depth for Table 5 speed

# %%
import json, time
from contextlib import contextmanager
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
import torch
import torch.nn.functional as F

from segbook.data import collate
from segbook.config import load_config
from segbook.engine import build_train_loader, dist_info, resolve_device, seed_everything, train
from segbook.pipeline import build_model, eval_dataset, load_weights, train_dataset, with_dataset_classes
from segbook.quadtree import build_quadtree, propagate, roi_pyramid_levels, select_nodes, trim_padding
from segbook.reproduce import size_ranges, experiment_context, schedule_overrides, seconds_per_iter, write_json_atomic, write_table, _repo_root
from segbook.bench import latency_summary, time_alternately
from segbook.evaluation import evaluate_coco, predictions_to_coco
from segbook.transfiner import top_per_image, detector_recall, incoherence_scores, roi_pyramid_features
from segbook.viz import save_figure

ctx = experiment_context(out_dir, shapes_root, coco_root, seed)
CONFIG = _repo_root() / "configs" / "transfiner_shapes_cpu.yaml"
FT_CONFIG = _repo_root() / "configs" / "transfiner_shapes_cpu_finetune.yaml"


# %% [markdown]
# ## One training run (in one or two stages)
#
# The wiring of `segbook.pipeline.train_command` (what `segbook train` runs: data set, classes from the data, seeded
# model, the engine's `train`) with the schedule rescaled to `iters` as in the other experiments (warm-up over the first
# tenth, one ×0.1 step at 80 %), but without the engine's final evaluation: every evaluation of this model is one of the
# switched ones below (the configured one among them).
#
# With `finetune_iters > 0` (the cpu and gpu profiles) a second stage follows: `configs/transfiner_shapes_cpu_finetune.yaml`
# starting from stage 1's weights — the official code's training nodes (predicted incoherence at 0.125/0.5/0.5),
# bilinear propagation, the top 10 detections refined. This is the recipe under which refined masks first beat the
# coarse ones on shapes (session 3; with GT-incoherent training nodes the refinement head of a from-scratch R18 at
# 128 px learned nothing, chapter 8), so the tables below describe that model, trained with the code's choices.

# %%
def fit(config, iters, run_dir, extra=()):
    "Train `config` for `iters` iterations into `run_dir` (schedule rescaled as above); returns (cfg, model, summary)."
    cfg = load_config(config, [f"data.root={ctx.shapes}", f"device={device}", *schedule_overrides(iters, batch_size, seed), *extra])
    seed_everything(cfg.seed)
    train_set = train_dataset(cfg)
    cfg = with_dataset_classes(cfg, train_set)
    seed_everything(cfg.seed)
    model = build_model(cfg)
    if cfg.weights: load_weights(model, cfg.weights)
    summary = train(model, build_train_loader(train_set, cfg.data.batch_size, cfg.seed, collate, cfg.data.num_workers), cfg,
                    run_dir, evaluate_fn=None, resume=False, progress=False)
    return cfg, model, summary

t0, c0 = time.perf_counter(), time.process_time()
cfg, model, summary = fit(CONFIG, iters, ctx.out / "model")
run_dirs = [ctx.out / "model"]
if finetune_iters:
    # the measured recipe's schedule: a short warm-up, then a constant learning rate (no step inside the run)
    cfg, model, summary = fit(FT_CONFIG, finetune_iters, ctx.out / "model_ft",
                              [f"weights={ctx.out / 'model' / 'last.pt'}", f"solver.warmup_iters={max(1, finetune_iters // 40)}",
                               f"solver.steps=[{2 * finetune_iters}]"])
    run_dirs.append(ctx.out / "model_ft")
train_seconds, train_cpu_seconds = round(time.perf_counter() - t0, 1), round(time.process_time() - c0, 1)
s_per_iter = seconds_per_iter(run_dirs[-1])  # the last stage's
dev = resolve_device(device, dist_info())  # 'auto' -> cuda when there is one
model = model.to(dev).eval()
head, tcfg = model.head, model.cfg
val = eval_dataset(cfg)
print({"train_seconds": train_seconds, "train_cpu_seconds": train_cpu_seconds, "s_per_iter": round(s_per_iter, 2),
       "loss": round(summary["metrics"]["loss"], 3), "propagation": tcfg.propagation, "detector_mode": tcfg.detector_mode,
       "sizes": tcfg.sizes})


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
        self._feats, self._inc, self._nodes, self._tokens, self._values = [], {}, {}, {}, {}
        self.counts = {}  # (mode, depth) -> (detected, refined) node totals per level: the cap may drop whole levels

    def feats(self, n:int) -> list: # dense RoI features of the first n grids
        while len(self._feats) < n:
            l = len(self._feats)
            self._feats.append(roi_pyramid_features(self.levels, self.rois, self.fpn[:, l], self.head.sizes[l]))
        return self._feats[:n]

    def inc(self, mode:str, depth:int) -> list: # incoherence probabilities of the first `depth` levels
        if len(self._inc.get(mode, ())) < depth:
            with switched(self.head.detector, mode=mode, num_levels=depth):
                self._inc[mode] = [x.sigmoid() for x in self.head.detector(self.feats(depth if mode == "cascade" else 1), self.coarse)]
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

    def values(self, mode:str, depth:int, joint:bool) -> torch.Tensor: # [R,K] refined node probabilities
        if (mode, depth, joint) not in self._values:
            nodes = self.nodes(mode, depth)
            if (mode, depth) not in self._tokens:  # tokens are per node: the same for joint and per-level attention
                self._tokens[mode, depth] = self.head.encoder(self.levels, self.rois, self.fpn[:, :depth], nodes, self.coarse,
                                                              self.head.sizes[:depth])
            run = lambda valid: self.head.transformer(self._tokens[mode, depth], valid).sigmoid()
            if joint:
                v = run(nodes.valid)
            else:
                v = torch.zeros(nodes.valid.shape, device=self.rois.device)
                for l in range(depth):
                    on = nodes.level == l
                    v = torch.where(on, run(nodes.valid & on), v)
            self._values[mode, depth, joint] = v
        return self._values[mode, depth, joint]

    def masks(self, depth:int=3, # levels refined (Table 5), 1..3
              joint:bool=True, # one sequence over all levels (MJR) or one per level
              qmp:bool=True, # propagate every level's nodes (QMP) or write the finest level's only
              propagation:str|None=None, # 'nearest' | 'bilinear' (None: the trained config's)
              detector_mode:str|None=None, # 'cascade' | 'single' (None: the trained config's)
             ) -> torch.Tensor: # [R,s,s] refined probabilities, s = sizes[depth-1]
        mode = detector_mode or self.head.detector.mode
        nodes, values = self.nodes(mode, depth), self.values(mode, depth, joint)
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
    keep = top_per_image(rois, topk)
    shared = SharedRefinement(model.head, [feats[k] for k in ("p2", "p3", "p4", "p5")], rois[keep], coarse[keep]) if keep.any() else None
    out = {}
    for name, sw in variants.items():
        depth = sw.get("depth", len(model.head.sizes))
        masks = coarse
        if depth > 0:
            s = model.head.sizes[depth - 1]
            masks = F.interpolate(coarse[:, None], size=(s, s), mode="bilinear", align_corners=False)[:, 0]
            if shared is not None: masks[keep] = shared.masks(**sw).to(masks.dtype)
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
# One pass over the first `eval_images` val images (batches of 8) gives the predictions of every variant; each variant
# is scored with `segbook.evaluation.evaluate_coco` — box, mask and Boundary AP (Boundary IoU, dilation 0.02), as
# `evaluate_model` does. The box AP is the same in every row (the switches act on the masks only).

# %%
other = "bilinear" if tcfg.propagation == "nearest" else "nearest"
VARIANTS = {  # name: switches
    "depth 3 (as trained)": dict(depth=3),  # first: the shallower trees reuse its levels
    "depth 0 (coarse)": dict(depth=0), "depth 1": dict(depth=1), "depth 2": dict(depth=2),
    "MJR off": dict(joint=False), "QMP off": dict(qmp=False), "MJR off, QMP off": dict(joint=False, qmp=False),
    f"{other} propagation": dict(propagation=other),
    "detector: single 28² map": dict(detector_mode="single"),
}
n_eval = len(val) if eval_images is None else min(eval_images, len(val))
results, ids, node_stats = {n: [] for n in VARIANTS}, [], {}
t0 = time.perf_counter()
for start in range(0, n_eval, 8):
    images, sizes, orig, targets = batch_of(val, list(range(start, min(n_eval, start + 8))), dev)
    batch_ids = [int(t["image_id"]) for t in targets]
    for name, preds in predict_batch(model, images, sizes, orig, VARIANTS, refine_topk, stats=node_stats).items():
        results[name] += predictions_to_coco(preds, batch_ids, val.coco_ids)  # RLE now: 9 variants of pasted masks would not fit
    ids += batch_ids
predict_seconds = time.perf_counter() - t0
ev = {}
for name in VARIANTS:
    m = evaluate_coco(val.ann_file, results[name], iou_types=("bbox", "segm", "boundary"), image_ids=ids)
    ev[name] = {**{f"{t}_{k}": v for t, r in m.items() for k, v in r.items() if k != "stats"}, "images": len(ids),
                "detections": len(results[name])}
    print(f"{name:28s} AP^m {100 * ev[name]['segm_AP']:5.2f}  AP^B {100 * ev[name]['boundary_AP']:5.2f}  AP^b {100 * ev[name]['bbox_AP']:5.2f}")
print(f"predictions of {len(VARIANTS)} variants on {len(ids)} images: {predict_seconds:.0f} s")
per_roi = lambda key, kind: " / ".join(f"{v / max(1, node_stats[key]['rois']):.0f}" for v in node_stats[key][kind]) if key in node_stats else "–"
nodes_note = (f"Nodes per refined RoI as trained (cascade, 3 levels), 28²/56²/112²: detected {per_roi('cascade/3', 'detected')}, "
              f"refined after the cap of {tcfg.max_nodes_per_roi} per RoI (most confident first) {per_roi('cascade/3', 'refined')}.")
print(nodes_note)

# %% [markdown]
# Speed per depth (Table 5's FPS column): `segbook.bench.time_alternately` calls the depth variants in turn on one val
# image, batch 1, each call from scratch (nothing shared between variants): detection, refinement of the top
# `refine_topk` detections (trimmed node sequences, as above), pasting. On the CPU with one thread.

# %%
DEPTHS = ["depth 0 (coarse)", "depth 1", "depth 2", "depth 3 (as trained)"]
one = batch_of(val, [0], dev)[:3]
threads = torch.get_num_threads(); torch.set_num_threads(1 if dev.type == "cpu" else threads)
timed = time_alternately({n: (lambda x, n=n: predict_batch(model, *x, {n: VARIANTS[n]}, refine_topk)[n]) for n in DEPTHS},
                         one, bench_iters, warmup=1, device=dev)
torch.set_num_threads(threads)
for n in DEPTHS:
    ev[n]["latency"] = latency_summary(timed[n]["ms"])
    print(f"{n:22s} {ev[n]['latency']['median_ms']:.0f} ms / image")

# %% [markdown]
# ## Table 3: the incoherence detector's recall and accuracy
#
# On the val images: every detection with IoU ≥ 0.5 to a (non-crowd) ground-truth box is a positive; its targets are
# Eq. 1's incoherent cells of that GT mask cropped to the detected box (`incoherent_pyramid`, the training targets), its
# predictions the detector's maps ≥ `inc_threshold`. Recall = TP/(TP+FN), accuracy = (TP+TN)/all cells
# (`segbook.transfiner.incoherence_scores` and `detector_recall`, chapter 8), pooled over all positives, per level and
# over the three levels together.
# The paper does not say which level(s) its numbers pool.

# %%
scores = incoherence_scores(model, val, dev, eval_images, modes=["cascade", "single"])
det = {"positives": scores["positives"], "incoherent_share": [float(t.float().mean()) for t in scores["targets"]],
       **{m: detector_recall(scores, tcfg.inc_threshold, m) for m in ("cascade", "single")}} if scores["positives"] else {"positives": 0}
print(json.dumps(det, indent=None)[:600])

# %% [markdown]
# ## The tables
#
# Ours beside the paper (COCO val, R50-FPN, 1x). AP* (LVIS annotations of COCO val) has no shapes counterpart and is
# shown for the paper only; our AP^B is Boundary AP on shapes val. −1 from COCOeval (no ground truth of that size on
# shapes) is "n/a".

# %%
pct = lambda v: "n/a" if v is None or v < 0 else f"{100 * v:.1f}"
setting = (f"{profile} profile: one Transfiner (Mask R-CNN R18-FPN from scratch, 128 px) trained {iters} iterations × batch "
           f"{batch_size}" + (f", then fine-tuned {finetune_iters} iterations on predicted incoherent nodes "
                               f"(configs/{FT_CONFIG.name})" if finetune_iters else "") + f", trained with detector '{tcfg.detector_mode}', propagation '{tcfg.propagation}', joint refinement, "
           f"3 levels {tcfg.sizes}; evaluated on {ev['depth 3 (as trained)']['images']} shapes val images, refining the top "
           f"{refine_topk if refine_topk is not None else 'all'} detections per image")
smoke_note = ("Smoke schedule: the numbers only show that every switch runs; no ranking can be read from them."
              if profile == "smoke" else "Compare the direction of each effect with the paper, not the values.")
INF = "inference-time switch here (paper: a separately trained model)"

# Table 3
P3 = {"cascade": dict(acc=84, rec=86, AP=37.3, APB=24.2), "single": dict(acc=79, rec=73, AP=36.6, APB=23.7)}
rows3 = {"cascade": ("lower-level guidance ✓: cascade, finer levels fused with the up-sampled coarser map (as trained)", "depth 3 (as trained)"),
         "single": ("no finer-level detection: the 28² map nearest-up-sampled (official code's detector; "
                    "paper row: no guidance, trained)", "detector: single 28² map")}
lines = [f"Transfiner Table 3 (incoherence detector) on shapes — {setting}; {det['positives']} positive detections (IoU ≥ 0.5).", "",
         "| detector | ours recall (all levels) | ours accuracy | ours recall 28²/56²/112² | ours AP | ours AP^B | paper recall | paper acc | paper AP | paper AP^B | row is |",
         "|---|---|---|---|---|---|---|---|---|---|---|"]
for m, (label, var) in rows3.items():
    d = det.get(m)
    rec = "–" if d is None else f"{100 * d['all']['recall']:.0f}%"
    acc = "–" if d is None else f"{100 * d['all']['accuracy']:.0f}%"
    per = "–" if d is None else " / ".join(f"{100 * x['recall']:.0f}%" for x in d["levels"])
    lines.append(f"| {label} | {rec} | {acc} | {per} | {pct(ev[var]['segm_AP'])} | {pct(ev[var]['boundary_AP'])} | "
                 f"{P3[m]['rec']}% | {P3[m]['acc']}% | {P3[m]['AP']} | {P3[m]['APB']} | {'as trained' if m == tcfg.detector_mode else INF} |")
share = det.get("incoherent_share")
lines += ["", "Targets: Eq. 1 incoherent cells of the matched GT mask cropped to the detected box"
          + (f" (incoherent share of the cells 28²/56²/112²: {' / '.join(f'{100 * s:.1f}%' for s in share)})." if share else
             " — no detection reached IoU 0.5 with a GT box, so recall and accuracy are undefined (–).")
          + " Paper text: recall 74% → 86% (its table says 73%). " + smoke_note]
write_table(ctx.tables / "transfiner_table3_detector.md", lines)

# Table 5
P5 = {0: (35.2, 37.6, 50.3, 37.7, 17.2, 12.3), 1: (35.5, 38.4, 50.9, 38.1, 17.2, 10.6), 2: (36.2, 39.1, 51.9, 38.7, 17.3, 8.9),
      3: (37.3, 40.5, 52.9, 39.5, 17.5, 7.1), 4: (37.1, 40.7, 53.1, 39.3, 17.4, 5.2)}
lines = [f"Transfiner Table 5 (quadtree depth) on shapes — {setting}.", "",
         f"| depth | output | ours AP | ours AP^B | ours AP_L | ours AP_M | ours AP_S | ours ms / image ({dev.type}, batch 1{', 1 thread' if dev.type == 'cpu' else ''}) | paper AP | paper AP* | paper AP_L | paper AP_M | paper AP_S | paper FPS (GPU) | row is |",
         "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
for k, p in P5.items():
    out = f"{28 * 2 ** max(0, k - 1)}×{28 * 2 ** max(0, k - 1)}"
    if k <= 3:
        e = ev["depth 0 (coarse)" if k == 0 else ("depth 3 (as trained)" if k == 3 else f"depth {k}")]
        ours = f"{pct(e['segm_AP'])} | {pct(e['boundary_AP'])} | {pct(e['segm_APl'])} | {pct(e['segm_APm'])} | {pct(e['segm_APs'])} | {e['latency']['median_ms']:.0f}"
        kind = "as trained" if k == 3 else ("the coarse masks of the same model (`refine: false`)" if k == 0 else INF)
    else:
        ours, kind = "not run | – | – | – | – | –", "needs a 224² level the trained head does not have"
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
lines = [f"Transfiner Table 8 (multi-level joint refinement, quadtree mask propagation) on shapes — {setting}.", "",
         "| MJR | QMP | propagation | ours AP | ours AP^B | ours AP_50 | paper AP | paper AP^B | paper AP* | paper AP*_50 | row is |",
         "|---|---|---|---|---|---|---|---|---|---|---|"]
for var, mjr, qmp, prop in rows8:
    e, p = ev[var], P8.get((mjr, qmp)) if prop == "nearest" else None
    paper = " | ".join(str(v) for v in p) if p else "– | – | – | –"
    kind = "as trained" if var == "depth 3 (as trained)" else INF
    lines.append(f"| {'✓' if mjr else ''} | {'✓' if qmp else ''} | {prop} | {pct(e['segm_AP'])} | {pct(e['boundary_AP'])} | "
                 f"{pct(e['segm_AP50'])} | {paper} | {kind} |")
lines += ["", "QMP off: the coarse mask up-sampled to 112² with only the finest level's refined nodes written (§4.2); MJR off: "
          "each level's nodes attend only to their own level. The paper propagates by nearest duplication; the official "
          "code up-samples bilinearly (align_corners) and overwrites the nodes — that row has no paper number. " + nodes_note
          + " MJR and QMP can only matter where an RoI refines nodes on more than one level. " + smoke_note]
write_table(ctx.tables / "transfiner_table8_mjr_qmp.md", lines)

# Coarse vs refined, the head's whole contribution
c, r = ev["depth 0 (coarse)"], ev["depth 3 (as trained)"]
lines = [f"Coarse (`refine: false`) vs refined masks of the same Transfiner — {setting}.", "",
         "| masks | AP^m | AP^m_50 | AP^m_75 | AP^B (boundary) | AP^B_75 | AP^b (box) | paper AP (Table 5) |", "|---|---|---|---|---|---|---|---|"]
for label, e, p in (("coarse 28² (Mask R-CNN head)", c, 35.2), ("refined 112² (Transfiner)", r, 37.3)):
    lines.append(f"| {label} | {pct(e['segm_AP'])} | {pct(e['segm_AP50'])} | {pct(e['segm_AP75'])} | {pct(e['boundary_AP'])} | "
                 f"{pct(e['boundary_AP75'])} | {pct(e['bbox_AP'])} | {p} |")
lines += ["", smoke_note]
write_table(ctx.tables / "transfiner_coarse_vs_refined.md", lines)
write_json_atomic({"profile": profile, "iters": iters, "finetune_iters": finetune_iters, "batch_size": batch_size, "eval_images": eval_images,
                   "refine_topk": refine_topk, "train_seconds": train_seconds, "train_cpu_seconds": train_cpu_seconds,
                   "s_per_iter": s_per_iter, "config": str(CONFIG), "finetune_config": str(FT_CONFIG) if finetune_iters else None, "variants": {n: {"switches": VARIANTS[n], **e} for n, e in ev.items()},
                   "detector": det, "shared_equals_head_refine": same_as_head, "coarse_equals_predict": same_coarse,
                   "switch_changes_masks": changes, "predict_seconds_all_variants": predict_seconds, "node_stats": node_stats,
                   "latency_setting": {"batch": 1, "threads": 1 if dev.type == "cpu" else threads, "iters": bench_iters,
                                       "device": str(dev)}},
                  ctx.out / "results.json")

# %%
fig, (a1, a2) = plt.subplots(1, 2, figsize=(11, 3.8), layout="constrained")
ks = [0, 1, 2, 3]
names = ["depth 0 (coarse)", "depth 1", "depth 2", "depth 3 (as trained)"]
a1.plot(ks, [100 * max(0, ev[n]["segm_AP"]) for n in names], "o-", label="AP^m")
a1.plot(ks, [100 * max(0, ev[n]["boundary_AP"]) for n in names], "s-", label="AP^B")
a1.set_xticks(ks, ["0\n28²", "1\n28²", "2\n56²", "3\n112²"]); a1.set_xlabel("quadtree depth (output)"); a1.set_ylabel("AP (%)")
a1.legend(); a1.set_title("Table 5: depth (inference-time)")
t8 = [v for v, *_ in rows8]
y8 = np.arange(len(t8))   # side-by-side bars per row (never drawn over each other)
a2.barh(y8 - 0.2, [100 * max(0, ev[v]["segm_AP"]) for v in t8], height=0.4, color="tab:blue", label="AP^m")
a2.barh(y8 + 0.2, [100 * max(0, ev[v]["boundary_AP"]) for v in t8], height=0.4, color="tab:orange", label="AP^B")
a2.set_yticks(y8, t8); a2.invert_yaxis(); a2.set_xlabel("AP (%)"); a2.legend(loc="lower right")
a2.set_title("Table 8: MJR / QMP (inference-time)")
fig.suptitle(f"Transfiner on shapes, {profile}: {iters} it" + (f" + {finetune_iters} fine-tuning it" if finetune_iters else "")
             + f" × {batch_size}")
save_figure(fig, "transfiner_tables.png"); plt.close(fig)

# %%
assert summary["iteration"] == (finetune_iters or iters) and same_as_head is not False
assert all(0 <= e["segm_AP"] <= 1 and 0 <= e["boundary_AP"] <= 1 and e["images"] == ev["depth 0 (coarse)"]["images"]
           for e in ev.values()), ev
assert len({round(e["bbox_AP"], 12) for e in ev.values()}) == 1  # the switches change masks only
if det["positives"]:
    assert all(0 <= det[m]["all"][k] <= 1 for m in ("cascade", "single") for k in ("recall", "accuracy"))
    assert det["cascade"]["levels"][0] == det["single"]["levels"][0]  # both modes share the 28² map
