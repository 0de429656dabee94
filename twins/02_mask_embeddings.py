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
# # Mask embeddings
#
# > ISTR §3.1: a mask of s×s pixels is regressed as a short vector r = g(m) and read back as f(r). With a linear g and f the best pair has a closed form, PCA (Eqs. 1–3, Fig. 1).

# %%
#| default_exp embeddings

# %%
#| export
import json
import math
import os
import sys
import time
import warnings
from collections import defaultdict
from pathlib import Path

from segbook.io import torch_save_atomic, write_markdown_table, write_text_atomic
from segbook.data import iter_coco_masks

import numpy as np
import torch
from torch import nn
from torchvision.ops import box_convert, roi_align

# %% [markdown]
# ISTR does not regress a 28×28 mask directly. It regresses an l-dimensional embedding r and
# reconstructs the mask with a fixed decoder. The paper asks encoder g and decoder f to keep as much
# information about the masks M as possible,
#
# $$\max \mathcal{I}(M, f(g(M))), \qquad (1)$$
#
# which it relaxes to the reconstruction objective over n training masks m_i ∈ ℝ^{s²}
#
# $$\min \sum_{i=1}^n \|m_i - f(r_i)\|_2^2, \quad r_i = g(m_i). \qquad (2)$$
#
# With a linear codec through one matrix D ∈ ℝ^{s²×l}, f(g(m)) = D Dᵀ m, and orthonormal columns
# (the paper prints "DDᵀ = I_l"; the l×l identity is DᵀD), Eq. 2 becomes
#
# $$D^* = \arg\min_D \sum_{i=1}^n \|m_i - D D^\top m_i\|_2^2, \qquad (3)$$
#
# whose solution is the top-l eigenvectors of the second-moment matrix Σ_i m_i m_iᵀ: PCA without
# centring. The official code (see `method-details.md` §1) differs in three ways, each a switch here:
# it subtracts a mean (`mean=True`), whitens (`whiten=True`) and fits in a noisy-logit domain
# (`logit=True`).
#
# This chapter builds the pieces in the order data flows: crop each mask to its box (§ Cropping),
# stream masks out of a COCO file (§ Reading), accumulate moments (§ Streaming moments), solve Eq. 3
# (§ PCA), measure (§ Energy, § Reconstruction), store (§ Saving), and compares PCA with two other
# codecs Eq. 2 admits: a fixed DCT basis and a small learned autoencoder.

# %%
import matplotlib
matplotlib.use("Agg")
import matplotlib.pyplot as plt
from segbook.viz import save_figure, figures_dir

torch.manual_seed(0)
# The tensors here are small: one thread avoids OpenMP oversubscription when several notebooks
# (nbdev-test) or users share a few cores, which made the autoencoder cells ~10x slower.
torch.set_num_threads(1)

from segbook.data import find_coco_mini

COCO_MINI = find_coco_mini() or Path("shared/coco-mini")  # absent: the cells that need it skip
COCO_MINI.exists()


# %% [markdown]
# ## Cropping a mask to its box
#
# Each instance mask is cut out along its ground-truth box and resampled to s×s (s = 28). The
# official code does this with detectron2's `crop_and_resize`, which for bitmasks is RoIAlign
# (`aligned=True`) followed by a 0.5 threshold. torchvision's `roi_align` does the same on a batch:
# mask i is image i of the input and box i its RoI, so all instances of an image are cropped in one
# call. A box with zero width or height has no inside; its row comes back as zeros, and the readers
# below skip it with a counted warning.

# %%
#| export
def crop_and_resize_masks(masks:torch.Tensor, # [N,H,W] uint8/bool/float masks of one image
                          boxes:torch.Tensor, # [N,4] xyxy boxes in the masks' pixels
                          size:int=28, # output side s
                          threshold:float|None=0.5, # binarise at this value (detectron2); None keeps RoIAlign's soft values
                         ) -> torch.Tensor: # [N,s,s] float
    "Crop mask i to box i and resample it to `size`×`size` with `roi_align(aligned=True)`; zero-area boxes give zeros."
    n = masks.shape[0]
    if n == 0:
        return masks.new_zeros((0, size, size), dtype=torch.float32)
    boxes = boxes.to(device=masks.device, dtype=torch.float32)
    index = torch.arange(n, device=masks.device, dtype=torch.float32)[:, None]
    crops = roi_align(masks[:, None].float(), torch.cat([index, boxes], 1), (size, size),
                      spatial_scale=1.0, sampling_ratio=0, aligned=True)[:, 0]
    if threshold is not None:
        crops = (crops >= threshold).float()
    has_area = (boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1])
    return crops * has_area[:, None, None]


# %%
m = torch.zeros(3, 40, 60, dtype=torch.uint8)
m[0, 10:30, 20:40] = 1                      # a square filling its box
m[1, 0:20, 0:60] = 1; m[1, 0:10, 30:60] = 0 # an L shape
crops = crop_and_resize_masks(m, torch.tensor([[20., 10, 40, 30], [0, 0, 60, 20], [5, 5, 5, 9]]), size=8)
crops[1]

# %%
assert crops.shape == (3, 8, 8) and crops.dtype == torch.float32
assert (crops[0] == 1).all()                         # the square fills its own box
assert crops[1][:4, 4:].sum() == 0 and crops[1][4:].sum() == 32  # L: top-right quarter empty, bottom half full
assert (crops[2] == 0).all()                         # zero-width box -> zeros
soft = crop_and_resize_masks(m[:1], torch.tensor([[15., 10, 40, 30]]), size=8, threshold=None)
assert ((soft > 0) & (soft < 1)).any() and soft.max() == 1   # the mask edge cuts through bins: soft values kept
assert crop_and_resize_masks(m[:0], torch.zeros(0, 4)).shape == (0, 28, 28)

# %% [markdown]
# ## Masks from a COCO file
#
# The PCA is fitted on GT masks cropped to their boxes at s×s: `segbook.data.iter_coco_masks` (chapter 01) streams
# them from an annotation file in batches, with its checks and counted skips. On coco-mini:

# %%
if COCO_MINI.exists():
    coco_stats = {}
    coco_train = torch.cat(list(iter_coco_masks(COCO_MINI / "annotations/instances_train2017.json", stats=coco_stats, progress=False)))
    coco_val = torch.cat(list(iter_coco_masks(COCO_MINI / "annotations/instances_val2017.json", progress=False)))
    print(coco_stats, coco_train.shape, coco_val.shape)

# %%
if COCO_MINI.exists():
    assert coco_train.dtype == torch.uint8 and coco_train.shape[1:] == (28, 28)
    assert coco_stats["used"] == len(coco_train) and coco_stats["crowd"] == 6
    assert coco_stats["used"] + coco_stats["crowd"] + coco_stats["skipped_empty_mask"] + coco_stats["skipped_zero_area_box"] \
        + coco_stats["skipped_degenerate_polygon"] == coco_stats["instances"] == 746
    assert coco_train.flatten(1).any(1).all()          # no empty crops reach the fit
    # a mask fills much of its own tight box: the mean foreground fraction is far from 0 and 1
    assert 0.3 < coco_train.float().mean() < 0.9


