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
# # Mask Transfiner where the mask resolution is the bottleneck: refined vs coarse on the large preset, on both detectors
#
# > The `large` shapes preset (320² images, mostly COCO-large objects with detail a 28² grid cannot hold) leaves
# > 20 mask AP and 44 boundary AP between a perfect 28² mask and a perfect 112² one (`transfiner_headroom`). Here
# > Mask Transfiner is trained on it, on torchvision's Mask R-CNN (the paper) and on ISTR (this book's combination),
# > two seeds each, and every model is scored three ways on the same detections: its coarse 28² masks
# > (`model.refine=false`), refined at the paper's detector threshold (0.5 on every level), and refined at an
# > operating point chosen on training images. Beside that, Table 3's recall and accuracy of the incoherence detector
# > per level, and the nodes the quadtree refines per level.
#
# **Recipe** (`configs/transfiner_large_cpu.yaml`, `configs/transfiner_istr_large_cpu.yaml`): the book's
# shapes-pretrained ResNet-18 + FPN (chapter 05b) with frozen BatchNorm, ResNet layers 2–4 and the FPN trained,
# 600 training images, batch 2; 1800 iterations for Mask R-CNN (6 epochs), 4000 for ISTR (13 epochs; a set-prediction
# detector needs the longer schedule). The head is trained as the paper: GT-incoherent training nodes, the BCE
# detector loss, nearest propagation.
#
# **The operating point is an inference-time switch.** The paper thresholds its detector at 0.5 and says recall is
# what matters ("to cover all the error-prone regions"), reaching 86 % (Table 3) with jittered training targets,
# which we do not use. Our detector, trained with plain BCE on a target that marks 3–11 % of the cells, is calibrated
# lower than that: at 0.5 it finds a minority of them. So each model also gets, per level, the highest threshold at
# which it reaches the paper's 86 % recall **on the first training images** (never val), and val is scored at those.
# Both rows are in every table; the ledger's refined numbers are the calibrated ones, labelled so.
#
# **Same detections.** Coarse and refined share the checkpoint, the boxes and the scores; only the masks differ. For
# both detectors the ten best detections of an image are refined (`refine_topk=10`, the official code's test-time
# limit; the rest keep their coarse mask) with at most 1024 nodes per RoI.

# %% tags=["parameters"]
profile = "smoke"
out_dir = None
seed = 0  # seed of the data set (the training seeds are `seeds`)
device = "cpu"
shapes_root = "unused"   # the default preset is not used: the large preset is generated here
coco_root = None
n_train = 8  # training images of the large preset
n_val = 4  # val images
seeds = [0]  # training seeds, per detector
detectors = ["maskrcnn", "istr"]
iters = 4  # None: the configs' schedules (cpu and gpu profiles); else every run is rescaled to this many iterations
workers = 1  # trainings / evaluations side by side (one torch thread each)
calib_images = 4  # training images the operating point is chosen on
calib_recall = 0.86  # Table 3's recall with lower-level guidance
eval_images = None  # None: the whole val split
refine_topk = 10
max_nodes_per_roi = 1024

# %%
import json, os, subprocess, sys, time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
import torch
from tqdm.auto import tqdm

from segbook.config import load_config
from segbook.pipeline import build_model, eval_dataset, load_weights
from segbook.reproduce import (_repo_root, experiment_context, run_finished, seconds_per_iter, shapes_mismatch, threshold_verdict,
                               write_json_atomic, write_table)
from segbook.shapes import write_shapes_dataset
from segbook.transfiner import detector_recall, incoherence_scores, thresholds_for_recall
from segbook.viz import save_figure

ctx = experiment_context(out_dir, None if shapes_root == "unused" else shapes_root, coco_root, seed, n_train=2, n_val=1)
CONFIGS = {"maskrcnn": _repo_root() / "configs" / "transfiner_large_cpu.yaml",
           "istr": _repo_root() / "configs" / "transfiner_istr_large_cpu.yaml"}
LABEL = {"maskrcnn": "Mask R-CNN", "istr": "ISTR"}
PAPER_THRESHOLDS = [0.5, 0.5, 0.5]
torch.set_num_threads(1)

# %% [markdown]
# ## Data and training
#
# The data set lives in the run's shared folder, keyed by seed and image counts (`shapes_mismatch` checks it says
# exactly that), so a second run reuses it. Each model is one `segbook train` command, `workers` at a time, one
# thread each; a run folder that has reached the end of its schedule and been evaluated there is kept as it is (a
# killed one resumes from its last checkpoint).

