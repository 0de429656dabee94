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
# # Shapes: a synthetic dataset that is hard at the boundary
#
# > A seeded generator that writes real COCO JSON and PNG images: eight shape classes that differ in boundary detail, occluding each other, on textured backgrounds. The book's default dataset for CPU runs.

# %%
#| default_exp shapes

# %% [markdown]
# Both papers are about the *boundary*: ISTR compresses a mask into a few PCA coefficients (how much
# detail survives?), Mask Transfiner refines exactly the pixels near the boundary that a coarse mask
# gets wrong. A toy dataset of filled squares would make both look perfect. So the classes here are
# told apart mostly by their outline:
#
# | class | what makes it hard |
# |---|---|
# | ellipse | the easy baseline (convex, smooth) |
# | triangle | sharp corners |
# | notched_square | a rectangular notch: a concavity with right angles |
# | ring | a hole: the mask is not simply connected |
# | cross | thin arms, a few pixels wide at 128² |
# | star | 6–11 thin spikes: high-frequency outline |
# | pacman | a wedge cut out of a disc |
# | crescent | a disc minus an offset disc: thin horns |
#
# Colour is drawn independently of class, so colour carries no label information; backgrounds are
# gradients with optional stripes and pixel noise; 1–10 objects per image overlap, later ones on top.
# Everything is written in COCO format (compressed RLE masks), so the same `segbook.data.CocoInstances`
# reads it, pycocotools evaluates it, and the code path is the one used for real COCO.

# %%
#| export
import functools
import json
import time
import zlib
from pathlib import Path

from segbook.io import write_text_atomic

import numpy as np
from PIL import Image
from pycocotools import mask as mask_utils


# %% [markdown]
# ## Shapes as membership functions
#
# Each class is a function of local coordinates `(u, v)` — the pixel position relative to the shape's
# centre, divided by its radius and rotated — returning whether the point lies inside. Every shape fits
# in the unit disc. A shape draws its own random parameters (aspect ratio, number of spikes, hole size)
# from the generator it is given, once per object, so one call rasterises the whole object.
# No drawing library gives anti-aliased *and* exactly matching binary masks of rings and crescents,
# so these ten lines of geometry are written by hand.

# %%
#| export
def ellipse(u, v, rng):
    "Filled ellipse, semi-axes 1 and b ∈ [0.45, 1]."
    b = rng.uniform(0.45, 1.0)
    return u * u + (v / b) ** 2 <= 1

def triangle(u, v, rng):
    "Triangle with vertices on the unit circle at jittered 120° spacing (sharp corners)."
    ang = np.pi / 2 + np.arange(3) * 2 * np.pi / 3 + rng.uniform(-0.3, 0.3, 3)
    px, py = np.cos(ang), np.sin(ang)
    inside = np.ones(u.shape, bool)
    for i in range(3):  # counter-clockwise vertices: inside = left of every edge
        j = (i + 1) % 3
        inside &= (px[j] - px[i]) * (v - py[i]) - (py[j] - py[i]) * (u - px[i]) >= 0
    return inside

def notched_square(u, v, rng):
    "Square of half-side 0.7 with a rectangular notch cut into one side (a right-angled concavity)."
    depth, half_width = rng.uniform(0.5, 0.9), rng.uniform(0.12, 0.3)
    square = (np.abs(u) <= 0.7) & (np.abs(v) <= 0.7)
    notch = (u >= 0.7 - depth) & (np.abs(v) <= half_width)
    return square & ~notch

def ring(u, v, rng):
    "Elliptical annulus: outer radius 1, hole radius 0.45–0.7 (not simply connected)."
    b, r_in = rng.uniform(0.7, 1.0), rng.uniform(0.45, 0.7)
    r2 = u * u + (v / b) ** 2
    return (r2 <= 1) & (r2 >= r_in * r_in)

def cross(u, v, rng):
    "Plus sign with thin arms (half-width 0.12–0.22 of the radius)."
    w = rng.uniform(0.12, 0.22)
    return ((np.abs(u) <= w) & (np.abs(v) <= 1)) | ((np.abs(v) <= w) & (np.abs(u) <= 1))

def star(u, v, rng):
    "Star with 6–11 spikes: radius oscillates between r_in ∈ [0.35, 0.5] and 1."
    n, r_in = rng.integers(6, 12), rng.uniform(0.35, 0.5)
    t = (np.arctan2(v, u) * n / (2 * np.pi)) % 1.0
    spike = 1 - np.abs(2 * t - 1)  # 0 between spikes, 1 at a tip
    return np.hypot(u, v) <= r_in + (1 - r_in) * spike

def pacman(u, v, rng):
    "Unit disc with a wedge (mouth) of 50°–100° removed."
    mouth = np.deg2rad(rng.uniform(50, 100))
    return (u * u + v * v <= 1) & (np.abs(np.arctan2(v, u)) >= mouth / 2)

