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
# # Data: COCO instances, transforms, batches
#
# > Read any COCO-format instance-segmentation dataset into tensors, resize and flip it with masks and boxes kept consistent, batch it, look at it — and fail loudly (or skip and count) on bad input.

# %%
#| default_exp data

# %% [markdown]
# Both papers train and evaluate on COCO. Everything downstream — ISTR's mask embeddings, the matching
# costs, Mask Transfiner's incoherent regions — consumes the same thing: an image tensor and, per
# instance, a class, a box and a binary mask. This chapter produces exactly that from a folder laid
# out like COCO:
#
# ```
# root/annotations/instances_{split}.json
# root/{split}/<file_name>            # coco-mini: split = train2017 / val2017; shapes: train / val
# ```
#
# Parsing and mask decoding are pycocotools' (polygons, compressed and uncompressed RLE), image
# decoding is Pillow's (torchvision 0.29 deprecates its own decoders), resizing is torchvision's. What is written here is the glue: up-front validation with
# errors that name the file and field, a contiguous label mapping, transforms that move masks and
# boxes together, and a collate function that pads a batch.

# %%
#| export
import contextlib
import io
import json
import math
import os
import warnings
from collections import Counter
from types import SimpleNamespace
from pathlib import Path

from segbook.io import atomic_write

import numpy as np
import torch
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO
from PIL import Image
from torchvision.ops import masks_to_boxes
from torchvision.transforms.v2 import functional as TF


# %% [markdown]
# ## Where the files are, and what goes wrong
#
# `DatasetError` is the one exception for bad input: its message starts with the file and names the
# field. Problems that make a dataset unusable (a missing or malformed annotation file, an annotation
# pointing at an unknown image or category, a missing image file) raise when the dataset is built.
# Problems with *one item* that must not stop a long training run (a degenerate polygon, a zero-area
# box, a corrupt image met during iteration) are skipped, counted in `dataset.skipped`, and warned about.

# %%
#| export
class DatasetError(ValueError):
    "Bad dataset input; the message names the file and the field."

def coco_paths(root, # dataset root
               split:str, # 'train2017', 'val2017', 'train', 'val', ...
              ) -> tuple:
    "`(annotation json, image folder)` of `split` under `root`; 'train'/'val' fall back to COCO's '…2017' names."
    root = Path(root)
    ann, img = root / "annotations" / f"instances_{split}.json", root / split
    if not ann.exists() and split in ("train", "val"):
        alt = root / "annotations" / f"instances_{split}2017.json"
        if alt.exists():
            ann, img = alt, root / f"{split}2017"
    if not ann.exists():
        raise DatasetError(f"{ann}: annotation file not found (expected root/annotations/instances_{split}.json)")
    return ann, img


# %%
#| export
def load_coco_json(path) -> dict:
    "Read a COCO instances JSON, raising `DatasetError` with the file, line and column when it is malformed."
    path = Path(path)
    try:
        with open(path) as f:
            d = json.load(f)
    except json.JSONDecodeError as e:
        raise DatasetError(f"{path}: malformed JSON at line {e.lineno}, column {e.colno}: {e.msg}") from e
    except (OSError, UnicodeDecodeError) as e:
        raise DatasetError(f"{path}: cannot read annotation file: {e}") from e
    if not isinstance(d, dict):
        raise DatasetError(f"{path}: top level must be an object with 'images', 'annotations', 'categories'")
    for key in ("images", "categories"):
        if not isinstance(d.get(key), list):
            raise DatasetError(f"{path}: field '{key}' missing or not a list")
    d.setdefault("annotations", [])
    if not isinstance(d["annotations"], list):
        raise DatasetError(f"{path}: field 'annotations' is not a list")
    return d


# %% [markdown]
# ## Validating annotations up front
#
# Every image, category and annotation is checked once, when the dataset is built, so a typo in a
# 100k-image JSON fails in the first second rather than after an hour of training. `annotation_problem`
# decides which annotations are *skipped* rather than fatal. One pycocotools quirk matters here: a
# polygon with exactly 4 coordinates is silently read as a *box* by `frPyObjects`, so polygon parts
# with fewer than 6 coordinates (fewer than 3 points) are dropped before decoding.

# %%
#| export
def _field_error(path, where, msg):
    return DatasetError(f"{path}: {where}: {msg}")

def _check_images(path, images, need_files:bool=True):
    by_id = {}
    for i, im in enumerate(images):
        where = f"images[{i}]"
        if not isinstance(im, dict):
            raise _field_error(path, where, "not an object")
        for k in ("id", "file_name", "height", "width") if need_files else ("id", "height", "width"):
            if k not in im:
                raise _field_error(path, where + f" (id={im.get('id')})", f"missing field '{k}'")
        if not (isinstance(im["height"], int) and isinstance(im["width"], int) and im["height"] > 0 and im["width"] > 0):
            raise _field_error(path, where + f" (id={im['id']})", f"'height'/'width' must be positive integers, got {im['height']}x{im['width']}")
        if need_files:   # the image file must lie inside the split folder: a relative path that does not climb out
            fn = im["file_name"]
            if not isinstance(fn, str) or not fn.strip() or Path(fn).is_absolute() or ".." in Path(fn).parts or "\0" in fn:
                raise _field_error(path, where + f" (id={im['id']})", f"'file_name' must be a relative path inside the split "
                                   f"folder, got {fn!r}")
        if im["id"] in by_id:
            raise _field_error(path, where, f"duplicate image id {im['id']}")
        by_id[im["id"]] = im
    return by_id

def _check_categories(path, categories):
    ids = []
    for i, c in enumerate(categories):
        if not isinstance(c, dict) or "id" not in c or "name" not in c:
            raise _field_error(path, f"categories[{i}]", "needs fields 'id' and 'name'")
        if c["id"] in ids:
            raise _field_error(path, f"categories[{i}]", f"duplicate category id {c['id']}")
        ids.append(c["id"])
    return sorted(ids)

def annotation_problem(ann:dict, # one COCO annotation (already known to be well-formed)
                      ) -> str|None:
    "Why `ann` should be skipped: 'degenerate_polygon', 'zero_area_box', or None when usable."
    seg = ann["segmentation"]
    if isinstance(seg, list) and not any(len(p) >= 6 for p in seg):
        return "degenerate_polygon"
    box = ann.get("bbox")
    if box is not None and (box[2] <= 0 or box[3] <= 0):
        return "zero_area_box"
    return None

