# ---
# jupyter:
#   jupytext:
#     text_representation:
#       extension: .py
#       format_name: percent
#       format_version: '1.3'
#       jupytext_version: 1.19.6
#   kernelspec:
#     display_name: python3
#     language: python
#     name: python3
# ---

# %% [markdown]
# # ISTR Table 1 (a–e) on shapes: every ablation switch, one short schedule
#
# > Each row of ISTR's Table 1 is one switch of the model (`ISTRConfig`), the matching cost (`MatchingConfig`)
# > or the set loss (`SetLossConfig`). We train each variant from the same seed on the synthetic shapes set with the
# > same schedule and report mask / box AP on its val split beside the paper's COCO numbers.
#
# **Not comparable in absolute terms:** the paper trains ResNet-50-FPN (ImageNet init) on COCO train2017 for 36
# epochs at 480–800 px and evaluates on COCO val2017; we train a ResNet-18-FPN from scratch
# (`configs/istr_shapes_cpu.yaml`, 128 px, 40 queries, 3 stages) for `iters` iterations. The smoke profile
# (8 iterations) only proves every switch trains and evaluates: its APs are ~0 and say nothing about the ranking.

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
variants = [0]  # rows of VARIANTS to train, by name or position (0: the baseline); the profiles pass "all"

# %%
import json
from pathlib import Path

import matplotlib.pyplot as plt

from segbook.reproduce import experiment_context, logged, seconds_per_iter, train_istr_variant, write_json_atomic, write_table, _repo_root

ctx = experiment_context(out_dir, shapes_root, coco_root, seed)
CONFIG = _repo_root() / "configs" / "istr_shapes_cpu.yaml"

# %% [markdown]
# The variants. The baseline is the paper's final model (l = 60, cosine mask cost, L2 + dice, dynamic attention,
# average-pooled image features + position embeddings); each other row changes one switch. The paper's numbers are
# Table 1 mask AP / box AP (COCO val2017).

# %%
BASE = dict(model={"mask_dim": 60}, matching={}, loss={})
VARIANTS = {  # name: (table, changes, paper AP^m, paper AP^b)
    "l=60 (baseline)":       ("a-e", {}, 34.2, 41.0),
    "raw 28×28 mask":        ("a", {"model": {"mask_head": "raw"}, "matching": {"mask_cost": "dice"}, "loss": {"mask_loss": "dice"}}, 31.6, 40.2),
    "l=40":                  ("a", {"model": {"mask_dim": 40}}, 33.7, 41.1),
    "l=80":                  ("a", {"model": {"mask_dim": 80}}, 33.8, 40.6),
    "mask cost: none":       ("b", {"matching": {"mask_cost": "none"}}, 33.8, 40.7),
    "mask cost: dice":       ("b", {"matching": {"mask_cost": "dice"}}, 33.9, 40.8),
    "mask cost: L1":         ("b", {"matching": {"mask_cost": "l1"}}, 34.0, 40.9),
    "loss: dice":            ("c", {"loss": {"mask_loss": "dice"}}, 32.6, None),
    "loss: L2":              ("c", {"loss": {"mask_loss": "l2"}}, 33.8, None),
    "attention: multi-head": ("d", {"model": {"attention": "multihead"}}, 22.0, 31.2),
    "image feat.: max":      ("e", {"model": {"image_pool": "max", "pos_embed": False}}, 33.3, 40.0),
    "image feat.: avg":      ("e", {"model": {"image_pool": "avg", "pos_embed": False}}, 33.6, 40.6),
    "pos. embed. only":      ("e", {"model": {"image_pool": "none", "pos_embed": True}}, 34.0, 40.9),
}
chosen = list(VARIANTS) if variants == "all" else [v if isinstance(v, str) else list(VARIANTS)[v] for v in variants]
assert set(chosen) <= set(VARIANTS), f"variants: unknown {sorted(set(chosen) - set(VARIANTS))}; known: {list(VARIANTS)}"

