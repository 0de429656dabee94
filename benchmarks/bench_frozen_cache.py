"""Benchmark training ISTR's head on a frozen backbone, with and without the per-image feature cache (issue #13).

Three ways to train the same ISTR (configs/istr_shapes_cpu.yaml with the paper's head: l = 60, 6 stages) on
shapes batches, timed as the engine runs them (forward + backward + AdamW step), one thread:

- `finetune`: trainable_layers=3 (the paper's FREEZE_AT 2) — what end-to-end fine-tuning costs;
- `frozen`: trainable_layers=0 — the body runs without autograd every iteration;
- `frozen+cache`: trainable_layers=0, cache_backbone_mb>0 — the body's outputs of an image seen before are read back
  (timed after one pass over the batches, i.e. from the second epoch on, which is most of a run);
- `frozen+fpn+cache`: the FPN frozen too (configs/istr_shapes_head.yaml): the cache holds P2-P5 and only the head trains,
  so no gradient flows back through RoIAlign.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/bench_frozen_cache.py --data data/shapes [--iters 20]

The modes alternate batch by batch so that a load change on a shared machine hits all three alike; the 1-minute
load average is recorded. Writes benchmarks/results/frozen_cache.json (unique temp file + rename).
"""
import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--data", required=True, help="shapes root (segbook data synth)")
    ap.add_argument("--iters", type=int, default=20, help="timed iterations per mode")
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "frozen_cache.json"))
    a = ap.parse_args(argv)
    torch.set_num_threads(a.threads)
    from segbook.config import load_config
    from segbook.data import collate
    from segbook.embeddings import PCACodec
    from segbook.engine import build_optimizer
    from segbook.pipeline import build_model, train_dataset, with_dataset_classes

    base = ["model.mask_dim=60", "model.num_stages=6", f"data.root={a.data}"]
    cfg = load_config(ROOT / "configs" / "istr_shapes_cpu.yaml", base)
    ds = train_dataset(cfg)
    cfg = with_dataset_classes(cfg, ds)
    codec = Path(tempfile.mkdtemp()) / "codec.pt"
    comps = torch.linalg.qr(torch.randn(28 * 28, 60))[0].T.contiguous()   # a random orthonormal basis: timing only
    PCACodec(comps, torch.zeros(28 * 28), torch.ones(60), torch.ones(28 * 28), 28).save(codec)
    batches = [collate([ds[i] for i in range(b * a.batch_size, (b + 1) * a.batch_size)]) for b in range(a.iters)]
    modes = {"finetune": ["model.trainable_layers=3"], "frozen": ["model.trainable_layers=0"],
             "frozen+cache": ["model.trainable_layers=0", "model.cache_backbone_mb=2048"],
             "frozen+fpn+cache": ["model.trainable_layers=0", "model.freeze_fpn=true", "model.cache_backbone_mb=2048"]}
    runs = {}
    for name, ov in modes.items():
        c = load_config(ROOT / "configs" / "istr_shapes_cpu.yaml", base + ov + [f"model.codec_path={codec}"])
        c = with_dataset_classes(c, ds)
        torch.manual_seed(0)
        model = build_model(c).train()
        runs[name] = (model, build_optimizer(model, c.solver), [])

    def step(name, images, targets):
        model, opt, times = runs[name]
        t = time.perf_counter()
        loss = sum(v for k, v in model(images, targets).items() if k.startswith("loss_"))
        opt.zero_grad(set_to_none=True); loss.backward(); opt.step()
        return time.perf_counter() - t

    for images, targets in batches:   # one pass: warm-up for all, and it fills the cache
        for name in runs: step(name, images, targets)
    load0 = os.getloadavg()[0]
    for images, targets in batches:
        for name in runs: runs[name][2].append(step(name, images, targets))
    load1 = os.getloadavg()[0]
    med = {n: statistics.median(r[2]) for n, r in runs.items()}
    cache = runs["frozen+cache"][0].backbone.__dict__.get("_feature_cache")
    result = {"benchmark": "ISTR training step (forward+backward+AdamW), shapes 128 px, batch %d" % a.batch_size,
              "model": "configs/istr_shapes_cpu.yaml + mask_dim=60 num_stages=6 (ResNet-18-FPN, 40 queries)",
              "torch": torch.__version__, "threads": torch.get_num_threads(), "machine": platform.machine(),
              "cpus": os.cpu_count(), "load_avg_1min": [load0, load1], "iters": a.iters,
              "seconds_per_iter_median": med,
              "seconds_per_iter_min": {n: min(r[2]) for n, r in runs.items()},
              "speedup_vs_finetune": {n: med["finetune"] / v for n, v in med.items()},
              "cache": {"hits": cache.hits, "misses": cache.misses, "mib": cache.used / 2 ** 20} if cache else None,
              "command": "OMP_NUM_THREADS=1 .venv/bin/python benchmarks/bench_frozen_cache.py " + " ".join(sys.argv[1:] if argv is None else argv),
              "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    out = Path(a.out); out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=out.parent, prefix=out.name + ".", suffix=".tmp")
    with os.fdopen(fd, "w") as f: json.dump(result, f, indent=1)
    os.replace(tmp, out)
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
