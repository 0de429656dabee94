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
# # Reports: AP tables, training curves, predictions beside the ground truth
#
# > What `segbook eval` prints, what `segbook plot` and `segbook viz` draw — presentation only; the numbers come from chapters 9 and 10.

# %%
#| default_exp report

# %% [markdown]
# Three ways to read a result, each a pure function of files the other commands write:
#
# - **the AP table** of `segbook eval` — the numbers `evaluate_coco` (chapter 9) returns, in percent with one
#   decimal as the papers print them (ISTR Tables 2–3, Transfiner Tables 1–2): rows bbox / segm / boundary, columns
#   AP, AP50, AP75, APs, APm, APl; a `–` is a setting without ground truth (pycocotools' −1). `--per-class` adds
#   one row per category, read from COCOeval's precision array at area *all*, 100 detections;
# - **the training curves** of `segbook plot RUN`, from `RUN/metrics.jsonl`: the engine (chapter 10) writes one
#   line per `log_period` with `iter`, `lr`, `loss`, each `loss_*` term, `grad_norm`, `time`, and one line
#   `{"iter", "eval": {...}}` per evaluation;
# - **ground truth beside predictions** of `segbook viz`, per image, as detectron2's `visualize_json_results`
#   draws it, with `segbook.viz.draw_instances`.
#
# Nothing here computes a metric: every function takes what the evaluation or the engine wrote.

# %%
#| export
import json
import math
from pathlib import Path

import numpy as np

from segbook.viz import draw_instances, write_figure

# %% [markdown]
# ## The AP table

# %%
#| export
AP_COLUMNS = ("AP", "AP50", "AP75", "APs", "APm", "APl")

def _pct(v) -> str:
    "A COCO fraction as percent with one decimal; '–' for pycocotools' -1 (no ground truth) or a missing value."
    return "–" if v is None or v < 0 else f"{100 * v:.1f}"

def ap_table(metrics:dict, # flat metrics as `segbook eval` returns them: 'bbox_AP', 'segm_AP50', ..., 'images', 'detections'
            ) -> str: # a fixed-width text table, one row per iou type present
    "The COCO AP table of one evaluation: rows bbox / segm / boundary, columns AP .. APl in percent (1 decimal)."
    rows = [t for t in ("bbox", "segm", "boundary") if f"{t}_AP" in metrics]
    if not rows: raise ValueError(f"ap_table: no '<iou type>_AP' key in the metrics (keys: {sorted(metrics)[:8]})")
    lines = [f"{'':<9}" + "".join(f"{c:>7}" for c in AP_COLUMNS)]
    lines += [f"{t:<9}" + "".join(f"{_pct(metrics.get(f'{t}_{c}')):>7}" for c in AP_COLUMNS) for t in rows]
    where = " of ".join(str(metrics[k]) for k in ("split", "data") if metrics.get(k))
    if "images" in metrics:
        lines.append(f"{metrics['images']} images, {metrics.get('detections', '?')} detections" + (f" ({where})" if where else ""))
    return "\n".join(lines)

def per_class_table(rows:list, # `per_class` rows of the metrics: {'id', 'name', iou_type: AP fraction}
                   ) -> str:
    "Per-category AP (percent, 1 decimal) for each iou type the rows carry, one line per category."
    if not rows: return "(no categories)"
    types = [t for t in ("bbox", "segm", "boundary") if t in rows[0]]
    w = max(8, *(len(str(r["name"])) for r in rows))
    head = f"{'category':<{w}}" + "".join(f"{t + ' AP':>13}" for t in types)
    return "\n".join([head] + [f"{str(r['name']):<{w}}" + "".join(f"{_pct(r.get(t)):>13}" for t in types) for r in rows])


# %% [markdown]
# Example: the ground truth of hand-made squares, dilated by 1 pixel (chapter 9's `perturbed_ground_truth`),
# scored by `evaluate_coco` and printed. Two categories, one of them with no detections at all, so the
# per-class rows differ.

# %%
from segbook.evaluation import evaluate_coco, perturbed_ground_truth, squares_dataset
from segbook.pipeline import flatten_metrics
gt = squares_dataset(6, 40, size=100)
for a in gt["annotations"][3:]: a["category_id"] = 2
gt["categories"].append({"id": 2, "name": "other square"})
res = [r for r in perturbed_ground_truth(gt, 1) if r["category_id"] == 1]
m = {**flatten_metrics(evaluate_coco(gt, res, per_class=True), {1: "square", 2: "other square"}), "images": 6, "detections": len(res)}
print(ap_table(m)); print(); print(per_class_table(m["per_class"]))