# %%
rows = {}
for i, name in enumerate(chosen):
    table, change, p_m, p_b = VARIANTS[name]
    kw = {k: {**BASE[k], **change.get(k, {})} for k in BASE}
    try:  # a finished variant folder (an interrupted earlier run of this notebook) returns its final evaluation
        r = train_istr_variant(CONFIG, ctx.shapes, ctx.out / f"v{i:02d}", iters, batch_size, eval_images, seed, device, **kw)
        ev = r["eval"]["eval"]
        rows[name] = {"table": table, **{k: ev[k] for k in ("segm_AP", "segm_AP50", "bbox_AP", "bbox_AP50")},
                      "paper_APm": p_m, "paper_APb": p_b, "loss_last": (logged(ctx.out / f"v{i:02d}", "loss") or [None])[-1],
                      "s_per_iter": seconds_per_iter(ctx.out / f"v{i:02d}")}
    except Exception as e:  # one failing switch must not hide the others: recorded and shown in the table
        rows[name] = {"table": table, "error": f"{type(e).__name__}: {e}"[:300], "paper_APm": p_m, "paper_APb": p_b}
    print(name, rows[name])

# %%
fmt = lambda v: "–" if v is None else (f"{100 * v:.1f}" if isinstance(v, float) and v <= 1 else str(v))
lines = [f"ISTR Table 1 switches on shapes ({profile} profile: {iters} iterations × batch {batch_size}, ResNet-18-FPN from scratch, "
         f"128 px, eval on {eval_images} val images) beside the paper (COCO val2017, R50-FPN, 3x schedule).", "",
         "| Table 1 | variant | ours AP^m | ours AP^m_50 | ours AP^b | ours AP^b_50 | ours final loss | ours s/it | paper AP^m | paper AP^b | note |",
         "|---|---|---|---|---|---|---|---|---|---|---|"]
for name, r in rows.items():
    loss, spi = r.get("loss_last"), r.get("s_per_iter")
    lines.append(f"| {r['table']} | {name} | {fmt(r.get('segm_AP'))} | {fmt(r.get('segm_AP50'))} | {fmt(r.get('bbox_AP'))} | "
                 f"{fmt(r.get('bbox_AP50'))} | {'–' if loss is None else f'{loss:.2f}'} | {'–' if spi is None else f'{spi:.2f}'} | "
                 f"{r['paper_APm']} | {'–' if r['paper_APb'] is None else r['paper_APb']} | {r.get('error', '')} |")
best = max((r.get("bbox_AP50", 0) for r in rows.values()), default=0)
verdict = ("Smoke schedule: numbers only show the path runs; no ranking can be read from them." if profile == "smoke" else
           f"At this budget no row reaches 1 % box AP50 (best {100 * best:.1f} %): ISTR, a set predictor trained from scratch, "
           "has not yet learned to localise, so these rows are not separable and no ranking can be read from them. "
           "On the same data `configs/istr_shapes_cpu.yaml` (l = 16) reached 12.1 / 4.9 box / mask AP after 2500 "
           "iterations (all 200 val images, figures/results/istr_shapes_cpu.json); the gpu profile (1500 iterations × batch 16, "
           "20× the images of this one) is where the ranking is meant to be read."
           if best < 0.01 else "Shapes APs after a short from-scratch schedule; compare rankings, not values, with the paper.")
lines += ["", "Paper: l=784 (raw mask as a vector) 31.4 / 41.1 is not run here. The final loss is comparable only between rows "
          "with the same loss terms (not for Table 1c). " + verdict]
write_table(ctx.tables / "istr_table1_ablations.md", lines)
write_json_atomic({"profile": profile, "iters": iters, "batch_size": batch_size, "rows": rows}, ctx.out / "results.json")

# %%
ok = {n: r for n, r in rows.items() if "segm_AP" in r}
fig, ax = plt.subplots(figsize=(7, 3.5))
ax.barh(list(ok), [100 * r["segm_AP"] for r in ok.values()], color="tab:blue", label="ours (shapes)")
ax.set_xlabel("mask AP (%)"); ax.invert_yaxis(); ax.set_title(f"ISTR Table 1 switches on shapes, {profile}: {iters} it")
from segbook.viz import save_figure
save_figure(fig, "istr_table1_ablations.png"); plt.close(fig)

# %%
assert len(rows) == len(chosen)
assert any("segm_AP" in r for r in rows.values()), rows  # at least the path trains and evaluates
