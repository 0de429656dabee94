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
# # Pipeline: train, evaluate, predict
#
# > What `segbook train`, `segbook eval` and `segbook predict` do, as plain functions: config → data → codec → model → engine → COCO results.

# %%
#| default_exp pipeline

# %% [markdown]
# The chapters before this one each own one piece. This chapter only wires them, in the order data
# flows, so a reader can follow `segbook train` from the YAML file to the checkpoint:
#
# 1. `load_config` (chapter 10) reads the YAML and the `key=value` overrides;
# 2. `CocoInstances` + `build_transforms` (chapter 1) give the data; the number of classes comes from
#    the data set, not the config, so a config works on shapes and on your own data alike;
# 3. for ISTR with mask embeddings (alone, or as Transfiner's detector: `model.istr`), the PCA codec of
#    Eq. 3 (chapter 2) is fitted on the training split's masks unless `codec_path` names one — the
#    official code ships it as a separate file hard-wired to COCO (method-details §1), which is why
#    custom data sets needed hand-work there;
# 4. `build_istr` (chapter 5) attaches the codec and the set criterion (chapter 3);
# 5. `engine.train` (chapter 10) runs the loop, with periodic COCO evaluation (chapter 9).

# %%
#| export
import inspect
import json
import math
import os
import sys
import time
import warnings
from collections import Counter
from dataclasses import replace
from pathlib import Path

from segbook.io import atomic_write, write_json_atomic, write_text_atomic

import numpy as np
import torch
from tqdm.auto import tqdm

from segbook.config import ConfigError, TrainConfig, load_config, save_config
from segbook.data import (LOAD_SKIPS, CocoInstances, DatasetError, build_transforms, collate, coco_paths, load_coco_json, read_rgb,
                          read_coco_instances,
                          segmentation_to_rle, skip_summary)


# %% [markdown]
# ## Data from a config

# %%
#| export
def eval_transforms(cfg:TrainConfig):
    "The test-time transform: fixed shorter side (`data.test_size`, default the largest training size), no flip."
    d = cfg.data
    return build_transforms(False, d.min_size, d.max_size, d.max_size_cap, 0.0, d.test_size)

def train_dataset(cfg:TrainConfig) -> CocoInstances:
    "The training split with the papers' augmentation (crowd regions dropped)."
    d = cfg.data
    return CocoInstances(d.root, d.train_split, transforms=build_transforms(True, d.min_size, d.max_size, d.max_size_cap, d.flip, d.test_size),
                         max_image_pixels=d.max_image_pixels)

def eval_dataset(cfg:TrainConfig, split:str|None=None) -> CocoInstances:
    "An evaluation split (crowd regions kept, flagged) at test size; an unreadable image raises, `predict_dataset` excludes it."
    return CocoInstances(cfg.data.root, split or cfg.data.val_split, transforms=eval_transforms(cfg), train=False,
                         on_bad_image="raise", max_image_pixels=cfg.data.max_image_pixels)


# %% [markdown]
# ## The codec and the model

# %%
#| export
def istr_settings(cfg:TrainConfig) -> dict|None:
    "The ISTR model settings of a config: `model` (model_type istr), `model.istr` (Transfiner on ISTR), else None."
    if cfg.model_type == "istr":
        return cfg.model
    if cfg.model_type == "transfiner" and cfg.model.get("detector") == "istr":
        return cfg.model.get("istr", {})
    return None

def with_codec_path(cfg:TrainConfig, path) -> TrainConfig:
    "`cfg` with the ISTR settings' `codec_path` set to `path`."
    p = str(path)
    if cfg.model_type == "istr":
        return replace(cfg, model={**cfg.model, "codec_path": p})
    return replace(cfg, model={**cfg.model, "istr": {**cfg.model.get("istr", {}), "codec_path": p}})

def ensure_codec(cfg:TrainConfig, out_dir, # run folder: the fitted codec is written to out_dir/codec.pt
                 progress:bool=True) -> TrainConfig:
    "For ISTR (alone or under Transfiner) with mask embeddings and no `codec_path`: fit the PCA codec (Eq. 3) on the training split."
    m = istr_settings(cfg)
    if m is None or m.get("mask_head", "embedding") != "embedding" or m.get("codec_path"):
        return cfg
    from segbook.embeddings import pca_fit_command
    path = Path(out_dir) / "codec.pt"
    if not path.exists():
        info = pca_fit_command(cfg.data.root, cfg.data.train_split, dim=m.get("mask_dim", 60), size=m.get("mask_size", 28),
                               out=path, progress=progress)  # the paper's codec: no mean, no whitening, binary domain
        print(json.dumps({"codec": str(path), **{k: info[k] for k in info if k in ("masks", "energy", "miou")}}))
    return with_codec_path(cfg, path.resolve())