def crescent(u, v, rng):
    "Unit disc minus an offset disc: two thin horns."
    d, r = rng.uniform(0.35, 0.6), rng.uniform(0.75, 0.95)
    return (u * u + v * v <= 1) & ((u - d) ** 2 + v * v > r * r)

SHAPES = {f.__name__: f for f in (ellipse, triangle, notched_square, ring, cross, star, pacman, crescent)}
CLASSES = tuple(SHAPES)
# Rough fraction of the unit disc each shape fills (used only to aim an object at a target area).
FILL = {"ellipse": 0.72, "triangle": 0.41, "notched_square": 0.53, "ring": 0.57,
        "cross": 0.4, "star": 0.42, "pacman": 0.79, "crescent": 0.35}


# %% [markdown]
# ## Rasterising one object
#
# The object's bounding square is sampled `ss`×`ss` times per pixel (pixel `i` covers `[i, i+1)`),
# and the coverage — the fraction of sub-samples inside — is the anti-aliasing alpha used to paint
# the image; the binary mask is `coverage ≥ 0.5`. Only the object's own patch is evaluated, all of it
# in one vectorised numpy expression.

# %%
#| export
def rasterize(shape, # a membership function such as `star`
              cx:float, cy:float, # centre in pixels
              radius:float, # radius in pixels of the unit disc the shape lives in
              angle:float, # rotation in radians
              size:int, # image side
              rng:np.random.Generator, # draws the shape's own parameters
              ss:int=2): # sub-samples per pixel side
    "Coverage of `shape` on its patch: `((slice_y, slice_x), coverage [h,w] float32 in [0,1])`."
    x0, x1 = max(int(np.floor(cx - radius)), 0), min(int(np.ceil(cx + radius)) + 1, size)
    y0, y1 = max(int(np.floor(cy - radius)), 0), min(int(np.ceil(cy + radius)) + 1, size)
    sub = ((np.arange(ss) + 0.5) / ss).astype(np.float32)
    xs = (np.arange(x0, x1, dtype=np.float32)[:, None] + sub).ravel()
    ys = (np.arange(y0, y1, dtype=np.float32)[:, None] + sub).ravel()
    dx, dy = (xs[None, :] - cx) / radius, (ys[:, None] - cy) / radius
    c, s = np.float32(np.cos(angle)), np.float32(np.sin(angle))
    inside = shape(c * dx + s * dy, -s * dx + c * dy, rng)
    cov = inside.reshape(y1 - y0, ss, x1 - x0, ss).mean((1, 3), dtype=np.float32)
    return (slice(y0, y1), slice(x0, x1)), cov


# %% [markdown]
# ## Sizes: COCO's small / medium / large, relative to the image
#
# COCO calls an object small below 32² pixels and large above 96², for images of about 640×480. At
# 128² those absolute thresholds would make nearly everything small, so shapes rescales them by the
# image area: `small < 32²·S²/(640·480)`, `large > 96²·S²/(640·480)` (55 and 492 px² at S=128). The
# thresholds are written into the JSON's `info.area_rng` so evaluation can use the same buckets.
# Each object picks a bucket (30% / 40% / 30%), then an area log-uniformly inside it.
# (The `large` preset below keeps COCO's absolute thresholds instead, `absolute=True`.)

# %%
#| export
def area_thresholds(size:int, # image side
                    absolute:bool=False, # COCO's own 32², 96² whatever the image size
                   ) -> tuple:
    "COCO's small/medium and medium/large area thresholds (32², 96² at 640×480), rescaled to a `size`² image unless `absolute`."
    if absolute: return 32.0 ** 2, 96.0 ** 2
    k = size * size / (640 * 480)
    return 32 ** 2 * k, 96 ** 2 * k

def _sample_area(rng, size, p):
    "Target area of one object: a bucket by `p['area_cdf']`, then log-uniform inside it (bounds from the preset `p`)."
    t1, t2 = area_thresholds(size, p["absolute_areas"])
    u = rng.random()
    lo, hi = ((p["area_min"] * size * size, t1) if u < p["area_cdf"][0] else (t1, t2) if u < p["area_cdf"][1]
              else (t2 * p["large_margin"], p["area_max"] * size * size))
    return float(np.exp(rng.uniform(np.log(lo), np.log(hi))))