def _check_annotation(path, i, ann, images, cat_ids):
    where = f"annotations[{i}] (id={ann.get('id') if isinstance(ann, dict) else None})"
    if not isinstance(ann, dict):
        raise _field_error(path, where, "not an object")
    for k in ("image_id", "category_id", "segmentation"):
        if k not in ann:
            raise _field_error(path, where, f"missing field '{k}'")
    if ann["image_id"] not in images:
        raise _field_error(path, where, f"image_id {ann['image_id']!r} is not in 'images'")
    if ann["category_id"] not in cat_ids:
        raise _field_error(path, where, f"category_id {ann['category_id']!r} is not in 'categories'")
    seg, im = ann["segmentation"], images[ann["image_id"]]
    if isinstance(seg, dict):
        if "counts" not in seg or "size" not in seg:
            raise _field_error(path, where, "RLE 'segmentation' needs 'counts' and 'size'")
        if not isinstance(seg["size"], list) or list(seg["size"]) != [im["height"], im["width"]]:
            raise _field_error(path, where, f"RLE 'segmentation.size' {seg['size']} differs from the image's "
                               f"[height, width] = {[im['height'], im['width']]}")
    elif isinstance(seg, list):
        if not all(isinstance(p, list) and all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in p)
                   and len(p) % 2 == 0 for p in seg):
            raise _field_error(path, where, "polygon 'segmentation' must be a list of [x1, y1, x2, y2, ...] lists")
        if not all(math.isfinite(x) for p in seg for x in p):
            raise _field_error(path, where, "polygon 'segmentation' has a non-finite coordinate")
    else:
        raise _field_error(path, where, f"'segmentation' must be polygons (list) or RLE (object), got {type(seg).__name__}")
    if isinstance(seg, dict):
        counts = seg["counts"]
        if isinstance(counts, list):
            if not all(isinstance(c, int) and not isinstance(c, bool) and c >= 0 for c in counts):
                raise _field_error(path, where, "uncompressed RLE 'segmentation.counts' must be non-negative integers")
            if sum(counts) != im["height"] * im["width"]:
                raise _field_error(path, where, f"uncompressed RLE 'segmentation.counts' covers {sum(counts)} pixels, "
                                   f"the image has {im['height']}x{im['width']} = {im['height'] * im['width']}")
        elif not isinstance(counts, (str, bytes)):
            raise _field_error(path, where, f"RLE 'segmentation.counts' must be a string or a list, got {type(counts).__name__}")
    box = ann.get("bbox")
    if box is not None and (not isinstance(box, list) or len(box) != 4
                            or not all(isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x) for x in box)):
        raise _field_error(path, where, f"'bbox' must be [x, y, w, h] of finite numbers, got {box!r}")
    if ann.get("iscrowd", 0) not in (0, 1, True, False):
        raise _field_error(path, where, f"'iscrowd' must be 0 or 1, got {ann['iscrowd']!r}")

def read_coco_instances(path, # a COCO instances JSON (or the dict read from one, named 'gt' in errors)
                        drop_crowd:bool=False, # leave crowd regions out (training) instead of keeping them
                        need_files:bool=True, # images need 'file_name' (False: evaluation reads no image)
                       ) -> SimpleNamespace: # .data .images (by id) .cat_ids .annotations (usable) .skipped (Counter) .skipped_ids
    "Load and check a COCO instances file: each annotation is kept, skipped with a counted reason, or an error naming file, record and field."
    if isinstance(path, dict):
        d, path = path, "gt"
        for key in ("images", "annotations", "categories"):
            if not isinstance(d.get(key), list): raise DatasetError(f"gt: field '{key}' missing or not a list")
    else:
        path = Path(path)
        d = load_coco_json(path)
    images = _check_images(path, d["images"], need_files)
    cat_ids = _check_categories(path, d["categories"])
    kept, skipped, skipped_ids = [], Counter(), {}
    for i, ann in enumerate(d["annotations"]):
        _check_annotation(path, i, ann, images, set(cat_ids))
        if drop_crowd and ann.get("iscrowd", 0):
            continue
        why = annotation_problem(ann)
        if why:
            skipped[why] += 1
            skipped_ids.setdefault(why, []).append(ann.get("id"))
            continue
        kept.append(ann)
    return SimpleNamespace(data=d, images=images, cat_ids=cat_ids, annotations=kept, skipped=skipped, skipped_ids=skipped_ids)


# %% [markdown]
# ## Decoding a mask
#
# The three COCO encodings all go through pycocotools: polygons are rasterised by `frPyObjects` and
# the parts merged, uncompressed RLE (`counts` a list, used for crowd regions) is compressed by
# `frPyObjects`, compressed RLE (`counts` a string) is used as is. All masks of an image are then
# decoded in one `mask_utils.decode` call.

# %%
#| export
def segmentation_to_rle(seg, # COCO 'segmentation': polygons, or RLE with list or string counts
                        height:int, width:int) -> dict:
    "Compressed RLE of one COCO segmentation (polygon parts with < 3 points are dropped)."
    if isinstance(seg, list):
        polys = [p for p in seg if len(p) >= 6]
        return mask_utils.merge(mask_utils.frPyObjects(polys, height, width))
    if isinstance(seg["counts"], list):
        return mask_utils.frPyObjects(seg, height, width)
    return seg

def decode_masks(segs:list, # COCO segmentations of one image
                 height:int, width:int) -> torch.Tensor:
    "Binary masks `[N,H,W]` uint8 of `segs` (N may be 0)."
    if not segs:
        return torch.zeros((0, height, width), dtype=torch.uint8)
    m = mask_utils.decode([segmentation_to_rle(s, height, width) for s in segs])  # [H,W,N] Fortran order
    return torch.from_numpy(np.ascontiguousarray(m.transpose(2, 0, 1)))

def mask_boxes(masks:torch.Tensor, # [N,H,W] binary
              ) -> torch.Tensor:
    "Tight boxes `[N,4]` float32 xyxy in pixel-edge coordinates (a mask covering column 3 only → x1=3, x2=4)."
    if len(masks) == 0:
        return torch.zeros((0, 4), dtype=torch.float32)
    return masks_to_boxes(masks.bool()).float() + torch.tensor([0.0, 0.0, 1.0, 1.0])


# %% [markdown]
# `torchvision.ops.masks_to_boxes` returns the *index* of the last row/column; we add one so a box
# spans pixel edges `[x1, x2)`. Then a horizontal flip is exactly `x → W − x` and a resize exactly
# `x → x·W'/W`, with no half-pixel bookkeeping; COCO's `[x, y, w, h]` is the same convention.

# %% [markdown]
# ## Instance masks cropped to their boxes, streamed
#
# As the official `MaskLoader`, the reader needs only the annotation JSON: image sizes come from
# its `images` table, masks (polygons, RLE or uncompressed RLE) are decoded with pycocotools. Crowd
# regions are left out. Per image, all instances are decoded into one [k,H,W] stack and cropped in one
# RoIAlign call; crops are streamed in batches so that memory does not depend on the dataset size.
# The file is read and checked by `segbook.data.read_coco_instances`, the same function the training data set
# uses, so an annotation is skipped (zero-area box, polygon of fewer than 3 points; counted, one warning at the end
# with example ids), kept, or refused with an error naming the file, record and field exactly as there. A crop that
# comes out empty is skipped and counted too. Without a `bbox`, the crop box is the mask's own.