# %%
t = ap_table(m).splitlines()
assert t[0].split() == list(AP_COLUMNS) and [l.split()[0] for l in t[1:4]] == ["bbox", "segm", "boundary"]
assert t[2].split()[1] == _pct(m["segm_AP"]) and "6 images, 3 detections" in t[4]
rows = {r["name"]: r for r in m["per_class"]}
assert rows["other square"]["segm"] == 0 and rows["square"]["segm"] > 0.5  # detections only for category 1
assert np.isclose((rows["square"]["segm"] + rows["other square"]["segm"]) / 2, m["segm_AP"])  # AP = mean over categories
assert _pct(-1) == "–" and _pct(0.1234) == "12.3"


# %% [markdown]
# ## Training curves from `metrics.jsonl`

# %%
#| export
def read_metrics_log(run, # a run folder holding metrics.jsonl, or the file itself
                    ) -> tuple: # (training lines, evaluation lines), each a list of dicts in file order
    "The lines of a run's metrics.jsonl split into training and evaluation records; `FileNotFoundError` / `ValueError` when missing or empty."
    path = Path(run)
    if path.is_dir() or path.suffix != ".jsonl": path = path / "metrics.jsonl"
    if not path.is_file(): raise FileNotFoundError(f"{path}: no metrics.jsonl (a `segbook train` run folder has one)")
    train, evals = [], []
    for line in path.read_text().splitlines():
        try: rec = json.loads(line)
        except json.JSONDecodeError: continue  # a line cut short by a killed run
        if isinstance(rec, dict) and "iter" in rec and not ("skipped" in rec and "eval" not in rec):  # not the skip counts
            (evals if isinstance(rec.get("eval"), dict) else train).append(rec)
    if not train and not evals: raise ValueError(f"{path}: empty — no line with an 'iter' field was logged yet")
    return train, evals

def plot_run(run, # run folder (or its metrics.jsonl)
             title:str|None=None) -> "matplotlib.figure.Figure":
    "Three panels over iterations: loss terms (log y), learning rate, and every logged '*_AP' of the evaluations (percent)."
    from matplotlib.figure import Figure
    train, evals = read_metrics_log(run)
    fig = Figure(figsize=(13, 3.6), layout="constrained")
    ax_loss, ax_lr, ax_ap = fig.subplots(1, 3)
    its = [r["iter"] for r in train]
    keys = ["loss"] + sorted({k for r in train for k in r if k.startswith("loss_")})
    for k in keys:
        pts = [(r["iter"], r[k]) for r in train if isinstance(r.get(k), (int, float)) and r[k] > 0]
        if pts: ax_loss.plot(*zip(*pts), label=k, lw=2.2 if k == "loss" else 1.2, color="k" if k == "loss" else None)
    ax_loss.set_yscale("log"); ax_loss.set_title("loss terms (period means)"); ax_loss.set_xlabel("iteration")
    if train: ax_loss.legend(fontsize=6, ncol=2, loc="best", framealpha=0.6)
    if any("lr" in r for r in train): ax_lr.plot(its, [r.get("lr", math.nan) for r in train], color="tab:blue")
    ax_lr.set_title("learning rate"); ax_lr.set_xlabel("iteration")
    ap_keys = sorted({k for r in evals for k, v in r["eval"].items() if k.endswith("_AP") and isinstance(v, (int, float))})
    for k in ap_keys:
        pts = [(r["iter"], 100 * r["eval"][k]) for r in evals if isinstance(r["eval"].get(k), (int, float))]
        ax_ap.plot(*zip(*pts), marker="o", label=k)
    if ap_keys: ax_ap.legend(fontsize=8)
    else: ax_ap.text(0.5, 0.5, "no evaluation logged", ha="center", va="center", transform=ax_ap.transAxes)
    ax_ap.set_title("evaluation AP (%)"); ax_ap.set_xlabel("iteration")
    fig.suptitle(title or str(Path(run)), fontsize=10)
    return fig

