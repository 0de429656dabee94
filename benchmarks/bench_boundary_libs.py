"""segbook's COCO evaluators against faster-coco-eval on coco-mini val: same 12 stats? which is faster?

For bbox and segm the reference is pycocotools' COCOeval (what segbook used before); for boundary it is segbook's
BoundaryCOCOeval (min of mask IoU and Boundary IoU, bands by one separable min filter). The other side is
faster-coco-eval's COCOeval_faster with iouType bbox / segm / boundary (its C++ band, dilation_ratio 0.02).
Both are fed the same ground-truth COCO object and the same results, converted by segbook.evaluation._detections,
so only the evaluator differs.

Prediction sets (all from segbook.evaluation.perturbed_ground_truth, random scores): the val ground truth eroded
by 2 px, dilated by 2 px, shifted by (dy, dx) = (2, 3) px, and a "noisy" set: dilated by 1 px and shifted by 1 px,
20 % of the detections dropped, plus false positives (duplicates eroded by 3 px and moved 4 px with fresh scores,
and copies relabelled to another category).

Each evaluation is timed `--repeats` times (wall and process CPU seconds, one thread: OMP_NUM_THREADS=1,
torch.set_num_threads(1), faster-coco-eval with boundary_cpu_count=1 and rle_iou_max_workers=1) from a freshly
loaded ground truth each time (the JSON parse is outside the timer), so neither side reuses cached bands.
The boundary evaluation is also timed on one reused ground-truth object ("warm": segbook caches each GT band in
its annotation; faster-coco-eval recomputes them in every evaluate()). Finally each val mask's band is computed
both ways (segbook.evaluation.boundary_band_rle, faster_coco_eval.core.mask.rleToBoundary): pixels that differ,
and CPU ms per mask. Writes JSON atomically.

    .venv/bin/python benchmarks/bench_boundary_libs.py [--coco-mini PATH] [--out benchmarks/results/boundary_libs.json]
"""
import os

os.environ.setdefault("OMP_NUM_THREADS", "1")
import argparse  # noqa: E402
import json  # noqa: E402
import platform  # noqa: E402
import statistics  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from importlib.metadata import version  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from faster_coco_eval import COCOeval_faster  # noqa: E402
from pycocotools.cocoeval import COCOeval  # noqa: E402

from faster_coco_eval.core import mask as fce_mask  # noqa: E402
from pycocotools import mask as mask_utils  # noqa: E402

from segbook.evaluation import (STAT_NAMES, BoundaryCOCOeval, _detections, boundary_band_rle,  # noqa: E402
                                load_coco, perturbed_ground_truth, run_cocoeval)

IOU_TYPES = ("bbox", "segm", "boundary")
TOL = 1e-4


