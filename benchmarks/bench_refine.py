"""Benchmark Mask Transfiner's refinement against the coarse model it refines: same checkpoint, same detections.

For each of the first --images val images at batch 1, `model.predict` (box-local masks, as `segbook eval` calls it)
with `refine` off (the coarse 28² masks) and on, called alternately (`segbook.bench.time_alternately`, one warm-up
round), for each refinement setting: the official code's top-10 detections per image (`refine_topk`), optionally
gated by detection score (`refine_min_score`, this book's switch), each with one attention sequence per RoI (the
paper) or with interleaved sequences of at most --sequence-tokens tokens (`sequence_tokens`, this book's switch, not
exact). Reports the median per-image time of each, the ratio refined / coarse (of the per-image medians summed over
the images), and the peak memory of one call above its start (CPU: VmHWM after a reset; CUDA: max_memory_allocated).

Then, on the RoIs the head was handed for those images: where the refinement time goes (detector, quadtree and node
selection, node encoder, transformer, propagation), and what each rewrite buys, the previous implementation timed
beside the current one on the same inputs:
- transformer: `nn.TransformerEncoder`'s own forward (masked-softmax attention) vs `encoder_layer`
  (`F.scaled_dot_product_attention`, the same weights);
- node features: the corner rows indexed into [M,4,C] and summed vs `F.embedding_bag` (`segbook.gather`);
- detector's finer levels: dense RoIAlign of all C channels at 56² / 112² then the 1x1 fuse conv vs the conv's
  feature half applied to the FPN maps first and one channel pooled;
- detector's RoI pooling: every RoI pooled on every FPN level and selected (sync-free, the CUDA path) vs each RoI
  pooled on its own level only (`roi_pyramid_features(per_level=True)`, the CPU path);
- attention sequences (not exact, a switch): one sequence of K tokens per RoI vs interleaved sequences of at most
  S tokens (`sequence_tokens`).

The detector's thresholds: --thresholds (one per level), or chosen on --calib-images training images to reach
--calib-recall (as nbs/experiments/transfiner_large.ipynb does).

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/bench_refine.py --checkpoint RUN/last.pt [--images 20] [--repeats 3]
        [--min-scores none,0.5] [--sequence-tokens none,192] [--thresholds 0.24,0.10,0.03 | --calib-images 100] [--out PATH]
"""
import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from functools import partial
from pathlib import Path

import torch
import torch.nn.functional as F

import segbook.transfiner as transfiner
from segbook.bench import time_alternately
from segbook.data import collate
from segbook.gather import _corners, gather_points
from segbook.pipeline import eval_dataset, load_trained, unpasted
from segbook.quadtree import build_quadtree, propagate, select_nodes, trim_padding
from segbook.reproduce import write_json_atomic
from segbook.transfiner import NEIGHBOURS, fpn_strides, incoherence_scores, roi_pyramid_features, thresholds_for_recall


def median_ms(fn, repeats):
    fn()
    out = []
    for _ in range(repeats):
        t0 = time.perf_counter(); fn(); out.append(1e3 * (time.perf_counter() - t0))
    return statistics.median(out)


def gather_indexed(feats, scales, boxes, node_yx, node_roi, node_level, grid_size):
    "The previous torch path of `gather_points`: corner rows indexed into [M,4,C], weighted, summed."
    C = feats[0].shape[1]
    rows = torch.cat([f.permute(0, 2, 3, 1).reshape(-1, C) for f in feats])
    flat, weight, start = None, None, 0
    for l, (f, sc) in enumerate(zip(feats, scales)):
        B, _, H, W = f.shape
        b, idx, w = _corners(boxes, node_yx, node_roi, grid_size, sc, True, H, W)
        on = (node_level == l)[:, None]
        r = start + b[:, None] * (H * W) + idx
        flat = r if flat is None else torch.where(on, r, flat)
        weight = w if weight is None else torch.where(on, w, weight)
        start += B * H * W
    return (rows[flat] * weight[..., None]).sum(1)