# %%
#| export
def iter_coco_masks(ann_json, # COCO instances JSON (annotations/instances_SPLIT.json)
                    size:int=28, # mask side s
                    batch:int=4096, # masks per yielded batch
                    stats:dict|None=None, # filled with counts: images, instances, crowd, used, skipped_*
                    progress:bool=True, # show a tqdm bar over images
                   ):
    "Yield [b,s,s] uint8 batches of every non-crowd instance mask cropped to its GT box."
    from collections import defaultdict
    from torchvision.ops import box_convert
    from tqdm.auto import tqdm
    from segbook.embeddings import crop_and_resize_masks
    path = Path(ann_json)
    if not path.exists():
        raise FileNotFoundError(f"{path}: annotation file not found")
    coco = read_coco_instances(path)              # the data set's checks and skips, verbatim
    per_image = defaultdict(list)
    for ann in coco.annotations:
        per_image[ann["image_id"]].append(ann)
    st = stats if stats is not None else {}
    st.update(images=len(coco.images), instances=len(coco.data["annotations"]), crowd=0, used=0,
              **{f"skipped_{k}": 0 for k in ("degenerate_polygon", "zero_area_box", "empty_mask")})
    for why, n in coco.skipped.items():
        st[f"skipped_{why}"] = n
    examples = [i for ids in coco.skipped_ids.values() for i in ids]
    buffer, n_buffered = [], 0
    for image_id in tqdm(sorted(per_image), desc=f"masks {path.name}", disable=not progress, leave=False):
        im = coco.images[image_id]
        anns = [a for a in per_image[image_id] if not a.get("iscrowd", 0)]
        st["crowd"] += len(per_image[image_id]) - len(anns)
        if not anns:
            continue
        decoded = decode_masks([a["segmentation"] for a in anns], im["height"], im["width"])
        ids = [a.get("id") for a in anns]
        boxes = torch.tensor([a["bbox"] for a in anns] if all("bbox" in a for a in anns) else
                             box_convert(mask_boxes(decoded), "xyxy", "xywh").tolist(), dtype=torch.float32)
        crops = crop_and_resize_masks(decoded, box_convert(boxes, "xywh", "xyxy"), size).to(torch.uint8)
        nonempty = crops.flatten(1).bool().any(1)
        n_empty = int((~nonempty).sum())
        if n_empty:
            st["skipped_empty_mask"] += n_empty
            examples += [i for i, keep in zip(ids, nonempty.tolist()) if not keep]
            crops = crops[nonempty]
        st["used"] += len(crops)
        buffer.append(crops); n_buffered += len(crops)
        while n_buffered >= batch:
            allm = torch.cat(buffer)
            yield allm[:batch]
            buffer, n_buffered = [allm[batch:]], len(allm) - batch
    if n_buffered:
        yield torch.cat(buffer)
    skipped = sum(v for k, v in st.items() if k.startswith("skipped_"))
    if skipped:
        reasons = {k[len("skipped_"):]: v for k, v in st.items() if k.startswith("skipped_") and v}
        warnings.warn(f"{path}: skipped {skipped} of {st['instances']} instances {reasons}; e.g. annotation ids {examples[:5]}")


# %% [markdown]
# A file with one zero-area box, one empty mask and one good polygon: the good one is kept, the
# other two are counted and named in one warning.

# %%
import tempfile
def _tiny_coco(path):
    anns = [dict(id=1, image_id=7, bbox=[2, 2, 10, 10], iscrowd=0, segmentation=[[2, 2, 12, 2, 12, 12, 2, 12]]),
            dict(id=2, image_id=7, bbox=[5, 5, 0, 4], iscrowd=0, segmentation=[[5, 5, 5, 9, 5, 7]]),
            dict(id=3, image_id=7, bbox=[20, 20, 5, 5], iscrowd=0, segmentation={"size": [32, 32], "counts": [1024]}),
            dict(id=4, image_id=7, bbox=[0, 0, 32, 32], iscrowd=1, segmentation={"size": [32, 32], "counts": [0, 1024]})]
    path.write_text(json.dumps(dict(images=[dict(id=7, file_name="7.png", height=32, width=32)],
                                    categories=[dict(id=1, name="thing")], annotations=[dict(a, category_id=1) for a in anns])))
    return path

with tempfile.TemporaryDirectory() as d, warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    st = {}
    got = list(iter_coco_masks(_tiny_coco(Path(d) / "t.json"), size=8, stats=st, progress=False))
assert len(got) == 1 and got[0].shape == (1, 8, 8) and got[0].all()
assert st["used"] == 1 and st["skipped_zero_area_box"] == 1 and st["skipped_empty_mask"] == 1 and st["crowd"] == 1
msgs = [str(c.message) for c in caught if "skipped" in str(c.message)]
assert len(msgs) == 1 and "skipped 2 of 4" in msgs[0] and "t.json" in msgs[0] and "[2, 3]" in msgs[0]

# %% [markdown]
# ## The dataset
#
# `CocoInstances` is a map-style `torch.utils.data.Dataset`. Categories are mapped to contiguous
# labels 0..C−1 in order of their COCO id (`coco_ids[label]` goes back, `label_of[coco_id]` forth).
# In training (`train=True`) crowd regions are dropped, as both papers' detectron2 pipelines do; for
# evaluation (`train=False`) they are kept and flagged in `iscrowd`. Images without annotations are
# returned with empty tensors of the right shapes. `boxes` are computed from the decoded masks, so
# box and mask agree by construction; instances whose mask decodes empty are skipped and counted.

# %% [markdown]
# ### Images of any mode, and a size limit
#
# Pillow decodes the pixels; what it does not decide is how a mode that is not 8-bit RGB becomes RGB. Its
# `convert("RGB")` is right for grey (`L`, `1`), palette (`P`, with or without transparency), `RGBA`/`LA` (the alpha
# channel is dropped, as detectron2's `read_image` drops it) and `CMYK`, but it *clips* 16-bit grey at 255, so a
# 16-bit scan would come out nearly white. `read_rgb` scales 16-bit grey (`I;16*`, and `I` when every value fits in
# 16 bits) by 255/65535 instead, and refuses what it cannot map without guessing: floating-point images (`F`) and
# 32-bit integers beyond 16 bits. A file whose header announces more than `max_pixels` pixels (Pillow's own
# decompression-bomb threshold by default, ~89 M) is refused before any pixel is decoded: a counted skip in training
# and evaluation, a clear error in `predict`.