# %%
root = ctx.shared / f"shapes_large_s{seed}_train{n_train}_val{n_val}"
if shapes_mismatch(root, seed=seed, n_train=n_train, n_val=n_val, size=320, preset="large") is not None:
    write_shapes_dataset(root, n_train=n_train, n_val=n_val, seed=seed, preset="large")
segbook = [sys.executable, "-m", "segbook.cli"]
env = {**os.environ, "OMP_NUM_THREADS": "1"}

def run_logged(args:list, log:Path) -> dict:
    "Run one segbook command, its output to `log`; the last stdout line is its JSON summary when it prints one."
    t0 = time.perf_counter()
    with open(log, "w") as fh:
        p = subprocess.run(args, stdout=subprocess.PIPE, stderr=fh, text=True, env=env, cwd=_repo_root())
    if p.returncode:
        raise RuntimeError(f"{' '.join(map(str, args[2:]))} failed ({p.returncode}); see {log}:\n{log.read_text()[-1500:]}")
    lines = [l for l in p.stdout.splitlines() if l.startswith("{")]
    return {"seconds": round(time.perf_counter() - t0, 1), **(json.loads(lines[-1]) if lines else {})}

runs = {(d, s): ctx.out / "runs" / f"{d}_s{s}" for d in detectors for s in seeds}
finished = lambda run: run_finished(run, evaluated=True)   # trained to the end of its schedule and evaluated there

def train_one(key):
    d, s = key
    if finished(runs[key]): return {"seconds": 0.0, "reused": str(runs[key])}
    runs[key].parent.mkdir(parents=True, exist_ok=True)
    args = [*segbook, "train", "--config", str(CONFIGS[d]), "--data", str(root), "--out", str(runs[key]), "--device", device,
            *(["--max-iters", str(iters)] if iters else []), f"seed={s}"]
    return run_logged(args, runs[key].parent / f"{d}_s{s}.train.log")

t0 = time.perf_counter()
with ThreadPoolExecutor(workers) as pool:
    trained = dict(zip(runs, tqdm(pool.map(train_one, runs), total=len(runs), desc="train")))
train_seconds = round(time.perf_counter() - t0, 1)
s_per_iter = {f"{d}_s{s}": seconds_per_iter(runs[d, s]) for d, s in runs}
print({"train_seconds": train_seconds, "s_per_iter": s_per_iter})

# %% [markdown]
# ## The incoherence detector: operating point, recall and nodes
#
# For each model: its detector's probabilities on the positive detections of the first `calib_images` training images
# give the per-level thresholds that reach 86 % recall there (`thresholds_for_recall`); on val, Table 3's recall and
# accuracy at 0.5 and at those thresholds, and the mean number of nodes a refined RoI gets per level at each
# (`incoherence_scores`, chapter 8).

# %%
WEIGHTS = _repo_root() / "weights" / "shapes_resnet18.pt"   # the configs name it relative to the repository root
def model_of(run:Path, d:str):
    pretrained = f"model.pretrained={WEIGHTS}" if d == "maskrcnn" else f"model.istr.pretrained={WEIGHTS}"
    cfg = load_config(run / "config.yaml", [f"model.refine_topk={refine_topk}", f"model.max_nodes_per_roi={max_nodes_per_roi}", pretrained])
    model = build_model(cfg); load_weights(model, run / "last.pt", verbose=False)
    return cfg, model.eval()

def cached(path:Path, request:dict, compute):
    "`compute()`, or the value saved at `path` by an earlier call with the same request (and the same checkpoint)."
    if path.exists():
        saved = json.loads(path.read_text())
        if saved.get("request") == request: return saved["value"]
    value = compute()
    write_json_atomic({"request": request, "value": value}, path)
    return value