# %% [markdown]
# ## Presets, and detail that only a fine mask can hold
#
# At 128² the objects are 5–60 px across, so a 28×28 mask per box already has a cell per pixel or
# better: nothing is lost by predicting masks at 28², and Mask Transfiner's refinement to 56² and 112²
# has nothing to fix. The `large` preset makes the mask resolution the bottleneck instead. Its images
# are 320² with 1–4 objects, most of them COCO-large in absolute pixels (area > 96²), and every object
# carries boundary detail a few pixels wide at its own scale. The box of such an object is about two
# radii across, so one cell of a 28² grid covers ≈ 7 % of the radius, one of a 112² grid ≈ 1.8 %.
# Features 4–8 % of the radius wide are therefore below or near one cell at 28² (RoIAlign's bilinear
# average and the 0.5 threshold wash them out), one to two cells at 56², and two to four cells at 112².
#
# The detail is one wrapper around any membership function, so the eight classes keep their names,
# their ids and their coarse silhouettes (the class is still told by the outline at coarse scale), and
# the fine features are the same kind for all of them:
#
# - **serration**: the body is evaluated at radially rescaled coordinates `(u, v) / s(θ)` with
#   `s(θ) ∈ [body·(1 − depth), body]` oscillating 36–60 times around the centre, so the outline gets
#   teeth (and a ring's hole gets them too);
# - **holes**: 1–4 small discs subtracted, centred on points inside the body;
# - **slits**: 1–3 thin radial notches cut in from the outline;
# - **spokes**: 1–3 thin radial bars from the centre to just inside the unit disc, so they stick out
#   of the body (which is shrunk to `body` = 0.8 of the disc to leave them room) as thin stems.
#
# All parameters are drawn from the object's own generator, after nothing else, so a seed still fixes
# every pixel. The default preset is the book's original data set and is left exactly as it was
# (same draws in the same order, byte-identical files; its JSON has no `info.preset`).

# %%
#| export
def with_detail(shape, # a membership function such as `star`
                body:float=0.8, # the shape is shrunk to this radius, leaving room for the spokes
                teeth:tuple=(36, 60), # serration: number of teeth around the centre (inclusive range)
                depth:tuple=(0.05, 0.08), # serration depth, fraction of the body radius
                holes:tuple=(1, 4), # number of small holes
                hole_radius:tuple=(0.02, 0.035), # their radius, fraction of the unit disc
                slits:tuple=(1, 3), # number of thin notches cut in from the outline
                spokes:tuple=(1, 3), # number of thin bars from the centre outwards
                bar_half_width:tuple=(0.02, 0.035), # half-width of slits and spokes
               ):
    "Membership function: `shape` with serrated outline, small holes, thin slits and thin spokes (see the list above)."
    def detailed(u, v, rng):
        k, a, phase = rng.integers(teeth[0], teeth[1] + 1), rng.uniform(*depth), rng.uniform(0, 2 * np.pi)
        s = body * (1 - a * 0.5 * (1 + np.sin(k * np.arctan2(v, u) + phase)))   # [body·(1-a), body]
        inside = shape(u / s, v / s, rng)
        r2 = u * u + v * v
        pts = np.flatnonzero(inside & (r2 <= (0.9 * body) ** 2))
        if pts.size:
            for j in rng.choice(pts, int(rng.integers(holes[0], holes[1] + 1))):
                inside &= (u - u.flat[j]) ** 2 + (v - v.flat[j]) ** 2 > rng.uniform(*hole_radius) ** 2
        def bar(r0, r1):   # a thin radial bar at a random angle, from radius r0 to r1
            phi, w = rng.uniform(0, 2 * np.pi), rng.uniform(*bar_half_width)
            c, si = np.float32(np.cos(phi)), np.float32(np.sin(phi))
            along = c * u + si * v
            return (along >= r0) & (along <= r1) & (np.abs(c * v - si * u) <= w)
        for _ in range(int(rng.integers(slits[0], slits[1] + 1))):
            inside &= ~bar(0.55 * body, 1.0)
        for _ in range(int(rng.integers(spokes[0], spokes[1] + 1))):
            inside |= bar(0.0, 0.97)
        return inside
    detailed.__name__ = f"detailed_{getattr(shape, '__name__', 'shape')}"
    return detailed

PRESETS = {
    # the book's default data set: 128², 1-10 objects, COCO's buckets rescaled to the image (30 / 40 / 30 %)
    "default": dict(size=128, objects=(1, 10), absolute_areas=False, area_cdf=(0.3, 0.7), area_min=0.0015,
                    large_margin=1.0, area_max=0.22, centre=(0.05, 0.95), detail=None),
    # mask resolution is the bottleneck: 320², 1-4 objects, COCO's absolute buckets, 90 % aimed above 96² (with a
    # margin for occlusion and the detail's own cut-outs), centres kept off the border, detail on every object
    "large": dict(size=320, objects=(1, 4), absolute_areas=True, area_cdf=(0.0, 0.1), area_min=0.01,
                  large_margin=1.3, area_max=0.2, centre=(0.25, 0.75), detail=dict(body=0.8)),
}