# %%
#| export
MAX_IMAGE_PIXELS = Image.MAX_IMAGE_PIXELS or 89_478_485  # Pillow's decompression-bomb warning threshold

class ImageTooLarge(DatasetError):
    "An image whose header announces more pixels than the limit: refused before decoding."

def rgb_array(img:Image.Image, # an opened image of any mode
              where="image") -> np.ndarray: # [H,W,3] uint8
    "Pixels of `img` as 8-bit RGB: 16-bit grey scaled (not clipped), alpha dropped, palette and CMYK through Pillow."
    if img.mode in ("I;16", "I;16L", "I;16B", "I;16N", "I"):
        a = np.asarray(img)
        if a.dtype.kind not in "ui": a = np.asarray(img, dtype=np.int64)
        if a.size and (int(a.min()) < 0 or int(a.max()) > 65535):
            raise DatasetError(f"{where}: mode {img.mode} values {int(a.min())}..{int(a.max())} do not fit 16 bits; "
                               "convert it to 8-bit RGB")
        g = np.round(a.astype(np.float32) * (255 / 65535)).astype(np.uint8)
        return np.repeat(g[..., None], 3, axis=2)
    if img.mode == "F":
        raise DatasetError(f"{where}: floating-point image (mode F) has no fixed range to map to 8 bits; convert it to 8-bit RGB")
    return np.array(img.convert("RGB"))

def read_rgb(path, # image file
             max_pixels:int|None=MAX_IMAGE_PIXELS, # refuse larger images before decoding (None: no limit)
            ) -> torch.Tensor: # [3,H,W] uint8
    "An image file as an RGB tensor; `ImageTooLarge` past `max_pixels`, `DatasetError` naming the file when it cannot be decoded."
    undecodable = lambda e: DatasetError(f"{path}: cannot decode image ({type(e).__name__}: {e})")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)   # our own limit decides below
            f = Image.open(path)
    except Image.DecompressionBombError as e:
        raise ImageTooLarge(f"{path}: {e}") from e
    except (OSError, ValueError, SyntaxError) as e:   # not an image, or a header Pillow cannot parse
        raise undecodable(e) from e
    with f:
        w, h = f.size
        if max_pixels is not None and w * h > max_pixels:
            raise ImageTooLarge(f"{path}: {w}x{h} = {w * h} pixels is over the limit of {max_pixels} "
                                "(decompression-bomb guard; data.max_image_pixels raises it)")
        try:
            pixels = rgb_array(f, str(path))
        except DatasetError:
            raise
        except (OSError, ValueError, SyntaxError) as e:   # e.g. a truncated file: the header was fine, the pixels are not
            raise undecodable(e) from e
    return torch.from_numpy(pixels).permute(2, 0, 1).contiguous()


# %%
import tempfile
with tempfile.TemporaryDirectory() as tmp:
    grey16 = Path(tmp) / "grey16.png"
    Image.fromarray(np.full((4, 6), 200 * 257, np.uint16)).save(grey16)
    with Image.open(grey16) as f: clipped = np.array(f.convert("RGB"))
    x = read_rgb(grey16)
    assert x.shape == (3, 4, 6) and int(x.min()) == int(x.max()) == 200 and clipped.max() == 255   # scaled, not clipped
    bomb = Path(tmp) / "big.png"
    Image.new("RGB", (64, 64)).save(bomb)
    try: read_rgb(bomb, max_pixels=1000); raise AssertionError("no error")
    except ImageTooLarge as e: assert "4096 pixels is over the limit of 1000" in str(e)
print("16-bit grey 200*257 ->", int(x[0, 0, 0]), "(Pillow's convert('RGB') alone:", int(clipped[0, 0, 0]), ")")

# %%
#| export
LOAD_SKIPS = ("empty_mask", "bad_image", "image_too_large", "image_excluded_from_eval")  # counted while iterating
_MAX_WORKERS = 64  # rows of the shared counters (worker ids beyond share rows; the sums stay right)

