"""Benchmark sampling FPN features at Mask Transfiner quadtree nodes (segbook.gather).

Setting: 2 images of 800x1216, FPN P2..P5 with 256 channels (float32), 100 RoIs (50 per image, sides
log-uniform 16..600 px), each RoI's 28/56/112 grids on P_i, P_{i-1}, P_{i-2} (`roi_pyramid_levels`).
Nodes per RoI per grid default to the coco-mini means of the GT quadtree (56/75/102 at 28/56/112,
figures/tables/transfiner_table1_oracle.md); `--nodes` overrides (e.g. the 90th percentile 77,109,158,
or training's 100,100,100). Methods, each in a fresh process so peak memory is its own:

- sparse:       `gather_points` on the three grids (torch on CPU, Triton on CUDA) -> [nodes, 256];
                the torch path makes one channels-last copy of the levels per call
- sparse_channels_last: the same with channels_last features (the torch path copies nothing)
- dense_S:      torchvision roi_align (aligned, sampling_ratio=1) of every RoI at S x S on its level,
                then indexing the nodes of that grid (what the official code does), for S in 28/56/112
- dense_all:    the three dense grids together (the official code's full RoI pyramid)

Reports the median wall time (ms, after one warm-up) and the peak memory above the inputs (CPU:
VmHWM - VmRSS after resetting the high-water mark; CUDA: max_memory_allocated - allocated).

    .venv/bin/python benchmarks/bench_gather.py [--device auto|cpu|cuda] [--repeats 5] [--nodes 56,75,102] [--out PATH]
"""
import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
from torchvision.ops import roi_align

from segbook.gather import gather_points
from segbook.quadtree import roi_pyramid_levels

SIZES = (28, 56, 112)
METHODS = ("sparse", "sparse_channels_last", "dense_28", "dense_56", "dense_112", "dense_all")


def make_inputs(device, nodes_per_level, B=2, R=100, C=256, H=800, W=1216, seed=0):
    g = torch.Generator().manual_seed(seed)
    feats = [torch.randn(B, C, H // s, W // s, generator=g).to(device) for s in (4, 8, 16, 32)]   # P2..P5
    side = torch.exp(torch.empty(R, 2).uniform_(torch.log(torch.tensor(16.)).item(), torch.log(torch.tensor(600.)).item(), generator=g))
    xy = torch.rand(R, 2, generator=g) * (torch.tensor([W, H]) - side).clamp(min=1)
    boxes = torch.cat([(torch.arange(R) * B // R)[:, None].float(), xy, xy + side], 1).to(device)
    levels = roi_pyramid_levels(boxes[:, 1:]) - 2                                                  # [R,3] index into P2..P5
    nodes = []
    for s, k in zip(SIZES, nodes_per_level):
        cells = torch.rand(R, s * s, generator=g).topk(min(k, s * s), 1).indices                   # k distinct cells per RoI
        roi = torch.arange(R)[:, None].expand_as(cells).reshape(-1)
        nodes.append((torch.stack([cells // s, cells % s], -1).reshape(-1, 2).to(device), roi.to(device)))
    return feats, boxes, levels, nodes


def run_sparse(feats, boxes, levels, nodes):
    scales = [1 / 4, 1 / 8, 1 / 16, 1 / 32]
    return [gather_points(feats, boxes, s, yx, roi, scales, node_level=levels[roi, j])
            for j, (s, (yx, roi)) in enumerate(zip(SIZES, nodes))]


def run_dense(feats, boxes, levels, nodes, which):
    scales = [1 / 4, 1 / 8, 1 / 16, 1 / 32]
    outs = []
    for j, (s, (yx, roi)) in enumerate(zip(SIZES, nodes)):
        if s not in which:
            continue
        C = feats[0].shape[1]
        dense = boxes.new_zeros(len(boxes), C, s, s)
        for k, (f, sc) in enumerate(zip(feats, scales)):                       # one roi_align per FPN level
            on = levels[:, j] == k
            dense[on] = roi_align(f, boxes[on], (s, s), sc, 1, True)
        outs.append(dense[roi, :, yx[:, 0], yx[:, 1]])
        del dense
    return outs


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def _rss_kb(field):
    for line in open("/proc/self/status"):
        if line.startswith(field):
            return int(line.split()[1])
    return 0


def worker(method, device, repeats, nodes_per_level):
    device = torch.device(device)
    feats, boxes, levels, nodes = make_inputs(device, nodes_per_level)
    if method == "sparse_channels_last":                                      # as a backbone could emit them
        feats = [f.contiguous(memory_format=torch.channels_last) for f in feats]
    fn = (lambda: run_sparse(feats, boxes, levels, nodes)) if method.startswith("sparse") else \
         (lambda: run_dense(feats, boxes, levels, nodes, SIZES if method == "dense_all" else (int(method.split("_")[1]),)))
    with torch.no_grad():
        fn(); _sync(device)                                                   # warm-up (and Triton compile)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(); base = torch.cuda.memory_allocated()
        else:
            open("/proc/self/clear_refs", "w").write("5"); base = _rss_kb("VmRSS:") * 1024
        times = []
        for _ in range(repeats):
            t = time.perf_counter(); out = fn(); _sync(device); times.append((time.perf_counter() - t) * 1e3)
            del out
        peak = (torch.cuda.max_memory_allocated() if device.type == "cuda" else _rss_kb("VmHWM:") * 1024) - base
    n = sum(len(yx) for (s, (yx, _)) in zip(SIZES, nodes) if method in ("sparse", "sparse_channels_last", "dense_all") or method == f"dense_{s}")
    return {"median_ms": statistics.median(times), "times_ms": [round(t, 2) for t in times],
            "peak_mem_mb": round(peak / 2 ** 20, 1), "nodes": n}


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", default="auto")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--nodes", default="56,75,102", help="nodes per RoI at 28,56,112")
    ap.add_argument("--out", default=str(Path(__file__).resolve().parent / "results" / "gather.json"))
    ap.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    a = ap.parse_args()
    device = ("cuda" if torch.cuda.is_available() else "cpu") if a.device == "auto" else a.device
    nodes_per_level = [int(x) for x in a.nodes.split(",")]
    if a.worker:
        print(json.dumps(worker(a.worker, device, a.repeats, nodes_per_level)))
        return
    results = {}
    for m in METHODS:
        cmd = [sys.executable, __file__, "--device", device, "--repeats", str(a.repeats), "--nodes", a.nodes, "--worker", m]
        r = subprocess.run(cmd, capture_output=True, text=True)
        if r.returncode:
            raise SystemExit(f"{m} failed:\n{r.stderr[-2000:]}")
        results[m] = json.loads(r.stdout.strip().splitlines()[-1])
        print(m, results[m], flush=True)
    rep = {"benchmark": "gather_points vs dense roi_align + index at quadtree nodes",
           "command": " ".join([Path(sys.executable).name, *sys.argv]),
           "device": torch.cuda.get_device_name() if device == "cuda" else f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)",
           "torch": torch.__version__, "python": platform.python_version(),
           "created_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
           "setting": {"images": 2, "image_size": [800, 1216], "channels": 256, "rois": 100, "dtype": "float32",
                       "nodes_per_roi_at_28_56_112": nodes_per_level, "repeats": a.repeats,
                       "backend_sparse": "triton" if device == "cuda" else "torch"},
           "results": results}
    out = Path(a.out); out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp"); tmp.write_text(json.dumps(rep, indent=1) + "\n"); os.replace(tmp, out)
    print("wrote", out)


if __name__ == "__main__":
    main()