# %% [markdown]
# ## The official pre-transform: noisy logits
#
# With `logit=True` the codec works on logits instead of 0/1 pixels, as the official code does:
# draw u = max(0.05·U(0,1), 0.01) per pixel, map 1 → 1−u and 0 → u, and take the inverse sigmoid.
# Foreground then lies in [2.94, 4.60] and background in [−4.60, −2.94]; decoding applies a sigmoid.
# The noise is drawn anew on every call (also when training encodes a GT mask); pass a seeded
# `generator` to make it repeatable.

# %%
#| export
def noisy_logit(masks:torch.Tensor, # [...] binary masks (0/1, any dtype)
                generator:torch.Generator|None=None, # source of the noise u (its device is used for drawing)
               ) -> torch.Tensor: # [...] float logits, same dtype as `masks` if floating, else float32
    "The official noisy logit: log(p/(1-p)) with p = 1-u on foreground and u on background, u = max(0.05·U(0,1), 0.01)."
    dtype = masks.dtype if masks.is_floating_point() else torch.float32
    gen_device = generator.device if generator is not None else masks.device
    u = (0.05 * torch.rand(masks.shape, generator=generator, device=gen_device, dtype=dtype)).clamp_min(0.01).to(masks.device)
    return torch.logit(torch.where(masks >= 0.5, 1 - u, u))


# %%
z = noisy_logit(torch.tensor([[0., 1.], [1., 0.]]), torch.Generator().manual_seed(0))
z

# %%
big = noisy_logit((torch.rand(1000, 28 * 28) > 0.5).float())
assert big.abs().min() >= math.log(0.95 / 0.05) - 1e-5 and big.abs().max() <= math.log(0.99 / 0.01) + 1e-5
assert (z[0, 1] > 0) and (z[0, 0] < 0)
assert not torch.equal(noisy_logit(torch.ones(50)), noisy_logit(torch.ones(50)))   # fresh noise per call


# %% [markdown]
# ## Streaming moments
#
# Eq. 3 needs only the second-moment matrix MᵀM = Σ m_i m_iᵀ (784×784 for s = 28); the centred
# variant needs the count and the sum as well. These three add up over batches, so a fit over any
# number of masks holds one 784×784 float64 matrix and one batch, never the whole data set
# (sklearn's `IncrementalPCA`, which the official code uses, instead keeps a running SVD).
#
# For 0/1 masks (integer or bool tensors) the sums are integer counts, and float32 holds every
# integer up to 2²⁴ exactly. So each block of at most `block` masks is converted to float32 once,
# multiplied in float32 (one BLAS `sgemm`, several times faster than float64 on a CPU), summed in
# float32, and only the 784×784 result is added into the float64 totals: the moments are exactly the
# float64 ones, at float32 speed. The block also bounds the extra memory (one float32 block, not a
# float copy of the whole batch). Float inputs (soft masks, logits) are accumulated in float64.

# %%
#| export
class MaskMoments:
    "Running count, sum and second moment Σ x xᵀ (float64) of flattened s×s masks; memory O(s⁴), independent of N."
    def __init__(self, size:int=28, # mask side s
                 logit:bool=False, # accumulate noisy logits instead of 0/1 pixels (official code)
                 seed:int=0, # seed of the logit noise
                 device=None, # where the sums live (default CPU)
                ):
        self.size, self.logit, self.dim = size, logit, size * size
        self.count = 0
        self.sum = torch.zeros(self.dim, dtype=torch.float64, device=device)
        self.second = torch.zeros(self.dim, self.dim, dtype=torch.float64, device=device)
        self.generator = torch.Generator().manual_seed(seed)

    def update(self, masks:torch.Tensor, # [N,s,s] or [N,s²] masks (uint8/bool 0/1, or float)
               block:int=8192, # masks converted and multiplied at a time (integer input; must stay below 2²⁴)
              ) -> "MaskMoments":
        "Add a batch of masks to the running sums."
        x = masks.reshape(len(masks), -1)
        if x.shape[1] != self.dim:
            raise ValueError(f"MaskMoments(size={self.size}) expects {self.dim} pixels per mask, got {x.shape[1]}")
        dev = self.second.device
        if self.logit or x.is_floating_point():
            x = x.to(dev, torch.float64)
            if self.logit:
                x = noisy_logit(x, self.generator)
            self.second += x.T @ x
            self.sum += x.sum(0)
        else:                                        # 0/1 counts: exact in float32 per block
            for part in x.split(min(block, 2**24 - 1)):
                f = part.to(dev, torch.float32)
                self.second += f.T @ f
                self.sum += f.sum(0)
        self.count += len(x)
        return self


# %%
mm = MaskMoments(size=4).update(torch.eye(4).repeat(3, 1, 1).to(torch.uint8))
assert mm.count == 3 and mm.second.dtype == torch.float64
assert mm.second[0, 0] == 3 and mm.second[0, 5] == 3 and mm.second[0, 1] == 0   # pixel (0,0) and (1,1) co-occur in all 3
a = torch.rand(50, 3, 3) > 0.5
one_shot, streamed = MaskMoments(3).update(a), MaskMoments(3).update(a[:20]).update(a[20:])
assert torch.equal(one_shot.second, streamed.second) and torch.equal(one_shot.sum, streamed.sum)


# %% [markdown]
# ## PCA in closed form (Eq. 3)
#
# The minimiser of Eq. 3 is D = the l eigenvectors of the moment matrix with the largest
# eigenvalues, since Σ‖m − DDᵀm‖² = tr(MᵀM) − tr(Dᵀ MᵀM D). `principal_axes` computes all of them
# with `torch.linalg.eigh` in float64, sorts by decreasing eigenvalue, and fixes each vector's sign
# (largest entry positive) so fits are repeatable. With `mean=True` it decomposes the covariance
# (MᵀM − n μμᵀ)/(n−1) instead, which is textbook PCA and what `IncrementalPCA` fits.

# %%
#| export
def principal_axes(moments:MaskMoments, # accumulated sums
                   mean:bool=False, # centre first (covariance) instead of the paper's uncentred second moment
                  ) -> tuple: # (eigenvalues [d] descending, axes [d,d] one per row, mean [d]) in float64
    "Eigendecomposition solving Eq. 3: all principal axes of the (centred or uncentred) second moment, largest first."
    n = moments.count
    if n == 0:
        raise ValueError("principal_axes: no masks were accumulated")
    if mean:
        mu = moments.sum / n
        matrix = (moments.second - n * torch.outer(mu, mu)) / max(n - 1, 1)
    else:
        mu = torch.zeros_like(moments.sum)
        matrix = moments.second / n
    evals, evecs = torch.linalg.eigh(matrix)
    evals, axes = evals.flip(0).clamp_min(0), evecs.flip(1).T
    sign = torch.sign(axes.gather(1, axes.abs().argmax(1, keepdim=True)))
    return evals, axes * torch.where(sign == 0, 1.0, sign).to(axes.dtype), mu


