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
# # Transfiner Table 7 analogue: time and memory of the refinement step at R RoIs
#
# > Mask Transfiner's Table 7 compares its quadtree transformer with standard transformers on full 28² and 56² RoI
# > grids (FLOPs, memory, FPS of the whole model on COCO val). Here we time the **refinement step alone**, with the
# > segbook modules, for R RoIs at once: the sparse quadtree path (`gather_points` at the nodes → node encoder →
# > refinement transformer → propagation to 112²), the same path with dense 28²/56²/112² RoIAlign grids that are then
# > indexed at the nodes (what the official code does), and a dense transformer over every cell of a 28² or 56² grid.
#
# **What is comparable.** Not the absolute numbers: the paper measures the full network (backbone, detector, coarse
# head, refinement) per COCO image with trained weights, on a GPU Table 7 does not name, at a number of refined RoIs
# it does not give (the official code refines the top 10 detections per image). We measure only the step that
# differs between the rows, with random weights and random FPN features of two 800×1216 images, R random boxes, and
# the node counts of the ground-truth quadtree on coco-mini (a stand-in for the detector's nodes). The *ratios*
# between rows are the closest thing to the paper's claim ("3 times less memory", "half of the FLOPs"); the paper's
# ratios are diluted by the network parts all rows share. The incoherence detector is not timed (the dense rows do
# not need one). The non-local-attention rows and the 224² rows of Table 7 are not run.

# %% tags=["parameters"]
profile = "smoke"
out_dir = None
seed = 0
device = "cpu"
shapes_root = "unused"
coco_root = None
rois = [1]  # numbers of RoIs refined in one call (the profiles pass [10, 50], [10, 50, 100], [10, 50, 100, 300])
repeats = 1  # timed rounds per R (after one untimed warm-up call of each method)
max_tokens = None  # skip a dense-transformer row when R × tokens per RoI exceeds this; None: the profile's budget below

# %%
import importlib.util
import math
import statistics

import matplotlib.pyplot as plt
import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

from segbook.bench import device_name, measure_call, memory_method, time_alternately
from segbook.quadtree import NodeSequence, propagate, values_at_nodes
from segbook.reproduce import _repo_root, experiment_context, write_json_atomic, write_table
from segbook.transfiner import NEIGHBOURS, TransfinerConfig, TransfinerHead, roi_pyramid_features, sine_position
from segbook.viz import save_figure

ctx = experiment_context(out_dir, shapes_root, coco_root, seed)
if not (isinstance(rois, (list, tuple)) and rois and all(isinstance(r, int) and r > 0 for r in rois)):
    raise ValueError(f"parameter 'rois': expected a non-empty list of positive ints, got {rois!r} (papermill CLI: -y 'rois: [10, 50]')")
if not (isinstance(repeats, int) and repeats >= 1):
    raise ValueError(f"parameter 'repeats': expected an int >= 1, got {repeats!r}")
if device == "cuda" and not torch.cuda.is_available():
    raise RuntimeError("device='cuda' was asked for, but torch.cuda.is_available() is False")
dev = torch.device("cuda" if device in ("auto", "cuda") and torch.cuda.is_available() else "cpu")
BUDGET = max_tokens if max_tokens is not None else {"smoke": 30_000, "cpu": 100_000}.get(profile)  # gpu: no budget
print(f"device {dev} ({device_name(dev)}), {torch.get_num_threads()} threads; token budget per call: {BUDGET}")
print("memory:", memory_method(dev))

# %% [markdown]
# ## Inputs: the gather benchmark's, with the node counts of coco-mini's quadtrees
#
# `benchmarks/bench_gather.py` already builds the setting (two 800×1216 images, FPN P2–P5 with 256 channels, R boxes
# with log-uniform sides 16–600 px, each RoI's 28/56/112 grids on P_i, P_{i−1}, P_{i−2}, and k distinct random cells
# per grid) and the dense RoIAlign + index path; we import it. The nodes per RoI at 28/56/112 are the mean counts of
# the GT quadtree (Eq. 1 maps, children under nodes) over the first 15 coco-mini val images, or, without coco-mini,
# the means over all of coco-mini val recorded in `figures/tables/transfiner_table1_oracle.md`.