def plot_command(run, # run folder of `segbook train`
                 out=None, # PNG to write (default RUN/curves.png)
                ) -> dict:
    "`segbook plot`: the training curves of a run as a PNG."
    out = Path(out) if out else Path(run) / "curves.png"
    train, evals = read_metrics_log(run)
    write_figure(plot_run(run), out)
    return {"png": str(out), "train_lines": len(train), "eval_lines": len(evals),
            "last_iter": max(r["iter"] for r in train + evals)}


# %% [markdown]
# Example: a hand-written log with the engine's keys (two loss terms, a warm-up learning rate, two
# evaluations). A real run's curves are drawn in chapter 10b.

# %%
import tempfile
tmp = Path(tempfile.mkdtemp())
lines = [{"iter": i, "lr": 1e-3 * min(1, i / 20), "loss": 9 / i ** 0.5, "loss_ce": 2 / i ** 0.5, "loss_mask": 7 / i ** 0.5,
          "grad_norm": 1.0, "time": 0.1} for i in range(5, 101, 5)]
lines += [{"iter": 50, "eval": {"bbox_AP": 0.05, "segm_AP": 0.04, "images": 4}}, {"iter": 100, "eval": {"bbox_AP": 0.12, "segm_AP": 0.1}}]
(tmp / "metrics.jsonl").write_text("".join(json.dumps(l) + "\n" for l in lines) + '{"iter": 10')  # last line cut short
fig = plot_run(tmp)
fig

# %%
tr, ev = read_metrics_log(tmp)
assert len(tr) == 20 and len(ev) == 2  # the cut-short line is skipped
r = plot_command(tmp, tmp / "c.png")
assert Path(r["png"]).stat().st_size > 10_000 and r["last_iter"] == 100 and not list(tmp.glob("*.tmp"))
ax_loss, ax_lr, ax_ap = fig.axes
assert ax_loss.get_yscale() == "log" and len(ax_loss.lines) == 3 and len(ax_ap.lines) == 2
(tmp / "empty").mkdir(); (tmp / "empty" / "metrics.jsonl").write_text("")
for bad, err in ((tmp / "nothing", FileNotFoundError), (tmp / "empty", ValueError)):
    try: read_metrics_log(bad); raise AssertionError("accepted")
    except err as e: assert "metrics.jsonl" in str(e), e


# %% [markdown]
# ## Ground truth beside predictions
#
# One figure per image: the ground truth on the left (crowd regions say so), the detections with score ≥
# `threshold` on the right with `class score`. Small images are enlarged by an integer factor first, so the
# labels stay readable on the 64-pixel shapes images.