# %% [markdown]
# `PCACodec` holds the solution as buffers and is an ordinary `nn.Module`: `encode` is r = Dᵀ(m − μ)/σ
# and `decode_raw` is m̂ = D(σ ⊙ r) + μ, where μ = 0 and σ = 1 in the paper's formulation, μ is the mean
# with `mean=True`, and σ = √eigenvalue with `whiten=True`. `decode` turns the raw output into
# probabilities: a clamp to [0,1] in the binary domain, a sigmoid in the logit domain. Both are plain
# batched tensor algebra, so gradients flow to r (ISTR's dice loss needs that) on any device/dtype.

# %%
#| export
class PCACodec(nn.Module):
    "The linear mask codec of Eq. 3: `encode` masks [N,s,s] → [N,l], `decode` [N,l] → [N,s,s] probabilities."
    def __init__(self, components:torch.Tensor, # [l,s²] orthonormal rows (Dᵀ)
                 mean:torch.Tensor, # [s²] subtracted before encoding (zeros: the paper)
                 scale:torch.Tensor, # [l] embedding scale σ (ones: the paper; √eigenvalue: whitened)
                 eigenvalues:torch.Tensor, # [s²] all eigenvalues, largest first (for `energy`)
                 size:int, # mask side s
                 logit:bool=False, # codec works on noisy logits (official code)
                 meta:dict|None=None, # provenance stored with the codec
                ):
        super().__init__()
        self.register_buffer("components", components)
        self.register_buffer("mean", mean)
        self.register_buffer("scale", scale)
        self.register_buffer("eigenvalues", eigenvalues)
        self.size, self.logit, self.meta = size, logit, dict(meta or {})

    @property
    def dim(self) -> int: return self.components.shape[0]
    @property
    def centred(self) -> bool: return bool(self.meta.get("mean", False))
    @property
    def whitened(self) -> bool: return bool(self.meta.get("whiten", False))

    @classmethod
    def from_moments(cls, moments:MaskMoments, # accumulated masks
                     dim:int=60, # embedding dimension l
                     mean:bool=False, # subtract the mean (official code)
                     whiten:bool=False, # divide embeddings by √eigenvalue (official code)
                     dtype=torch.float32, # dtype of the buffers
                     meta:dict|None=None, # extra provenance
                    ) -> "PCACodec":
        "Solve Eq. 3 on `moments` and keep the top `dim` axes."
        if not 1 <= dim <= moments.dim:
            raise ValueError(f"dim must be in 1..{moments.dim} for {moments.size}x{moments.size} masks, got {dim}")
        evals, axes, mu = principal_axes(moments, mean)
        scale = evals[:dim].sqrt().clamp_min(1e-6) if whiten else torch.ones(dim, dtype=torch.float64)
        info = dict(meta or {}, mean=mean, whiten=whiten, logit=moments.logit, n_masks=moments.count)
        return cls(axes[:dim].to(dtype), mu.to(dtype), scale.to(dtype), evals.to(dtype), moments.size, moments.logit, info)

    @classmethod
    def random_orthonormal(cls, size:int=28, # mask side s
                           dim:int=16, # embedding dimension l (l = s² gives decode(encode(m)) == m)
                           seed:int=0) -> "PCACodec":
        "A paper-mode codec on a random orthonormal basis, no data needed: for examples, tests and benchmarks."
        g = torch.Generator().manual_seed(seed)
        axes = torch.linalg.qr(torch.randn(size * size, dim, generator=g))[0].T.contiguous()   # [l,s²] orthonormal rows
        return cls(axes, torch.zeros(size * size), torch.ones(dim), torch.ones(size * size), size,
                   meta={"source": f"random orthonormal basis (seed {seed})"})

    def truncate(self, dim:int, # new embedding dimension l' ≤ l
                ) -> "PCACodec":
        "The same codec keeping only the first `dim` axes (the Eq. 3 solution for l' = dim: axes are nested)."
        if not 1 <= dim <= self.dim:
            raise ValueError(f"truncate: dim must be in 1..{self.dim}, got {dim}")
        return type(self)(self.components[:dim], self.mean, self.scale[:dim], self.eigenvalues, self.size, self.logit, self.meta)

    def encode(self, masks:torch.Tensor, # [N,s,s] 0/1 masks (any dtype)
               generator:torch.Generator|None=None, # noise source for the logit domain
              ) -> torch.Tensor: # [N,l]
        "g(m) = Dᵀ(t(m) − μ)/σ, t = identity (paper) or the noisy logit (official)."
        x = masks.flatten(1).to(self.components.dtype)  # (flatten: also for N = 0)
        if self.logit:
            x = noisy_logit(x, generator)
        on_cpu = x.device.type == "cpu"   # there a zero mean / unit scale is cheap to detect (no device sync) and skipped
        if not (on_cpu and not self.mean.any()):
            x = x - self.mean
        r = x @ self.components.T
        return r if on_cpu and bool((self.scale == 1).all()) else r / self.scale

    def decode_raw(self, r:torch.Tensor, # [N,l] embeddings
                  ) -> torch.Tensor: # [N,s,s] pixel values (binary domain) or logits (logit domain)
        "f(r) = D(σ ⊙ r) + μ, before any squashing."
        return ((r * self.scale) @ self.components + self.mean).reshape(r.shape[0], self.size, self.size)

    def decode(self, r:torch.Tensor, # [N,l] embeddings
              ) -> torch.Tensor: # [N,s,s] probabilities in [0,1]
        "Reconstructed masks as probabilities: clamp (binary domain) or sigmoid (logit domain)."
        raw = self.decode_raw(r)
        return raw.sigmoid() if self.logit else raw.clamp(0, 1)

    def forward(self, masks:torch.Tensor) -> torch.Tensor:
        "decode(encode(masks))"
        return self.decode(self.encode(masks))

    def energy_curve(self) -> torch.Tensor:
        "[s²] (or [K] for a basis that ships only K eigenvalues) cumulative fraction of the second moment (variance when centred) captured by the first k axes."
        ev = self.eigenvalues.double()
        return ev.cumsum(0) / self.meta.get("total_variance", ev.sum())

    def energy(self, l:int|None=None) -> float:
        "Fraction of the second moment (variance when centred) captured by the first `l` axes (default: the codec's)."
        return float(self.energy_curve()[(l or self.dim) - 1])

    def save(self, path, # file to write (.pt)
            ) -> Path:
        "Write the codec to one file (temp file + rename) and return its path."
        from segbook import __version__
        path = Path(path)
        state = {k: v.detach().cpu() for k, v in self.state_dict().items()}
        torch_save_atomic(dict(format="segbook.PCACodec", version=1, size=self.size, dim=self.dim, logit=self.logit,
                                meta=dict(self.meta, segbook_version=__version__), **state), path)
        return path

    @classmethod
    def from_official_npz(cls, path, # official ISTR basis `..._{K}_siz28.npz` (keys components_c, mean_c, explained_variance_c, ratio_c)
                          dtype=torch.float32, # dtype of the buffers
                         ) -> "PCACodec":
        "The official ISTR mask basis (IncrementalPCA, whitened, noisy-logit domain) as a `PCACodec` with the same encode/decode."
        path = Path(path)
        with np.load(path) as z:
            missing = [k for k in ("components_c", "mean_c", "explained_variance_c", "ratio_c") if k not in z.files]
            if missing:
                raise ValueError(f"{path}: not an official ISTR PCA file (lacks field(s) {missing})")
            comp, mean = np.asarray(z["components_c"]), np.asarray(z["mean_c"])
            var, ratio = np.asarray(z["explained_variance_c"]).reshape(-1), np.asarray(z["ratio_c"]).reshape(-1)
        comp, mean = comp.reshape(-1, comp.shape[-1]), mean.reshape(-1)
        size = math.isqrt(comp.shape[-1])
        if size * size != comp.shape[-1] or mean.shape != comp.shape[-1:] or var.shape != comp.shape[:1] or ratio.shape != var.shape:
            raise ValueError(f"{path}: field shapes components_c {comp.shape}, mean_c {mean.shape}, explained_variance_c "
                             f"{var.shape}, ratio_c {ratio.shape} do not describe K axes of s×s masks")
        t = lambda a: torch.from_numpy(a.astype(np.float64)).to(dtype)
        meta = dict(source=str(path.resolve()), mean=True, whiten=True, logit=True, official=True,
                    total_variance=float(var[0]) / float(ratio[0]))
        return cls(t(comp), t(mean), t(np.sqrt(var)), t(var), size, logit=True, meta=meta)

    @classmethod
    def load(cls, path, # file written by `PCACodec.save`, or an official ISTR `.npz` basis
             map_location="cpu", # where the buffers go
            ) -> "PCACodec":
        "Read a codec written by `save` (`torch.load(weights_only=True)`), or an official `.npz` (`from_official_npz`)."
        path = Path(path)
        if path.suffix == ".npz":
            return cls.from_official_npz(path).to(map_location)
        d = torch.load(path, map_location=map_location, weights_only=True)
        if not isinstance(d, dict) or d.get("format") != "segbook.PCACodec":
            raise ValueError(f"{path}: not a segbook PCACodec file (field 'format' is {d.get('format') if isinstance(d, dict) else type(d).__name__})")
        for key in ("components", "mean", "scale", "eigenvalues", "size"):
            if key not in d:
                raise ValueError(f"{path}: PCACodec file lacks field '{key}'")
        return cls(d["components"], d["mean"], d["scale"], d["eigenvalues"], d["size"], d.get("logit", False), d.get("meta"))