class CocoInstances(torch.utils.data.Dataset):
    "COCO-format instance segmentation: `ds[i] -> (image [3,H,W] uint8, target dict)`, after `transforms`."
    def __init__(self, root, # dataset root (annotations/ and image folders)
                 split:str, # e.g. 'train2017' or 'val'
                 transforms=None, # callable `(image, target) -> (image, target)`
                 train:bool=True, # drop crowd regions (True) or keep them flagged (False)
                 check_files:bool=True, # stat every image file now; missing files raise (or are skipped)
                 on_missing:str="raise", # missing image file at construction: 'raise' | 'skip' (counted)
                 on_bad_image:str="skip", # unreadable image during iteration: 'skip' (warn, count, next image) | 'raise'
                 max_image_pixels:int|None=MAX_IMAGE_PIXELS, # larger images are unreadable (decompression-bomb guard)
                ):
        if on_missing not in ("raise", "skip") or on_bad_image not in ("raise", "skip"):
            raise ValueError("on_missing and on_bad_image must be 'raise' or 'skip'")
        self.root, self.split, self.transforms, self.train = Path(root), split, transforms, train
        self.on_bad_image, self.max_image_pixels = on_bad_image, max_image_pixels
        self.ann_file, self.image_dir = coco_paths(root, split)
        coco = read_coco_instances(self.ann_file, drop_crowd=train)
        d, images, self.coco_ids = coco.data, coco.images, coco.cat_ids
        self.label_of = {c: i for i, c in enumerate(self.coco_ids)}
        names = {c["id"]: c["name"] for c in d["categories"]}
        self.class_names = [names[c] for c in self.coco_ids]
        self._skipped = Counter(coco.skipped)
        # counts made while iterating live in shared memory, one row per DataLoader worker (row 0: this process),
        # so that the run's summary sees the skips of every worker
        self._load_skips = torch.zeros(1 + _MAX_WORKERS, len(LOAD_SKIPS), dtype=torch.int64).share_memory_()
        self._anns = {i: [] for i in images}
        for ann in coco.annotations:
            self._anns[ann["image_id"]].append(ann)
        for why, ids in coco.skipped_ids.items():
            warnings.warn(f"{self.ann_file}: skipped {len(ids)} annotation(s) with {why} (ids {ids[:5]}{'...' if len(ids) > 5 else ''})")
        self._images = [images[i] for i in sorted(images)]
        if check_files:
            missing = [im for im in self._images if not (self.image_dir / im["file_name"]).is_file()]
            if missing and on_missing == "raise":
                raise DatasetError(f"{self.image_dir / missing[0]['file_name']}: image file missing "
                                   f"(images id={missing[0]['id']}, field 'file_name' in {self.ann_file}); "
                                   f"{len(missing)} of {len(self._images)} images are missing")
            if missing:
                self.count_skip("missing_image", len(missing))
                warnings.warn(f"{self.image_dir}: skipped {len(missing)} image(s) whose file is missing, "
                              f"e.g. {missing[0]['file_name']}")
                gone = {im["id"] for im in missing}
                self._images = [im for im in self._images if im["id"] not in gone]
        self.image_ids = [im["id"] for im in self._images]
        self.coco = COCO()  # pycocotools' index over the checked JSON (skipped annotations left out), e.g. for COCOeval
        self.coco.dataset = {**d, "annotations": [a for a in d["annotations"] if not annotation_problem(a)]}
        with contextlib.redirect_stdout(io.StringIO()):
            self.coco.createIndex()

    def __len__(self): return len(self._images)

    def count_skip(self, reason:str, n:int=1):
        "Count `n` items left out for `reason` (from any DataLoader worker)."
        if reason in LOAD_SKIPS:
            info = torch.utils.data.get_worker_info()
            self._load_skips[0 if info is None else 1 + info.id % _MAX_WORKERS, LOAD_SKIPS.index(reason)] += n
        else:
            self._skipped[reason] += n

    def iteration_skips(self) -> torch.Tensor: # [len(LOAD_SKIPS)] int64
        "The counts made while iterating (every worker), in `LOAD_SKIPS` order, e.g. to sum over processes."
        return self._load_skips.sum(0)

    @property
    def skipped(self) -> Counter:
        "What was left out so far, by reason (annotations and images; every worker's counts included)."
        c = Counter(self._skipped)
        for why, n in zip(LOAD_SKIPS, self.iteration_skips().tolist()):
            if n: c[why] += n
        return c

    def image_path(self, i:int) -> Path:
        "Path of the `i`-th image file."
        return self.image_dir / self._images[i]["file_name"]

    def load(self, i:int):
        "The `i`-th sample before transforms; raises `DatasetError` on an unreadable or mis-sized image."
        im, path = self._images[i], self.image_path(i)
        try:
            image = read_rgb(path, self.max_image_pixels)
        except DatasetError as e:   # ImageTooLarge stays ImageTooLarge
            raise type(e)(f"{e} (images id={im['id']})") from e
        h, w = im["height"], im["width"]
        if tuple(image.shape[1:]) != (h, w):
            raise DatasetError(f"{path}: image is {image.shape[2]}x{image.shape[1]} but {self.ann_file} says "
                               f"width={w}, height={h} (images id={im['id']})")
        anns = self._anns[im["id"]]
        masks = decode_masks([a["segmentation"] for a in anns], h, w)
        keep = masks.flatten(1).bool().any(1)
        if not bool(keep.all()):
            n = int((~keep).sum())
            self.count_skip("empty_mask", n)
            warnings.warn(f"{self.ann_file}: {n} annotation(s) of image id={im['id']} decode to an empty mask; skipped")
            masks, anns = masks[keep], [a for a, k in zip(anns, keep.tolist()) if k]
        target = {
            "boxes": mask_boxes(masks),
            "labels": torch.tensor([self.label_of[a["category_id"]] for a in anns], dtype=torch.int64),
            "masks": masks,
            "iscrowd": torch.tensor([bool(a.get("iscrowd", 0)) for a in anns], dtype=torch.bool),
            "image_id": int(im["id"]),
            "orig_size": torch.tensor([h, w], dtype=torch.int64),
            "size": torch.tensor([h, w], dtype=torch.int64),
        }
        return image, target

    def __getitem__(self, i:int):
        for k in range(len(self)):
            j = (i + k) % len(self)
            try:
                image, target = self.load(j)
                break
            except DatasetError as e:
                if self.on_bad_image == "raise":
                    raise
                self.count_skip("image_too_large" if isinstance(e, ImageTooLarge) else "bad_image")
                warnings.warn(f"{e}; skipped, using the next image")
        else:
            raise DatasetError(f"{self.image_dir}: no readable image in split '{self.split}'")
        if self.transforms is not None:
            image, target = self.transforms(image, target)
        return image, target

    def __repr__(self):
        return (f"CocoInstances({self.ann_file}, {len(self)} images, {len(self.class_names)} classes, "
                f"train={self.train}, skipped={dict(self.skipped)})")


# %% [markdown]
# `skipped` counts what was left out: `degenerate_polygon`, `zero_area_box`, `missing_image` (with
# `on_missing='skip'`) at construction; `empty_mask`, `bad_image` and `image_too_large` during iteration. The
# iteration counters are a small tensor in shared memory with a row per `DataLoader` worker, so the parent process
# reads the counts of every worker (a plain attribute would be counted in the workers' copies and lost); the
# warnings, which name the file, reach the console either way. `segbook train`, `eval` and `pca-fit` print these
# counts as one summary line at the end and store them with their metrics.

# %%
#| export
IMAGE_SKIPS = ("missing_image", "bad_image", "image_too_large", "image_excluded_from_eval")  # the rest are annotations

def skip_summary(skipped:dict, # reason -> count (e.g. `CocoInstances.skipped`)
                 what:str, # the command or split, e.g. 'train (shapes/train)'
                ) -> str|None: # one line, or None when nothing was left out
    "The line a command prints at its end: how many annotations and images it left out, by reason."
    parts = []
    for kind, keys in (("annotation", [k for k in skipped if k not in IMAGE_SKIPS]), ("image", [k for k in IMAGE_SKIPS if k in skipped])):
        keys = [k for k in keys if skipped[k]]
        if keys:
            parts.append(f"{sum(skipped[k] for k in keys)} {kind}(s) ({', '.join(f'{k} {skipped[k]}' for k in sorted(keys))})")
    return f"{what}: left out {' and '.join(parts)}; the warnings above name them" if parts else None


# %% [markdown]
# ## Transforms that keep masks and boxes together
#
# A transform is a callable `(image, target) -> (image, target)`. Three are needed by both papers'
# training recipes (detectron2's `ResizeShortestEdge` + `RandomFlip`, then pixel normalisation):
#
# - `ResizeShortestEdge`: the shorter side goes to a size drawn from a list (`min_size` a sequence:
#   ISTR's 480…800 in steps of 32) or from a range (`min_size`..`max_size`), and the longer side is
#   capped at `max_size_cap` (1333). Images are resized with antialiasing, masks with nearest
#   neighbour, boxes scaled by the same factors; `target['size']` becomes the new `(h, w)`.
# - `RandomHorizontalFlip`: `x → W − x` on boxes, a flip on masks.
# - `Normalize`: uint8 → float, `(x/255 − mean)/std` with ImageNet's RGB statistics.
#
# Randomness comes from `generator` when given (a seeded `torch.Generator`), else from torch's global
# generator — which `DataLoader` seeds per worker from its own generator, so runs are reproducible.
# torchvision's `transforms.v2` could do the same on `tv_tensors`; these few lines keep the target a
# plain dict and keep `size` in step.

