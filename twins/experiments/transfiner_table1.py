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
from segbook.reproduce import experiment_context, write_json_atomic

ctx = experiment_context(out_dir, shapes_root, coco_root, seed)
res = {}
if ctx.coco is None:
    print("coco-mini not found: Transfiner Table 1 skipped")
else:
    write_table1_percent(ctx.coco, ctx.tables / "transfiner_table1_percent.md", splits=tuple(splits))
    res = write_table1_oracle(ctx.coco, ctx.tables / "transfiner_table1_oracle.md", split=splits[0])
    print((ctx.tables / "transfiner_table1_percent.md").read_text()); print((ctx.tables / "transfiner_table1_oracle.md").read_text())
write_json_atomic({"profile": profile, "oracle": res}, ctx.out / "results.json")

# %%
if res: assert res["miou_oracle_quadtree"] >= res["miou_coarse_28"]