# %%
def random_boxes_masks(n, s=28, seed=0):
    "n masks of s×s: random axis-aligned ellipses, a toy stand-in for object masks."
    g = torch.Generator().manual_seed(seed)
    c = torch.rand(n, 2, generator=g) * 0.4 + 0.3
    r = torch.rand(n, 2, generator=g) * 0.3 + 0.2
    yy, xx = torch.meshgrid(torch.linspace(0, 1, s), torch.linspace(0, 1, s), indexing="ij")
    return ((((xx - c[:, :1, None]) / r[:, :1, None]) ** 2 + ((yy - c[:, 1:, None]) / r[:, 1:, None]) ** 2) <= 1).to(torch.uint8)

toy = random_boxes_masks(2000)
toy_moments = MaskMoments().update(toy)
codec = PCACodec.from_moments(toy_moments, dim=20)
r = codec.encode(toy[:5])
r.shape, codec.energy(), codec.energy(5)

# %%
D = codec.components.double()
assert torch.allclose(D @ D.T, torch.eye(20, dtype=torch.float64), atol=1e-5)          # DᵀD = I_l
assert (codec.eigenvalues[:-1] >= codec.eigenvalues[1:]).all()                          # largest first
full = PCACodec.from_moments(toy_moments, dim=784, dtype=torch.float64)
assert torch.allclose(full.decode_raw(full.encode(toy[:50])), toy[:50].double(), atol=1e-9)  # l = s²: exact
# Eq. 3 holds: the PCA basis beats a random orthonormal basis of the same size on the fit data
def eq2_error(codec, m): return ((codec.decode_raw(codec.encode(m)) - m.float()) ** 2).sum().item()
q, _ = torch.linalg.qr(torch.randn(784, 20))
rand_codec = PCACodec(q.T.contiguous(), torch.zeros(784), torch.ones(20), torch.ones(784), 28)
assert eq2_error(codec, toy) < 0.5 * eq2_error(rand_codec, toy)
# and its error is exactly the uncaptured energy: Σ‖m − DDᵀm‖² = n·Σ_{k>l} λ_k
assert abs(eq2_error(codec, toy) / len(toy) - codec.eigenvalues[20:].double().sum().item()) < 1e-2 * codec.eigenvalues[20:].sum().item()

# %% [markdown]
# The switches do what they say: whitened embeddings have unit variance (centred) or unit second
# moment (uncentred) on the fit data; the logit codec encodes noisy logits and decodes with a
# sigmoid; gradients reach the embedding.

# %%
cw = PCACodec.from_moments(toy_moments, dim=20, mean=True, whiten=True)
rw = cw.encode(toy)
assert torch.allclose(rw.var(0), torch.ones(20), atol=1e-3) and rw.mean(0).abs().max() < 1e-3
assert torch.allclose(PCACodec.from_moments(toy_moments, 20, whiten=True).encode(toy).pow(2).mean(0), torch.ones(20), atol=1e-3)
assert codec.energy(20) != cw.energy(20)                                  # variance vs second moment
lg = PCACodec.from_moments(MaskMoments(logit=True).update(toy), dim=40)
assert lg.logit and lg.encode(toy[:3]).abs().max() > 10                   # logits are large numbers
assert ((lg.decode(lg.encode(toy[:200])) >= 0.5) == toy[:200].bool()).float().mean() > 0.95
r = codec.encode(toy[:4]).requires_grad_()
codec.decode(r).sum().backward()
assert r.grad is not None and r.grad.abs().sum() > 0

# %% [markdown]
# ## Saving and loading
#
# One file holds the codec: `torch.save` of a plain dict (buffers, s, l, switches, and provenance:
# source file, split, mask count, segbook version), written to a temp file and renamed.
# `PCACodec.load` reads it back with `weights_only=True`.

# %%
import tempfile
with tempfile.TemporaryDirectory() as d:
    p = cw.save(Path(d) / "codec.pt")
    back = PCACodec.load(p)
    assert [f.name for f in Path(d).iterdir()] == ["codec.pt"]           # no temporary file left beside it