# %% [markdown]
# ## Backgrounds and occlusion
#
# A background is a linear gradient between two random colours, with stripes of random frequency
# and orientation on 60% of images; Gaussian pixel noise goes over the finished image.
#
# Objects are drawn in order, later ones on top. The *visible* mask of an object is where it is the
# top-most: we keep a label map (index of the top-most object per pixel). An object whose visible area
# is below `max(min_visible_px, min_visible_frac · full area)` is removed from the image altogether
# (not just from the annotations, so no unlabelled object is left in the picture). Removing an object
# only uncovers pixels, so every other object's visible area can only grow: one pass suffices.
# `full=True` also returns each object's unoccluded mask, which the tests use to check that
# visible = own shape minus everything drawn later.

# %%
#| export
@functools.lru_cache(maxsize=4)
def _grid(size):
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / size
    return yy, xx

def _background(rng, size):
    yy, xx = _grid(size)
    phi = rng.uniform(0, 2 * np.pi)
    t = xx * np.float32(np.cos(phi)) + yy * np.float32(np.sin(phi))
    t = (t - t.min()) / (t.max() - t.min() + 1e-6)
    c0, c1 = rng.uniform(0, 255, 3).astype(np.float32), rng.uniform(0, 255, 3).astype(np.float32)
    img = c0 + (c1 - c0) * t[..., None]
    if rng.random() < 0.6:
        psi, freq, amp = rng.uniform(0, np.pi), rng.uniform(3, 14), rng.uniform(8, 30)
        wave = np.sin(np.float32(2 * np.pi * freq) * (xx * np.float32(np.cos(psi)) + yy * np.float32(np.sin(psi)))
                      + np.float32(rng.uniform(0, 2 * np.pi)))
        img += wave[..., None] * (amp * rng.uniform(0.5, 1.0, 3)).astype(np.float32)
    return img

def _label_map(objects, size):
    lm = np.full((size, size), -1, np.int16)
    for i, o in enumerate(objects):
        lm[o["slice"]][o["mask"]] = i
    return lm

def make_shapes_image(rng:np.random.Generator, # the image's own generator
                      size:int|None=None, # image side in pixels (default: the preset's, 128 or 320)
                      max_objects:int|None=None, # objects per image are drawn from the preset's minimum..max_objects (default: its maximum)
                      min_visible_px:float|None=None, # drop objects showing fewer pixels (default 0.0008·size²)
                      min_visible_frac:float=0.3, # ... or less than this fraction of themselves
                      ss:int=2, # anti-aliasing sub-samples per pixel side
                      full:bool=False, # also return each object's unoccluded mask
                      preset:str="default"): # a key of PRESETS
    "One image: `(image [S,S,3] uint8, visible masks [N,S,S] bool, labels [N] int64 in 0..7[, full masks [N,S,S]])`."
    if preset not in PRESETS: raise ValueError(f"preset: {preset!r} is not one of {sorted(PRESETS)}")
    p = PRESETS[preset]
    size = p["size"] if size is None else size
    max_objects = p["objects"][1] if max_objects is None else max_objects
    body = p["detail"]["body"] if p["detail"] else 1.0
    min_px = 0.0008 * size * size if min_visible_px is None else min_visible_px
    img = _background(rng, size)
    objects = []
    for _ in range(int(rng.integers(p["objects"][0], max_objects + 1))):
        label = int(rng.integers(len(CLASSES)))
        name = CLASSES[label]
        radius = float(np.sqrt(_sample_area(rng, size, p) / (np.pi * FILL[name]))) / body
        cx, cy = rng.uniform(*p["centre"], 2) * size
        shape = SHAPES[name] if p["detail"] is None else with_detail(SHAPES[name], **p["detail"])
        sl, cov = rasterize(shape, cx, cy, radius, rng.uniform(0, 2 * np.pi), size, rng, ss)
        mask = cov >= 0.5
        if not mask.any():
            continue
        patch_mean = img[sl].reshape(-1, 3).mean(0)  # pick a colour that stands out from the background
        for _ in range(20):
            color = rng.uniform(0, 255, 3).astype(np.float32)
            if np.abs(color - patch_mean).sum() > 120:
                break
        shade = rng.uniform(-25, 25) * np.linspace(-1, 1, cov.shape[1], dtype=np.float32)[None, :, None]
        objects.append(dict(label=label, slice=sl, cov=cov, mask=mask, full=int(mask.sum()), paint=color + shade))
    lm = _label_map(objects, size)
    visible = np.bincount(lm.ravel().astype(np.int64) + 1, minlength=len(objects) + 1)[1:]
    keep = [o for o, a in zip(objects, visible) if a >= max(min_px, min_visible_frac * o["full"])]
    if len(keep) < len(objects):
        objects, lm = keep, _label_map(keep, size)
    for o in objects:
        a = o["cov"][..., None]
        img[o["slice"]] = img[o["slice"]] * (1 - a) + o["paint"] * a
    img += rng.standard_normal(img.shape, dtype=np.float32) * np.float32(rng.uniform(2, 10))
    masks = lm[None] == np.arange(len(objects), dtype=np.int16)[:, None, None]
    labels = np.array([o["label"] for o in objects], np.int64)
    img = np.clip(np.rint(img), 0, 255).astype(np.uint8)
    if not full:
        return img, masks, labels
    unoccluded = np.zeros_like(masks)
    for k, o in enumerate(objects):
        unoccluded[k][o["slice"]] = o["mask"]
    return img, masks, labels, unoccluded