stamp = lambda run: [(run / "last.pt").stat().st_size, (run / "last.pt").stat().st_mtime_ns]
def measure_detector(key, run):
    cfg, model = model_of(run, key[0])
    calib = incoherence_scores(model, eval_dataset(cfg, cfg.data.train_split), max_images=calib_images)
    thr = thresholds_for_recall(calib, calib_recall) if calib["positives"] else PAPER_THRESHOLDS
    val = incoherence_scores(model, eval_dataset(cfg), max_images=eval_images, node_thresholds=[PAPER_THRESHOLDS, thr])
    curve = [[(t, detector_recall(val, [t] * 3)["levels"]) for t in (0.02, 0.05, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7)]] if val["positives"] else []
    return {"thresholds": thr, "calib_positives": calib["positives"], "val_positives": val["positives"],
            "paper": detector_recall(val, PAPER_THRESHOLDS) if val["positives"] else None,
            "calibrated": detector_recall(val, thr) if val["positives"] else None,
            "nodes": {"paper": val["nodes"][0], "calibrated": val["nodes"][1]}, "refined_rois": val["rois"], "curve": curve}

request = dict(calib_images=calib_images, calib_recall=calib_recall, eval_images=eval_images, refine_topk=refine_topk,
               max_nodes_per_roi=max_nodes_per_roi, positives="every detection")
measure = lambda key: cached(runs[key] / "detector.json", {**request, "checkpoint": stamp(runs[key])},
                            lambda: measure_detector(key, runs[key]))
with ThreadPoolExecutor(workers) as pool:   # torch releases the GIL in its kernels: `workers` models side by side
    detector = dict(zip(runs, tqdm(pool.map(measure, runs), total=len(runs), desc="detector")))
print({f"{d}_s{s}": {"thr": [round(t, 3) for t in v["thresholds"]],
                     "recall": [round(l["recall"], 3) for l in v["calibrated"]["levels"]] if v["calibrated"] else None,
                     "nodes": [round(x, 1) for x in v["nodes"]["calibrated"]]} for (d, s), v in detector.items()})

# %% [markdown]
# ## Coarse vs refined on the same detections
#
# Three `segbook eval` commands per model: `model.refine=false` (the coarse 28² masks), the paper's thresholds, the
# calibrated ones. Mask AP and Boundary AP (COCO's definitions; the preset's objects are COCO-large). Each measurement
# is kept beside its run with what was asked, so a rerun (or a killed one) redoes only what changed.

# %%
settings = {"coarse": lambda key: ["model.refine=false"],
            "paper": lambda key: [f"model.inc_threshold={json.dumps(PAPER_THRESHOLDS)}"],
            "calibrated": lambda key: ["model.inc_threshold=[" + ", ".join(f"{t:.10f}" for t in detector[key]["thresholds"]) + "]"]}
# (fixed-point: YAML reads 1e-05 as a string)
def eval_one(job):
    key, name = job
    out = runs[key] / f"eval_{name}"
    args = [*segbook, "eval", "--checkpoint", str(runs[key] / "last.pt"), "--out", str(out), "--device", device,
            *(["--max-images", str(eval_images)] if eval_images else []),
            f"model.refine_topk={refine_topk}", f"model.max_nodes_per_roi={max_nodes_per_roi}", *settings[name](key)]
    return cached(out / "request.json", {"args": args[2:], "checkpoint": stamp(runs[key])},
                  lambda: run_logged(args, runs[key] / f"eval_{name}.log"))

jobs = [(key, name) for key in runs for name in settings]
with ThreadPoolExecutor(workers) as pool:
    evals = dict(zip(jobs, tqdm(pool.map(eval_one, jobs), total=len(jobs), desc="eval")))
ap = {(key, name): {k: 100 * evals[key, name][k] for k in ("segm_AP", "boundary_AP", "bbox_AP")} | {"seconds": evals[key, name]["seconds"]}
      for key, name in jobs}
print({f"{d}_s{s} {n}": {k: round(v, 1) for k, v in a.items()} for ((d, s), n), a in ap.items()})

# %% [markdown]
# ## Tables and ledger

# %%
f1 = lambda v: "–" if v is None else f"{v:.1f}"
pct = lambda xs: " / ".join(f"{100 * x:.0f}" for x in xs)
lines = [f"Mask Transfiner on the large shapes preset ({profile} profile; val: {evals[jobs[0]]['images']} images of {root.name}). Mask AP / Boundary AP (%) of the same detections, coarse "
         "(`model.refine=false`) and refined at the paper's detector threshold (0.5) and at the operating point chosen "
         f"on {calib_images} training images ({100 * calib_recall:.0f} % recall per level there). Recall / accuracy: "
         "Table 3's, per level 28² / 56² / 112², on val. Nodes: mean refined nodes per RoI per level.", "",
         "| detector | seed | coarse mask / boundary | refined @0.5 | refined @calibrated | Δ mask / Δ boundary (calibrated) "
         "| thresholds | recall @0.5 | recall @calibrated | accuracy @calibrated | nodes @0.5 | nodes @calibrated |",
         "|---|---|---|---|---|---|---|---|---|---|---|---|"]
