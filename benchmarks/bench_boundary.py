"""Time COCO evaluation (bbox / segm / boundary) with segbook.evaluation on coco-mini val.

Detections are the val ground truth with a boundary-only error (masks dilated or eroded by a few pixels,
random scores), so every type has a full set of matches to score. Each setting is timed `--repeats` times,
in wall and process-CPU seconds (on a shared machine the CPU time is the steadier number), from a freshly
loaded ground truth, so boundary bands are computed from scratch ("cold"); the boundary evaluation is also
timed on one reused ground-truth object ("warm": its bands cached). The band itself is timed per mask (CPU)
three equivalent ways, each on the mask cropped to its box: separable min filter (the one used), chessboard
distance transform, d iterated 3x3 erosions. Writes JSON atomically.

    .venv/bin/python benchmarks/bench_boundary.py [--coco-mini PATH] [--out benchmarks/results/boundary.json]
"""
import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import numpy as np
from scipy import ndimage

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from segbook.evaluation import (boundary_band, boundary_dilation, evaluate_coco, load_coco,  # noqa: E402
                                perturbed_ground_truth)


def versions() -> dict:
    import pycocotools, scipy, torch
    try:
        from importlib.metadata import version
        pycoco = version("pycocotools")
    except Exception:
        pycoco = getattr(pycocotools, "__version__", "?")
    return {"python": platform.python_version(), "numpy": np.__version__, "scipy": scipy.__version__,
            "pycocotools": pycoco, "torch": torch.__version__}


def device() -> dict:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip(); break
    except OSError:
        pass
    load = list(os.getloadavg()) if hasattr(os, "getloadavg") else None
    return {"cpu": cpu, "cpu_count": os.cpu_count(), "load_average_at_start": load, "platform": platform.platform()}


def timed(fn, repeats):
    "Run fn `repeats` times: (last output, wall seconds per run, process CPU seconds per run)."
    walls, cpus, out = [], [], None
    for _ in range(repeats):
        t, c = time.perf_counter(), time.process_time(); out = fn()
        walls.append(time.perf_counter() - t); cpus.append(time.process_time() - c)
    return out, walls, cpus


def band_timings(coco, repeats) -> dict:
    "Per-mask band CPU time (ms) of the three equivalent forms, each on every val mask cropped to its box."
    masks, ds = [], []
    for a in coco.loadAnns(coco.getAnnIds()):
        m = coco.annToMask(a).astype(bool)
        rows, cols = np.flatnonzero(m.any(1)), np.flatnonzero(m.any(0))
        if rows.size:
            masks.append(m[rows[0]:rows[-1] + 1, cols[0]:cols[-1] + 1]); ds.append(boundary_dilation(*m.shape))

    def cdt(m, d):
        return m & (ndimage.distance_transform_cdt(np.pad(m, 1), metric="chessboard")[1:-1, 1:-1] <= d)

    def erosion(m, d):
        return m & ~ndimage.binary_erosion(np.pad(m, 1), np.ones((3, 3), bool), iterations=d, border_value=1)[1:-1, 1:-1]

    out = {}
    for name, fn in (("min_filter (used)", boundary_band), ("chessboard_cdt", cdt), ("iterated_erosion", erosion)):
        _, _, cpu = timed(lambda: [fn(m, d) for m, d in zip(masks, ds)], repeats)
        out[name] = {"cpu_ms_per_mask_median": 1000 * statistics.median(cpu) / len(masks), "n_masks": len(masks)}
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--coco-mini", default=os.environ.get("SEGBOOK_COCO_MINI", str(ROOT.parent / "shared" / "coco-mini")))
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "boundary.json"))
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--pixels", type=int, nargs="+", default=[2, -2], help="perturbations to time (px; <0 erodes)")
    args = ap.parse_args(argv)
    gt_json = Path(args.coco_mini) / "annotations" / "instances_val2017.json"
    if not gt_json.exists():
        sys.exit(f"bench_boundary: {gt_json} not found (pass --coco-mini or set SEGBOOK_COCO_MINI)")

    record = {"benchmark": "coco-mini val: evaluate_coco seconds per iou type, GT vs perturbed-GT detections",
              "command": " ".join([os.path.relpath(sys.executable, Path.cwd()), *sys.argv]), "device": device(),
              "versions": versions(), "repeats": args.repeats, "time_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
              "runs": []}
    base = load_coco(gt_json)
    record["n_images"], record["n_gt"] = len(base.getImgIds()), len(base.getAnnIds())
    for px in args.pixels:
        results = perturbed_ground_truth(base, px, seed=abs(px))
        run = {"perturbation_px": px, "n_detections": len(results), "seconds": {}, "AP": {}}
        for iou_type in ("bbox", "segm", "boundary"):
            # fresh ground truth each time: pycocotools converts it to RLE and the bands are computed cold
            ap_, t, c = timed(lambda: evaluate_coco(load_coco(gt_json), results, (iou_type,)), args.repeats)
            run["seconds"][iou_type] = {"wall_median": statistics.median(t), "cpu_median": statistics.median(c),
                                        "wall_all": t, "cpu_all": c}
            run["AP"][iou_type] = {k: ap_[iou_type][k] for k in ("AP", "AP50", "AP75", "APs", "APm", "APl")}
        gt = load_coco(gt_json)
        evaluate_coco(gt, results, ("boundary",))  # fills the GT band cache
        _, t, c = timed(lambda: evaluate_coco(gt, results, ("boundary",)), args.repeats)
        run["seconds"]["boundary_warm_gt"] = {"wall_median": statistics.median(t), "cpu_median": statistics.median(c),
                                              "wall_all": t, "cpu_all": c}
        record["runs"].append(run)
        print(f"px={px:+d}: " + ", ".join(f"{k} {v['wall_median']:.2f}s wall/{v['cpu_median']:.2f}s cpu"
                                          for k, v in run["seconds"].items())
              + f" | AP segm {run['AP']['segm']['AP']:.3f} boundary {run['AP']['boundary']['AP']:.3f}")
    record["band_ms_per_mask"] = band_timings(base, args.repeats)
    print("band cpu ms/mask:", {k: round(v["cpu_ms_per_mask_median"], 3) for k, v in record["band_ms_per_mask"].items()})

    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    tmp.write_text(json.dumps(record, indent=1))
    os.replace(tmp, out)
    print("wrote", out)


if __name__ == "__main__":
    main()