# %% [markdown]
# ## Writing the dataset
#
# Each image has its own generator seeded with `(seed, split, index)`, so image *k* is the same
# whatever `n_train` is, and the same seed gives byte-identical JSON (and PNGs). Masks are stored as
# compressed RLE (`pycocotools.mask.encode`), and `bbox`/`area` are computed from the stored visible
# mask by pycocotools, so they agree with it exactly. Category ids are 1..8, as in COCO (ids are not
# contiguous labels; `CocoInstances` maps them).

# %%
#| export
def shapes_coco_split(out:Path, # dataset root
                      split:str, # 'train' or 'val'
                      n:int, # number of images
                      size:int, seed:int, progress:bool=False,
                      preset:str="default") -> dict: # a key of PRESETS
    "Write `out/split/*.png` and return the split's COCO dict (not yet written)."
    from tqdm.auto import tqdm
    img_dir = Path(out) / split
    img_dir.mkdir(parents=True, exist_ok=True)
    split_code = {"train": 0, "val": 1}.get(split, zlib.crc32(split.encode()) + 2)
    t1, t2 = area_thresholds(size, PRESETS[preset]["absolute_areas"])
    info = {"description": "segbook shapes: seeded synthetic instance segmentation", "version": "1",
            "seed": seed, "size": size, "split": split}
    if preset != "default": info["preset"] = preset   # the default's files stay as they always were
    info["area_rng"] = {"all": [0, 1e10], "small": [0, t1], "medium": [t1, t2], "large": [t2, 1e10]}
    coco = {"info": info, "licenses": [], "images": [], "annotations": [],
            "categories": [{"id": i + 1, "name": c, "supercategory": "shape"} for i, c in enumerate(CLASSES)]}
    for i in tqdm(range(n), desc=f"shapes {split}", disable=not progress, leave=False):
        image, masks, labels = make_shapes_image(np.random.default_rng([seed, split_code, i]), size, preset=preset)
        name = f"{i + 1:06d}.png"
        Image.fromarray(image).save(img_dir / name, compress_level=1)
        coco["images"].append({"id": i + 1, "file_name": name, "height": size, "width": size})
        rles = mask_utils.encode(np.asfortranarray(masks.transpose(1, 2, 0).astype(np.uint8)))
        for rle, area, box, label in zip(rles, mask_utils.area(rles), mask_utils.toBbox(rles), labels):
            coco["annotations"].append({
                "id": len(coco["annotations"]) + 1, "image_id": i + 1, "category_id": int(label) + 1,
                "segmentation": {"size": [size, size], "counts": rle["counts"].decode("ascii")},
                "area": int(area), "bbox": [float(b) for b in box], "iscrowd": 0})
    return coco

def write_shapes_dataset(out, # output folder (gets annotations/, train/, val/)
                         n_train:int=2000, # training images
                         n_val:int=200, # validation images
                         size:int|None=None, # image side (default: the preset's, 128 or 320)
                         seed:int=0, # same seed → byte-identical JSON and images
                         progress:bool=False,
                         preset:str="default") -> dict: # a key of PRESETS: 'default' or 'large'
    "Write the shapes dataset in COCO layout; returns a JSON-serialisable summary (paths, counts, seconds)."
    if preset not in PRESETS: raise ValueError(f"preset: {preset!r} is not one of {sorted(PRESETS)}")
    size = PRESETS[preset]["size"] if size is None else size
    out = Path(out)
    (out / "annotations").mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    summary = {"root": str(out), "size": size, "seed": seed, "preset": preset, "classes": list(CLASSES)}
    for split, n in (("train", n_train), ("val", n_val)):
        coco = shapes_coco_split(out, split, n, size, seed, progress, preset)
        ann = out / "annotations" / f"instances_{split}.json"
        write_text_atomic(json.dumps(coco, separators=(",", ":")), ann)
        summary[split] = {"annotations": str(ann), "images": str(out / split),
                          "n_images": n, "n_instances": len(coco["annotations"])}
    summary["seconds"] = round(time.perf_counter() - t0, 2)
    return summary


# %% [markdown]
# ## Example