for (d, s) in runs:
    c, p, k, det = ap[(d, s), "coarse"], ap[(d, s), "paper"], ap[(d, s), "calibrated"], detector[d, s]
    rec = lambda which, m: pct([l[m] for l in det[which]["levels"]]) if det[which] else "–"
    lines.append(f"| {LABEL[d]} | {s} | {f1(c['segm_AP'])} / {f1(c['boundary_AP'])} | {f1(p['segm_AP'])} / {f1(p['boundary_AP'])} "
                 f"| {f1(k['segm_AP'])} / {f1(k['boundary_AP'])} | {k['segm_AP'] - c['segm_AP']:+.1f} / {k['boundary_AP'] - c['boundary_AP']:+.1f} "
                 f"| {' / '.join(f'{t:.3g}' for t in det['thresholds'])} | {rec('paper', 'recall')} | {rec('calibrated', 'recall')} "
                 f"| {rec('calibrated', 'accuracy')} | {' / '.join(f'{x:.0f}' for x in det['nodes']['paper'])} "
                 f"| {' / '.join(f'{x:.0f}' for x in det['nodes']['calibrated'])} |")
lines += ["", "Paper (COCO val, R50-FPN, Table 5): depth 0 (coarse 28²) 35.2 AP → depth 3 (112²) 37.3 AP (+2.1); Table 3: "
          "recall 86 %, accuracy 84 % with lower-level guidance. Rows '@0.5' are the model as trained and thresholded as the "
          "paper; '@calibrated' is an inference-time switch (thresholds from training images)."]
write_table(ctx.tables / "transfiner_large.md", lines)

# %%
per_seed = lambda d, name, k: [round(ap[(d, s), name][k], 2) for s in seeds if (d, s) in runs]
diff = lambda d, k, name="calibrated": [round(ap[(d, s), name][k] - ap[(d, s), "coarse"][k], 2) for s in seeds if (d, s) in runs]
claims = []
for d in detectors:
    for k, metric, need in (("segm_AP", "mask AP", 1.0), ("boundary_AP", "boundary AP", 2.0)):
        claims.append({"id": f"transfiner.refined_vs_coarse.{d}.{k}", "paper": "Mask Transfiner", "where": "Table 5",
                       "claim": f"refined 112² masks beat the coarse 28² ones on {metric} ({LABEL[d]} detector, large preset)",
                       "metric": f"{metric}: refined − coarse (calibrated thresholds)",
                       "paper_values": {"refined - coarse": 2.1 if k == "segm_AP" else None},
                       "ours": {"refined - coarse": diff(d, k), "refined - coarse @0.5": diff(d, k, "paper"),
                                "coarse": per_seed(d, "coarse", k), "refined": per_seed(d, "calibrated", k)},
                       "seeds": seeds, "profile": profile, "data": f"shapes large val ({evals[jobs[0]]['images']} images)",
                       **threshold_verdict(diff(d, k), need), "target": f"≥ +{need} per seed",
                       "table": "figures/tables/transfiner_large.md",
                       "command": f"segbook reproduce --profile {profile} --only transfiner_large"})
recall_at = lambda d, which: [[round(100 * l["recall"], 1) for l in detector[d, s][which]["levels"]] if detector[d, s][which] else None
                              for s in seeds if (d, s) in runs]
claims.append({"id": "transfiner.table3.detector_recall_per_level", "paper": "Mask Transfiner", "where": "Table 3",
               "claim": "the incoherence detector finds most incoherent cells on every level (recall 86 %)",
               "metric": "val recall (%) per level [28², 56², 112²], Mask R-CNN detector",
               "paper_values": {"recall": 86, "accuracy": 84},
               "ours": {"recall @calibrated": recall_at("maskrcnn", "calibrated"), "recall @0.5": recall_at("maskrcnn", "paper")},
               "seeds": seeds, "profile": profile, **threshold_verdict([min(r) for r in recall_at("maskrcnn", "calibrated") if r], 50),
               "target": "≥ 50 % on each level per seed", "table": "figures/tables/transfiner_large.md",
               "command": f"segbook reproduce --profile {profile} --only transfiner_large"})