assert back.whitened and back.centred and back.dim == 20 and back.meta["n_masks"] == 2000 and "segbook_version" in back.meta
assert torch.equal(back.encode(toy[:10]), cw.encode(toy[:10]))

# %% [markdown]
# ## The official ISTR bases
#
# The official code ships four fitted bases (l = 40, 60, 80, 100; COCO train2017, the first 100,000
# non-crowd masks, `IncrementalPCA(whiten=True)` on noisy logits; `../shared/istr-official-pca/README.md`).
# `PCACodec.from_official_npz` reads one as a codec with μ = `mean_c`, D = `components_c` and
# σ = √`explained_variance_c`, so `encode` is the official (softened_logit(m) − μ)·Dᵀ/σ and `decode`
# the official sigmoid(r·(σ ⊙ D) + μ); `PCACodec.load` accepts the `.npz` directly, so a config's
# `codec_path` can name one. The file keeps only K eigenvalues, so the codec's energy is relative
# to the total variance implied by `ratio_c` (explained-variance ratios): `energy(60)` = Σ ratio_c.
# `find_official_pca` locates the folder the way `find_coco_mini` does.

# %%
#| export
OFFICIAL_PCA_NAME = "coco_2017_train_class_agnosticTrue_whitenTrue_sigmoidTrue_{dim}_siz28.npz"

def find_official_pca(start=None, # where to start looking (default: the working directory)
                     ) -> Path|None:
    "`$SEGBOOK_ISTR_PCA`, else the first `shared/istr-official-pca` beside `start` or one of its parents; None if absent."
    from segbook.data import find_shared
    return find_shared("istr-official-pca", "SEGBOOK_ISTR_PCA", start=start)


# %%
OFFICIAL_PCA = find_official_pca()
official_bases = {}
if OFFICIAL_PCA is not None:
    official_bases = {k: PCACodec.load(OFFICIAL_PCA / OFFICIAL_PCA_NAME.format(dim=k)) for k in (40, 60, 80, 100)
                      if (OFFICIAL_PCA / OFFICIAL_PCA_NAME.format(dim=k)).exists()}
{k: (c.dim, round(c.energy(), 3)) for k, c in official_bases.items()}

# %% [markdown]
# Encode and decode are the README's formulas (checked in float64, with the softening noise drawn
# from a seeded generator on both sides). How well the bases reconstruct coco-mini masks is in the
# table below and in the `segbook pca-fit --from-npz` example at the end of the chapter.

# %%
if 60 in official_bases:
    path = OFFICIAL_PCA / OFFICIAL_PCA_NAME.format(dim=60)
    z = np.load(path)
    off64 = PCACodec.from_official_npz(path, dtype=torch.float64)
    m = toy[:64]
    r = off64.encode(m, generator=torch.Generator().manual_seed(5))
    u = (0.05 * torch.rand(m.flatten(1).shape, generator=torch.Generator().manual_seed(5), dtype=torch.float64)).clamp_min(0.01).numpy()
    soft = np.where(m.flatten(1).numpy() >= 0.5, 1 - u, u)                         # README: 1 − r if set, else r
    enc = (np.log(soft / (1 - soft)) - z["mean_c"]) @ z["components_c"][0].T / np.sqrt(z["explained_variance_c"])
    dec = 1 / (1 + np.exp(-(r.numpy() @ (z["components_c"][0] * np.sqrt(z["explained_variance_c"][0])[:, None]) + z["mean_c"])))
    assert np.abs(r.numpy() - enc).max() < 1e-6 and np.abs(off64.decode(r).flatten(1).numpy() - dec).max() < 1e-6
    off60 = official_bases[60]
    assert off60.logit and off60.centred and off60.whitened and off60.dim == 60
    assert abs(off60.energy() - float(z["ratio_c"].sum())) < 1e-5
    assert torch.allclose(off60.decode(r.float()).double(), off64.decode(r), atol=1e-5)   # the float32 codec decodes alike


# %% [markdown]
# ## Energy: Fig. 1
#
# Fig. 1 of the paper ranks the top-100 components by energy (eigenvalue) and observes that the
# first few carry most of the mask information. The same curve on real COCO masks (coco-mini
# train2017, ~740 instances) and on the synthetic shapes, and, when `../shared/istr-official-pca` is
# present, the official l = 100 basis fitted on COCO train2017. The official curve is a fraction of
# *variance* (centred, noisy-logit domain, relative to the total variance its `ratio_c` implies), the
# others of the uncentred second moment of 0/1 masks, so the curves' shapes compare, their levels less so:

# %%
#| export
def mask_iou(pred:torch.Tensor, # [N,s,s] bool/0-1
             target:torch.Tensor, # [N,s,s] bool/0-1
            ) -> torch.Tensor: # [N] IoU; two empty masks have IoU 1
    "Per-mask intersection over union of binary masks."
    p, t = pred.flatten(1).bool(), target.flatten(1).bool()
    inter, union = (p & t).sum(1).float(), (p | t).sum(1).float()
    return torch.where(union > 0, inter / union.clamp_min(1), torch.ones_like(union))

def reconstruction_miou(codec:nn.Module, # anything with `encode` [N,s,s]→[N,l] and `decode` [N,l]→[N,s,s] probabilities
                        masks:torch.Tensor, # [N,s,s] 0/1 masks
                        threshold:float=0.5, # binarisation of the decoded mask (ISTR pastes at 0.5)
                        batch:int=8192, # masks per step
                        seed:int=0, # seed of the logit noise, if the codec uses it
                       ) -> float:
    "Mean over masks of IoU(decode(encode(m)) ≥ threshold, m), as the official `mask_evaluation.py` measures it."
    g = torch.Generator().manual_seed(seed)
    total, n = 0.0, 0
    with torch.no_grad():
        for chunk in masks.split(batch):
            kw = {"generator": g} if getattr(codec, "logit", False) else {}
            rec = codec.decode(codec.encode(chunk, **kw)) >= threshold
            total += mask_iou(rec, chunk).double().sum().item(); n += len(chunk)
    return total / max(n, 1)


# %%
assert mask_iou(torch.zeros(1, 4, 4), torch.zeros(1, 4, 4)).item() == 1.0
t = torch.zeros(2, 4, 4); t[:, :2] = 1
p = torch.zeros(2, 4, 4); p[0, :1] = 1; p[1, 2:] = 1
assert torch.allclose(mask_iou(p, t), torch.tensor([0.5, 0.0]))
assert reconstruction_miou(full, toy[:100]) == 1.0 and 0.5 < reconstruction_miou(codec, toy) < 1.0

# %% [markdown]
# The synthetic shapes come from chapter 01's `segbook.shapes` (written here into a temporary
# folder, a few hundred images, seeded). If that module is not available the shapes rows are skipped.

