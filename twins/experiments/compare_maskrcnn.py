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
# # ISTR Table 2 on shapes: ISTR vs Mask R-CNN under one schedule
#
# > ISTR's Table 2 sets ISTR beside Mask R-CNN (and others) on COCO test-dev: mask AP^m, box AP^b, their S/M/L
# > splits and the speed on a 1080Ti. We train both on the synthetic shapes set — ISTR from
# > `configs/istr_shapes_pretrained.yaml` (the paper's head: l = 60, 6 stages), torchvision's Mask R-CNN from
# > `configs/maskrcnn_shapes_pretrained.yaml` (the base detector of the Transfiner config) — on the same ResNet-18-FPN
# > (64 FPN channels) with the same schedule, and
# > evaluate both on the shapes val split: box, mask and Boundary AP, and latency at batch 1 (CPU: one thread).
# > Both start from the book's pretrained ResNet-18-FPN (`weights/shapes_resnet18.pt`, chapter 05b) and fine-tune it
# > end to end (`configs/istr_shapes_pretrained.yaml`, `configs/maskrcnn_shapes_pretrained.yaml`), one run per seed.
#
# **Same for both:** train split, iterations, images per iteration, AdamW, weight decay 1e-4, gradient clipping 1.0,
# linear warm-up over the first tenth, one ×0.1 step at 80 %, 128 px input (no multi-scale), flip 0.5, seed, the first
# `eval_images` val images. **Not the same:** the base learning rate is each config's own (ISTR 2e-4, Mask R-CNN 3e-4),
# and the loss each model was designed with.
#
# **Not comparable with the paper in absolute terms:** the paper trains ResNet-50-FPN (ImageNet init) on COCO train2017 for
# 36 epochs at 480–800 px and reports COCO test-dev; we fine-tune a shapes-pretrained ResNet-18-FPN for `iters`
# iterations on 128 px synthetic images. The smoke profile (a handful of iterations) only proves the path runs: its APs are ~0.

# %% tags=["parameters"]
profile = "smoke"
out_dir = None
seed = 0
device = "cpu"
shapes_root = None
coco_root = None
iters = 1
batch_size = 2
eval_images = 4
bench_iters = 5  # timed batch-1 calls per model (after 2 untimed)
seeds = None  # training seeds (None: [seed]); the cpu profile runs two

# %%
import json, os, time
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
import torch
from PIL import Image

from segbook.bench import istr_preprocess, latency_summary, time_alternately
from segbook.config import load_config
from segbook.engine import dist_info, resolve_device
from segbook.pipeline import load_trained, train_command
from segbook.reproduce import (size_ranges, experiment_context, ranking_verdict, schedule_overrides, seconds_per_iter,
                               write_json_atomic, write_table, _repo_root)
from segbook.viz import save_figure

ctx = experiment_context(out_dir, shapes_root, coco_root, seed)
CONFIGS = {"ISTR": _repo_root() / "configs" / "istr_shapes_pretrained.yaml",
           "Mask R-CNN": _repo_root() / "configs" / "maskrcnn_shapes_pretrained.yaml"}
WEIGHTS = _repo_root() / "weights" / "shapes_resnet18.pt"   # chapter 05b_pretrain
seeds = [seed] if seeds is None else list(seeds)

# %% [markdown]
# ## One schedule, two models
#
# Both runs go through `segbook.pipeline.train_command` (what `segbook train` runs) with the same `key=value`
# overrides, `segbook.reproduce.schedule_overrides`: the schedule rescaled to `iters` (warm-up over the first tenth, one ×0.1
# step at 80 %), and the engine's final evaluation scores the first `eval_images` val images (box, mask, Boundary AP).

# %%
runs, by_seed = {}, {name: {} for name in CONFIGS}
for s in seeds:
    for name, cfg_path in CONFIGS.items():
        run_dir = ctx.out / (name.lower().replace(" ", "_").replace("-", "") + f"_seed{s}")
        t0, c0 = time.perf_counter(), time.process_time()
        summary = train_command(cfg_path, run_dir, data=ctx.shapes, device=device, resume=True, eval_images=eval_images, progress=False,
                                overrides=schedule_overrides(iters, batch_size, s) + [f"model.pretrained={WEIGHTS}"])
        r = {"dir": run_dir, "summary": summary, "seconds": round(time.perf_counter() - t0, 1),
             "cpu_seconds": round(time.process_time() - c0, 1), "s_per_iter": seconds_per_iter(run_dir),
             "eval": summary["eval"]["eval"], "seed": s}
        by_seed[name][s] = r
        runs.setdefault(name, r)   # the first seed's model is the one timed and tabulated in full
        print(name, f"seed {s}", {k: r[k] for k in ("seconds", "cpu_seconds", "s_per_iter")},
              {k: round(v, 4) for k, v in r["eval"].items() if k.endswith("_AP")})