# %%
import tempfile
import matplotlib.pyplot as plt
from segbook.viz import save_figure

img, masks, labels = make_shapes_image(np.random.default_rng(3), 128)
img.shape, masks.shape, [CLASSES[l] for l in labels]

# %%
assert img.shape == (128, 128, 3) and img.dtype == np.uint8
assert masks.ndim == 3 and masks.shape[1:] == (128, 128) and len(masks) == len(labels) >= 1
assert masks.sum(0).max() <= 1, "visible masks of one image never overlap"
assert len(CLASSES) >= 6
a, b = make_shapes_image(np.random.default_rng(3), 128), make_shapes_image(np.random.default_rng(3), 128)
assert all(np.array_equal(x, y) for x, y in zip(a, b)), "same generator state, same image"

# %% [markdown]
# A small set for this chapter (the book's runs use `segbook data synth`, 2000 + 200 images):

# %%
tmp = Path(tempfile.mkdtemp())
info = write_shapes_dataset(tmp / "shapes", n_train=200, n_val=16, size=128, seed=0)
info

# %%
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval
d = json.loads(Path(info["train"]["annotations"]).read_text())
assert len(d["images"]) == 200 and len(d["annotations"]) == info["train"]["n_instances"]
assert {c["name"] for c in d["categories"]} == set(CLASSES)
per_image = np.bincount([a["image_id"] for a in d["annotations"]], minlength=201)[1:]
assert per_image.min() >= 1 and per_image.max() <= 10
again = write_shapes_dataset(tmp / "again", n_train=20, n_val=4, size=128, seed=0)
first20 = json.loads(Path(again["train"]["annotations"]).read_text())
assert first20["annotations"] == [a for a in d["annotations"] if a["image_id"] <= 20], "image k does not depend on n_train"

# %% [markdown]
# The ground truth evaluated against itself with pycocotools' `COCOeval` must score segm AP = 1:
# a check that the RLEs, areas and ids form a valid COCO file.

# %%
import contextlib, io
with contextlib.redirect_stdout(io.StringIO()):
    gt = COCO(info["val"]["annotations"])
    dets = gt.loadRes([{"image_id": a["image_id"], "category_id": a["category_id"], "segmentation": a["segmentation"],
                        "score": 1.0} for a in gt.dataset["annotations"]])
    ev = COCOeval(gt, dets, "segm"); ev.evaluate(); ev.accumulate(); ev.summarize()
assert abs(ev.stats[0] - 1.0) < 1e-9, ev.stats

# %% [markdown]
# ## What it looks like
#
# Ground-truth overlays as `segbook data browse --data <root> --split train` draws them:

# %%
from segbook.data import CocoInstances, render_ground_truth, coco_statistics
shapes_train = CocoInstances(tmp / "shapes", "train", train=False)
fig, axes = plt.subplots(2, 4, figsize=(10, 5))
for ax, i in zip(axes.flat, range(8)):
    ax.imshow(render_ground_truth(shapes_train, i, min_side=256)); ax.set_axis_off()
fig.tight_layout()
save_figure(fig, "data_shapes_grid.png", dpi=64)

# %% [markdown]
# ## Statistics: shapes next to COCO
#
# Instances per image, COCO size buckets (shapes' rescaled to 128², see above) and instances per
# class. COCO-mini (when present) is shown for comparison: shapes has fewer objects per image than COCO
# (which has a long tail of crowded images), a comparable spread of sizes, and balanced classes where
# COCO is dominated by `person`.

# %%
from segbook.data import find_coco_mini

COCO_MINI = find_coco_mini() or Path("shared/coco-mini")  # absent: the cells that need it skip
stats = {"shapes (train, 200 images)": coco_statistics(info["train"]["annotations"])}
if COCO_MINI.exists():
    stats["coco-mini (train2017)"] = coco_statistics(COCO_MINI / "annotations" / "instances_train2017.json")
{k: {f: v[f] for f in ("n_images", "n_instances", "size_buckets")} for k, v in stats.items()}

# %%
s = stats["shapes (train, 200 images)"]
assert s["n_instances"] == info["train"]["n_instances"] and len(s["per_class"]) == len(CLASSES)
assert all(v > 0 for v in s["size_buckets"].values()), "small, medium and large objects all occur"
assert min(s["per_class"].values()) > 0.5 * max(s["per_class"].values()), "classes roughly balanced"

# %%
fig, axes = plt.subplots(len(stats), 3, figsize=(12, 3.2 * len(stats)), squeeze=False)
for row, (name, s) in zip(axes, stats.items()):
    row[0].hist(s["instances_per_image"], bins=np.arange(0, max(s["instances_per_image"]) + 2) - 0.5)
    row[0].set(title=f"{name}: instances per image", xlabel="instances")
    row[1].bar(list(s["size_buckets"]), list(s["size_buckets"].values()), color=["C1", "C2", "C3"])
    row[1].set(title="size buckets (COCO areas)")
    top = sorted(s["per_class"].items(), key=lambda kv: -kv[1])[:12]
    row[2].barh([k for k, _ in top][::-1], [v for _, v in top][::-1]); row[2].set(title="instances per class (top 12)")