# %%
SIZES = (20, 40, 60, 80, 128, 784)
datasets = {}
if COCO_MINI.exists():
    datasets["coco-mini"] = (coco_train, coco_val)
try:
    from segbook.shapes import write_shapes_dataset
    _shapes_dir = Path(tempfile.mkdtemp(prefix="segbook_shapes_"))
    write_shapes_dataset(_shapes_dir, n_train=150, n_val=50, size=128, seed=0)
    datasets["shapes"] = tuple(torch.cat(list(iter_coco_masks(_shapes_dir / f"annotations/instances_{s}.json", progress=False)))
                               for s in ("train", "val"))
except ImportError:
    print("segbook.shapes not available: shapes rows skipped")
{k: (len(a), len(b)) for k, (a, b) in datasets.items()}

# %%
pca = {name: PCACodec.from_moments(MaskMoments().update(tr), dim=784, dtype=torch.float64) for name, (tr, _) in datasets.items()}
fig, axes = plt.subplots(1, 2, figsize=(9, 3.2))
for name, c in pca.items():
    ev = c.eigenvalues[:100].double()
    axes[0].plot(range(1, 101), (ev / c.eigenvalues.sum()).numpy(), marker=".", ms=3, label=name)
    axes[1].plot(range(1, 101), c.energy_curve()[:100].numpy(), label=name)
if 100 in official_bases:                       # centred (variance), K = 100 eigenvalues only
    c = official_bases[100]
    axes[0].plot(range(1, 101), c.energy_curve().diff(prepend=torch.zeros(1, dtype=torch.float64)).numpy(), marker=".", ms=3,
                 label="PCA official (COCO train2017)")
    axes[1].plot(range(1, 101), c.energy_curve().numpy(), label="PCA official (COCO train2017)")
axes[0].set(yscale="log", xlabel="component (ranked)", ylabel="energy fraction", title="energy per component (Fig. 1)")
axes[1].set(xlabel="components kept l", ylabel="cumulative energy", title="captured energy", ylim=(0, 1.01))
axes[1].axvline(60, color="gray", ls=":", lw=1)
for a in axes: a.legend()
save_figure(fig, "embeddings_energy.png")
{name: {l: round(c.energy(l), 4) for l in (1, 5, 20, 60)} for name, c in pca.items()}

# %%
for name, c in pca.items():
    assert c.energy(60) > 0.9 and c.energy(1) > 0.3           # most of the energy sits in the first components
    assert torch.all(c.energy_curve().diff() >= -1e-12)

# %% [markdown]
# ## Reconstruction
#
# What l buys in mask quality: PCA fitted on train, masks of the other split encoded, decoded,
# thresholded at 0.5, IoU averaged. l = 784 keeps every axis and must be exact.

# %%
if "coco-mini" in pca:
    show = coco_val[:8]
    fig, axes = plt.subplots(4, 8, figsize=(8, 4.4))
    for row, l in enumerate([None, 20, 60, 128]):
        rec = show.float() if l is None else pca["coco-mini"].truncate(l).forward(show)
        for j in range(8):
            axes[row, j].imshow(rec[j].numpy(), cmap="gray", vmin=0, vmax=1); axes[row, j].set_xticks([]); axes[row, j].set_yticks([])
        axes[row, 0].set_ylabel("GT" if l is None else f"l={l}")
    fig.suptitle("coco-mini val masks and their PCA reconstructions (fit on train)")
    save_figure(fig, "embeddings_reconstructions.png")


# %% [markdown]
# ## Beyond the paper: other codecs for Eq. 2
#
# Eq. 2 does not require PCA. Two alternatives with the same `encode`/`decode` interface:
#
# * **DCT**: a fixed, data-free orthonormal basis — the 2-D DCT-II, C M Cᵀ with the orthonormal DCT
#   matrix C, keeping the l lowest-frequency coefficients in JPEG zig-zag order. torch has no DCT, so
#   C is built here from its definition C[k,i] = a_k cos(π(2i+1)k / 2s) (checked against `scipy.fft.dctn`).
# * **Autoencoder**: a small MLP s² → 128 → l → 128 → s² with a sigmoid output, trained on the fit
#   split with Adam on the Eq. 2 objective (squared error). Nonlinear, so it can in principle beat PCA
#   at equal l; trained briefly on CPU here (300 steps of 256 masks, a few seconds), and only for
#   l ∈ {20, 60} to keep the chapter under a minute.

# %%
#| export
def dct_matrix(n:int, # transform length
               dtype=torch.float64) -> torch.Tensor: # [n,n] orthonormal DCT-II matrix C (y = C x)
    "C[k,i] = a_k·cos(π(2i+1)k/2n), a_0 = √(1/n), a_k = √(2/n): the orthonormal DCT-II (scipy's `norm='ortho'`)."
    k = torch.arange(n, dtype=dtype)[:, None]
    i = torch.arange(n, dtype=dtype)[None, :]
    c = torch.cos(math.pi * (2 * i + 1) * k / (2 * n)) * math.sqrt(2 / n)
    c[0] = c[0] / math.sqrt(2)
    return c