# %%
#| export
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)

class Compose:
    "Apply transforms in order."
    def __init__(self, transforms:list): self.transforms = list(transforms)
    def __call__(self, image, target):
        for t in self.transforms:
            image, target = t(image, target)
        return image, target
    def __repr__(self): return f"Compose({self.transforms})"

def resized_shape(h:int, w:int, short:int, max_size_cap:int) -> tuple:
    "`(h', w')` with the shorter side `short` and the longer at most `max_size_cap` (aspect kept)."
    scale = short / min(h, w)
    if max(h, w) * scale > max_size_cap:
        scale = max_size_cap / max(h, w)
    return int(h * scale + 0.5), int(w * scale + 0.5)

class ResizeShortestEdge:
    "Resize so the shorter side is a random choice from `min_size` (or in `[min_size, max_size]`), longer side ≤ `max_size_cap`."
    def __init__(self, min_size, # int, or a sequence of sizes to choose from
                 max_size:int|None=None, # with an int `min_size`: draw the short side uniformly in [min_size, max_size]
                 max_size_cap:int=1333, # cap on the longer side
                 generator:torch.Generator|None=None):
        self.min_size, self.max_size, self.max_size_cap, self.generator = min_size, max_size, max_size_cap, generator

    def short_side(self) -> int:
        "Draw the target length of the shorter side."
        if isinstance(self.min_size, (list, tuple)):
            return int(self.min_size[int(torch.randint(len(self.min_size), (1,), generator=self.generator))])
        if self.max_size is not None and self.max_size > self.min_size:
            return int(torch.randint(self.min_size, self.max_size + 1, (1,), generator=self.generator))
        return int(self.min_size)

    def __call__(self, image, target):
        h, w = image.shape[-2:]
        nh, nw = resized_shape(h, w, self.short_side(), self.max_size_cap)
        image = TF.resize(image, [nh, nw], antialias=True)
        t = dict(target)
        m = t["masks"]
        t["masks"] = (TF.resize(m, [nh, nw], interpolation=TF.InterpolationMode.NEAREST_EXACT) if len(m)
                      else m.new_zeros((0, nh, nw)))
        t["boxes"] = t["boxes"] * torch.tensor([nw / w, nh / h, nw / w, nh / h])
        t["size"] = torch.tensor([nh, nw], dtype=torch.int64)
        return image, t

    def __repr__(self): return f"ResizeShortestEdge({self.min_size}, {self.max_size}, cap={self.max_size_cap})"

class RandomHorizontalFlip:
    "Flip image, masks and boxes left-right with probability `p`."
    def __init__(self, p:float=0.5, generator:torch.Generator|None=None): self.p, self.generator = p, generator
    def __call__(self, image, target):
        if float(torch.rand((), generator=self.generator)) >= self.p:
            return image, target
        w = image.shape[-1]
        t = dict(target)
        t["masks"] = t["masks"].flip(-1)
        t["boxes"] = torch.stack([w - t["boxes"][:, 2], t["boxes"][:, 1], w - t["boxes"][:, 0], t["boxes"][:, 3]], 1)
        return image.flip(-1), t
    def __repr__(self): return f"RandomHorizontalFlip({self.p})"

class Normalize:
    "uint8 `[3,H,W]` → float32 `(x/255 − mean)/std` (float input is taken to be in [0,1])."
    def __init__(self, mean=IMAGENET_MEAN, std=IMAGENET_STD):
        self.mean, self.std = torch.tensor(mean).view(3, 1, 1), torch.tensor(std).view(3, 1, 1)
    def __call__(self, image, target):
        x = image.float() / 255 if image.dtype == torch.uint8 else image.float()
        return (x - self.mean) / self.std, target
    def __repr__(self): return "Normalize()"

def build_transforms(train:bool, # training (random size, flip) or evaluation (fixed size)
                     min_size=(480, 512, 544, 576, 608, 640, 672, 704, 736, 768, 800), # choices, or the low end of a range
                     max_size:int|None=None, # high end of the short-side range (with an int `min_size`)
                     max_size_cap:int=1333, # cap on the longer side
                     flip:float=0.5, # flip probability in training
                     test_size:int|None=None, # evaluation short side; default: the largest training size
                     generator:torch.Generator|None=None) -> Compose:
    "The papers' recipe: resize shortest edge (+ flip in training), then normalise."
    if train:
        ts = [ResizeShortestEdge(min_size, max_size, max_size_cap, generator)]
        if flip > 0:
            ts.append(RandomHorizontalFlip(flip, generator))
    else:
        top = max(min_size) if isinstance(min_size, (list, tuple)) else (max_size or min_size)
        ts = [ResizeShortestEdge(test_size or top, None, max_size_cap)]
    return Compose(ts + [Normalize()])


# %% [markdown]
# ## Batches
#
# `collate` stacks a list of samples into one zero-padded tensor whose height and width are multiples
# of 32 (the FPN's coarsest stride), and keeps the targets as a list: each holds its own `size`, the
# unpadded extent a model must respect. uint8 images are normalised here, so a batch is always a
# normalised float tensor whatever transforms were used.

# %%
#| export
def collate(samples:list, # [(image [3,H,W], target dict), ...]
            size_divisibility:int=32) -> tuple:
    "`(images [B,3,H*,W*] float32 zero-padded to a multiple of size_divisibility, targets list)`."
    norm = Normalize()
    images = [norm(img, None)[0] if img.dtype == torch.uint8 else img.float() for img, _ in samples]
    d = size_divisibility
    H = int(math.ceil(max(i.shape[1] for i in images) / d) * d)
    W = int(math.ceil(max(i.shape[2] for i in images) / d) * d)
    batch = images[0].new_zeros((len(images), 3, H, W))
    for b, img in enumerate(images):
        batch[b, :, : img.shape[1], : img.shape[2]] = img
    return batch, [t for _, t in samples]


# %% [markdown]
# ## Looking at the data
#
# `browse` is the data half of "look before you train" (detectron2's `visualize_data`): it draws the
# ground truth of `n` seeded-random images with `segbook.viz.draw_instances` and writes PNGs. Small
# images are enlarged (nearest neighbour) so the labels stay readable. `segbook data browse` calls it.