fig.tight_layout()
save_figure(fig, "data_stats.png", dpi=72)


# %% [markdown]
# ## The large preset
#
# `write_shapes_dataset(..., preset="large")` (`segbook data synth --preset large`) writes the same COCO
# layout with the same eight categories, 320² images and the detail described above; its `info` carries
# `preset: "large"` and COCO's absolute area buckets. How much of each object a mask of R×R cells inside
# its box can hold is measured the way a mask head's output is used: the mask is cropped to its box at
# R² with RoIAlign (aligned, bilinear, threshold 0.5, the training target of a mask head that is perfect
# at R) and pasted back into the image (bilinear, > 0.5), as `segbook.evaluation` pastes predictions.

# %%
#| export
def mask_boxes(masks:np.ndarray, # [N,H,W] bool, every mask non-empty
              ) -> np.ndarray: # [N,4] float32 xyxy, pixel edges (COCO's bbox as x0, y0, x0+w, y0+h)
    "Tight boxes of masks."
    rows, cols = masks.any(2), masks.any(1)
    y0, x0 = rows.argmax(1), cols.argmax(1)
    y1, x1 = masks.shape[1] - rows[:, ::-1].argmax(1), masks.shape[2] - cols[:, ::-1].argmax(1)
    return np.stack([x0, y0, x1, y1], 1).astype(np.float32)

def at_resolution(masks:np.ndarray, # [N,H,W] bool full-image masks
                  size:int, # R: mask side inside the box
                  boxes:np.ndarray|None=None, # [N,4] xyxy (default: the tight boxes)
                 ) -> np.ndarray: # [N,H,W] bool
    "Each mask as a perfect R×R box mask would give it back: RoIAlign crop (threshold 0.5), bilinear paste (> 0.5)."
    import torch
    from segbook.incoherent import crop_masks
    from segbook.istr import paste_masks
    m = torch.from_numpy(np.ascontiguousarray(masks))
    b = torch.from_numpy(mask_boxes(masks) if boxes is None else np.asarray(boxes, np.float32))
    if len(m) == 0: return np.zeros(masks.shape, bool)
    return (paste_masks(crop_masks(m, b, size).float(), b, *masks.shape[1:])[:, 0] > 0.5).numpy()

def mask_iou(a:np.ndarray, b:np.ndarray) -> np.ndarray: # a, b: [N,H,W] bool -> [N] IoU of a[i] with b[i]
    "IoU of corresponding masks."
    inter, union = (a & b).reshape(len(a), -1).sum(1), (a | b).reshape(len(a), -1).sum(1)
    return inter / np.maximum(union, 1)


# %%
img, masks, labels = make_shapes_image(np.random.default_rng(3), preset="large")
img.shape, [CLASSES[l] for l in labels], masks.reshape(len(masks), -1).sum(1).tolist()

# %%
assert img.shape == (320, 320, 3) and 1 <= len(labels) <= 4 and masks.sum(0).max() <= 1
b0 = mask_boxes(masks[:1])[0]; ys, xs = np.nonzero(masks[0])
assert b0.tolist() == [xs.min(), ys.min(), xs.max() + 1, ys.max() + 1]
assert mask_iou(at_resolution(masks, 112), masks).min() > mask_iou(at_resolution(masks, 28), masks).min()
again = make_shapes_image(np.random.default_rng(3), preset="large")
assert all(np.array_equal(x, y) for x, y in zip((img, masks, labels), again)), "same generator state, same image"

# %% [markdown]
# A small large-preset set, written twice (the same seed gives the same bytes), and the time it takes:

# %%
t0 = time.perf_counter()
large = write_shapes_dataset(tmp / "large", n_train=0, n_val=40, seed=0, preset="large")
per_image = (time.perf_counter() - t0) / 40
twice = write_shapes_dataset(tmp / "large2", n_train=0, n_val=40, seed=0, preset="large")
dl = json.loads(Path(large["val"]["annotations"]).read_text())
areas = np.array([a["area"] for a in dl["annotations"]])
share_large = float((areas > 96 ** 2).mean())
print(f"{per_image * 1000:.0f} ms per 320² image on this machine ({per_image * 700:.0f} s for 600 + 100 images); "
      f"{len(areas)} objects, {100 * share_large:.0f} % COCO-large (area > 96²), median area {np.median(areas):.0f} px²")

