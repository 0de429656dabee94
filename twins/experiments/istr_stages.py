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
# # ISTR Fig. 3 on shapes: AP at every refinement stage of one model
#
# > ISTR refines boxes and masks recurrently (Alg. 1); its Fig. 3 reports mask and box AP after each of the
# > N = 6 stages (they rise and saturate in the last two). We train one shapes model (3 stages,
# > `configs/istr_shapes_cpu.yaml`) and evaluate `ISTR.predict(..., stage=k)` for every k.
#
# Not comparable in absolute terms with the paper (COCO, R50/R101-FPN, 36 epochs, 6 stages); the smoke profile
# trains a handful of iterations, so only the shape of the curve under a real schedule (cpu/gpu profiles) means anything.

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

# %%
import torch
import matplotlib.pyplot as plt

from segbook.pipeline import evaluate_model
from segbook.reproduce import experiment_context, train_istr_variant, write_json_atomic, write_table, _repo_root
from segbook.viz import save_figure

ctx = experiment_context(out_dir, shapes_root, coco_root, seed)
run = train_istr_variant(_repo_root() / "configs" / "istr_shapes_cpu.yaml", ctx.shapes, ctx.out / "model",
                         iters, batch_size, eval_images, seed, device)
model, val = run["model"], run["val"]


# %% [markdown]
# `evaluate_model` calls `model.predict(images, sizes, orig_sizes, topk=...)`; a two-line wrapper fixes the stage.

# %%
class AtStage(torch.nn.Module):
    "A view of an ISTR model whose `predict` returns the predictions of stage `k` (0-based; -1 the last)."
    def __init__(self, model, k:int): super().__init__(); self.model, self.k = model, k
    def predict(self, *args, **kw): return self.model.predict(*args, stage=self.k, **kw)

n_stages = model.cfg.num_stages if hasattr(model, "cfg") else 3
per_stage = [evaluate_model(AtStage(model, k), val, run["device"], max_images=eval_images, progress=False,
                            iou_types=("bbox", "segm")) for k in range(n_stages)]
for k, m in enumerate(per_stage): print(f"stage {k + 1}: AP^m {100 * m['segm_AP']:.2f}  AP^b {100 * m['bbox_AP']:.2f}")

# %%
lines = [f"ISTR stage analysis (Fig. 3) on shapes ({profile} profile: {iters} iterations × batch {batch_size}, "
         f"ResNet-18-FPN from scratch, {n_stages} stages, {eval_images} val images).", "",
         "| stage | ours AP^m | ours AP^b |", "|---|---|---|"]
lines += [f"| {k + 1} | {100 * m['segm_AP']:.1f} | {100 * m['bbox_AP']:.1f} |" for k, m in enumerate(per_stage)]
lines += ["", "Paper Fig. 3 (COCO val2017, 6 stages, R50/R101-FPN): AP rises stage by stage and saturates in the last two "
          "(values read only from a plot, not reproduced here)."]
write_table(ctx.tables / "istr_fig3_stages.md", lines)
write_json_atomic({"profile": profile, "iters": iters, "stages": per_stage}, ctx.out / "results.json")

# %%
fig, ax = plt.subplots(figsize=(4.5, 3))
ks = range(1, n_stages + 1)
ax.plot(ks, [100 * m["segm_AP"] for m in per_stage], "o-", label="mask AP")
ax.plot(ks, [100 * m["bbox_AP"] for m in per_stage], "s-", label="box AP")
ax.set_xlabel("stage"); ax.set_ylabel("AP (%)"); ax.set_xticks(list(ks)); ax.legend()
ax.set_title(f"ISTR stages on shapes ({profile}, {iters} it)")
save_figure(fig, "istr_fig3_stages.png"); plt.close(fig)

# %%
assert len(per_stage) == n_stages and all(0 <= m["segm_AP"] <= 1 for m in per_stage)
