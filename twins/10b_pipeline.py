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
import json
import os
import time
import warnings
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from segbook.config import TrainConfig, load_config, save_config
from segbook.data import CocoInstances, build_transforms, collate, coco_paths, read_rgb


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
    return CocoInstances(d.root, d.train_split, transforms=build_transforms(True, d.min_size, d.max_size, d.max_size_cap, d.flip, d.test_size))

def eval_dataset(cfg:TrainConfig, split:str|None=None) -> CocoInstances:
    "An evaluation split (crowd regions kept, flagged) at test size."
    return CocoInstances(cfg.data.root, split or cfg.data.val_split, transforms=eval_transforms(cfg), train=False)


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
    "The model named by `cfg.model_type` (an explicit if/elif: follow it with grep)."
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
@torch.no_grad()
def predict_dataset(model, ds:CocoInstances, device="cpu", batch_size:int=8, max_images:int|None=None,
                    topk:int=100, progress:bool=True) -> tuple:
    "Run `model.predict` over `ds` -> (predictions list, COCO image ids)."
    model.eval()
    n = len(ds) if max_images is None else min(max_images, len(ds))
    preds, ids = [], []
    for start in tqdm(range(0, n, batch_size), desc="predict", disable=not progress, leave=False):
        images, targets = collate([ds[i] for i in range(start, min(n, start + batch_size))])
        sizes = torch.stack([t["size"] for t in targets]).to(device)
        orig = torch.stack([torch.as_tensor(t["orig_size"]) for t in targets]).to(device)
        out = model.predict(images.to(device), sizes, orig, topk=topk)
        preds += [{k: v.cpu() for k, v in p.items()} for p in out]
        ids += [int(t["image_id"]) for t in targets]
    return preds, ids

def evaluate_model(model, ds:CocoInstances, device="cpu", max_images:int|None=None, results_path=None,
                   iou_types=("bbox", "segm", "boundary"), progress:bool=True) -> dict:
    "COCO box / mask / boundary AP of `model` on `ds` (optionally saving the COCO results JSON)."
    from segbook.evaluation import evaluate_coco, predictions_to_coco, save_coco_results
    t0 = time.time()
    preds, ids = predict_dataset(model, ds, device, max_images=max_images, progress=progress)
    results = predictions_to_coco(preds, ids, ds.coco_ids)
    if results_path: save_coco_results(results, results_path)
    metrics = evaluate_coco(ds.ann_file, results, iou_types=iou_types, image_ids=ids)
    flat = {f"{t}_{k}": v for t, m in metrics.items() for k, v in m.items() if k != "stats"}
    return {**flat, "images": len(ids), "detections": len(results), "seconds": round(time.time() - t0, 2)}


# %% [markdown]
# ## The three commands

# %%
#| export
def _atomic_json(obj, path):
    path = Path(path); path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp"); tmp.write_text(json.dumps(obj, indent=1)); os.replace(tmp, path)

def load_weights(model:torch.nn.Module,
                 path, # a `segbook train` checkpoint (its "model" entry is used) or a plain state dict
                 verbose:bool=True) -> dict: # {"loaded": n, "missing": [...], "unexpected": [...], "mismatched": [...]}
    "Start a run from other weights (fine-tuning): every tensor whose name and shape match is loaded, the rest are listed."
    from segbook.engine import load_checkpoint
    state = load_checkpoint(path)
    state = state.get("model", state)
    own = model.state_dict()
    mismatched = sorted(k for k, v in state.items() if k in own and own[k].shape != v.shape)
    keep = {k: v for k, v in state.items() if k in own and k not in mismatched}
    if not keep:
        raise ValueError(f"weights={path}: no tensor matches the model (first model keys: {list(own)[:3]})")
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
    out = Path(out); out.mkdir(parents=True, exist_ok=True)
    info = init_distributed()
    seed_everything(cfg.seed)
    ds = train_dataset(cfg)
    cfg = with_dataset_classes(cfg, ds)
    if info.is_main: cfg = ensure_codec(cfg, out, progress)
    elif istr_settings(cfg) is not None and not istr_settings(cfg).get("codec_path"):
        cfg = with_codec_path(cfg, (out / "codec.pt").resolve())
    if info.world_size > 1: torch.distributed.barrier()
    seed_everything(cfg.seed)  # the same initial weights however long the codec fit took
    model = build_model(cfg)
    if cfg.weights and not (resume and (out / "last.pt").exists()):  # a resumed run continues from its own checkpoint
        load_weights(model, cfg.weights, progress)
    _atomic_json({"coco_ids": list(ds.coco_ids), "names": list(ds.class_names)}, out / "classes.json")
    save_config(cfg, out / "config.yaml")
    loader = build_train_loader(ds, cfg.data.batch_size, cfg.seed, collate, cfg.data.num_workers)
    dev = resolve_device(cfg.device, info)
    val = eval_dataset(cfg)
    evaluate_fn = lambda m: evaluate_model(m, val, dev, max_images=eval_images, progress=False)
    return train(model, loader, cfg, out, evaluate_fn=evaluate_fn, resume=resume, progress=progress)

