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
# # Appendix: drawing instances and saving figures
#
# > Overlays of masks and boxes (torchvision's drawing utilities) and one place that decides where the book's figures go.

# %%
#| default_exp viz

# %%
#| export
import os
from pathlib import Path

from segbook.io import atomic_write

import numpy as np
import torch
from torchvision.utils import draw_bounding_boxes, draw_segmentation_masks


# %% [markdown]
# ## Where figures go
#
# Chapters and experiment notebooks save into the repository's `figures/` folder, found by walking up
# from the working directory to the `pyproject.toml` that has a `[tool.nbdev]` table.
# `SEGBOOK_FIGURES` overrides it: `segbook reproduce` points it at its output folder so a run never
# writes into the checkout unless asked to.

# %%
#| export
def figures_dir() -> Path:
    "The folder figures are saved to: `$SEGBOOK_FIGURES`, else `<repo>/figures`, else `./figures`."
    if os.environ.get("SEGBOOK_FIGURES"):
        return Path(os.environ["SEGBOOK_FIGURES"])
    for d in [Path.cwd(), *Path.cwd().parents]:
        pp = d / "pyproject.toml"
        if pp.exists() and "[tool.nbdev]" in pp.read_text(errors="ignore") and (d / "nbs").is_dir():
            return d / "figures"
    return Path.cwd() / "figures"

def write_figure(fig, path, # a matplotlib figure and the file to write (format from the suffix, default png)
                 dpi:int=110) -> Path:
    "Save `fig` to `path` through a uniquely named temp file in the same folder, then rename (atomic)."
    out = Path(path)
    fmt = out.suffix.lstrip(".") or "png"
    return atomic_write(out, lambda f: fig.savefig(f, dpi=dpi, bbox_inches="tight", format=fmt,
                                                   metadata={"Software": None} if fmt == "png" else None), "wb")

def save_figure(fig, name:str, # file name without folder, e.g. 'data_shapes_grid.png'
                dpi:int=110) -> Path:
    "Save a matplotlib `fig` into `figures_dir()` (`write_figure`: temp file, then rename), show it in a notebook, return the path."
    path = write_figure(fig, figures_dir() / name, dpi)
    show_in_notebook(path)
    return path

def show_in_notebook(path):
    "Display a saved image below the cell when running in IPython (a chapter, its site page); nothing elsewhere."
    try:
        from IPython import get_ipython
        from IPython.display import Image, display
    except ImportError:
        return
    if get_ipython() is not None:
        display(Image(filename=str(path)))


# %% [markdown]
# ## Overlays
#
# `draw_instances` is what `segbook data browse` and `segbook predict` render: one colour per
# instance, a box, and `class (score)` as its label. It wraps torchvision's
# `draw_segmentation_masks` and `draw_bounding_boxes` so the drawing is theirs, not ours.

# %%
#| export
def instance_colors(n:int, seed:int=0) -> list:
    "`n` distinct, saturated RGB colours (a fixed golden-ratio walk round the hue circle)."
    import colorsys
    return [tuple(int(255 * c) for c in colorsys.hsv_to_rgb((seed * 0.17 + i * 0.618034) % 1.0, 0.85, 0.95))
            for i in range(n)]

def draw_instances(image, # [3,H,W] uint8 tensor or [H,W,3] uint8 array
                   masks=None, # [N,H,W] bool/0-1
                   boxes=None, # [N,4] xyxy pixels
                   labels=None, # N strings
                   alpha:float=0.5) -> np.ndarray:
    "Overlay instance masks, boxes and labels on `image`; returns an [H,W,3] uint8 array."
    img = torch.as_tensor(np.array(image)) if not torch.is_tensor(image) else image
    if img.ndim == 3 and img.shape[-1] == 3 and img.shape[0] != 3:
        img = img.permute(2, 0, 1)
    img = img.to(torch.uint8).contiguous()
    n = len(masks) if masks is not None else (len(boxes) if boxes is not None else 0)
    colors = instance_colors(n)
    if masks is not None and n:
        img = draw_segmentation_masks(img, torch.as_tensor(np.array(masks)).bool(), alpha=alpha, colors=colors)
    if boxes is not None and n:
        img = draw_bounding_boxes(img, torch.as_tensor(np.asarray(boxes), dtype=torch.float32),
                                  labels=list(labels) if labels is not None else None, colors=colors, width=1)
    return img.permute(1, 2, 0).numpy()


# %% [markdown]
# ## Example

# %%
img = np.full((64, 64, 3), 40, np.uint8)
m = np.zeros((2, 64, 64), bool); m[0, 8:30, 8:30] = True; m[1, 30:60, 20:50] = True
out = draw_instances(img, m, [[8, 8, 30, 30], [20, 30, 50, 60]], ["square", "box"])
assert out.shape == (64, 64, 3) and out.dtype == np.uint8
assert (out[20, 20] != img[20, 20]).any() and (out[2, 2] == img[2, 2]).all()  # inside tinted, outside untouched
