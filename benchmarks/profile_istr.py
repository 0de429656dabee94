"""Where an ISTR inference call spends its time on the CPU (the call `segbook bench` times).

The model, input and call are `segbook.bench`'s: ISTR from a config with a random PCA codec, one random
uint8 HxW image, `BenchModel.run` = pre-processing -> network -> top-100 -> 100 masks pasted at HxW, under
`torch.inference_mode`, freed heap handed back to the OS before each call as the bench does. Two views:

- sections: CPU time of this thread (`time.thread_time`; torch at 1 thread computes on it) in the
  backbone, each step of the stages (forward hooks on the stage submodules), RoIAlign and the
  post-processing (module functions wrapped while profiling), median over `--repeats` calls after one
  warm-up; `other` is the call's remainder (pre-processing, query init, glue);
- top_ops: `torch.profiler` self CPU time per aten op for one more call.

It records under `--label` in the `--out` JSON (other labels in the file are kept), so the same script
run on the code before and after a change (e.g. `PYTHONPATH=/path/to/old/checkout`) gives one file:

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/profile_istr.py --label after [--size 512x512] [--repeats 3] \
        [--config configs/istr_r50_coco.yaml] [--out benchmarks/results/istr_cpu_profile.json] [--no-fold]
"""
import argparse
import datetime
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import torch

import segbook
import segbook.istr as istr
from segbook import bench

STAGE_PARTS = {"self_attn": "stage.self_attention", "roi_attn": "stage.dynamic_conv", "ffn": "stage.ffn",
               "cls_tower": "stage.towers_heads", "reg_tower": "stage.towers_heads", "mask_tower": "stage.towers_heads",
               "class_logits": "stage.towers_heads", "box_deltas": "stage.towers_heads", "mask_out": "stage.towers_heads"}


class Sections:
    "Accumulates thread CPU time per named section for one call."
    def __init__(self):
        self.t = defaultdict(float)
        self._start = {}

    def hook_module(self, module, name):
        module.register_forward_pre_hook(lambda m, a: self._start.__setitem__(id(m), time.thread_time()))
        module.register_forward_hook(lambda m, a, o: self.t.__setitem__(name, self.t[name] + time.thread_time() - self._start[id(m)]))

    def wrap(self, owner, attr, name):
        fn = getattr(owner, attr)
        def timed(*a, **k):
            t0 = time.thread_time()
            try:
                return fn(*a, **k)
            finally:
                self.t[name] += time.thread_time() - t0
        setattr(owner, attr, timed)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default="configs/istr_r50_coco.yaml")
    ap.add_argument("--size", default="512x512")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--label", required=True, help="key of this run in the output file, e.g. before / after")
    ap.add_argument("--out", default="benchmarks/results/istr_cpu_profile.json")
    ap.add_argument("--no-fold", action="store_true", help="ablation: keep the frozen BN unfolded (inference_body = backbone.body)")
    a = ap.parse_args(argv)
    torch.set_num_threads(1)
    H, W = bench.parse_size(a.size)
    b = bench.build_bench_model(a.config, "cpu", H, W)
    m = b.module
    if a.no_fold:
        m.inference_body = lambda: m.backbone.body
    img = torch.randint(0, 256, (3, H, W), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    sec = Sections()
    with torch.inference_mode():
        b.run(img)                                  # warm-up; builds the folded body where the code has one
    sec.hook_module(m.backbone.body, "backbone.body (ResNet)")
    if hasattr(m, "inference_body") and m.inference_body() is not m.backbone.body:
        sec.hook_module(m.inference_body(), "backbone.body (ResNet)")
    sec.hook_module(m.backbone.fpn, "backbone.fpn")
    for stage in m.stages:
        for attr, name in STAGE_PARTS.items():
            sec.hook_module(getattr(stage, attr), name)
    sec.wrap(istr, "multilevel_roi_align", "roi_align (6 stages)")
    sec.wrap(istr, "paste_masks", "postprocess.paste_masks")
    sec.wrap(istr, "postprocess", "postprocess (all)")
    runs = []
    with torch.inference_mode():
        for _ in range(a.repeats):
            bench._release_free_memory()
            sec.t.clear()
            t0, w0 = time.thread_time(), time.perf_counter()
            b.run(img)
            sec.t["total"] = time.thread_time() - t0
            sec.t["wall"] = time.perf_counter() - w0
            runs.append(dict(sec.t))
        bench._release_free_memory()
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
            b.run(img)
    med = {k: statistics.median(r[k] for r in runs) * 1e3 for k in runs[0]}
    med["postprocess (rest: top-k, decode, boxes)"] = med.pop("postprocess (all)") - med["postprocess.paste_masks"]
    total = med.pop("total"); wall = med.pop("wall")
    med["other (pre-processing, query init, glue)"] = total - sum(med.values())
    sections = {k: dict(ms=round(v, 1), share=round(v / total, 3)) for k, v in sorted(med.items(), key=lambda kv: -kv[1])}
    ev = sorted(prof.key_averages(), key=lambda e: -e.self_cpu_time_total)
    prof_total = sum(e.self_cpu_time_total for e in ev)
    top = [dict(op=e.key, calls=e.count, self_ms=round(e.self_cpu_time_total / 1e3, 1),
                share=round(e.self_cpu_time_total / prof_total, 3)) for e in ev[:15]]
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                cwd=Path(segbook.__file__).parent).stdout.strip() or None
    except OSError:
        commit = None
    rec = dict(command="OMP_NUM_THREADS=1 python benchmarks/profile_istr.py " + " ".join(sys.argv[1:] if argv is None else argv),
               date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
               segbook=str(Path(segbook.__file__).parent), segbook_commit=commit,
               load_average=os.getloadavg(), threads=torch.get_num_threads(), torch=torch.__version__,
               config=a.config, size=[H, W], repeats=a.repeats, frozen_bn_folded=None if not hasattr(m, "inference_body") else not a.no_fold,
               call_cpu_ms=round(total, 1), call_wall_ms=round(wall, 1), sections=sections,
               profiler_total_ms=round(prof_total / 1e3, 1), top_ops=top)
    out = Path(a.out)
    data = json.loads(out.read_text()) if out.is_file() else {}
    data.setdefault("what", "CPU time of one segbook-bench ISTR call by section and by aten op (benchmarks/profile_istr.py); "
                            "labels are runs of the same script on different code")
    data[a.label] = rec
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=out.parent, prefix=f".{out.name}.", suffix=".tmp")
    with os.fdopen(fd, "w") as f:
        f.write(json.dumps(data, indent=1) + "\n")
    os.replace(tmp, out)
    print(f"{a.label}: call {total:.0f} ms CPU ({wall:.0f} ms wall)", file=sys.stderr)
    for k, v in sections.items():
        print(f"  {k:45s} {v['ms']:8.1f} ms  {v['share']:.1%}", file=sys.stderr)


if __name__ == "__main__":
    main()