# %%
#| export
def render_ground_truth(ds:CocoInstances, i:int, # dataset and index
                        min_side:int=384) -> np.ndarray:
    "`[H,W,3]` uint8 overlay of sample `i` (raw, untransformed) with class names; crowd regions say so."
    from segbook.viz import draw_instances
    image, t = ds.load(i)
    k = max(1, min_side // max(1, min(image.shape[1:])))
    masks, boxes = t["masks"], t["boxes"]
    if k > 1:
        image = image.repeat_interleave(k, 1).repeat_interleave(k, 2)
        masks = masks.repeat_interleave(k, 1).repeat_interleave(k, 2)
        boxes = boxes * k
    names = [ds.class_names[l] + (" (crowd)" if c else "") for l, c in zip(t["labels"].tolist(), t["iscrowd"].tolist())]
    return draw_instances(image, masks, boxes, names)

def browse(data, # dataset root
           split:str, # split name
           out, # folder for the PNGs
           n:int=8, # number of images
           seed:int=0, # which images (a seeded random sample)
          ) -> list:
    "Render ground-truth overlays of `n` sampled images of `split` to `out/<split>_<image_id>.png`; returns the paths."
    ds = CocoInstances(data, split, train=False)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    order = torch.randperm(len(ds), generator=torch.Generator().manual_seed(seed))[:n].tolist()
    paths = []
    for i in order:
        p = out / f"{split}_{ds.image_ids[i]}.png"
        drawn = Image.fromarray(render_ground_truth(ds, i))
        atomic_write(p, lambda f: drawn.save(f, format="png"), "wb")
        paths.append(p)
    return paths


# %% [markdown]
# ## Dataset statistics
#
# Counts straight from the JSON (no image decoding): instances per image, per class, and per COCO size
# bucket. The buckets are COCO's (`area < 32²`, `< 96²`, larger) unless the JSON's `info.area_rng`
# says otherwise — shapes writes its own, rescaled to its image size (see the shapes chapter).

# %%
#| export
COCO_AREA_RNG = {"all": [0, 1e10], "small": [0, 32 ** 2], "medium": [32 ** 2, 96 ** 2], "large": [96 ** 2, 1e10]}

def area_ranges(coco:dict) -> dict:
    "Area buckets of a COCO dict: its `info.area_rng` when present, else COCO's."
    rng = (coco.get("info") or {}).get("area_rng")
    return {k: list(v) for k, v in rng.items()} if rng else dict(COCO_AREA_RNG)

def coco_statistics(ann_file, # a COCO instances JSON
                   ) -> dict:
    "Instances per image, per class and per size bucket (crowd regions excluded); JSON-serialisable."
    d = load_coco_json(ann_file)
    names = {c["id"]: c["name"] for c in d["categories"]}
    anns = [a for a in d["annotations"] if not a.get("iscrowd", 0)]
    per_image = Counter(a["image_id"] for a in anns)
    rng = area_ranges(d)
    buckets = Counter()
    for a in anns:
        area = a.get("area", 0)
        buckets["small" if area < rng["small"][1] else "medium" if area < rng["medium"][1] else "large"] += 1
    return {"n_images": len(d["images"]), "n_instances": len(anns),
            "instances_per_image": [per_image.get(im["id"], 0) for im in d["images"]],
            "per_class": {names[c]: n for c, n in sorted(Counter(a["category_id"] for a in anns).items())},
            "size_buckets": {k: buckets.get(k, 0) for k in ("small", "medium", "large")},
            "area_rng": rng}


# %% [markdown]
# ## Example: one tiny dataset, three mask encodings
#
# A 10×12 image with the same rectangle (rows 3–6, columns 2–7) annotated three ways: as a polygon,
# as uncompressed RLE (column-major run lengths written out by hand), and as compressed RLE — plus a
# crowd region. All three must decode to the same mask and the same box `[2, 3, 8, 7]`.

# %%
import tempfile

def tiny_coco(root, anns, images=None, categories=None, size=(10, 12)):
    "Write a small COCO dataset (one grey image per entry of `images`) under `root/annotations`, `root/val`."
    root = Path(root); (root / "annotations").mkdir(parents=True, exist_ok=True); (root / "val").mkdir(exist_ok=True)
    images = images if images is not None else [{"id": 1, "file_name": "a.png", "height": size[0], "width": size[1]}]
    for im in images:
        Image.fromarray(np.full((im["height"], im["width"], 3), 128, np.uint8)).save(root / "val" / im["file_name"])
    d = {"images": images, "annotations": anns,
         "categories": categories or [{"id": 3, "name": "car"}, {"id": 7, "name": "train"}]}
    (root / "annotations" / "instances_val.json").write_text(json.dumps(d))
    return root

rect = np.zeros((10, 12), np.uint8); rect[3:7, 2:8] = 1
compressed = mask_utils.encode(np.asfortranarray(rect)); compressed["counts"] = compressed["counts"].decode()
anns = [
    {"id": 1, "image_id": 1, "category_id": 3, "segmentation": [[2, 3, 8, 3, 8, 7, 2, 7]], "bbox": [2, 3, 6, 4]},
    {"id": 2, "image_id": 1, "category_id": 7, "segmentation": {"size": [10, 12], "counts": [23, 4, 6, 4, 6, 4, 6, 4, 6, 4, 6, 4, 43]}},
    {"id": 3, "image_id": 1, "category_id": 3, "segmentation": compressed},
    {"id": 4, "image_id": 1, "category_id": 7, "segmentation": {"size": [10, 12], "counts": [0, 10, 110]}, "iscrowd": 1},
]
root = tiny_coco(Path(tempfile.mkdtemp()) / "tiny", anns)
ds = CocoInstances(root, "val")
image, target = ds[0]
ds, {k: (tuple(v.shape) if torch.is_tensor(v) else v) for k, v in target.items()}

# %%
assert image.shape == (3, 10, 12) and image.dtype == torch.uint8
assert target["masks"].shape == (3, 10, 12) and target["masks"].dtype == torch.uint8
assert all(torch.equal(m, torch.from_numpy(rect)) for m in target["masks"]), "polygon, uncompressed and compressed RLE agree"
assert target["boxes"].tolist() == [[2, 3, 8, 7]] * 3 and target["boxes"].dtype == torch.float32
assert target["labels"].tolist() == [0, 1, 0] and ds.coco_ids == [3, 7] and ds.label_of == {3: 0, 7: 1}
assert not target["iscrowd"].any(), "train=True drops crowd regions"
_, t_eval = CocoInstances(root, "val", train=False)[0]
assert t_eval["iscrowd"].tolist() == [False, False, False, True] and t_eval["boxes"][3].tolist() == [0, 0, 1, 10]

# %% [markdown]
# ## Example: transforms and a batch
#
# Resizing the tiny image to a short side of 40 (×4) and flipping it must keep each box equal to the
# bounding box of its mask; `collate` then pads two differently sized samples to multiples of 32.

# %%
g = torch.Generator().manual_seed(0)
tf = Compose([ResizeShortestEdge(40), RandomHorizontalFlip(1.0, g)])
img2, t2 = tf(image, target)
assert img2.shape == (3, 40, 48) and t2["size"].tolist() == [40, 48] and t2["masks"].shape == (3, 40, 48)
assert torch.allclose(t2["boxes"], mask_boxes(t2["masks"]), atol=1) and t2["boxes"][0].tolist() == [16, 12, 40, 28]
assert torch.equal(t2["masks"][0], torch.from_numpy(rect).repeat_interleave(4, 0).repeat_interleave(4, 1).flip(-1))
assert resized_shape(480, 640, 800, 1333) == (800, 1067) and resized_shape(100, 1000, 800, 1333) == (133, 1333)
images, targets = collate([(image, target), (img2, t2)])
assert images.shape == (2, 3, 64, 64) and images.dtype == torch.float32
assert images[0, :, 10:].abs().sum() == 0 and images[0, :, :, 12:].abs().sum() == 0, "zero padding outside each image"
assert [t["size"].tolist() for t in targets] == [[10, 12], [40, 48]]


# %% [markdown]
# ## Bad input
#
# Each of these must fail with a `DatasetError` naming the file and the field — or, for one bad item,
# be skipped and counted.

# %%
def error_of(fn):
    try:
        fn()
    except DatasetError as e:
        return str(e)
    raise AssertionError("no DatasetError")

bad = Path(tempfile.mkdtemp())
r = tiny_coco(bad / "unknown_image", [{"id": 9, "image_id": 5, "category_id": 3, "segmentation": [[0, 0, 4, 0, 4, 4]]}])
msg = error_of(lambda: CocoInstances(r, "val")); print(msg)
assert "instances_val.json" in msg and "image_id 5" in msg and "id=9" in msg
r = tiny_coco(bad / "unknown_cat", [{"id": 9, "image_id": 1, "category_id": 99, "segmentation": [[0, 0, 4, 0, 4, 4]]}])
assert "category_id 99" in error_of(lambda: CocoInstances(r, "val"))
r = tiny_coco(bad / "malformed", []); (r / "annotations" / "instances_val.json").write_text('{"images": [')
msg = error_of(lambda: CocoInstances(r, "val")); print(msg)
assert "malformed JSON" in msg and "instances_val.json" in msg
r = tiny_coco(bad / "missing", []); (r / "val" / "a.png").unlink()
msg = error_of(lambda: CocoInstances(r, "val")); print(msg)
assert "a.png" in msg and "file_name" in msg
with warnings.catch_warnings(record=True) as w:
    warnings.simplefilter("always")
    r = tiny_coco(bad / "degenerate", [{"id": 1, "image_id": 1, "category_id": 3, "segmentation": [[0, 0, 4, 4]]},
                                       {"id": 2, "image_id": 1, "category_id": 3, "segmentation": [[0, 0, 4, 0, 4, 4]], "bbox": [0, 0, 0, 4]},
                                       {"id": 3, "image_id": 1, "category_id": 3, "segmentation": [[0, 0, 4, 0, 4, 4]], "bbox": [0, 0, 4, 4]}])
    d = CocoInstances(r, "val")
assert d.skipped == {"degenerate_polygon": 1, "zero_area_box": 1} and len(d[0][1]["labels"]) == 1 and len(w) == 2
r = tiny_coco(bad / "corrupt", [], images=[{"id": 1, "file_name": "a.png", "height": 10, "width": 12},
                                           {"id": 2, "file_name": "b.png", "height": 10, "width": 12}])
(r / "val" / "a.png").write_bytes(b"not a png")
with warnings.catch_warnings(record=True) as w:
    warnings.simplefilter("always")
    d = CocoInstances(r, "val")
    _, t = d[0]
assert t["image_id"] == 2 and d.skipped["bad_image"] == 1 and "a.png" in str(w[0].message)
assert "a.png" in error_of(lambda: CocoInstances(r, "val", on_bad_image="raise")[0])


# %% [markdown]
# ## COCO-mini: real images
#
# The 100 + 100 COCO images in `../shared/coco-mini` (when present) go through the same code. The
# grid below is what `segbook data browse --data ../shared/coco-mini --split val2017` writes, one
# file per image.

# %%
#| export
def find_shared(name:str, # folder under `shared/`, e.g. 'coco-mini'
                env:str, # environment variable that overrides the search
                marker:str="", # a sub-path the folder must hold to count (e.g. 'annotations')
                start=None, # where to start looking (default: the working directory)
               ) -> Path|None:
    "`$env`, else the first `shared/name` (holding `marker`) beside `start` or one of its parents; None if absent."
    if os.environ.get(env): return Path(os.environ[env])
    start = Path(start or Path.cwd()).resolve()
    for d in [start, *start.parents]:
        if (d / "shared" / name / marker).is_dir(): return d / "shared" / name
    return None

def find_coco_mini(start=None, # where to start looking (default: the working directory)
                  ) -> Path|None:
    "`$SEGBOOK_COCO_MINI`, else the first `shared/coco-mini` beside `start` or one of its parents; None if absent."
    return find_shared("coco-mini", "SEGBOOK_COCO_MINI", "annotations", start)


# %%
COCO_MINI = find_coco_mini() or Path("shared/coco-mini")  # absent: the cells that need it skip
COCO_MINI.exists()

# %%
import matplotlib.pyplot as plt
from segbook.viz import save_figure

if COCO_MINI.exists():
    val = CocoInstances(COCO_MINI, "val2017", train=False)
    print(val)
    picks = torch.randperm(len(val), generator=torch.Generator().manual_seed(0))[:6].tolist()
    fig, axes = plt.subplots(2, 3, figsize=(10, 5.4))
    for ax, i in zip(axes.flat, picks):
        ax.imshow(render_ground_truth(val, i, min_side=1)); ax.set_axis_off()
        ax.set_title(f"image {val.image_ids[i]}: {len(val.load(i)[1]['labels'])} instances", fontsize=9)
    fig.tight_layout()
    save_figure(fig, "data_coco_mini_grid.png", dpi=72)

# %%
if COCO_MINI.exists():
    image, t = val[picks[0]]
    assert image.shape[0] == 3 and t["masks"].shape[1:] == image.shape[1:] and len(t["boxes"]) == len(t["labels"])
    assert len(val.class_names) == 80 and val.coco_ids[-1] == 90 and val.label_of[90] == 79
    assert torch.allclose(t["boxes"], mask_boxes(t["masks"])), "boxes are the masks' tight boxes"
    tr = CocoInstances(COCO_MINI, "train", transforms=build_transforms(True, min_size=(256, 288), max_size_cap=400))
    x, tt = tr[0]
    assert x.dtype == torch.float32 and min(tt["size"].tolist()) in (256, 288) and max(tt["size"].tolist()) <= 400
    assert tr.ann_file.name == "instances_train2017.json", "'train' resolves to train2017"