def load_trained(checkpoint, # a last.pt written by `segbook train`
                 device="cpu",
                 overrides=()) -> tuple: # `key=value` changes to the run's config, e.g. model.refine=false

    "Rebuild the model of a run from its folder (config.yaml, codec.pt) and load the checkpoint -> (model, cfg)."
    from segbook.engine import load_checkpoint
    ck_path = Path(checkpoint); run = ck_path.parent
    if not (run / "config.yaml").exists():
        raise FileNotFoundError(f"{run / 'config.yaml'}: missing — a checkpoint is read together with the config of its run")
    cfg = load_config(run / "config.yaml", list(overrides))
    cp = (istr_settings(cfg) or {}).get("codec_path")
    if cp and not Path(cp).exists() and (run / "codec.pt").exists():  # run folder moved: use its own codec
        cfg = with_codec_path(cfg, run / "codec.pt")
    model = build_model(cfg)
    ck = load_checkpoint(ck_path)
    model.load_state_dict(ck["model"])
    return model.to(device).eval(), cfg

def eval_command(checkpoint, data=None, split=None, device="cpu", out=None, max_images=None, progress=True,
                 overrides=()) -> dict:
    "`segbook eval`: bbox / segm / boundary AP of a checkpoint on a split; metrics (and COCO results) written to `out`."
    model, cfg = load_trained(checkpoint, device, overrides)
    if data: cfg = replace(cfg, data=replace(cfg.data, root=str(data)))
    ds = eval_dataset(cfg, split)
    out = Path(out) if out else Path(checkpoint).parent / f"eval_{ds.split}"
    metrics = evaluate_model(model, ds, device, max_images=max_images, results_path=out / "results.json", progress=progress)
    metrics = {"checkpoint": str(checkpoint), "data": str(cfg.data.root), "split": ds.split, **metrics}
    _atomic_json(metrics, out / "metrics.json")
    return metrics

def predict_command(checkpoint, images:list, out, device="cpu", score_threshold:float=0.4, progress=True) -> dict:
    "`segbook predict`: overlay PNGs and a COCO-style JSON of detections for image files."
    from PIL import Image
    from segbook.evaluation import predictions_to_coco
    from segbook.viz import draw_instances
    model, cfg = load_trained(checkpoint, device)
    run = Path(checkpoint).parent
    classes = json.loads((run / "classes.json").read_text()) if (run / "classes.json").exists() else None
    names = classes["names"] if classes else [str(i) for i in range(cfg.model["num_classes"])]
    tf = eval_transforms(cfg)
    out = Path(out); out.mkdir(parents=True, exist_ok=True)
    records, written = [], []
    for i, p in enumerate(tqdm(images, desc="predict", disable=not progress)):
        try:
            img = read_rgb(p)
        except Exception as e:
            raise ValueError(f"{p}: cannot read image ({type(e).__name__}: {e})") from e
        h, w = img.shape[-2:]
        empty = {"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.int64), "masks": torch.zeros(0, h, w, dtype=torch.uint8),
                 "iscrowd": torch.zeros(0, dtype=torch.bool), "image_id": i, "orig_size": torch.tensor([h, w]), "size": torch.tensor([h, w])}
        x, t = tf(img, empty)
        batch, _ = collate([(x, t)])
        with torch.no_grad():
            det = model.predict(batch.to(device), t["size"][None].to(device), torch.tensor([[h, w]], device=device))[0]
        det = {k: v.cpu() for k, v in det.items()}
        keep = det["scores"] >= score_threshold
        det = {k: v[keep] for k, v in det.items()}
        masks = det["masks"][:, 0] > 0.5
        labels = [f"{names[int(l)]} {float(s):.2f}" for l, s in zip(det["labels"], det["scores"])]
        png = out / (Path(p).stem + ".png")
        Image.fromarray(draw_instances(img, masks, det["boxes"], labels)).save(png)
        written.append(str(png))
        coco_ids = classes["coco_ids"] if classes else list(range(1, len(names) + 1))
        for r in predictions_to_coco([det], [i], coco_ids):
            records.append({**r, "file_name": str(p)})
    _atomic_json(records, out / "predictions.json")
    return {"images": len(images), "detections": len(records), "overlays": written, "json": str(out / "predictions.json")}


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
summary = train_command("../configs/istr_shapes_cpu.yaml", tmp / "run", data=tmp / "shapes", device="cpu", max_iters=3,
                        overrides=["data.batch_size=2", "data.num_workers=0", "eval_period=0", "log_period=1", "model.num_queries=10",
                                   "model.num_stages=2", "data.min_size=[64]", "data.max_size_cap=64"], progress=False)
assert summary["iteration"] == 3 and (tmp / "run" / "last.pt").exists() and (tmp / "run" / "codec.pt").exists()

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
m = eval_command(tmp / "run" / "last.pt", split="val", progress=False)
assert {"bbox_AP", "segm_AP", "boundary_AP"} <= set(m) and m["images"] == 4
p = predict_command(tmp / "run" / "last.pt", sorted((tmp / "shapes" / "val").glob("*.png"))[:2], tmp / "pred", score_threshold=0.0, progress=False)
assert len(p["overlays"]) == 2 and Path(p["json"]).exists()
m