# %%
assert Path(twice["val"]["annotations"]).read_bytes() == Path(large["val"]["annotations"]).read_bytes()
assert (tmp / "large" / "val" / "000005.png").read_bytes() == (tmp / "large2" / "val" / "000005.png").read_bytes()
assert dl["info"]["preset"] == "large" and dl["info"]["size"] == 320 and large["size"] == 320
assert dl["info"]["area_rng"]["large"][0] == 96 ** 2 and dl["info"]["area_rng"]["small"][1] == 32 ** 2, "COCO's absolute buckets"
assert [c["name"] for c in dl["categories"]] == list(CLASSES), "same classes and ids as the default preset"
assert share_large > 0.5, share_large
assert per_image < 1.0, "generation stays cheap"
assert "preset" not in d["info"], "the default preset's JSON is unchanged"

# %% [markdown]
# The default preset is unchanged: the pixels and JSON of a small default set hash to the value they
# had before the presets existed.

# %%
import hashlib
def _digest(root):
    h = hashlib.sha256()
    for split in ("train", "val"):
        h.update((Path(root) / "annotations" / f"instances_{split}.json").read_bytes())
        for p in sorted((Path(root) / split).glob("*.png")): h.update(np.asarray(Image.open(p)).tobytes())
    return h.hexdigest()[:16]
write_shapes_dataset(tmp / "default12", n_train=12, n_val=4, size=128, seed=0)
assert _digest(tmp / "default12") == "0a13814f545aaab5"


# %% [markdown]
# ## What a 28² mask loses
#
# The IoU of every object with its own mask at R² (crop, paste back), for the default preset and the
# large one. On the default preset 28² is already nearly lossless; on the large preset it is not, and
# doubling R twice recovers most of the loss:

# %%
def _resolution_iou(preset, n, sizes=(28, 56, 112)):
    out = {r: [] for r in sizes}
    for i in range(n):
        _, m, _ = make_shapes_image(np.random.default_rng([5, i]), preset=preset)
        for r in sizes: out[r] += mask_iou(at_resolution(m, r), m).tolist()
    return {r: float(np.mean(v)) for r, v in out.items()}
res_iou = {p: _resolution_iou(p, n) for p, n in (("default", 30), ("large", 30))}
res_iou

# %%
assert res_iou["default"][28] > 0.97, "default objects fit a 28² grid"
assert 1 - res_iou["large"][28] > 3 * (1 - res_iou["default"][28]), "large-preset detail is lost at 28²"
assert res_iou["large"][112] > res_iou["large"][56] > res_iou["large"][28] + 0.03, "and recovered at 56² and 112²"

# %% [markdown]
# Four large-preset images with their ground-truth outlines (top; the square marks the zoom below), and
# below each a 64×64-px window of its largest object where a 28² mask loses most: the GT mask in grey,
# the outline a perfect 28² mask gives back in red and the one at 112² in blue. The red outline breaks
# the thin spokes into beads or drops them, closes the slits and cuts across the teeth; the blue one follows them.

# %%
from matplotlib.patches import Rectangle
from scipy import ndimage
fig, axes = plt.subplots(2, 4, figsize=(12, 6.4))
W = 64
for k in range(4):
    im, m, lab = make_shapes_image(np.random.default_rng([1, k]), preset="large")
    j = int(m.reshape(len(m), -1).sum(1).argmax())
    gt, r28, r112 = m[j], at_resolution(m[j:j + 1], 28)[0], at_resolution(m[j:j + 1], 112)[0]
    lost = ndimage.uniform_filter((gt ^ r28).astype(np.float32), W, mode="constant")
    cy, cx = np.unravel_index(lost.argmax(), lost.shape)
    y0, x0 = int(np.clip(cy - W // 2, 0, m.shape[1] - W)), int(np.clip(cx - W // 2, 0, m.shape[2] - W))
    ax = axes[0, k]; ax.imshow(im); ax.set_axis_off()
    for i in range(len(m)): ax.contour(m[i], levels=[0.5], colors=[f"C{i}"], linewidths=1.0)
    ax.add_patch(Rectangle((x0 - 0.5, y0 - 0.5), W, W, fill=False, ec="white", lw=1.5))
    win = np.s_[y0:y0 + W, x0:x0 + W]
    ax = axes[1, k]; ax.imshow(gt[win], cmap="gray_r", vmin=0, vmax=2.5, interpolation="nearest"); ax.set_axis_off()
    for mm, col in ((r28, "C3"), (r112, "C0")): ax.contour(mm[win], levels=[0.5], colors=[col], linewidths=1.6)
    ax.set_title(f"{CLASSES[lab[j]]}: IoU at 28² {mask_iou(r28[None], gt[None])[0]:.2f}, at 112² {mask_iou(r112[None], gt[None])[0]:.2f}",
                 fontsize=9)
fig.tight_layout()
save_figure(fig, "data_shapes_large.png", dpi=72)