# %%
spec = importlib.util.spec_from_file_location("bench_gather", _repo_root() / "benchmarks" / "bench_gather.py")
bench_gather = importlib.util.module_from_spec(spec); spec.loader.exec_module(bench_gather)
SIZES = list(bench_gather.SIZES)                                  # (28, 56, 112)

NODE_IMAGES = 15
if ctx.coco is not None:
    from segbook.incoherent import incoherent_pyramid, load_instance_masks
    from segbook.quadtree import build_quadtree
    counts = torch.cat([torch.stack([t.flatten(1).sum(1) for t in build_quadtree(incoherent_pyramid(m, b, SIZES))], 1) for _, m, b in
                        load_instance_masks(ctx.coco / "annotations" / "instances_val2017.json", max_images=NODE_IMAGES)]).float()
    NODES = [max(1, round(v)) for v in counts.mean(0).tolist()]
    node_source = f"mean GT quadtree nodes of {len(counts)} coco-mini val instances (first {NODE_IMAGES} images)"
else:
    NODES = [56, 75, 102]
    node_source = "coco-mini val means from figures/tables/transfiner_table1_oracle.md (coco-mini not found)"
K = sum(NODES)
print(f"nodes per RoI at {SIZES}: {NODES} (K = {K}); {node_source}")