def commit() -> str:
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT,
                               capture_output=True, text=True, check=True).stdout.strip()
        return sha + ("-dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def device() -> dict:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip(); break
    except OSError:
        pass
    return {"cpu": cpu, "cpu_count": os.cpu_count(), "platform": platform.platform()}


def noisy_set(coco, seed: int) -> list:
    "Dilated 1 px + shifted 1 px, 20 % dropped, duplicates (eroded 3 px, moved 4 px) and relabelled copies added."
    rng = np.random.default_rng(seed)
    base = perturbed_ground_truth(coco, 1, seed=seed, shift=(1, 0))
    kept = [r for r in base if rng.random() >= 0.2]
    dups = perturbed_ground_truth(coco, -3, seed=seed + 1, shift=(0, 4))
    dups = [r for r in dups if rng.random() < 0.3]
    cats = sorted(coco.getCatIds())
    relabelled = []
    for r in kept:
        if rng.random() < 0.2:
            other = [c for c in cats if c != r["category_id"]]
            relabelled.append({**r, "category_id": int(rng.choice(other)), "score": float(rng.uniform(0.05, 1.0))})
    return kept + dups + relabelled


def make_evaluator(lib: str, coco_gt, coco_dt, iou_type: str):
    if lib == "faster_coco_eval":
        return COCOeval_faster(coco_gt, coco_dt, iouType=iou_type, boundary_dilation_ratio=0.02,
                               boundary_cpu_count=1, rle_iou_max_workers=1)
    if iou_type == "boundary":
        return BoundaryCOCOeval(coco_gt, coco_dt, dilation_ratio=0.02)
    return COCOeval(coco_gt, coco_dt, iouType=iou_type)


def one_run(lib: str, gt_dict: dict, results: list, iou_type: str):
    "(stats, wall s, cpu s) of one evaluation from a fresh ground truth (its construction outside the timer)."
    coco_gt = load_coco(gt_dict)
    t, c = time.perf_counter(), time.process_time()
    dets = _detections(coco_gt, results, iou_type)
    stats = run_cocoeval(make_evaluator(lib, coco_gt, dets, iou_type))["stats"]
    return stats, time.perf_counter() - t, time.process_time() - c


def warm_boundary(lib: str, gt_dict: dict, results: list, repeats: int) -> dict:
    "Boundary evaluation seconds on one ground-truth object reused across runs (after one untimed run)."
    coco_gt = load_coco(gt_dict)
    run_cocoeval(make_evaluator(lib, coco_gt, _detections(coco_gt, results, "boundary"), "boundary"))
    walls, cpus = [], []
    for _ in range(repeats):
        t, c = time.perf_counter(), time.process_time()
        run_cocoeval(make_evaluator(lib, coco_gt, _detections(coco_gt, results, "boundary"), "boundary"))
        walls.append(time.perf_counter() - t); cpus.append(time.process_time() - c)
    return {"wall_median": statistics.median(walls), "cpu_median": statistics.median(cpus), "wall_all": walls, "cpu_all": cpus}


def band_check(coco, repeats: int) -> dict:
    "Every GT mask's band both ways: masks whose bands differ, pixels that differ, CPU ms per mask (median of runs)."
    rles = []
    for a in coco.loadAnns(coco.getAnnIds()):
        r = coco.annToRLE(a)
        rles.append({"size": r["size"], "counts": r["counts"].decode() if isinstance(r["counts"], bytes) else r["counts"]})
    out = {"n_masks": len(rles)}
    bands = {}
    for name, fn in (("segbook", lambda r: boundary_band_rle(r, 0.02)),
                     ("faster_coco_eval", lambda r: fce_mask.rleToBoundary(r, 0.02))):
        cpus = []
        for _ in range(repeats):
            c = time.process_time(); bands[name] = [fn(r) for r in rles]; cpus.append(time.process_time() - c)
        out[f"{name}_cpu_ms_per_mask_median"] = 1000 * statistics.median(cpus) / len(rles)
    diff = [int((mask_utils.decode(a) != mask_utils.decode(b)).sum()) for a, b in zip(bands["segbook"], bands["faster_coco_eval"])]
    out["masks_with_different_band"] = sum(d > 0 for d in diff)
    out["pixels_different_total"] = sum(diff)
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--coco-mini", default=os.environ.get("SEGBOOK_COCO_MINI", str(ROOT.parent / "shared" / "coco-mini")))
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "boundary_libs.json"))
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args(argv)
    gt_json = Path(args.coco_mini) / "annotations" / "instances_val2017.json"
    if not gt_json.exists():
        sys.exit(f"bench_boundary_libs: {gt_json} not found (pass --coco-mini or set SEGBOOK_COCO_MINI)")
    torch.set_num_threads(1)

    gt_dict = json.loads(gt_json.read_text())
    coco = load_coco(gt_dict)
    sets = {"eroded_2px": perturbed_ground_truth(coco, -2, seed=1),
            "dilated_2px": perturbed_ground_truth(coco, 2, seed=2),
            "shifted_dy2_dx3": perturbed_ground_truth(coco, 0, seed=3, shift=(2, 3)),
            "noisy_drop20_fp": noisy_set(coco, seed=4)}
    record = {"benchmark": "coco-mini val: segbook (pycocotools COCOeval / BoundaryCOCOeval) vs faster-coco-eval, "
                           "12 stats and seconds per evaluation",
              "command": " ".join([os.path.relpath(sys.executable, Path.cwd()), *sys.argv]),
              "commit": commit(), "device": device(),
              "threads": {"OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS"), "torch": torch.get_num_threads(),
                          "faster_coco_eval": {"boundary_cpu_count": 1, "rle_iou_max_workers": 1}},
              "load_average_at_start": list(os.getloadavg()),
              "versions": {"python": platform.python_version(), "numpy": np.__version__,
                           "pycocotools": version("pycocotools"), "faster-coco-eval": version("faster-coco-eval")},
              "reference": {"bbox": "pycocotools COCOeval", "segm": "pycocotools COCOeval",
                            "boundary": "segbook.evaluation.BoundaryCOCOeval"},
              "repeats": args.repeats, "tolerance": TOL, "stat_names": list(STAT_NAMES),
              "n_images": len(coco.getImgIds()), "n_gt": len(coco.getAnnIds()),
              "time_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "sets": {}}
    for name, results in sets.items():
        entry = {"n_detections": len(results)}
        for iou_type in IOU_TYPES:
            per_lib = {}
            for lib in ("segbook", "faster_coco_eval"):
                runs = [one_run(lib, gt_dict, results, iou_type) for _ in range(args.repeats)]
                walls, cpus = [r[1] for r in runs], [r[2] for r in runs]
                assert all(r[0] == runs[0][0] for r in runs), f"{lib} {iou_type} {name}: stats differ between repeats"
                per_lib[lib] = {"stats": runs[0][0], "wall_median": statistics.median(walls),
                                "cpu_median": statistics.median(cpus), "wall_all": walls, "cpu_all": cpus}
            diff = np.abs(np.subtract(per_lib["segbook"]["stats"], per_lib["faster_coco_eval"]["stats"]))
            s, f = per_lib["segbook"], per_lib["faster_coco_eval"]
            entry[iou_type] = {**per_lib, "max_abs_diff": float(diff.max()), "equal_within_tol": bool(diff.max() <= TOL),
                               "cpu_ratio_segbook_over_faster": s["cpu_median"] / f["cpu_median"],
                               "wall_ratio_segbook_over_faster": s["wall_median"] / f["wall_median"]}
            print(f"{name:17s} {iou_type:8s} max|diff| {diff.max():.2e}  cpu s segbook {s['cpu_median']:.3f} "
                  f"faster {f['cpu_median']:.3f} (ratio {entry[iou_type]['cpu_ratio_segbook_over_faster']:.2f})  "
                  f"wall s {s['wall_median']:.3f} / {f['wall_median']:.3f}  AP {s['stats'][0]:.4f}", flush=True)
        record["sets"][name] = entry
    record["boundary_warm_gt_dilated_2px"] = {lib: warm_boundary(lib, gt_dict, sets["dilated_2px"], args.repeats)
                                              for lib in ("segbook", "faster_coco_eval")}
    print("boundary, warm GT, dilated_2px: cpu s " + ", ".join(f"{k} {v['cpu_median']:.3f}"
                                                               for k, v in record["boundary_warm_gt_dilated_2px"].items()))
    record["band"] = band_check(coco, args.repeats)
    print("band:", record["band"])
    record["load_average_at_end"] = list(os.getloadavg())
    record["summary"] = {t: {"max_abs_diff_all_sets": max(e[t]["max_abs_diff"] for e in record["sets"].values()),
                             "equal_on_every_set": all(e[t]["equal_within_tol"] for e in record["sets"].values()),
                             "cpu_ratio_segbook_over_faster_per_set":
                                 {n: e[t]["cpu_ratio_segbook_over_faster"] for n, e in record["sets"].items()}}
                         for t in IOU_TYPES}
    for t, v in record["summary"].items():
        print(f"{t}: max|diff| over all sets {v['max_abs_diff_all_sets']:.2e}, equal {v['equal_on_every_set']}, "
              f"cpu ratio segbook/faster " + ", ".join(f"{r:.2f}" for r in v["cpu_ratio_segbook_over_faster_per_set"].values()))

    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=out.parent, prefix=out.name + ".", suffix=".tmp")
    with os.fdopen(fd, "w") as fh:
        json.dump(record, fh, indent=1)
    os.replace(tmp, out)
    print("wrote", out)


if __name__ == "__main__":
    main()