headline = {"transfiner_refined_mask_ap": per_seed("maskrcnn", "calibrated", "segm_AP"),
            "transfiner_coarse_mask_ap": per_seed("maskrcnn", "coarse", "segm_AP"),
            "transfiner_refined_boundary_ap": per_seed("maskrcnn", "calibrated", "boundary_AP"),
            "transfiner_coarse_boundary_ap": per_seed("maskrcnn", "coarse", "boundary_AP"),
            "detector_recall_per_level": recall_at("maskrcnn", "calibrated")[0]} if "maskrcnn" in detectors else {}
write_json_atomic({"profile": profile, "data": str(root), "seeds": seeds, "iters": iters, "train_seconds": train_seconds,
                   "s_per_iter": s_per_iter, "calib_images": calib_images, "calib_recall": calib_recall,
                   "refine_topk": refine_topk, "max_nodes_per_roi": max_nodes_per_roi,
                   "detector": {f"{d}_s{s}": {k: v for k, v in det.items()} for (d, s), det in detector.items()},
                   "ap": {f"{d}_s{s}.{n}": a for ((d, s), n), a in ap.items()},
                   "claims": claims, "headline": headline}, ctx.out / "results.json")
{c["id"]: (c["verdict"], c["ours"]["refined - coarse"] if "refined - coarse" in c["ours"] else c["ours"]["recall @calibrated"]) for c in claims}

# %%
fig, (a1, a2) = plt.subplots(1, 2, figsize=(11, 3.6), layout="constrained")
key0 = next(iter(runs))
if detector[key0]["curve"]:
    ts = [t for t, _ in detector[key0]["curve"][0]]
    for l, (s, colour) in enumerate(zip((28, 56, 112), ("tab:blue", "tab:orange", "tab:green"))):
        a1.plot(ts, [100 * lv[l]["recall"] for _, lv in detector[key0]["curve"][0]], "-o", color=colour, ms=3, label=f"recall {s}²")
        a1.plot(ts, [100 * lv[l]["accuracy"] for _, lv in detector[key0]["curve"][0]], ":", color=colour, label=f"accuracy {s}²")
        a1.axvline(detector[key0]["thresholds"][l], color=colour, lw=0.8, alpha=0.6)
    a1.axvline(0.5, color="k", lw=0.8, ls="--"); a1.axhline(86, color="grey", lw=0.6)
a1.set_xlabel("detector threshold"); a1.set_ylabel("%"); a1.legend(fontsize=7, ncol=2)
a1.set_title(f"Table 3 on val, {LABEL[key0[0]]} seed {key0[1]}: thin lines = calibrated thresholds", fontsize=9)
names = [f"{LABEL[d]} s{s}" for d, s in runs]
x = np.arange(len(names))
for j, (name, hatch) in enumerate((("paper", ""), ("calibrated", "//"))):
    a2.bar(x + j * 0.2 - 0.3, [ap[k, name]["segm_AP"] - ap[k, "coarse"]["segm_AP"] for k in runs], 0.2, color="tab:blue", hatch=hatch,
           label=f"Δ mask AP @{'0.5' if name == 'paper' else 'calibrated'}")
    a2.bar(x + j * 0.2 + 0.1, [ap[k, name]["boundary_AP"] - ap[k, "coarse"]["boundary_AP"] for k in runs], 0.2, color="tab:orange",
           hatch=hatch, label=f"Δ boundary AP @{'0.5' if name == 'paper' else 'calibrated'}")
a2.axhline(0, color="k", lw=0.6); a2.set_xticks(x, names, fontsize=8); a2.set_ylabel("refined − coarse (AP points)")
a2.legend(fontsize=7); a2.set_title("same detections, refined − coarse", fontsize=9)
save_figure(fig, "transfiner_large.png")

# %% [markdown]
# What to see: on the left, recall falls fast with the threshold and faster on the finer levels, so at 0.5 (dashed)
# the detector marks under half of the 28² incoherent cells and under a fifth of the 56² and 112² ones, while the
# thresholds chosen on training images (thin lines) reach the paper's 86 % on val too, with accuracy still above 80 %.
# On the right, refining at that operating point adds about 3 mask AP on both detectors and far more boundary AP on
# Mask R-CNN than on ISTR, whose coarse masks score ~0 boundary AP here (its l = 60 PCA masks are smooth at 28²); at
# 0.5 the gains are a tenth to two fifths of those.