def with_dataset_classes(cfg:TrainConfig, ds:CocoInstances) -> TrainConfig:
    "Set `model.num_classes` from the data set (warn when the config said otherwise)."
    n = len(ds.coco_ids)
    if cfg.model.get("num_classes") not in (None, n):
        warnings.warn(f"model.num_classes={cfg.model['num_classes']} replaced by {n}, the categories of {ds.ann_file}")
    return replace(cfg, model={**cfg.model, "num_classes": n})

def build_model(cfg:TrainConfig) -> torch.nn.Module:
    "The model named by `cfg.model_type` (an explicit if/elif: follow it with grep); a setting the model rejects raises `ConfigError`."
    try:
        return _build_model(cfg)
    except ConfigError: raise
    except ValueError as e: raise ConfigError(f"model: {e}") from None

def _build_model(cfg:TrainConfig) -> torch.nn.Module:
    if cfg.model_type != "istr" and (cfg.matching or cfg.loss):
        raise ValueError(f"matching: / loss: configure ISTR's set criterion; model_type '{cfg.model_type}' has none "
                         f"(got matching={cfg.matching}, loss={cfg.loss})")
    if cfg.model_type == "istr":
        from segbook.istr import build_istr
        from segbook.losses import SetLossConfig
        from segbook.matching import MatchingConfig
        matching = MatchingConfig(**{"mask_size": cfg.model.get("mask_size", 28), **cfg.matching})
        return build_istr(cfg.model, matching=matching, loss=SetLossConfig(**cfg.loss))
    elif cfg.model_type == "transfiner":
        from segbook.transfiner import build_transfiner
        return build_transfiner(cfg.model)
    elif cfg.model_type == "maskrcnn":
        from segbook.transfiner import build_transfiner
        return build_transfiner({**cfg.model, "detector": "maskrcnn"}, with_head=False)
    raise ValueError(f"model_type: '{cfg.model_type}' is not built by this version of segbook "
                     "(available: 'istr', 'transfiner', 'maskrcnn')")


# %% [markdown]
# ## Inference over a split, and COCO evaluation
#
# Batched inference: images of a batch share one forward; each image's detections are pasted at its
# original size (`orig_size`), so the COCO results line up with the annotation file.

