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
# # Transfiner Table 1 on coco-mini: how much of a box is incoherent, and what an oracle refinement recovers
#
# > Eq. 1's incoherent share (paper: 14% of the RoI) and the oracle rows (coarse mask 35.5 AP → nodes filled with GT
# > 51.0 AP) measured on coco-mini GT masks with `segbook.incoherent.write_table1_percent` and
# > `segbook.quadtree.write_table1_oracle`. The oracle row is a mask-mIoU proxy without a detector (see the table note).

# %% tags=["parameters"]
profile = "smoke"
out_dir = None
seed = 0
device = "cpu"
shapes_root = "unused"
coco_root = None
splits = ["val2017"]

# %%
from segbook.incoherent import write_table1_percent
from segbook.quadtree import write_table1_oracle
from segbook.reproduce import band_verdict, experiment_context, ranking_verdict, write_json_atomic

ctx = experiment_context(out_dir, shapes_root, coco_root, seed)
res, percent, claims = {}, {}, []
if ctx.coco is None:
    print("coco-mini not found: Transfiner Table 1 skipped")
else:
    percent = write_table1_percent(ctx.coco, ctx.tables / "transfiner_table1_percent.md", splits=tuple(splits))
    res = write_table1_oracle(ctx.coco, ctx.tables / "transfiner_table1_oracle.md", split=splits[0])
    print((ctx.tables / "transfiner_table1_percent.md").read_text()); print((ctx.tables / "transfiner_table1_oracle.md").read_text())

# %% [markdown]
# Two ledger entries. The share of incoherent cells is a measured value (one per split, deterministic): it counts as the
# paper's 14 % when within 2 points. The oracle's direction (GT in the incoherent nodes beats the coarse 28² mask) is the
# paper's 35.5 → 51.0 AP, here as mask mIoU without a detector.

# %%
if percent:
    share = [100 * r["eq1_14"] for r in percent.values()]
    claims.append({"id": "transfiner.table1.incoherent_share", "paper": "Mask Transfiner", "where": "Table 1",
                   "claim": "incoherent regions take ~14 % of the box area", "metric": "% of box cells (Eq. 1 at 14²)",
                   "paper_values": {"share": 14.0}, "ours": {f"coco-mini {sp}": [100 * r["eq1_14"]] for sp, r in percent.items()},
                   "seeds": "deterministic (one value per split)", "profile": profile, "data": "coco-mini GT masks",
                   **band_verdict(share, 14.0, 2.0), "note": "replicated = within 2 points of the paper's value",
                   "table": "figures/tables/transfiner_table1_percent.md",
                   "command": f"segbook reproduce --profile {profile} --only transfiner_table1 --data ../shared/coco-mini"})
if res:
    claims.append({"id": "transfiner.table1.oracle_fill", "paper": "Mask Transfiner", "where": "Table 1",
                   "claim": "filling the incoherent regions with GT beats the coarse mask (35.5 -> 51.0 AP)", "metric": "mask mIoU (proxy, no detector)",
                   "paper_values": {"oracle": 51.0, "coarse": 35.5},
                   "ours": {"oracle": [100 * res["miou_oracle_quadtree"]], "coarse": [100 * res["miou_coarse_28"]]},
                   "seeds": "deterministic", "profile": profile, "data": f"coco-mini {splits[0]} GT masks",
                   **ranking_verdict([100 * res["miou_oracle_quadtree"]], [100 * res["miou_coarse_28"]], 51.0, 35.5, min_seeds=1),
                   "table": "figures/tables/transfiner_table1_oracle.md",
                   "command": f"segbook reproduce --profile {profile} --only transfiner_table1 --data ../shared/coco-mini"})
write_json_atomic({"profile": profile, "oracle": res, "percent": percent, "claims": claims}, ctx.out / "results.json")

# %%
if res: assert res["miou_oracle_quadtree"] >= res["miou_coarse_28"]