# %% [markdown]
# ## Latency, batch 1
#
# `segbook.bench.time_alternately` calls the two trained models in turn on the same val image (one each per round, so a
# load change on the machine hits both alike), on the run's device (on the CPU with one thread), float32: uint8 image → resize/normalise/pad
# (`istr_preprocess`, the evaluation transform) → network → detections with masks pasted at the image size. The number
# of detections differs (ISTR: always its top 100; Mask R-CNN: those above its 0.05 score threshold, at most 100), and
# with it the mask-pasting cost — part of what each model costs at inference.

# %%
dev = resolve_device(device, dist_info())  # 'auto' -> cuda when there is one
models = {name: load_trained(Path(r["summary"]["checkpoint"]), dev)[0] for name, r in runs.items()}
test_cfg = load_config(CONFIGS["ISTR"]).data
val_png = sorted((ctx.shapes / "val").glob("*.png"))[0]
image = torch.from_numpy(np.array(Image.open(val_png).convert("RGB"))).permute(2, 0, 1).contiguous().to(dev)

def batch1(model):
    "One image through preprocessing, `model.predict` and mask pasting (the call `segbook bench` times)."
    def run(img):
        x, sizes = istr_preprocess(img, test_cfg.test_size, test_cfg.max_size_cap)
        return model.predict(x, sizes, torch.tensor([img.shape[-2:]], device=img.device), topk=100)
    return run

threads = torch.get_num_threads(); bench_threads = 1 if dev.type == "cpu" else threads; torch.set_num_threads(bench_threads)
load_before = os.getloadavg()
timed = time_alternately({n: batch1(m) for n, m in models.items()}, image, bench_iters, warmup=2, device=dev)
load_after = os.getloadavg(); torch.set_num_threads(threads)
for name in runs:
    runs[name]["latency"] = {**latency_summary(timed[name]["ms"]), "detections": int(timed[name]["output"][0]["boxes"].shape[0])}
    print(name, {k: round(v, 2) for k, v in runs[name]["latency"].items()})

# %% [markdown]
# ## The table
#
# The paper's rows are ISTR Table 2, ResNet-50-FPN, 36 epochs, COCO test-dev (AP50/AP75 and Boundary AP are not in
# that table; its speed is FPS / ms on one 1080Ti GPU). Ours: shapes val, pretrained ResNet-18-FPN fine-tuned, `iters`
# iterations, latency on the run's device (CPU: one thread). −1 from COCOeval (no ground truth in that size range) is shown as "n/a".

# %%