# %%
#| export
def _enlarge(image, masks, boxes, min_side:int):
    "Nearest-neighbour enlargement by an integer factor so the shorter side is >= min_side."
    import torch
    k = max(1, min_side // max(1, min(image.shape[-2:])))
    if k == 1: return image, masks, boxes
    image = image.repeat_interleave(k, -2).repeat_interleave(k, -1)
    masks = masks.repeat_interleave(k, -2).repeat_interleave(k, -1) if len(masks) else \
            torch.zeros(0, *image.shape[-2:], dtype=torch.bool)
    return image, masks, boxes * k

def gt_vs_pred_figure(image, # [3,H,W] uint8 tensor
                      gt:dict, # 'masks' [N,H,W], 'boxes' [N,4] xyxy, 'labels' N strings
                      pred:dict, # the same for the detections shown
                      title:str="", min_side:int=320) -> "matplotlib.figure.Figure":
    "Two panels: ground truth | predictions, each drawn with `draw_instances`."
    from matplotlib.figure import Figure
    fig = Figure(figsize=(9, 4.8), layout="constrained")
    for ax, d, name in zip(fig.subplots(1, 2), (gt, pred), ("ground truth", "predictions")):
        img, masks, boxes = _enlarge(image, d["masks"], d["boxes"], min_side)
        ax.imshow(draw_instances(img, masks, boxes, d["labels"])); ax.set_axis_off()
        ax.set_title(f"{name} ({len(d['labels'])})", fontsize=10)
    if title: fig.suptitle(title, fontsize=10)
    return fig

def _detections_of(recs:list, h:int, w:int, names:dict) -> dict:
    "Masks / boxes / labels of one image's result records (masks from RLE, else empty; boxes from bbox, else the mask's)."
    import torch
    from pycocotools import mask as mask_utils
    masks = torch.as_tensor(np.stack([mask_utils.decode(r["segmentation"]) for r in recs]) if recs and "segmentation" in recs[0]
                            else np.zeros((0, h, w), np.uint8)).bool()
    if recs and "bbox" in recs[0]: xywh = np.array([r["bbox"] for r in recs], np.float32).reshape(-1, 4)
    elif recs: xywh = np.array([mask_utils.toBbox(r["segmentation"]) for r in recs], np.float32).reshape(-1, 4)
    else: xywh = np.zeros((0, 4), np.float32)
    boxes = torch.as_tensor(np.concatenate([xywh[:, :2], xywh[:, :2] + xywh[:, 2:]], 1))
    return {"masks": masks if len(masks) else torch.zeros(0, h, w, dtype=torch.bool), "boxes": boxes,
            "labels": [f"{names.get(r['category_id'], r['category_id'])} {r['score']:.2f}" for r in recs]}

def viz_command(results, # COCO results JSON
                data, # dataset root
                split:str, # split the results are for
                out, # folder for the PNGs (SPLIT_IMAGEID.png)
                n:int=8, # number of images
                threshold:float=0.4, # draw detections with score >= this
                progress:bool=True) -> dict:
    "`segbook viz`: for the first `n` images (by id) that the results mention, ground truth beside the detections >= `threshold`."
    from tqdm.auto import tqdm
    from segbook.data import CocoInstances
    from segbook.pipeline import load_results
    ds = CocoInstances(data, split, train=False)
    recs, _ = load_results(results, ds.coco, split)
    by_image = {}
    for r in recs: by_image.setdefault(r["image_id"], []).append(r)
    index = {im: i for i, im in enumerate(ds.image_ids)}
    ids = sorted(set(by_image) & set(index)) or list(ds.image_ids)
    names = dict(zip(ds.coco_ids, ds.class_names))
    out, written = Path(out), []
    for image_id in tqdm(ids[:n], desc="viz", disable=not progress):
        image, t = ds.load(index[image_id])
        h, w = image.shape[-2:]
        gt = {"masks": t["masks"].bool(), "boxes": t["boxes"],
              "labels": [ds.class_names[l] + (" (crowd)" if c else "") for l, c in zip(t["labels"].tolist(), t["iscrowd"].tolist())]}
        shown = sorted((r for r in by_image.get(image_id, []) if r["score"] >= threshold), key=lambda r: -r["score"])
        fig = gt_vs_pred_figure(image, gt, _detections_of(shown, h, w, names),
                                f"{split} image {image_id}: detections with score >= {threshold:.3g}")
        written.append(str(write_figure(fig, out / f"{split}_{image_id}.png")))
    return {"images": len(written), "written": written}


# %% [markdown]
# Example: a tiny shapes set, with the ground truth eroded by one pixel as the "detections" (random scores), so the
# right panel shows almost the left one, minus what falls under the threshold.

# %%
from segbook.shapes import write_shapes_dataset
from segbook.data import coco_paths
write_shapes_dataset(tmp / "shapes", n_train=2, n_val=3, size=64, seed=0)
res = perturbed_ground_truth(coco_paths(tmp / "shapes", "val")[0], -1)
(tmp / "res.json").write_text(json.dumps(res))
v = viz_command(tmp / "res.json", tmp / "shapes", "val", tmp / "viz", n=2, threshold=0.3, progress=False)
from PIL import Image
Image.open(v["written"][0])

# %%
assert v["images"] == 2 and all(Path(p).stat().st_size > 5_000 for p in v["written"])
from segbook.data import CocoInstances
ds = CocoInstances(tmp / "shapes", "val", train=False)
img0, t0 = ds.load(0)
first = [r for r in res if r["image_id"] == ds.image_ids[0]]
d = _detections_of(first, 64, 64, {})
assert d["masks"].shape == (len(first), 64, 64) and len(d["labels"]) == len(first)
assert 0 < d["masks"].sum() < t0["masks"].bool().sum()  # eroded by a pixel: less foreground than the ground truth
fig = gt_vs_pred_figure(img0, {"masks": t0["masks"], "boxes": t0["boxes"], "labels": ["a"] * len(t0["masks"])}, d)
assert [a.get_title().split(" (")[0] for a in fig.axes] == ["ground truth", "predictions"]