def detector_dense(det, levels, rois, fpn, coarse, sizes):
    "The previous detector: every channel pooled densely on every grid, then Fig. 5's 1x1 fuse conv."
    feats = [roi_pyramid_features(levels, rois, fpn[:, l], s, per_level=False) for l, s in enumerate(sizes)]
    out = [det.trunk(torch.cat([feats[0], coarse[:, None]], 1))[:, 0]]
    for l in range(1, len(sizes)):
        up = F.interpolate(out[-1][:, None], size=(sizes[l], sizes[l]), mode="nearest")
        out.append(det.fuse[l - 1](torch.cat([feats[l], up.sigmoid()], 1))[:, 0] + up[:, 0])
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--checkpoint", required=True, help="a Transfiner run's last.pt (segbook train)")
    ap.add_argument("--images", type=int, default=20)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--refine-topk", type=int, default=10)
    ap.add_argument("--max-nodes", type=int, default=1024)
    ap.add_argument("--min-scores", default="none", help="comma-separated refine_min_score settings ('none' = no gate)")
    ap.add_argument("--sequence-tokens", default="none", help="comma-separated sequence_tokens settings ('none' = one sequence per RoI)")
    ap.add_argument("--thresholds", default=None, help="detector thresholds per level, e.g. 0.24,0.10,0.03")
    ap.add_argument("--calib-images", type=int, default=100)
    ap.add_argument("--calib-recall", type=float, default=0.86)
    ap.add_argument("--out", default=str(Path(__file__).resolve().parent / "results" / "refine.json"))
    a = ap.parse_args(argv)
    torch.set_num_threads(a.threads)
    load_start = os.getloadavg()[0]
    device = torch.device(a.device)
    model, cfg = load_trained(a.checkpoint, device, [f"model.refine_topk={a.refine_topk}", f"model.max_nodes_per_roi={a.max_nodes}"])
    if a.thresholds:
        thr = [float(t) for t in a.thresholds.split(",")]
    else:
        calib = incoherence_scores(model, eval_dataset(cfg, cfg.data.train_split), device, max_images=a.calib_images)
        thr = thresholds_for_recall(calib, a.calib_recall)
    model.cfg.inc_threshold = thr
    tc, head = model.cfg, model.head
    val = eval_dataset(cfg)
    images = [collate([val[i]]) for i in range(min(a.images, len(val)))]
    inputs = [(im.to(device), torch.stack([t["size"] for t in tg]).to(device)) for im, tg in images]
    gates = [None if g.strip().lower() == "none" else float(g) for g in a.min_scores.split(",")]
    seqs = [None if v.strip().lower() == "none" else int(v) for v in a.sequence_tokens.split(",")]

    def predictor(refine, gate, seq=None):
        def fn(x):
            model.refine, tc.refine_min_score, tc.sequence_tokens = refine, gate, seq
            return model.predict(x[0], x[1], x[1], **unpasted(model))
        return fn

    name = lambda g, S: f"refined (min_score={g})" if S is None else f"refined (min_score={g}, sequence_tokens={S})"
    fns = {"coarse": predictor(False, None), **{name(g, S): predictor(True, g, S) for g in gates for S in seqs}}
    per_image = {n: [] for n in fns}
    peak = {n: [] for n in fns}
    for x in inputs:
        res = time_alternately(fns, x, a.repeats, warmup=1, device=device)
        for n, r in res.items():
            per_image[n].append(statistics.median(r["ms"]))
            peak[n] += [p for p in r["peak_bytes"] if p is not None]
    coarse_total = sum(per_image["coarse"])
    settings = {n: {"ms_per_image_median": round(statistics.median(v), 1), "ms_per_image_mean": round(statistics.fmean(v), 1),
                    "ratio_to_coarse": round(sum(v) / coarse_total, 3),
                    "peak_mem_mb_max": round(max(peak[n]) / 2 ** 20, 1) if peak[n] else None} for n, v in per_image.items()}

    # where the refinement time goes, on the RoIs the head is handed (first setting)
    handed = []
    refine = head.refine
    def grab(levels, rois, coarse, return_nodes=False):
        handed.append((levels, rois, coarse)); return refine(levels, rois, coarse)
    head.refine = grab
    with torch.inference_mode():
        for x in inputs: predictor(True, gates[0])(x)
    del head.refine
    stages = {k: [] for k in ("detector", "quadtree_and_selection", "node_encoder", "transformer", "propagation",
                              *(f"transformer (sequence_tokens={S})" for S in seqs if S is not None))}
    fixes = {k: {"before": [], "after": []} for k in ("transformer", "node_features", "detector", "detector_roi_pooling",
                                                      *(f"sequence_tokens={S}" for S in seqs if S is not None))}
    every_level = partial(transfiner.roi_pyramid_features, per_level=False)

    def pooled_on_every_level(fn):   # the detector with its sync-free pooling (every RoI on every level, then selected)
        def run():
            own, transfiner.roi_pyramid_features = transfiner.roi_pyramid_features, every_level
            try:
                return fn()
            finally:
                transfiner.roi_pyramid_features = own
        return run
    nodes_per_level, rois_refined, tokens = torch.zeros(len(head.sizes)), 0, []
    reps = max(1, a.repeats)
    with torch.inference_mode():
        for levels, rois, coarse in handed:
            fpn = head.grid_levels(rois)
            inc = [x.sigmoid() for x in head.detector(levels, rois, fpn, coarse, head.sizes)]
            nodes = trim_padding(select_nodes(build_quadtree([p >= t for p, t in zip(inc, tc.inc_threshold)]), inc,
                                              tc.max_nodes_per_roi, tc.max_nodes_total))
            tok = head.encoder(levels, rois, fpn, nodes, coarse, head.sizes)
            vals = head.transformer(tok, nodes.valid).sigmoid()
            stages["detector"].append(median_ms(lambda: head.detector(levels, rois, fpn, coarse, head.sizes), reps))
            stages["quadtree_and_selection"].append(median_ms(lambda: trim_padding(select_nodes(
                build_quadtree([p >= t for p, t in zip(inc, tc.inc_threshold)]), inc, tc.max_nodes_per_roi, tc.max_nodes_total)), reps))
            stages["node_encoder"].append(median_ms(lambda: head.encoder(levels, rois, fpn, nodes, coarse, head.sizes), reps))
            stages["transformer"].append(median_ms(lambda: head.transformer(tok, nodes.valid), reps))
            stages["propagation"].append(median_ms(lambda: propagate(coarse, nodes, vals, head.sizes, tc.propagation), reps))
            for S in seqs:
                if S is not None:
                    stages[f"transformer (sequence_tokens={S})"].append(median_ms(lambda: head.transformer(tok, nodes.valid, S), reps))
                    fixes[f"sequence_tokens={S}"]["before"].append(stages["transformer"][-1])
                    fixes[f"sequence_tokens={S}"]["after"].append(stages[f"transformer (sequence_tokens={S})"][-1])
            detect = lambda: head.detector(levels, rois, fpn, coarse, head.sizes)
            fixes["detector_roi_pooling"]["before"].append(median_ms(pooled_on_every_level(detect), reps))
            fixes["detector_roi_pooling"]["after"].append(stages["detector"][-1])
            tr = head.transformer
            pad = ~nodes.valid & nodes.valid.any(1, keepdim=True)
            fixes["transformer"]["before"].append(median_ms(lambda: tr.decoder(tr.encoder(tok, src_key_padding_mask=pad)), reps))
            fixes["transformer"]["after"].append(stages["transformer"][-1])
            # the encoder's gather: every token's 3x3 neighbourhood on its own grid and FPN level
            R, K = nodes.valid.shape
            size = torch.tensor(head.sizes, device=rois.device)[nodes.level]
            offs = NEIGHBOURS.to(rois.device)
            yx = torch.minimum((nodes.yx[:, :, None] + offs).clamp(min=0), (size - 1)[..., None, None]).reshape(-1, 2)
            lvl = (fpn.gather(1, nodes.level) - 2)[:, :, None].expand(R, K, 9).reshape(-1)
            roi = nodes.roi[:, :, None].expand(R, K, 9).reshape(-1)
            gs = size[:, :, None].expand(R, K, 9).reshape(-1)
            args = (rois, gs, yx, roi, fpn_strides(levels))
            fixes["node_features"]["before"].append(median_ms(lambda: gather_indexed(levels, fpn_strides(levels), rois, yx, roi, lvl, gs), reps))
            fixes["node_features"]["after"].append(median_ms(lambda: gather_points(levels, *args, node_level=lvl, backend="torch"), reps))
            fixes["detector"]["before"].append(median_ms(lambda: detector_dense(head.detector, levels, rois, fpn, coarse, head.sizes), reps))
            fixes["detector"]["after"].append(stages["detector"][-1])
            nodes_per_level += torch.stack([(nodes.valid & (nodes.level == l)).sum() for l in range(len(head.sizes))]).float()
            rois_refined += R
            tokens.append(K)
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                cwd=Path(__file__).resolve().parent).stdout.strip() or None
    except OSError:
        commit = None
    n = len(inputs)
    result = {
        "benchmark": "Mask Transfiner refinement vs the coarse model (same checkpoint, same detections)",
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu ({platform.processor() or platform.machine()})",
        "torch": torch.__version__, "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
        "loadavg_1min_at_start": round(load_start, 2), "loadavg_1min_at_end": round(os.getloadavg()[0], 2),
        "git_commit": commit, "time_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "checkpoint": str(a.checkpoint), "data": str(cfg.data.root), "images": n, "batch": 1, "repeats": a.repeats,
        "refine_topk": a.refine_topk, "max_nodes_per_roi": a.max_nodes, "sequence_tokens": seqs,
        "inc_threshold": [round(t, 6) for t in thr],
        "settings": settings, "target_ratio": 1.3,
        "refined_rois_per_image": round(rois_refined / n, 2), "tokens_per_roi_padded_mean": round(statistics.fmean(tokens), 1) if tokens else 0,
        "nodes_per_refined_roi": [round(float(v) / max(1, rois_refined), 1) for v in nodes_per_level],
        "refine_stages_ms_per_image": {k: round(sum(v) / n, 1) for k, v in stages.items()},
        "fixes_ms_per_image": {k: {"before": round(sum(v["before"]) / n, 1), "after": round(sum(v["after"]) / n, 1),
                                   "speedup": round(sum(v["before"]) / max(1e-9, sum(v["after"])), 1)} for k, v in fixes.items()},
        "notes": "per-image times: median of --repeats alternating calls of model.predict (paste=False, as segbook eval); "
                 "ratio_to_coarse = sum over images of the refined medians / the coarse ones. Stages and fixes are measured on "
                 "the RoIs the first setting hands the head (its top-k / gated detections), previous and current implementation "
                 "on the same inputs.",
    }
    write_json_atomic(result, a.out)
    print(json.dumps({k: result[k] for k in ("settings", "refined_rois_per_image", "nodes_per_refined_roi",
                                             "refine_stages_ms_per_image", "fixes_ms_per_image")}, indent=1))


if __name__ == "__main__":
    main()
