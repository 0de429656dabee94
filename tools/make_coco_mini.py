"""Rebuild coco-mini (200 COCO 2017 images with instance masks) from the COCO 2017 files.

    python tools/make_coco_mini.py --coco COCO_ROOT --out data/coco-mini

COCO_ROOT is a COCO 2017 download with `train2017/`, `val2017/` (images), `annotations/panoptic_{split}.json` and
`annotations/panoptic_{split}/` (the panoptic PNGs, from `panoptic_annotations_trainval2017.zip`). The image ids
are `tools/coco_mini_ids.json`. Each *thing* segment of an image's panoptic PNG becomes one instance mask (so masks
never overlap), stored as compressed RLE with `area` = mask pixels and `bbox` from the mask (pycocotools); `iscrowd`
comes from the segment. Writes `OUT/{split}/` (image copies), `OUT/annotations/instances_{split}.json` and the
panoptic JSON and PNGs of the same images. The result equals the copy in `../shared/coco-mini` byte for byte in its
instances JSON (tests/test_tooling.py rebuilds it from that copy's own panoptic files).
"""
import argparse
import json
import os
import shutil
import sys
from pathlib import Path

import numpy as np
from PIL import Image
from pycocotools import mask as mask_utils

IDS = Path(__file__).with_name("coco_mini_ids.json")
SPLITS = ("train2017", "val2017")


def panoptic_ids(png: Path) -> np.ndarray:
    "Segment id per pixel of a COCO panoptic PNG: R + 256·G + 256²·B."
    rgb = np.asarray(Image.open(png).convert("RGB"), dtype=np.uint32)
    return rgb[..., 0] + 256 * rgb[..., 1] + 256 * 256 * rgb[..., 2]


def instances_from_panoptic(panoptic: dict, png_dir: Path, image_ids: list, split: str) -> dict:
    "COCO instances dict for `image_ids` (in that order) from a panoptic JSON and its PNG folder."
    things = {c["id"] for c in panoptic["categories"] if c.get("isthing")}
    images = {im["id"]: im for im in panoptic["images"]}
    segments = {a["image_id"]: a for a in panoptic["annotations"]}
    missing = [i for i in image_ids if i not in images or i not in segments]
    if missing:
        raise SystemExit(f"make_coco_mini: {split}: image ids {missing[:5]} (of {len(missing)}) are not in the panoptic JSON")
    keys = ("id", "file_name", "height", "width", "license", "coco_url", "flickr_url", "date_captured")
    out = {"info": {"description": f"coco-mini {split}: COCO 2017 images with instance masks derived from COCO panoptic annotations"},
           "licenses": panoptic.get("licenses", []), "images": [], "annotations": [],
           "categories": [{"id": c["id"], "name": c["name"], "supercategory": c["supercategory"]}
                          for c in panoptic["categories"] if c.get("isthing")]}
    for image_id in image_ids:
        im, ann = images[image_id], segments[image_id]
        out["images"].append({k: im[k] for k in keys if k in im})
        seg = panoptic_ids(png_dir / ann["file_name"])
        for s in ann["segments_info"]:
            if s["category_id"] not in things:
                continue
            m = np.asfortranarray((seg == s["id"]).astype(np.uint8))
            rle = mask_utils.encode(m)
            out["annotations"].append({
                "id": len(out["annotations"]) + 1, "image_id": image_id, "category_id": s["category_id"],
                "segmentation": {"size": rle["size"], "counts": rle["counts"].decode("ascii")},
                "area": float(mask_utils.area(rle)), "bbox": [float(v) for v in mask_utils.toBbox(rle)],
                "iscrowd": int(s.get("iscrowd", 0))})
    return out


def write_atomic(text: str, path: Path):
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text); os.replace(tmp, path)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--coco", required=True, type=Path, help="COCO 2017 root (images, panoptic JSON and PNGs)")
    ap.add_argument("--out", required=True, type=Path, help="output folder for coco-mini")
    ap.add_argument("--ids", type=Path, default=IDS, help="JSON with the image ids per split")
    a = ap.parse_args(argv)
    ids = json.loads(a.ids.read_text())
    for split in SPLITS:
        pan_json = a.coco / "annotations" / f"panoptic_{split}.json"
        if not pan_json.exists():
            raise SystemExit(f"make_coco_mini: {pan_json} not found (COCO panoptic annotations 2017)")
        panoptic = json.loads(pan_json.read_text())
        png_dir = a.coco / "annotations" / f"panoptic_{split}"
        inst = instances_from_panoptic(panoptic, png_dir, ids[split], split)
        (a.out / "annotations" / f"panoptic_{split}").mkdir(parents=True, exist_ok=True)
        (a.out / split).mkdir(parents=True, exist_ok=True)
        keep = set(ids[split])
        sub = dict(panoptic, images=[im for im in panoptic["images"] if im["id"] in keep],
                   annotations=[an for an in panoptic["annotations"] if an["image_id"] in keep])
        for im, an in zip(inst["images"], (next(x for x in sub["annotations"] if x["image_id"] == i) for i in ids[split])):
            shutil.copyfile(a.coco / split / im["file_name"], a.out / split / im["file_name"])
            shutil.copyfile(png_dir / an["file_name"], a.out / "annotations" / f"panoptic_{split}" / an["file_name"])
        write_atomic(json.dumps(inst), a.out / "annotations" / f"instances_{split}.json")
        write_atomic(json.dumps(sub), a.out / "annotations" / f"panoptic_{split}.json")
        print(f"make_coco_mini: {split}: {len(inst['images'])} images, {len(inst['annotations'])} instances "
              f"({sum(x['iscrowd'] for x in inst['annotations'])} crowd) -> {a.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