PAPER = {  # ISTR Table 2 (COCO test-dev, R50-FPN, 36 epochs, 1080Ti)
    "ISTR":       dict(AP_m=38.6, APs_m=22.1, APm_m=40.4, APl_m=50.6, AP_b=46.8, APs_b=27.8, APm_b=48.7, APl_b=59.9, fps=13.8, ms=72.5),
    "Mask R-CNN": dict(AP_m=37.5, APs_m=21.1, APm_m=39.6, APl_m=48.3, AP_b=41.3, APs_b=24.2, APm_b=43.6, APl_b=51.7, fps=15.3, ms=65.6),
}
pct = lambda v: "n/a" if v is None or v < 0 else f"{100 * v:.1f}"
num = lambda v, f="{:.1f}": "–" if v is None else f.format(v)
cols = ["segm_AP", "segm_AP50", "segm_AP75", "segm_APs", "segm_APm", "segm_APl", "bbox_AP", "bbox_APs", "bbox_APm", "bbox_APl", "boundary_AP"]
dev_label = f"CPU, {bench_threads} thread" if dev.type == "cpu" else torch.cuda.get_device_name(dev)
lr = {n: load_config(Path(r["dir"]) / "config.yaml").solver.lr for n, r in runs.items()}
lines = [f"ISTR Table 2 style on shapes ({profile} profile: {iters} iterations × batch {batch_size}, same schedule for both, "
         f"shapes-pretrained ResNet-18-FPN fine-tuned, 128 px, {runs['ISTR']['eval']['images']} val images; latency: {dev_label}, batch 1, "
         f"median of {bench_iters}, load average {load_before[0]:.1f}→{load_after[0]:.1f}) beside the paper "
         "(COCO test-dev, R50-FPN ImageNet init, 36 epochs, 480–800 px, 1080Ti). Not comparable in absolute terms.", "",
         "| model | data | AP^m | AP^m_50 | AP^m_75 | AP^m_S | AP^m_M | AP^m_L | AP^b | AP^b_S | AP^b_M | AP^b_L | AP^B (boundary) | ms / image | FPS | train s/it (wall, median) |",
         "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
for name in runs:
    for s, r in by_seed[name].items():
        e, lat = r["eval"], runs[name]["latency"] if s == seeds[0] else None
        lines.append(f"| {name} (ours, seed {s}, lr {lr[name]:g}) | shapes val | " + " | ".join(pct(e.get(c)) for c in cols)
                     + (f" | {lat['median_ms']:.1f} | {lat['fps']:.1f}" if lat else " | – | –") + f" | {num(r['s_per_iter'], '{:.2f}')} |")
for name, p in PAPER.items():
    lines.append(f"| {name} (paper) | COCO test-dev | {p['AP_m']} | – | – | {p['APs_m']} | {p['APm_m']} | {p['APl_m']} | {p['AP_b']} | "
                 f"{p['APs_b']} | {p['APm_b']} | {p['APl_b']} | – | {p['ms']} (1080Ti) | {p['fps']} (1080Ti) | – |")
lines += ["", size_ranges(ctx.shapes / "annotations" / "instances_val.json"),
          "Train s/it: wall seconds per iteration logged by the engine on this machine (shared: noisy under load); "
          "ISTR's run also fits its PCA codec on the train split first (not in s/it). "
          "Paper: ISTR beats Mask R-CNN by +1.1 AP^m and +5.5 AP^b at R50 (and is ~10 % slower). "
          + ("Smoke schedule: the numbers only show that both models train, evaluate and time; no ranking can be read from them."
             if profile == "smoke" else
             "Ours: shapes APs after a short fine-tuning schedule; compare the ranking, not the values, with the paper. "
             "Latency depends on the number of detections each model keeps (ISTR: 100; Mask R-CNN: "
             f"{runs['Mask R-CNN']['latency']['detections']} on the timed image).")]
per_seed = lambda name, key: [100 * by_seed[name][s]["eval"][key] for s in seeds]
verdicts = {key: ranking_verdict(per_seed("ISTR", key), per_seed("Mask R-CNN", key), PAPER["ISTR"][pk], PAPER["Mask R-CNN"][pk])
            for key, pk in (("segm_AP", "AP_m"), ("bbox_AP", "AP_b"))}
def say(key, what):
    v, a, b = verdicts[key], per_seed("ISTR", key), per_seed("Mask R-CNN", key)
    head = f"{what}: ISTR {' / '.join(f'{x:.1f}' for x in a)} vs Mask R-CNN {' / '.join(f'{x:.1f}' for x in b)} (seeds {seeds})"
    if v["verdict"] == "not run": return head + " — fewer than two seeds: not a test."
    tail = {"replicated": "ISTR ahead, as in the paper", "reversed": "**the paper's ranking is reversed here: Mask R-CNN is ahead**",
            "not separable": "the difference is within the seed spread: not separable"}[v["verdict"]]
    return head + f"; mean difference {v['difference']:+.1f}, seed spread {v['spread']:.1f}: {tail}."
lines += ["", say("segm_AP", "Mask AP"), say("bbox_AP", "Box AP")]
low = {n: sum(per_seed(n, "segm_AP")) / len(seeds) for n in runs if sum(per_seed(n, "segm_AP")) / len(seeds) < 10}
if low and profile != "smoke":
    lines.append("Under 10 mask AP: " + ", ".join(f"{n} ({v:.1f})" for n, v in low.items()) + f" — {iters} iterations × {batch_size} "
                 f"({iters * batch_size / 2000:.0f} epochs of the 2000 train images) fine-tuning end to end is too short for "
                 "that model to have converged, so its ranking tests little; the frozen-backbone head recipe (Table 1, Fig. 3) "
                 "trains twice as long at a third of the cost per iteration.")
write_table(ctx.tables / "istr_table2_vs_maskrcnn.md", lines)
write_json_atomic({"profile": profile, "iters": iters, "batch_size": batch_size, "eval_images": eval_images, "paper": PAPER,
                   "models": {n: {"config": str(CONFIGS[n]), "lr": lr[n], "eval": r["eval"], "train_seconds": r["seconds"], "train_cpu_seconds": r["cpu_seconds"],
                                  "s_per_iter": r["s_per_iter"], "latency": r["latency"]} for n, r in runs.items()},
                   "latency_setting": {"device": dev_label, "threads": bench_threads, "batch": 1, "image": str(val_png), "iters": bench_iters, "warmup": 2,
                                       "load_average": [load_before, load_after]},
                   "per_seed": {n: {str(s): r["eval"] for s, r in d.items()} for n, d in by_seed.items()},
                   "claims": [{"id": f"istr.table2.istr_vs_maskrcnn.{key}", "paper": "ISTR", "where": "Table 2",
                               "claim": f"ISTR beats Mask R-CNN on {what} (R50-FPN, same schedule)", "metric": what,
                               "paper_values": {"ISTR": PAPER["ISTR"][pk], "Mask R-CNN": PAPER["Mask R-CNN"][pk]},
                               "ours": {"ISTR": per_seed("ISTR", key), "Mask R-CNN": per_seed("Mask R-CNN", key)},
                               "seeds": seeds, "profile": profile, "data": f"shapes val ({runs['ISTR']['eval']['images']} images)",
                               **verdicts[key], "table": "figures/tables/istr_table2_vs_maskrcnn.md",
                               **({"note": "a row under 10 mask AP: too short a schedule to rank"} if low and profile != "smoke" else {}),
                               "command": f"segbook reproduce --profile {profile} --only compare_maskrcnn"}
                              for key, pk, what in (("segm_AP", "AP_m", "mask AP"), ("bbox_AP", "AP_b", "box AP"))],
                   "headline": {"istr_e2e_mask_ap": per_seed("ISTR", "segm_AP"), "maskrcnn_mask_ap": per_seed("Mask R-CNN", "segm_AP"),
                                "istr_ms_per_image_cpu": [runs["ISTR"]["latency"]["median_ms"]],
                                "maskrcnn_ms_per_image_cpu": [runs["Mask R-CNN"]["latency"]["median_ms"]]}},
                  ctx.out / "results.json")

# %%
fig, (a1, a2) = plt.subplots(1, 2, figsize=(9, 3.2), gridspec_kw={"width_ratios": [3, 1]}, layout="constrained")
keys = [("segm_AP", "AP^m"), ("segm_AP50", "AP^m_50"), ("bbox_AP", "AP^b"), ("boundary_AP", "AP^B")]
for i, (name, r) in enumerate(runs.items()):
    a1.bar([j + 0.4 * i for j in range(len(keys))], [100 * max(0.0, r["eval"][k]) for k, _ in keys], 0.4, label=name)
a1.set_xticks([j + 0.2 for j in range(len(keys))], [t for _, t in keys]); a1.set_ylabel("AP (%)"); a1.legend()
a1.set_title(f"shapes val, {profile}: {iters} it × {batch_size}")
a2.bar(list(runs), [r["latency"]["median_ms"] for r in runs.values()], color=["tab:blue", "tab:orange"])
a2.set_ylabel(f"ms / image ({dev_label})")
save_figure(fig, "istr_table2_vs_maskrcnn.png"); plt.close(fig)

# %%
sched = {n: load_config(Path(r["dir"]) / "config.yaml") for n, r in runs.items()}
same = lambda f: len({json.dumps(f(c), default=str) for c in sched.values()}) == 1
assert same(lambda c: (c.solver.max_iters, c.solver.warmup_iters, c.solver.steps, c.solver.gamma, c.solver.optimizer,
                       c.solver.weight_decay, c.solver.clip_grad_norm, c.data.batch_size, c.data.min_size, c.data.test_size,
                       c.data.flip, c.seed)), {n: c.solver for n, c in sched.items()}
assert sched["ISTR"].model["backbone"] == sched["Mask R-CNN"].model["backbone"] == "resnet18"
assert sched["ISTR"].model["hidden"] == sched["Mask R-CNN"].model["fpn_dim"]  # same FPN width
assert all(r["summary"]["iteration"] == iters and 0 <= r["eval"]["segm_AP"] <= 1 for r in runs.values())
assert all(r["latency"]["median_ms"] > 0 for r in runs.values())
assert sched["ISTR"].model["pretrained"] == sched["Mask R-CNN"].model["pretrained"] == str(WEIGHTS)  # one backbone for both