# %%
#| export
def binary_masks(crops:torch.Tensor, boxes:torch.Tensor, # [N,s,s] box-local probabilities, [N,4] xyxy
                 height:int, width:int, budget:int=1 << 25) -> torch.Tensor: # [N,H,W] bool
    "Paste box-local masks into bool full-size masks a few at a time (1 byte a pixel; the float paste stays ~4*budget bytes)."
    from segbook.istr import paste_masks
    out = torch.zeros(len(crops), height, width, dtype=torch.bool)
    step = max(1, budget // max(1, height * width))
    for i in range(0, len(crops), step):
        out[i:i + step] = paste_masks(crops[i:i + step].float(), boxes[i:i + step].float(), height, width)[:, 0] > 0.5
    return out

def unpasted(model) -> dict:
    "`{'paste': False}` when `model.predict` can return box-local mask crops (pasted later in bounded chunks), else `{}`."
    params = inspect.signature(model.predict).parameters
    return {"paste": False} if "paste" in params or any(p.kind == p.VAR_KEYWORD for p in params.values()) else {}

@torch.no_grad()
def predict_dataset(model, ds:CocoInstances, device="cpu", batch_size:int=8, max_images:int|None=None,
                    topk:int=100, progress:bool=True) -> tuple:
    "Run `model.predict` over `ds` -> (predictions list, COCO image ids); an image that cannot be read is left out and counted."
    model.eval()
    n = len(ds) if max_images is None else min(max_images, len(ds))
    preds, ids = [], []
    for start in tqdm(range(0, n, batch_size), desc="predict", disable=not progress, leave=False):
        samples = []
        for i in range(start, min(n, start + batch_size)):
            try:
                samples.append(ds[i])
            except DatasetError as e:  # scoring another image in its place would change AP silently
                ds.count_skip("image_excluded_from_eval")
                warnings.warn(f"{e}; excluded from the evaluation (its ground truth and predictions)")
        if not samples:
            continue
        images, targets = collate(samples)
        sizes = torch.stack([t["size"] for t in targets]).to(device)
        orig = torch.stack([torch.as_tensor(t["orig_size"]) for t in targets]).to(device)
        out = model.predict(images.to(device), sizes, orig, topk=topk, **unpasted(model))
        preds += [{k: v.cpu() if torch.is_tensor(v) else v for k, v in p.items()} for p in out]
        ids += [int(t["image_id"]) for t in targets]
    return preds, ids

def flatten_metrics(metrics:dict, # `evaluate_coco`'s {iou_type: {'AP', ..., 'stats', ['per_class']}}
                    names:dict|None=None, # category id -> name, for the per-class rows
                   ) -> dict: # {'bbox_AP': .., 'segm_AP50': .., ...} (+ 'per_class': [{'id','name', iou_type: AP}])
    "One flat, JSON-ready dict of `evaluate_coco`'s numbers; per-category APs (when computed) as one row per category."
    flat = {f"{t}_{k}": v for t, m in metrics.items() for k, v in m.items() if k not in ("stats", "per_class")}
    per = {t: m["per_class"] for t, m in metrics.items() if "per_class" in m}
    if per:
        ids = sorted({c for d in per.values() for c in d})
        flat["per_class"] = [{"id": c, "name": (names or {}).get(c, str(c)), **{t: d.get(c, -1.0) for t, d in per.items()}}
                             for c in ids]
    return flat

def evaluate_model(model, ds:CocoInstances, device="cpu", max_images:int|None=None, results_path=None,
                   iou_types=("bbox", "segm", "boundary"), progress:bool=True,
                   per_class:bool=False, # also each category's AP ('per_class' rows)
                  ) -> dict:
    "COCO box / mask / boundary AP of `model` on `ds` (optionally saving the COCO results JSON)."
    from segbook.evaluation import evaluate_coco, predictions_to_coco, save_coco_results
    t0 = time.time()
    before = ds.skipped
    preds, ids = predict_dataset(model, ds, device, max_images=max_images, progress=progress)
    now = ds.skipped - before   # this evaluation's image exclusions (the counters live as long as `ds`)
    excluded = now["image_excluded_from_eval"]
    skipped = {**{k: v for k, v in ds.skipped.items() if k not in LOAD_SKIPS}, **now}
    if excluded and not ids:
        raise DatasetError(f"{ds.image_dir}: none of the {excluded} images to evaluate could be read")
    results = predictions_to_coco(preds, ids, ds.coco_ids)
    if results_path: save_coco_results(results, results_path)
    metrics = evaluate_coco(ds.ann_file, results, iou_types=iou_types, image_ids=ids, per_class=per_class)
    flat = flatten_metrics(metrics, dict(zip(ds.coco_ids, ds.class_names)))
    return {**flat, "images": len(ids), "images_excluded": excluded, "skipped": dict(sorted(skipped.items())),
            "detections": len(results), "seconds": round(time.time() - t0, 2)}


# %% [markdown]
# ## The three commands

# %%
#| export
def load_weights(model:torch.nn.Module,
                 path, # a `segbook train` checkpoint (its "model" entry is used) or a plain state dict
                 verbose:bool=True) -> dict: # {"loaded": n, "missing": [...], "unexpected": [...], "mismatched": [...]}
    "Start a run from other weights (fine-tuning): every tensor whose name and shape match is loaded, the rest are listed."
    from segbook.engine import CheckpointError, load_checkpoint
    state = load_checkpoint(path)
    state = state.get("model", state)
    own = model.state_dict()
    mismatched = sorted(k for k, v in state.items() if k in own and own[k].shape != v.shape)
    keep = {k: v for k, v in state.items() if k in own and k not in mismatched}
    if not keep:
        raise CheckpointError(f"weights={path}: no tensor matches the model (first model keys: {list(own)[:3]})")
    res = model.load_state_dict(keep, strict=False)
    report = {"loaded": len(keep), "missing": sorted(res.missing_keys), "unexpected": sorted(set(state) - set(own)),
              "mismatched": mismatched}
    if verbose:
        print(f"[weights] {path}: loaded {len(keep)} tensors; {len(report['missing'])} keep their init, "
              f"{len(report['unexpected'])} unused, {len(mismatched)} of another shape", flush=True)
    return report

def train_command(config, # YAML file
                  out, # run folder: last.pt, metrics.jsonl, config.yaml, codec.pt, classes.json
                  data=None, # dataset root (overrides data.root)
                  device=None, # 'cpu' | 'cuda' | 'auto' (overrides device)
                  max_iters:int|None=None, # overrides solver.max_iters
                  overrides=(), # more `key=value` settings
                  resume:bool=True, # continue from out/last.pt when it exists
                  eval_images:int|None=None, # evaluate on the first N val images only (periodic evaluation)
                  progress:bool=True) -> dict:
    "`segbook train`: fit a model on a COCO-format split; returns the engine's summary plus the final evaluation."
    from segbook.engine import build_train_loader, init_distributed, resolve_device, seed_everything, train
    ov = list(overrides)
    if data: ov.append(f"data.root={data}")
    if device: ov.append(f"device={device}")
    if max_iters is not None: ov.append(f"solver.max_iters={max_iters}")
    cfg = load_config(config, ov)
    info = init_distributed()
    dev = resolve_device(cfg.device, info)   # before any work: a device this machine lacks is one clear error now
    seed_everything(cfg.seed)
    ds = train_dataset(cfg)
    out = Path(out); out.mkdir(parents=True, exist_ok=True)
    cfg = with_dataset_classes(cfg, ds)
    if info.is_main: cfg = ensure_codec(cfg, out, progress)
    elif istr_settings(cfg) is not None and not istr_settings(cfg).get("codec_path"):
        cfg = with_codec_path(cfg, (out / "codec.pt").resolve())
    if info.world_size > 1: torch.distributed.barrier()
    seed_everything(cfg.seed)  # the same initial weights however long the codec fit took
    model = build_model(cfg)
    if cfg.weights and not (resume and (out / "last.pt").exists()):  # a resumed run continues from its own checkpoint
        load_weights(model, cfg.weights, progress)
    write_json_atomic({"coco_ids": list(ds.coco_ids), "names": list(ds.class_names)}, out / "classes.json")
    save_config(cfg, out / "config.yaml")
    loader = build_train_loader(ds, cfg.data.batch_size, cfg.seed, collate, cfg.data.num_workers)
    val = eval_dataset(cfg)
    evaluate_fn = lambda m: evaluate_model(m, val, dev, max_images=eval_images, progress=False)
    summary = train(model, loader, cfg, out, evaluate_fn=evaluate_fn, resume=resume, progress=progress)
    summary["skipped"] = _train_skips(ds, info, dev)
    if info.is_main:
        line = skip_summary(summary["skipped"], f"train ({ds.ann_file})")
        if line: print(line, file=sys.stderr, flush=True)
        _log_skips(out / "metrics.jsonl", {"iter": summary["iteration"], "images": len(ds), "skipped": summary["skipped"]})
    return summary

def _train_skips(ds:CocoInstances, info, device) -> dict:
    "What training left out: the data set's checks, plus every rank's (and worker's) skips while iterating."
    counts = ds.skipped
    if info.world_size > 1:   # each rank read its own share of the images
        loads = ds.iteration_skips().to(device)
        torch.distributed.all_reduce(loads)
        counts = Counter({k: v for k, v in counts.items() if k not in LOAD_SKIPS})
        counts.update({k: n for k, n in zip(LOAD_SKIPS, loads.tolist()) if n})
    return dict(sorted(counts.items()))

def _log_skips(path:Path, record:dict):
    "Put `record` (the run's skip counts) at the end of metrics.jsonl, replacing one an earlier call of a resumed run wrote."
    def earlier_skips(line):
        try: rec = json.loads(line)
        except json.JSONDecodeError: return True   # a line cut short by a kill
        return isinstance(rec, dict) and "skipped" in rec and "eval" not in rec
    lines = [l for l in path.read_text().splitlines() if l.strip() and not earlier_skips(l)] if path.exists() else []
    write_text_atomic("".join(l + "\n" for l in lines + [json.dumps(record)]), path)

def load_trained(checkpoint, # a last.pt written by `segbook train`
                 device="cpu",
                 overrides=()) -> tuple: # `key=value` changes to the run's config, e.g. model.refine=false

    "Rebuild the model of a run from its folder (config.yaml, codec.pt) and load the checkpoint -> (model, cfg)."
    from segbook.engine import load_checkpoint, load_model_state
    ck_path = Path(checkpoint); run = ck_path.parent
    if not (run / "config.yaml").exists():
        raise FileNotFoundError(f"{run / 'config.yaml'}: missing — a checkpoint is read together with the config of its run")
    cfg = load_config(run / "config.yaml", list(overrides))
    cp = (istr_settings(cfg) or {}).get("codec_path")
    if cp and not Path(cp).exists() and (run / "codec.pt").exists():  # run folder moved: use its own codec
        cfg = with_codec_path(cfg, run / "codec.pt")
    model = build_model(cfg)
    ck = load_checkpoint(ck_path, require=("model",))
    load_model_state(model, ck["model"], ck_path)
    return model.to(device).eval(), cfg

def eval_command(checkpoint, data=None, split=None, device="cpu", out=None, max_images=None, progress=True,
                 overrides=(), per_class:bool=False) -> dict:
    "`segbook eval`: bbox / segm / boundary AP of a checkpoint on a split; metrics (and COCO results) written to `out`."
    model, cfg = load_trained(checkpoint, device, overrides)
    if data: cfg = replace(cfg, data=replace(cfg.data, root=str(data)))
    ds = eval_dataset(cfg, split)
    out = Path(out) if out else Path(checkpoint).parent / f"eval_{ds.split}"
    metrics = evaluate_model(model, ds, device, max_images=max_images, results_path=out / "results.json", progress=progress,
                             per_class=per_class)
    metrics = {"checkpoint": str(checkpoint), "data": str(cfg.data.root), "split": ds.split, **metrics}
    write_json_atomic(metrics, out / "metrics.json")
    line = skip_summary(metrics["skipped"], f"eval ({ds.ann_file})")
    if line: print(line, file=sys.stderr, flush=True)
    return metrics

def image_ids_by_file(data, # dataset root
                      split:str, # split whose annotation file names the images
                      images:list, # image files
                     ) -> list: # the `images[].id` of each file, and its record (height, width)
    "Look image files up by file name in a split's annotations -> [(id, image record)]; `DatasetError` when one is not there."
    ann_file, _ = coco_paths(data, split)
    recs = list(read_coco_instances(ann_file).images.values())   # the same checks (and verdicts) as train, eval and pca-fit
    by_path = {str(r.get("file_name")): r for r in recs}
    by_name = {}
    for r in recs: by_name.setdefault(Path(str(r.get("file_name"))).name, []).append(r)
    out = []
    for p in images:
        name = Path(p).name
        hit = by_path.get(name) or (by_name[name][0] if len(by_name.get(name, [])) == 1 else None)
        if hit is None:
            why = "several images" if len(by_name.get(name, [])) > 1 else "no image"
            raise DatasetError(f"{p}: {why} with file_name '{name}' in {ann_file} (field images[].file_name)")
        out.append((hit["id"], hit))
    return out

def predict_command(checkpoint, # a last.pt written by `segbook train`
                    images:list, # image files
                    out, # folder for the overlay PNGs and predictions.json
                    device="cpu",
                    score_threshold:float=0.4, # keep detections with score >= this (ISTR: sigmoid class scores, no NMS)
                    progress=True,
                    overrides=(), # `key=value` changes to the run's config, e.g. model.refine=false
                    data=None, # with `split`: dataset root whose annotations give each file's image id
                    split:str|None=None, # split of `data` the files belong to
                   ) -> dict:
    "`segbook predict`: overlay PNGs and a COCO-style JSON of detections for image files."
    from PIL import Image
    from segbook.evaluation import predictions_to_coco
    from segbook.viz import draw_instances
    if (data is None) != (split is None):
        raise DatasetError("predict: --data and --split go together (the split's annotations give the image ids)")
    missing = [str(p) for p in images if not Path(p).is_file()]
    if missing: raise FileNotFoundError(f"{missing[0]}: no such image file" + (f" ({len(missing)} of {len(images)} missing)" if len(missing) > 1 else ""))
    ids = image_ids_by_file(data, split, images) if data is not None else None
    model, cfg = load_trained(checkpoint, device, overrides)
    run = Path(checkpoint).parent
    classes = json.loads((run / "classes.json").read_text()) if (run / "classes.json").exists() else None
    names = classes["names"] if classes else [str(i) for i in range(cfg.model["num_classes"])]
    coco_ids = classes["coco_ids"] if classes else list(range(1, len(names) + 1))
    tf = eval_transforms(cfg)
    out = Path(out); out.mkdir(parents=True, exist_ok=True)
    records, written, empty_images = [], [], []
    for i, p in enumerate(tqdm(images, desc="predict", disable=not progress)):
        img = read_rgb(p, cfg.data.max_image_pixels)   # DatasetError (file named) when it cannot be decoded
        h, w = img.shape[-2:]
        if ids is not None and (ids[i][1].get("height"), ids[i][1].get("width")) != (h, w):
            raise DatasetError(f"{p}: image is {w}x{h} but images id={ids[i][0]} of split '{split}' says "
                               f"width={ids[i][1].get('width')}, height={ids[i][1].get('height')}")
        empty = {"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.int64), "masks": torch.zeros(0, h, w, dtype=torch.uint8),
                 "iscrowd": torch.zeros(0, dtype=torch.bool), "image_id": i, "orig_size": torch.tensor([h, w]), "size": torch.tensor([h, w])}
        x, t = tf(img, empty)
        batch, _ = collate([(x, t)])
        with torch.no_grad():
            det = model.predict(batch.to(device), t["size"][None].to(device), torch.tensor([[h, w]], device=device),
                                **unpasted(model))[0]
        det = {k: v.cpu() if torch.is_tensor(v) else v for k, v in det.items()}
        keep = det["scores"] >= score_threshold
        if not bool(keep.any()):
            empty_images.append((str(p), float(det["scores"].max()) if len(det["scores"]) else None))
        det = {k: v[keep] if torch.is_tensor(v) else v for k, v in det.items()}
        masks = det["masks"][:, 0] > 0.5 if "masks" in det else binary_masks(det["mask_crops"], det["boxes"], h, w)
        labels = [f"{names[int(l)]} {float(s):.2f}" for l, s in zip(det["labels"], det["scores"])]
        png = out / (Path(p).stem + ".png")
        drawn = Image.fromarray(draw_instances(img, masks, det["boxes"], labels))
        atomic_write(png, lambda f: drawn.save(f, format="png"), "wb")
        written.append(str(png))
        image_id = ids[i][0] if ids is not None else Path(p).name
        for r in predictions_to_coco([det], [0], coco_ids):
            records.append({**r, "image_id": image_id, "file_name": str(p)})
    if empty_images:
        scored = [e for e in empty_images if e[1] is not None]
        best = max(scored, key=lambda e: e[1]) if scored else None
        print(f"predict: no detection with score >= {score_threshold} in {len(empty_images)} of {len(images)} image(s)"
              + (f"; best score there {best[1]:.3f} ({best[0]}): lower --threshold to see it" if best else "; the model returned none"),
              file=sys.stderr, flush=True)
    write_json_atomic(records, out / "predictions.json")
    return {"images": len(images), "detections": len(records), "overlays": written, "json": str(out / "predictions.json"),
            "no_detection": [e[0] for e in empty_images]}


# %% [markdown]
# ## Scoring a COCO results file
#
# `segbook eval --results` scores detections written by any tool — detectron2's
# `coco_instances_results.json`, mmdetection's `*.segm.json`, `segbook predict --data ... --split ...` — the way
# `COCO.loadRes` reads them: a list of `{image_id, category_id, score}` records with a `bbox` `[x, y, w, h]` (box
# AP) and/or a `segmentation` as RLE at the image's size (mask and Boundary AP). `loadRes` checks almost
# nothing and fails later with an `IndexError` or an assertion; `load_results` checks every record first and
# names the file, the record and the field. Polygon and uncompressed-RLE segmentations are converted to
# compressed RLE, as pycocotools' evaluation needs.

# %%
#| export
class ResultsError(DatasetError):
    "A COCO results file that cannot be scored; the message names the file, the record index and the field."

def _number(x) -> bool: return isinstance(x, (int, float)) and not isinstance(x, bool)

def _check_segmentation(where:str, seg, img:dict) -> dict:
    "Compressed RLE of a result's `segmentation` at the image's size, or `ResultsError`."
    hw = [img.get("height"), img.get("width")]
    if isinstance(seg, dict):
        size, counts = seg.get("size"), seg.get("counts")
        if not (isinstance(size, list) and len(size) == 2 and all(_number(v) for v in size)):
            raise ResultsError(f"{where}: field 'segmentation.size' must be [height, width], got {size!r}")
        if list(size) != hw:
            raise ResultsError(f"{where}: field 'segmentation.size' {list(size)} != [height, width] {hw} of image {img['id']} "
                               "(paste masks into the original image)")
        if isinstance(counts, list): return segmentation_to_rle(seg, *hw)
        if not isinstance(counts, str): raise ResultsError(f"{where}: field 'segmentation.counts' must be a string or a list")
        return seg
    if isinstance(seg, list) and seg and all(isinstance(q, list) and len(q) >= 6 and len(q) % 2 == 0 and
                                            all(_number(v) and math.isfinite(v) for v in q) for q in seg):
        return segmentation_to_rle(seg, *hw)
    raise ResultsError(f"{where}: field 'segmentation' must be RLE {{'size', 'counts'}} or polygons, got {type(seg).__name__}")

def load_results(path, # COCO results JSON: a list of {image_id, category_id, score, bbox and/or segmentation}
                 coco_gt, # pycocotools COCO of the split the results are for
                 split:str="", # its name, for messages
                ) -> tuple: # (checked records, segmentations as compressed RLE; the iou types they carry)
    "Read and check a COCO results file as `COCO.loadRes` needs it; each error is one line naming file, record and field."
    from segbook.evaluation import IOU_TYPES
    path = Path(path)
    if not path.is_file(): raise FileNotFoundError(f"{path}: results file not found")
    try: recs = json.loads(path.read_text())
    except json.JSONDecodeError as e: raise ResultsError(f"{path}: malformed JSON at line {e.lineno}, column {e.colno}: {e.msg}") from None
    except (OSError, UnicodeDecodeError) as e: raise ResultsError(f"{path}: cannot read results file: {e}") from None
    if not isinstance(recs, list):
        raise ResultsError(f"{path}: top level must be a list of detections (COCO results format), got {type(recs).__name__}")
    first = {f: next((i for i, r in enumerate(recs) if isinstance(r, dict) and f in r), None) for f in ("bbox", "segmentation")}
    carried = [f for f, i in first.items() if i is not None]
    of_split = f"split '{split}'" if split else "the ground truth"
    out = []
    for i, r in enumerate(recs):
        where = f"{path}: results[{i}]"
        if not isinstance(r, dict): raise ResultsError(f"{where}: a detection must be an object, got {type(r).__name__}")
        if not carried: raise ResultsError(f"{where}: missing field 'bbox' or 'segmentation'")
        for f in ("image_id", "category_id", "score", *carried):
            if f not in r:
                also = f" (results[{first[f]}] has one; every record needs the same fields)" if f in first else ""
                raise ResultsError(f"{where}: missing field '{f}'{also}")
        img = coco_gt.imgs.get(r["image_id"]) if isinstance(r["image_id"], int) and not isinstance(r["image_id"], bool) else None
        if img is None:
            hint = " (a file name: run `segbook predict` with --data ROOT --split SPLIT for the data set's ids)" \
                   if isinstance(r["image_id"], str) else ""
            raise ResultsError(f"{where}: field 'image_id' {r['image_id']!r} is not an image of {of_split}{hint}")
        cid = r["category_id"]
        if not (isinstance(cid, int) and not isinstance(cid, bool) and cid in coco_gt.cats):
            raise ResultsError(f"{where}: field 'category_id' {r['category_id']!r} is not a category of the data set "
                               f"(ids {sorted(coco_gt.cats)[:10]}{'...' if len(coco_gt.cats) > 10 else ''})")
        if not (_number(r["score"]) and math.isfinite(r["score"])):
            raise ResultsError(f"{where}: field 'score' must be a finite number, got {r['score']!r}")
        rec = dict(r)
        if "bbox" in carried:
            b = r["bbox"]
            if not (isinstance(b, list) and len(b) == 4 and all(_number(v) and math.isfinite(v) for v in b)):
                raise ResultsError(f"{where}: field 'bbox' must be 4 finite numbers [x, y, w, h], got {b!r}")
            if b[2] < 0 or b[3] < 0: raise ResultsError(f"{where}: field 'bbox' has a negative width or height: {b}")
        if "segmentation" in carried:
            rec["segmentation"] = _check_segmentation(where, r["segmentation"], img)
        out.append(rec)
    types = [t for t in IOU_TYPES if (t == "bbox" and "bbox" in carried) or (t != "bbox" and "segmentation" in carried)]
    return out, tuple(types) if recs else IOU_TYPES

def eval_results_command(results, # COCO results JSON
                         data, # dataset root
                         split:str, # split the results are for
                         out=None, # folder for metrics.json (default: nothing written)
                         per_class:bool=False, # also each category's AP
                        ) -> dict:
    "`segbook eval --results`: bbox / segm / boundary AP of a COCO results file (whichever fields it carries) on a split."
    from segbook.evaluation import evaluate_coco, load_coco
    t0 = time.time()
    ann_file, _ = coco_paths(data, split)
    coco = load_coco(ann_file)   # the data set's checks: bad ground truth is an error or a counted skip
    recs, iou_types = load_results(results, coco, split)
    metrics = evaluate_coco(coco, recs, iou_types=iou_types, per_class=per_class)
    flat = flatten_metrics(metrics, {c: d.get("name", str(c)) for c, d in coco.cats.items()})
    metrics = {"results": str(results), "data": str(data), "split": split, **flat, "images": len(coco.imgs),
               "skipped": dict(sorted(coco.skipped.items())), "detections": len(recs), "seconds": round(time.time() - t0, 2)}
    if out: write_json_atomic(metrics, Path(out) / "metrics.json")
    line = skip_summary(metrics["skipped"], f"eval ({ann_file})")
    if line: print(line, file=sys.stderr, flush=True)
    return metrics


# %% [markdown]
# ## Example: train → eval → predict on a tiny shapes set
#
# A few iterations only — this checks the wiring, not the learning (chapter 5 and `tests/` show the
# learning; `configs/istr_shapes_cpu.yaml` is the real CPU run).

# %%
import tempfile
from segbook.shapes import write_shapes_dataset
torch.set_num_threads(1)
tmp = Path(tempfile.mkdtemp())
write_shapes_dataset(tmp / "shapes", n_train=8, n_val=4, size=64, seed=0)
import contextlib, io
summary = train_command("../configs/istr_shapes_cpu.yaml", tmp / "run", data=tmp / "shapes", device="cpu", max_iters=6,
                        overrides=["data.batch_size=2", "data.num_workers=0", "eval_period=3", "log_period=1", "model.num_queries=10",
                                   "model.num_stages=2", "data.min_size=[64]", "data.max_size_cap=64"], progress=False)
assert summary["iteration"] == 6 and (tmp / "run" / "last.pt").exists() and (tmp / "run" / "codec.pt").exists()

# %% [markdown]
# The set criterion's switches come from the config's `matching:` / `loss:` sections (Table 1b/1c), `mask_size` from the model:

# %%
from segbook.config import load_config
cfg = load_config("../configs/istr_shapes_cpu.yaml", ["matching.mask_cost=dice", "loss.mask_loss=l2", "model.mask_head=raw"])
crit = build_model(cfg).criterion
assert (crit.matching.mask_cost, crit.matching.mask_size, crit.loss_cfg.mask_loss) == ("dice", cfg.model.get("mask_size", 28), "l2")
try: build_model(load_config("../configs/transfiner_shapes_cpu.yaml", ["matching.mask_cost=dice"])); raise AssertionError("accepted")
except ValueError as e: assert "model_type 'transfiner'" in str(e), e

# %%
m = eval_command(tmp / "run" / "last.pt", split="val", progress=False, per_class=True)
assert {"bbox_AP", "segm_AP", "boundary_AP"} <= set(m) and m["images"] == 4 and len(m["per_class"]) == 8
val_images = sorted((tmp / "shapes" / "val").glob("*.png"))
p = predict_command(tmp / "run" / "last.pt", val_images[:2], tmp / "pred", score_threshold=0.0, progress=False)
assert len(p["overlays"]) == 2 and Path(p["json"]).exists()
from segbook.report import ap_table, per_class_table
print(ap_table(m))

# %% [markdown]
# The results file `eval_command` wrote scores to the same numbers through `segbook eval --results`, and so
# does `segbook predict --data ROOT --split SPLIT` on every image of the split (its records carry the data
# set's image ids); without `--data` the ids are file names, which the evaluation refuses in one line.

# %%
r = eval_results_command(tmp / "run" / "eval_val" / "results.json", tmp / "shapes", "val")
assert all(r[k] == m[k] for k in m if k.endswith(("_AP", "_AP50", "_APl"))) and r["detections"] == m["detections"]
pv = predict_command(tmp / "run" / "last.pt", val_images, tmp / "pred_val", score_threshold=0.0, progress=False, data=tmp / "shapes", split="val")
rv = eval_results_command(pv["json"], tmp / "shapes", "val")
assert rv["images"] == 4 and rv["detections"] == pv["detections"] and abs(rv["segm_AP"] - m["segm_AP"]) < 1e-3
try: eval_results_command(p["json"], tmp / "shapes", "val"); raise AssertionError("accepted file names as image ids")
except ResultsError as e: assert "results[0]: field 'image_id'" in str(e) and "--data ROOT --split SPLIT" in str(e), e

# %% [markdown]
# What `segbook plot RUN` and `segbook viz` draw for this run (chapter 13): the curves of its six
# iterations, and one validation image with its ground truth beside the five best-scored detections.

# %%
from IPython.display import display
from PIL import Image
from segbook.report import plot_run, viz_command
display(plot_run(tmp / "run", title="6 iterations on 8 shapes images"))
res = json.loads((tmp / "run" / "eval_val" / "results.json").read_text())
first = sorted(x["score"] for x in res if x["image_id"] == res[0]["image_id"])[::-1]
v = viz_command(tmp / "run" / "eval_val" / "results.json", tmp / "shapes", "val", tmp / "viz", n=1, threshold=first[4], progress=False)
display(Image.open(v["written"][0]))

# %% [markdown]
# In the curves the total loss falls over the six iterations and the learning rate drops tenfold at the step of
# `solver.steps`, while the AP of both evaluations (iterations 3 and 6) is zero: six steps check the wiring, not the
# learning. In the second picture the untrained model's five best detections are boxes that do not sit on the
# ground-truth shape yet, with scores near 0.09 — what a few hundred iterations of `configs/istr_shapes_cpu.yaml` change.