def zigzag_order(s:int) -> torch.Tensor: # [s²] flat indices u·s+v, lowest frequency first
    "JPEG zig-zag order of an s×s coefficient grid: by u+v, alternating direction along each anti-diagonal."
    return torch.tensor(sorted(range(s * s), key=lambda k: (k // s + k % s, k % s if (k // s + k % s) % 2 == 0 else k // s)))

class DCTCodec(nn.Module):
    "A fixed linear codec: the l lowest-frequency 2-D DCT-II coefficients of a mask."
    def __init__(self, size:int=28, # mask side s
                 dim:int=60, # coefficients kept l
                 dtype=torch.float32):
        super().__init__()
        self.size, self.logit = size, False
        self.register_buffer("dct", dct_matrix(size).to(dtype))
        self.register_buffer("order", zigzag_order(size)[:dim])

    @property
    def dim(self) -> int: return self.order.numel()

    def encode(self, masks:torch.Tensor) -> torch.Tensor: # [N,s,s] → [N,l]
        "Low-frequency coefficients of C M Cᵀ."
        m = masks.to(self.dct.dtype)
        return (self.dct @ m @ self.dct.T).flatten(1)[:, self.order]

    def decode_raw(self, r:torch.Tensor) -> torch.Tensor: # [N,l] → [N,s,s]
        "Cᵀ X C with the dropped coefficients set to zero."
        x = r.new_zeros(r.shape[0], self.size * self.size).index_copy(1, self.order, r)
        return self.dct.T @ x.reshape(-1, self.size, self.size) @ self.dct

    def decode(self, r:torch.Tensor) -> torch.Tensor:
        "Reconstruction clamped to [0,1]."
        return self.decode_raw(r).clamp(0, 1)


# %%
import scipy.fft
x = torch.rand(3, 6, 6, dtype=torch.float64)
C = dct_matrix(6)
assert torch.allclose(C @ C.T, torch.eye(6, dtype=torch.float64), atol=1e-12)
assert np.allclose((C @ x @ C.T).numpy(), scipy.fft.dctn(x.numpy(), type=2, axes=(1, 2), norm="ortho"))
assert zigzag_order(3).tolist() == [0, 1, 3, 6, 4, 2, 5, 7, 8]    # (0,0) (0,1) (1,0) (2,0) (1,1) (0,2) ...
dc = DCTCodec(6, 36, torch.float64)
assert torch.allclose(dc.decode_raw(dc.encode(x)), x)              # all coefficients: exact
assert torch.allclose(DCTCodec(6, 1, torch.float64).encode(x)[:, 0], x.mean((1, 2)) * 6)  # DC = s·mean


# %%
#| export
class MaskAutoencoder(nn.Module):
    "A small MLP codec s² → hidden → l → hidden → s²; `decode` gives sigmoid probabilities."
    def __init__(self, size:int=28, # mask side s
                 dim:int=60, # embedding dimension l
                 hidden:int=128, # width of the hidden layers
                ):
        super().__init__()
        self.size, self.logit = size, False
        d = size * size
        self.encoder = nn.Sequential(nn.Linear(d, hidden), nn.ReLU(), nn.Linear(hidden, dim))
        self.decoder = nn.Sequential(nn.Linear(dim, hidden), nn.ReLU(), nn.Linear(hidden, d))

    def encode(self, masks:torch.Tensor) -> torch.Tensor: # [N,s,s] → [N,l]
        return self.encoder(masks.flatten(1).float())

    def decode_raw(self, r:torch.Tensor) -> torch.Tensor: # [N,l] → [N,s,s] logits
        return self.decoder(r).reshape(-1, self.size, self.size)

    def decode(self, r:torch.Tensor) -> torch.Tensor: # [N,l] → [N,s,s] probabilities
        return self.decode_raw(r).sigmoid()

def train_autoencoder(masks:torch.Tensor, # [N,s,s] 0/1 training masks
                      dim:int=60, # embedding dimension l
                      steps:int=600, # Adam steps
                      batch:int=256, # masks per step
                      lr:float=3e-3, # Adam learning rate
                      seed:int=0, # init and batch order
                      hidden:int=128, # hidden width
                     ) -> MaskAutoencoder:
    "Fit a `MaskAutoencoder` on the Eq. 2 objective (mean squared reconstruction error of the probabilities)."
    torch.manual_seed(seed)
    model = MaskAutoencoder(masks.shape[-1], dim, hidden)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    x = masks.float()
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        idx = torch.randint(len(x), (min(batch, len(x)),), generator=g)
        loss = (model.decode(model.encode(x[idx])) - x[idx]).pow(2).mean()
        opt.zero_grad(); loss.backward(); opt.step()
    return model.eval()


# %%
ae_toy = train_autoencoder(toy[:1000], dim=8, steps=150)
before = reconstruction_miou(MaskAutoencoder(28, 8), toy[1000:])
after = reconstruction_miou(ae_toy, toy[1000:])
before, after

# %%
assert after > before + 0.3 and after > 0.7      # it learns, and generalises to held-out masks

# %% [markdown]
# ## The table: reconstruction mIoU vs l
#
# Each codec is fitted on the train split and measured on the other split (coco-mini: train2017 →
# val2017; shapes: train → val). PCA is the paper's codec (no mean, no whitening, binary domain); the
# official variant (mean, whitening, noisy logits) is a row of its own. The table is written by the
# code below to `figures/tables/embeddings_miou.md`.

# %%
AE_SIZES = (20, 60)
t0 = time.perf_counter()
rows = []
for name, (tr, te) in datasets.items():
    official = PCACodec.from_moments(MaskMoments(logit=True).update(tr), 784, mean=True, whiten=True)
    codecs = {"PCA (paper)": lambda l: pca[name].truncate(l).float(),
              "PCA official (mean, whiten, logit)": official.truncate,
              "DCT": lambda l: DCTCodec(28, l),
              "AE (MLP, 300 steps)": lambda l: train_autoencoder(tr, l, steps=300) if l in AE_SIZES else None}
    for cname, make in codecs.items():
        row = {"data (fit → test)": f"{name} ({len(tr)} → {len(te)})", "codec": cname}
        for l in SIZES:
            c = make(l)
            row[f"l={l}"] = reconstruction_miou(c, te) if c is not None else "–"
        rows.append(row)
    if name == "coco-mini" and official_bases:            # fitted on COCO train2017 by the official code, tested on the same split
        row = {"data (fit → test)": f"{name} (COCO train2017 → {len(te)})", "codec": "PCA official (COCO train2017)"}
        for l in SIZES:
            row[f"l={l}"] = reconstruction_miou(official_bases[l], te) if l in official_bases else "–"
        rows.append(row)
table_path = write_markdown_table(rows, figures_dir() / "tables" / "embeddings_miou.md",
    "Reconstruction mIoU (threshold 0.5) on held-out masks vs embedding size l; generated by nbs/02_mask_embeddings.ipynb")
print(f"{time.perf_counter() - t0:.1f}s")
print(table_path.read_text())

# %%
by = {(r["data (fit → test)"].split(" ")[0], r["codec"]): r for r in rows}
for name in datasets:
    pca_row, dct_row = by[(name, "PCA (paper)")], by[(name, "DCT")]
    assert pca_row["l=784"] > 0.999 and dct_row["l=784"] > 0.999      # a full orthonormal basis is exact
    assert pca_row["l=60"] >= pca_row["l=20"] > 0.5
    assert pca_row["l=20"] > dct_row["l=20"]                           # a learned basis beats a fixed one at small l


# %% [markdown]
# What the table says (numbers from the run committed with this chapter; 740 coco-mini train masks,
# ~800 shapes masks):
#
# * **PCA wins at small l.** At l = 20 the fitted basis is ahead of the DCT on both data sets
#   (coco-mini 0.865 vs 0.854, shapes 0.866 vs 0.837): the data-adapted axes put the object-filling
#   "blob" shapes first, the DCT spends coefficients on frequencies masks rarely use.
# * **DCT catches up and passes from l ≈ 40–60 on.** At l = 60 (the paper's choice) DCT is level or
#   slightly better on held-out masks (coco-mini 0.938 vs 0.933), and ahead at l = 128. With only
#   ~740 fitting masks, PCA's later axes are estimated from noise and generalise less well; a
#   data-free basis has nothing to overfit. On full COCO (860k masks) this small-sample effect should
#   shrink — not measured here.
# * **The official variant** (centred, whitened, noisy logits) reconstructs about as well as the
#   paper's plain PCA (within 0.005 everywhere). Whitening changes only the scale of r (it matters
#   for the regression loss, not for reconstruction); the logit domain changes the fit slightly.
# * **The official bases, fitted on COCO train2017** (100,000 masks, read from
#   `../shared/istr-official-pca`), reconstruct coco-mini val2017 at 0.922 / 0.944 / 0.957 for
#   l = 40 / 60 / 80 — the l = 60 value is the README's 0.944 from the official code — ahead of the
#   same recipe fitted on coco-mini's 740 masks (0.910 / 0.931 / 0.944) and of the DCT at l = 60
#   (0.938). With enough fitting masks the later PCA axes stop overfitting, as suspected above.
# * **The small autoencoder loses** at this budget (300 Adam steps, seconds on CPU): ~0.83–0.85 at
#   l = 20 and 60, below both linear codecs, and it barely improves from l = 20 to 60. A nonlinear
#   codec can in principle win at equal l, but that needs more data and training than a chapter
#   runs; this is a statement about the budget, not about autoencoders.

# %% [markdown]
# ## The `segbook pca-fit` command
#
# `pca_fit_command` is what `segbook pca-fit --data ROOT --split SPLIT --dim 60 --out codec.pt` runs:
# one streaming pass over the split's masks, the fit, the codec file, and a JSON-able summary. The
# reconstruction mIoU is measured on the fit split itself, on its first `eval_masks` masks (kept
# during the pass, so memory stays bounded on full COCO).

# %%
#| export
def pca_fit_command(data, # dataset root holding annotations/instances_SPLIT.json
                    split:str, # split name, e.g. train2017
                    dim:int=60, # embedding dimension l
                    size:int=28, # mask side s
                    out=None, # codec file to write (.pt); None: do not write
                    mean:bool=False, # centre (official code)
                    whiten:bool=False, # whiten (official code)
                    logit:bool=False, # noisy-logit domain (official code)
                    batch:int=4096, # masks per streamed batch
                    eval_masks:int=20000, # masks kept for the reconstruction mIoU
                    seed:int=0, # seed of the logit noise
                    progress:bool=True, # tqdm bar
                   ) -> dict:
    "Fit a PCA codec on a COCO-format split, save it, and return a summary (masks used/skipped, energy, mIoU, seconds)."
    from segbook.data import skip_summary
    t0 = time.perf_counter()
    ann = Path(data) / "annotations" / f"instances_{split}.json"
    if not ann.exists():
        raise FileNotFoundError(f"{ann}: no annotation file for split '{split}' under --data {data}")
    if not 1 <= dim <= size * size:
        raise ValueError(f"--dim must be in 1..{size * size} for --size {size}, got {dim}")
    moments, stats, held, n_held = MaskMoments(size, logit, seed), {}, [], 0
    for masks in iter_coco_masks(ann, size, batch, stats, progress):
        moments.update(masks)
        if n_held < eval_masks:
            held.append(masks[:eval_masks - n_held]); n_held += len(held[-1])
    if moments.count == 0:
        raise ValueError(f"{ann}: no usable (non-crowd, non-empty) instance masks")
    codec = PCACodec.from_moments(moments, dim, mean, whiten, meta=dict(source=str(Path(data).resolve()), split=split))
    if out is not None:
        codec.save(out)
    reasons = {k[len("skipped_"):]: v for k, v in sorted(stats.items()) if k.startswith("skipped_") and v}
    line = skip_summary(reasons, f"pca-fit ({ann})")
    if line: print(line, file=sys.stderr, flush=True)
    return dict(out=None if out is None else str(out), split=split, dim=dim, size=size, mean=mean, whiten=whiten, logit=logit,
                masks_used=stats["used"], masks_skipped=sum(reasons.values()), skipped=reasons, crowd_excluded=stats["crowd"],
                energy=round(codec.energy(), 6), miou=round(reconstruction_miou(codec, torch.cat(held), seed=seed), 6),
                miou_masks=n_held, seconds=round(time.perf_counter() - t0, 3))

def pca_basis_report(codec_path, # a fitted basis: official ISTR `.npz` or a `PCACodec.save` file
                     data, # dataset root holding annotations/instances_SPLIT.json
                     split:str, # split whose masks are reconstructed
                     batch:int=4096, # masks per streamed batch
                     eval_masks:int=20000, # masks kept for the reconstruction mIoU (the first ones of the split)
                     seed:int=0, # seed of the logit noise
                     progress:bool=True, # tqdm bar
                    ) -> dict:
    "What `segbook pca-fit --from-npz` reports instead of fitting: the basis's energy and its reconstruction mIoU on a split."
    t0 = time.perf_counter()
    codec = PCACodec.load(codec_path)
    ann = Path(data) / "annotations" / f"instances_{split}.json"
    if not ann.exists():
        raise FileNotFoundError(f"{ann}: no annotation file for split '{split}' under --data {data}")
    stats, held, n_held = {}, [], 0
    for masks in iter_coco_masks(ann, codec.size, batch, stats, progress):
        if n_held < eval_masks:
            held.append(masks[:eval_masks - n_held]); n_held += len(held[-1])
    if n_held == 0:
        raise ValueError(f"{ann}: no usable (non-crowd, non-empty) instance masks")
    energy = codec.energy() if ("total_variance" in codec.meta or len(codec.eigenvalues) == codec.size ** 2) else None
    return dict(codec=str(codec_path), source=codec.meta.get("source"), split=split, dim=codec.dim, size=codec.size,
                mean=codec.centred, whiten=codec.whitened, logit=codec.logit,
                energy=None if energy is None else round(energy, 6),
                miou=round(reconstruction_miou(codec, torch.cat(held), seed=seed), 6), miou_masks=n_held,
                masks_used=stats["used"], seconds=round(time.perf_counter() - t0, 3))


# %%
if COCO_MINI.exists():
    with tempfile.TemporaryDirectory() as d:
        summary = pca_fit_command(COCO_MINI, "train2017", dim=60, out=Path(d) / "pca60.pt", progress=False)
        loaded = PCACodec.load(Path(d) / "pca60.pt")
    print(json.dumps(summary))
    assert summary["masks_used"] == len(coco_train) and summary["masks_skipped"] + summary["masks_used"] + 6 == 746
    assert loaded.dim == 60 and loaded.meta["split"] == "train2017" and loaded.meta["n_masks"] == summary["masks_used"]
    assert 0.9 < summary["energy"] <= 1 and 0.8 < summary["miou"] <= 1
try:
    pca_fit_command("/nonexistent", "train", progress=False); raise AssertionError("must fail")
except FileNotFoundError as e:
    assert "instances_train.json" in str(e)
if COCO_MINI.exists() and 60 in official_bases:      # `segbook pca-fit --from-npz`: report on a basis instead of fitting
    report = pca_basis_report(OFFICIAL_PCA / OFFICIAL_PCA_NAME.format(dim=60), COCO_MINI, "val2017", progress=False)
    print(json.dumps(report))
    assert report["dim"] == 60 and report["miou_masks"] == len(coco_val) and abs(report["energy"] - official_bases[60].energy()) < 1e-6
    assert abs(report["miou"] - 0.944) < 0.01