def node_sequence(nodes:list, # per grid (yx [R*k,2], roi [R*k]) from bench_gather.make_inputs, k cells per RoI
                  R:int) -> NodeSequence: # [R,K] all valid, coarse grid first
    "The benchmark's nodes as one NodeSequence (the layout the node encoder and `propagate` read)."
    yx = torch.cat([p.view(R, -1, 2) for p, _ in nodes], 1)
    level = torch.cat([torch.full((R, len(p) // R), l, device=p.device) for l, (p, _) in enumerate(nodes)], 1)
    return NodeSequence(torch.arange(R, device=yx.device)[:, None].expand_as(level), level, yx, torch.ones_like(level, dtype=torch.bool))

def make_case(R:int) -> dict:
    "Features, R boxes, FPN level numbers per grid, nodes and coarse 28² probabilities for one call."
    feats, boxes, levels, nodes = bench_gather.make_inputs(dev, NODES, R=R, seed=seed)
    g = torch.Generator().manual_seed(seed + R)
    return dict(feats=feats, rois=boxes, levels=levels, fpn=levels + 2, nodes=nodes, seq=node_sequence(nodes, R),
                coarse=torch.rand(R, SIZES[0], SIZES[0], generator=g).to(dev))


# %% [markdown]
# ## The five methods
#
# One `TransfinerHead` with the paper's settings (d = 256, 4 heads, 3 post-norm layers, FFN 2048, the 3×3 context cue
# on, nearest propagation) supplies the node encoder and the refinement transformer; random weights, eval mode. Its
# node encoder uses the code's one-linear fusion (`node_fusion='concat'`) so the rows below can share its projection;
# the book's default per-cue fusion costs the same multiply–adds.
# - **quadtree, segbook NodeEncoder**: `TransfinerHead.node_logits` → sigmoid → `propagate` to 112². This is the
#   book's model as it runs: the node encoder calls `gather_points` once for all nodes and their 3×3 neighbours,
#   each on its own grid side.
# - **quadtree, gather_points once per grid**: the same tokens, but each grid's nodes (and neighbours) are sampled
#   by one call per grid, with `bench_gather.run_sparse`; then the node encoder's projection, the sine position and
#   the same transformer and propagation.
# - **quadtree, dense RoIAlign + index**: `bench_gather.run_dense` pools every RoI's full 28², 56² and 112² grids and
#   indexes them at the same nodes and neighbours (the official code's way); tokens and transformer as above.
#   The three quadtree rows compute the same output (checked at the end).
# - **dense transformer s²** (s = 28 from P_i, s = 56 from P_{i−1}): every cell of the RoI grid is a token
#   ([RoIAlign feature ‖ coarse probability] → linear → + sine position), through the same transformer: Table 7's
#   "Transformer [4] (s×s)".

# %%
torch.manual_seed(seed)
cfg = TransfinerConfig(sizes=SIZES, node_fusion="concat")
head = TransfinerHead(cfg, 256).to(dev).eval()
dense_proj = torch.nn.Linear(256 + 1, cfg.d_model).to(dev).eval()
N_IN_NODE = head.encoder.proj.in_features                          # 9·256 + 1 with the context cue
SCALES = [1 / 4, 1 / 8, 1 / 16, 1 / 32]

def quadtree_node_encoder(x:dict) -> torch.Tensor: # [R,112,112] probabilities
    "The book's head: NodeEncoder (gather_points) + transformer + propagation."
    logits = head.node_logits(x["feats"], x["rois"], x["fpn"], x["seq"], x["coarse"])
    return propagate(x["coarse"], x["seq"], logits.sigmoid(), SIZES, cfg.propagation)

def quadtree_via(sample, # bench_gather.run_sparse or run_dense: (feats, boxes, levels, per-grid (yx, roi)) -> per grid [M,C]
                 x:dict) -> torch.Tensor: # [R,112,112] probabilities
    "Node tokens as the node encoder builds them, from features sampled by `sample`; same transformer and propagation."
    seq, enc = x["seq"], head.encoder
    R, Kn = seq.level.shape
    offs = (NEIGHBOURS if enc.context else NEIGHBOURS[4:5]).to(dev)
    size = torch.tensor(SIZES, device=dev)[seq.level]                                     # [R,K]
    yx = torch.minimum((seq.yx[:, :, None] + offs).clamp(min=0), (size - 1)[..., None, None])  # [R,K,n,2]
    n = offs.shape[0]
    per_grid = [(yx[seq.level == l].reshape(-1, 2), seq.roi[:, :, None].expand(R, Kn, n)[seq.level == l].reshape(-1))
                for l in range(len(SIZES))]                                               # grid l: (yx, roi) per sample
    f = torch.cat([v.view(R, -1, n, v.shape[-1]) for v in sample(x["feats"], x["rois"], x["levels"], per_grid)], 1)
    if enc.context and not enc.feature:
        f = torch.cat([f[:, :, :4], f[:, :, 5:]], 2)
    grids = [x["coarse"]] + [F.interpolate(x["coarse"][:, None], size=(s, s), mode="bilinear", align_corners=False)[:, 0] for s in SIZES[1:]]
    tok = enc.proj(torch.cat([f.flatten(2), values_at_nodes(grids, seq)[..., None]], -1)) + sine_position(seq.yx, size, enc.d)
    return propagate(x["coarse"], seq, head.transformer(tok, seq.valid).sigmoid(), SIZES, cfg.propagation)

def dense_transformer(s:int, # grid side
                      grid:int): # which grid of the RoI pyramid gives its FPN level (0: P_i, 1: P_{i-1})
    "Table 7's standard transformer: every cell of the RoI's s×s grid is a token."
    yx = torch.stack(torch.meshgrid(torch.arange(s), torch.arange(s), indexing="ij"), -1).reshape(-1, 2).to(dev)
    pos = sine_position(yx, torch.full((s * s,), s, device=dev), cfg.d_model)
    def fn(x:dict) -> torch.Tensor: # [R,s,s] probabilities
        R = len(x["rois"])
        f = roi_pyramid_features(x["feats"], x["rois"], x["fpn"][:, grid], s)            # [R,256,s,s]
        p = F.interpolate(x["coarse"][:, None], size=(s, s), mode="bilinear", align_corners=False)
        tok = dense_proj(torch.cat([f, p], 1).flatten(2).transpose(1, 2)) + pos
        return head.transformer(tok, torch.ones(R, s * s, dtype=torch.bool, device=dev)).sigmoid().view(R, s, s)
    return fn

# name: (callable, tokens per RoI, input width of the token projection, output side, paper row of Table 7)
run_dense_all = lambda feats, boxes, levels, nodes: bench_gather.run_dense(feats, boxes, levels, nodes, SIZES)
METHODS = {
    "quadtree, segbook NodeEncoder": (quadtree_node_encoder, K, N_IN_NODE, SIZES[-1], "Mask Transfuser (112×112)"),
    "quadtree, gather_points once per grid": (lambda x: quadtree_via(bench_gather.run_sparse, x), K, N_IN_NODE, SIZES[-1], "Mask Transfuser (112×112)"),
    "quadtree, dense RoIAlign + index": (lambda x: quadtree_via(run_dense_all, x), K, N_IN_NODE, SIZES[-1], "Mask Transfuser (112×112)"),
    "dense transformer 28²": (dense_transformer(28, 0), 28 * 28, 257, 28, "Transformer [4] (28×28)"),
    "dense transformer 56²": (dense_transformer(56, 1), 56 * 56, 257, 56, "Transformer [4] (56×56)"),
}


# %% [markdown]
# ## FLOPs
#
# Multiply–adds of one RoI's step, ×2, counted for the token projection, the L encoder layers (Q, K, V and output
# projections 4·T·d², attention scores and weighted sum 2·T²·d, FFN 2·T·d·f) and the pixel decoder (T·d² + T·d).
# Bilinear sampling, RoIAlign and propagation are left out (under 0.05 GFLOP per RoI even for the dense 112² grid).
# The formula is checked against `torch.utils.flop_counter` at the end.

# %%
def step_flops(T:int, # tokens per RoI
               n_in:int, # input width of the token projection
               d:int=cfg.d_model, ffn:int=cfg.ffn, layers:int=cfg.layers) -> int:
    "FLOPs (2 × multiply-adds) of projection + encoder + pixel decoder for one RoI of T tokens."
    return 2 * (T * n_in * d + layers * (T * (4 * d * d + 2 * d * ffn) + 2 * T * T * d) + T * d * d + T * d)

GFLOP = {name: step_flops(T, n_in) / 1e9 for name, (_, T, n_in, _, _) in METHODS.items()}
GFLOP

# %% [markdown]
# ## Measurement
#
# For each R: the methods within the token budget; each gets one untimed warm-up call (on CPU only at its first R, to
# keep the smoke run short; on CUDA at every R), where a CUDA out-of-memory error is recorded as "OOM" (as the paper
# records its 112² transformer); then `repeats` rounds of `time_alternately` (each round calls every method once,
# A B C D A B …). Each call is synchronised and runs under `inference_mode`; its peak memory is measured above the
# memory held before the call (`segbook.bench.measure_call`).

# %%
results, warmed = {name: {} for name in METHODS}, set()
for R in rois:
    x = make_case(R)
    run = {}
    for name, (fn, T, _, _, _) in METHODS.items():
        if BUDGET is not None and R * T > BUDGET and name.startswith("dense transformer"):
            results[name][R] = {"status": "skipped", "why": f"{R * T} tokens > budget {BUDGET}"}
            continue
        try:
            if dev.type == "cuda" or name not in warmed:
                measure_call(fn, x, dev); warmed.add(name)                # warm-up
            run[name] = fn
        except torch.OutOfMemoryError as e:
            results[name][R] = {"status": "OOM", "why": str(e)[:200]}
            if dev.type == "cuda": torch.cuda.empty_cache()
    timed = time_alternately(run, x, iters=repeats, warmup=0, device=dev) if run else {}
    for name, r in timed.items():
        peaks = [p for p in r["peak_bytes"] if p is not None]
        results[name][R] = {"status": "ok", "median_ms": round(statistics.median(r["ms"]), 2), "ms": [round(v, 2) for v in r["ms"]],
                            "peak_mb": round(max(peaks) / 2**20, 1) if peaks else None, "gflop": round(GFLOP[name] * R, 2)}
    ref = timed.get("quadtree, segbook NodeEncoder", {}).get("output")
    for name, r in timed.items():                                     # same output from every quadtree path?
        if name.startswith("quadtree") and ref is not None:
            results[name][R]["max_abs_diff"] = float((r["output"] - ref).abs().max())
    print(R, {n: (v[R].get("median_ms"), v[R].get("peak_mb")) if v[R]["status"] == "ok" else v[R]["status"] for n, v in results.items()})
    del x, timed

# %% [markdown]
# ## Tables: the paper's Table 7, ours, and the ratios

# %%
PAPER = {  # Table 7, COCO val: AP, FLOPs (G), Memory (M), FPS
    "NLA [39] (112×112)": (36.3, 24.6, 8347, 4.6), "NLA [39] (224×224)": (36.6, 80.2, 18091, 2.4),
    "Transformer [4] (28×28)": (36.1, 37.2, 4368, 6.9), "Transformer [4] (56×56)": (36.5, 68.3, 17359, 2.1),
    "Mask Transfuser (112×112)": (37.3, 16.8, 2316, 7.1), "Mask Transfuser (224×224)": (37.1, 38.1, 4871, 5.2)}
ours_of = {}
for name, (_, _, _, _, row) in METHODS.items(): ours_of.setdefault(row, []).append(name)
dev_text = f"{device_name(dev)} ({dev.type}, {torch.get_num_threads()} threads)" if dev.type == "cpu" else device_name(dev)
cell = lambda r: (f"{r['median_ms']:.1f} ms / {r['peak_mb'] if r['peak_mb'] is not None else '–'} MB" if r["status"] == "ok" else r["status"])

lines = [f"Transfiner Table 7 (COCO val, whole network per image, R50-FPN, GPU not named) beside segbook's refinement step "
         f"alone ({profile} profile, {dev_text}, fp32, random weights, 2 images 800×1216, R random RoIs, {repeats} timed round(s)).", "",
         "| Table 7 row | paper AP | paper FLOPs (G) | paper memory (M) | paper FPS | ours (below) |", "|---|---|---|---|---|---|"]
for row, (ap, fl, mem, fps) in PAPER.items():
    lines.append(f"| {row} | {ap} | {fl} | {mem} | {fps} | {', '.join(ours_of.get(row, [])) or 'not run'} |")
lines += ["", f"Ours: median time / peak memory above the inputs of one call refining R RoIs. Nodes per RoI at 28/56/112: "
          f"{'/'.join(map(str, NODES))} ({node_source}).", "",
          "| method | tokens per RoI | output | GFLOP per RoI | " + " | ".join(f"R={R}" for R in rois) + " |",
          "|---|---|---|---|" + "---|" * len(rois)]
for name, (_, T, _, out_side, _) in METHODS.items():
    lines.append(f"| {name} | {T} | {out_side}² | {GFLOP[name]:.2f} | " + " | ".join(cell(results[name][R]) for R in rois) + " |")

# ratios to the sparse quadtree at the largest R where both ran
base = "quadtree, gather_points once per grid"
lines += ["", f"Ratio to the '{base}' row; paper: FLOPs, memory, time = FPS(quadtree)/FPS(row) of the whole "
          "network; ours: the refinement step at the largest R where both ran.", "",
          "| method | paper FLOPs × | paper memory × | paper time × | ours R | ours FLOPs × | ours memory × | ours time × |",
          "|---|---|---|---|---|---|---|---|"]
pq = PAPER["Mask Transfuser (112×112)"]
ratios = {}
for name, (_, _, _, _, row) in METHODS.items():
    both = [R for R in rois if results[name][R]["status"] == "ok" and results[base][R]["status"] == "ok"]
    p = PAPER[row]
    pr = f"{p[1] / pq[1]:.2f} | {p[2] / pq[2]:.2f} | {pq[3] / p[3]:.2f}"
    if not both:
        lines.append(f"| {name} | {pr} | – | – | – | – |"); continue
    R = max(both); a, b = results[name][R], results[base][R]
    mem = a["peak_mb"] / b["peak_mb"] if a["peak_mb"] and b["peak_mb"] else None
    ratios[name] = {"R": R, "flops": GFLOP[name] / GFLOP[base], "memory": mem, "time": a["median_ms"] / b["median_ms"]}
    lines.append(f"| {name} | {pr} | {R} | {ratios[name]['flops']:.2f} | {'–' if mem is None else f'{mem:.2f}'} | {ratios[name]['time']:.2f} |")
lines += ["", "Not comparable: absolute values (whole network vs one step; trained vs random weights; the paper's RoI count "
          "and GPU are not given). Comparable in direction only: the ratios, which in the paper include the shared "
          "backbone and detector. Not run: non-local attention (no implementation here), the 224² quadtree and dense "
          "112² transformer rows (the paper's ran out of memory). Skipped cells exceeded the profile's token budget "
          f"({BUDGET}). The official code at test uses a 28² threshold of 1e−6, so it refines nearly all 784 cells of the "
          "first level plus 196 coarse tokens: longer sequences than the dense 28² row; that setting is not measured here. "
          "On CPU the quadtree rows include the torch gather path's channels-last copy of the FPN levels on every "
          "`gather_points` call (see benchmarks/bench_gather.py); on CUDA the Triton kernel reads the levels in place. "
          f"Memory: {memory_method(dev)}."]
write_table(ctx.tables / "transfiner_table7_efficiency.md", lines)

# %%
fig, ax = plt.subplots(1, 2, figsize=(10, 3.6))
for name in METHODS:
    ok = [R for R in rois if results[name][R]["status"] == "ok"]
    ax[0].plot(ok, [results[name][R]["median_ms"] for R in ok], "o-", label=name)
    okm = [R for R in ok if (results[name][R]["peak_mb"] or 0) > 0]  # a log axis shows positive values only
    ax[1].plot(okm, [results[name][R]["peak_mb"] for R in okm], "o-", label=name)
for a, lab in zip(ax, ("time per call (ms)", "peak memory above inputs (MB)")):
    a.set_xscale("log"); a.set_xlabel("RoIs refined in one call (R)"); a.set_ylabel(lab); a.grid(alpha=0.3)
    if a.has_data(): a.set_yscale("log")
    a.set_xticks(rois, [str(R) for R in rois]); a.minorticks_off()
ax[0].legend(fontsize=7)
fig.suptitle(f"Refinement step, {dev_text}, {profile} profile", fontsize=9)
fig.tight_layout()
save_figure(fig, "transfiner_table7_efficiency.png"); plt.close(fig)

# Ledger: Table 7's claim that the dense 28² transformer costs more than the quadtree (paper: 2.21x FLOPs, 1.89x memory,
# 1.03x time); ours is the refinement step alone, one measurement per cost (the timing repeats are in `repeats`).
from segbook.reproduce import threshold_verdict
dense, quad_ref = "dense transformer 28²", "quadtree, gather_points once per grid"
claims = []
for cost, paper_x in (("flops", 37.2 / 16.8), ("memory", 4368 / 2316), ("time", 7.1 / 6.9)):
    x = ratios.get(dense, {}).get(cost)
    claims.append({"id": f"transfiner.table7.dense28_vs_quadtree.{cost}", "paper": "Mask Transfiner", "where": "Table 7",
                   "claim": f"a dense 28² transformer costs more {cost} than the quadtree refinement", "metric": f"{cost} ratio dense 28² / quadtree",
                   "paper_values": {"ratio": round(paper_x, 2)}, "ours": {"ratio": [x]}, "seeds": "one measurement",
                   "profile": profile, "data": f"{dev_text}, R={ratios.get(dense, {}).get('R')} random RoIs",
                   **threshold_verdict([x] if x is not None else [], 1.0, min_seeds=1), "note": "replicated = ratio above 1",
                   "table": "figures/tables/transfiner_table7_efficiency.md",
                   "command": f"segbook reproduce --profile {profile} --only transfiner_table7_efficiency --data ../shared/coco-mini"})

write_json_atomic({"profile": profile, "device": str(dev), "device_name": device_name(dev), "threads": torch.get_num_threads(),
                   "memory_method": memory_method(dev), "rois": rois, "repeats": repeats, "token_budget": BUDGET,
                   "nodes_per_level": NODES, "node_source": node_source, "gflop_per_roi": GFLOP, "results": results,
                   "ratios_to_quadtree": ratios, "paper_table7": PAPER, "claims": claims}, ctx.out / "results.json")

# %% [markdown]
# ## Checks
#
# The three quadtree paths computed the same masks in every timed call (so their rows differ in cost only); the FLOP
# formula matches PyTorch's counter (the transformer in train mode, where it does not take the fused inference path
# the counter cannot see into); every R has a result for every method, and each measured one a positive time.

# %%
quad = [n for n in METHODS if n.startswith("quadtree")]
assert len(quad) == 3 and all(results[n][R]["status"] == "ok" for n in quad for R in rois)
diffs = {(n, R): results[n][R]["max_abs_diff"] for n in quad for R in rois}
assert all(d <= 1e-4 for d in diffs.values()), diffs                # the three quadtree paths give the same 112² masks

tr = TransfinerHead(cfg, 256).transformer.train()
for T, n_in in ((K, N_IN_NODE), (300, 257)):
    proj = torch.nn.Linear(n_in, cfg.d_model)
    with FlopCounterMode(display=False) as fc, torch.no_grad():
        tr(proj(torch.randn(1, T, n_in)), torch.ones(1, T, dtype=torch.bool))
    assert abs(fc.get_total_flops() - step_flops(T, n_in)) <= 1e-6 * step_flops(T, n_in), (T, fc.get_total_flops(), step_flops(T, n_in))

assert all(set(results[n]) == set(rois) for n in METHODS)
ok = [r for v in results.values() for r in v.values() if r["status"] == "ok"]
assert ok and all(math.isfinite(r["median_ms"]) and r["median_ms"] > 0 for r in ok)
