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
# # Sparse RoIAlign at quadtree nodes (Mask Transfiner §3.2–3.3)
#
# > Bilinear sampling of FPN features at the cells of the quadtree, equal to dense `roi_align` then indexing, without building the dense grids: a PyTorch path and a Triton kernel.

# %%
#| default_exp gather

# %% [markdown]
# ## Why a sparse gather
#
# The node encoder needs the FPN feature of every node — the value `roi_align` would produce at that
# cell of the RoI's $s\times s$ grid — but pooling dense 112² grids for 100 RoIs (100×256×112² floats,
# 1.3 GB in float32) to keep a few hundred cells each is the memory problem the paper's issues report.
# No library samples RoIAlign at a *sparse* set of cells, so `segbook.gather` does: for node $(r, y, x)$
# it bilinearly samples the feature map at the cell centre
# $x_1\sigma - \tfrac12 + (x + \tfrac12)\,\tfrac{(x_2-x_1)\sigma}{s}$ (and likewise in $y$), with
# torchvision's border rules — exactly `roi_align(aligned=True, sampling_ratio=1)` at that cell.
# (`F.grid_sample` would also do, but its border handling differs from RoIAlign's at the last row
# and column, and it wants one call per image.) The PyTorch path views every level as channels-last
# rows (one stacked copy), computes each node's four corners on its own level in one pass, and sums the
# weighted corner rows with `F.embedding_bag(..., per_sample_weights, mode='sum')` — a fused gather-and-
# reduce (34× faster on the CPU than indexing [M,4,C] and summing; autograd gives the feature gradient);
# the Triton kernel (one program per block of nodes × block of channels) computes coordinates,
# weights and the weighted sum in registers and is used automatically on CUDA, its backward being
# a scatter (`index_add_`) of the weighted output gradient. No dense grid and no host sync either way.

# %%
#| export
import os
from typing import Optional, Sequence, Union

import torch
import torch.nn.functional as F

try:
    import triton
    import triton.language as tl
    HAS_TRITON = True
except Exception:  # pragma: no cover - triton is bundled with CUDA builds of torch
    HAS_TRITON = False


# %%
#| export
def _corners(boxes, node_yx, node_roi, grid_size, spatial_scale, aligned:bool, H, W): # scale, H, W: numbers or [M] per node
    "Batch index [M], flat corner indices [M,4] into H*W and bilinear weights [M,4] (zero outside the map)."
    roi = boxes[node_roi]                                                     # [M,5]
    off = 0.5 if aligned else 0.0
    x1, y1 = roi[:, 1] * spatial_scale - off, roi[:, 2] * spatial_scale - off
    rw, rh = roi[:, 3] * spatial_scale - off - x1, roi[:, 4] * spatial_scale - off - y1
    if not aligned:
        rw, rh = rw.clamp(min=1.0), rh.clamp(min=1.0)
    if torch.is_tensor(grid_size): grid_size = grid_size.to(roi.dtype)       # [M] a grid side per node
    x = x1 + (node_yx[:, 1].to(roi.dtype) + 0.5) * (rw / grid_size)
    y = y1 + (node_yx[:, 0].to(roi.dtype) + 0.5) * (rh / grid_size)
    inside = (y >= -1.0) & (y <= H) & (x >= -1.0) & (x <= W)
    y, x = y.clamp(min=0.0), x.clamp(min=0.0)
    y0, x0 = y.floor(), x.floor()
    ey, ex = y0 >= H - 1, x0 >= W - 1                                         # torchvision's last-row/col rule
    y0, x0 = torch.where(ey, (H - 1) + torch.zeros_like(y0), y0), torch.where(ex, (W - 1) + torch.zeros_like(x0), x0)
    y, x = torch.where(ey, y0, y), torch.where(ex, x0, x)
    y1_, x1_ = torch.where(ey, y0, y0 + 1), torch.where(ex, x0, x0 + 1)
    ly, lx = y - y0, x - x0
    hy, hx = 1 - ly, 1 - lx
    w = torch.stack([hy * hx, hy * lx, ly * hx, ly * lx], 1) * inside[:, None]
    y0, x0, y1_, x1_ = (t.long() for t in (y0, x0, y1_, x1_))
    idx = torch.stack([y0 * W + x0, y0 * W + x1_, y1_ * W + x0, y1_ * W + x1_], 1)
    return roi[:, 0].long(), idx, w

def _gather_torch(feats, scales, boxes, node_yx, node_roi, node_level, grid_size, aligned):
    "[M,C] RoIAlign values at the nodes: each node's corners on its own level, weighted sums by `F.embedding_bag` (autograd-friendly)."
    C, dev = feats[0].shape[1], boxes.device
    # channels-last rows, all levels stacked: a node's C values are contiguous (a view for one channels_last level)
    rows = torch.cat([f.permute(0, 2, 3, 1).reshape(-1, C) for f in feats]) if len(feats) > 1 else feats[0].permute(0, 2, 3, 1).reshape(-1, C)
    hw = torch.tensor([[f.shape[2], f.shape[3]] for f in feats], device=dev)                  # [L,2]
    start = torch.tensor([0] + [f.shape[0] * f.shape[2] * f.shape[3] for f in feats[:-1]], device=dev).cumsum(0)
    H, W = hw[node_level, 0], hw[node_level, 1]                                               # [M] each node's level
    scale = torch.tensor([float(sc) for sc in scales], dtype=rows.dtype, device=dev)[node_level]
    b, idx, w = _corners(boxes.to(rows.dtype), node_yx, node_roi, grid_size, scale, aligned, H, W)
    flat = (start[node_level] + b * (H * W))[:, None] + idx                                   # [M,4] rows
    return F.embedding_bag(flat, rows, per_sample_weights=w.to(rows.dtype), mode="sum")      # no [M,4,C] copy


# %%
#| export
if HAS_TRITON:
    @triton.jit
    def _gather_points_kernel(feat_ptr, boxes_ptr, yx_ptr, roi_ptr, lvl_ptr, gs_ptr, out_ptr,
                              M, C, H, W, level, stride_b, stride_c, stride_h, stride_w,
                              grid_size, spatial_scale, offset,
                              ALIGNED: tl.constexpr, PER_NODE_GRID: tl.constexpr,
                              BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr):
        pid_m, pid_c = tl.program_id(0), tl.program_id(1)
        m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        c = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
        mm, cm = m < M, c < C
        on = mm & (tl.load(lvl_ptr + m, mask=mm, other=-1) == level)          # nodes of this FPN level
        roi = tl.load(roi_ptr + m, mask=on, other=0).to(tl.int64)
        ny = tl.load(yx_ptr + 2 * m, mask=on, other=0).to(tl.float32)
        nx = tl.load(yx_ptr + 2 * m + 1, mask=on, other=0).to(tl.float32)
        b = tl.load(boxes_ptr + 5 * roi, mask=on, other=0.0).to(tl.int64)
        x1 = tl.load(boxes_ptr + 5 * roi + 1, mask=on, other=0.0) * spatial_scale - offset
        y1 = tl.load(boxes_ptr + 5 * roi + 2, mask=on, other=0.0) * spatial_scale - offset
        rw = tl.load(boxes_ptr + 5 * roi + 3, mask=on, other=0.0) * spatial_scale - offset - x1
        rh = tl.load(boxes_ptr + 5 * roi + 4, mask=on, other=0.0) * spatial_scale - offset - y1
        if not ALIGNED:
            rw, rh = tl.maximum(rw, 1.0), tl.maximum(rh, 1.0)
        if PER_NODE_GRID:
            gs = tl.load(gs_ptr + m, mask=on, other=1).to(tl.float32)
        else:
            gs = grid_size * 1.0
        x = x1 + (nx + 0.5) * (rw / gs)
        y = y1 + (ny + 0.5) * (rh / gs)
        inside = on & (y >= -1.0) & (y <= H) & (x >= -1.0) & (x <= W)
        y, x = tl.maximum(y, 0.0), tl.maximum(x, 0.0)
        y0, x0 = tl.floor(y), tl.floor(x)
        ey, ex = y0 >= H - 1, x0 >= W - 1
        y0 = tl.where(ey, H - 1.0, y0)
        x0 = tl.where(ex, W - 1.0, x0)
        y, x = tl.where(ey, y0, y), tl.where(ex, x0, x)
        y1i, x1i = tl.where(ey, y0, y0 + 1.0).to(tl.int64), tl.where(ex, x0, x0 + 1.0).to(tl.int64)
        ly, lx = y - y0, x - x0
        hy, hx = 1.0 - ly, 1.0 - lx
        y0i, x0i = y0.to(tl.int64), x0.to(tl.int64)
        base = feat_ptr + b * stride_b                                        # [BLOCK_M] pointers
        cof = (c.to(tl.int64) * stride_c)[None, :]
        lm = inside[:, None] & cm[None, :]
        v00 = tl.load(base[:, None] + (y0i * stride_h + x0i * stride_w)[:, None] + cof, mask=lm, other=0.0)
        v01 = tl.load(base[:, None] + (y0i * stride_h + x1i * stride_w)[:, None] + cof, mask=lm, other=0.0)
        v10 = tl.load(base[:, None] + (y1i * stride_h + x0i * stride_w)[:, None] + cof, mask=lm, other=0.0)
        v11 = tl.load(base[:, None] + (y1i * stride_h + x1i * stride_w)[:, None] + cof, mask=lm, other=0.0)
        acc = ((hy * hx)[:, None] * v00.to(tl.float32) + (hy * lx)[:, None] * v01.to(tl.float32)
               + (ly * hx)[:, None] * v10.to(tl.float32) + (ly * lx)[:, None] * v11.to(tl.float32))
        out_ptrs = out_ptr + m.to(tl.int64)[:, None] * C + c[None, :]
        tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=on[:, None] & cm[None, :])

def _triton_ok(t:torch.Tensor) -> bool:
    return HAS_TRITON and (t.is_cuda or os.environ.get("TRITON_INTERPRET") == "1")

class _GatherPointsTriton(torch.autograd.Function):
    "Forward: the Triton kernel, one launch per FPN level into one output. Backward: torch scatter (index_add_)."
    @staticmethod
    def forward(ctx, boxes, node_yx, node_roi, node_level, grid_size, scales, aligned, *features):
        M, C = node_yx.shape[0], features[0].shape[1]
        out = features[0].new_zeros(M, C)
        bx = boxes.float().contiguous()
        yx, roi, lvl = node_yx.long().contiguous(), node_roi.long().contiguous(), node_level.long().contiguous()
        per_node = torch.is_tensor(grid_size)
        gs = grid_size.long().contiguous() if per_node else lvl  # (unread when one side for all)
        BLOCK_M, BLOCK_C = 32, min(128, triton.next_power_of_2(C))
        grid = (triton.cdiv(M, BLOCK_M), triton.cdiv(C, BLOCK_C))
        if M:
            for l, (f, sc) in enumerate(zip(features, scales)):
                _gather_points_kernel[grid](f, bx, yx, roi, lvl, gs, out, M, C, f.shape[2], f.shape[3], l,
                                            *f.stride(), 1 if per_node else int(grid_size), float(sc),
                                            0.5 if aligned else 0.0, ALIGNED=aligned, PER_NODE_GRID=per_node,
                                            BLOCK_M=BLOCK_M, BLOCK_C=BLOCK_C)
        ctx.save_for_backward(boxes, node_yx, node_roi, node_level)
        ctx.meta = (grid_size, scales, aligned, [f.shape for f in features], features[0].dtype)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        boxes, node_yx, node_roi, node_level = ctx.saved_tensors
        grid_size, scales, aligned, shapes, dtype = ctx.meta
        grads = []
        for l, (shape, sc) in enumerate(zip(shapes, scales)):
            B, C, H, W = shape
            b, idx, w = _corners(boxes.float(), node_yx, node_roi, grid_size, sc, aligned, H, W)
            w = w * (node_level == l)[:, None]
            g = torch.zeros(B * H * W, C, dtype=torch.float32, device=grad_out.device)
            flat = (b[:, None] * (H * W) + idx).reshape(-1)                       # [M*4]
            g.index_add_(0, flat, (grad_out.float()[:, None, :] * w[..., None]).reshape(-1, C))
            grads.append(g.view(B, H, W, C).permute(0, 3, 1, 2).to(dtype))
        return (None,) * 7 + tuple(grads)


# %%
#| export
def gather_points(features:Union[torch.Tensor, Sequence[torch.Tensor]], # [B,C,H,W] one FPN level, or a list of levels
                  boxes:torch.Tensor, # [R,5] (batch_idx, x1, y1, x2, y2) in input pixels
                  grid_size:Union[int, torch.Tensor], # side s of the RoI grid the nodes live on (28, 56, 112), or [M] one per node
                  node_yx:torch.Tensor, # [M,2] int cell (y, x) in the s*s grid
                  node_roi:torch.Tensor, # [M] int index into boxes
                  spatial_scale:Union[float, Sequence[float]], # feature stride^-1 (per level for a list)
                  node_level:Optional[torch.Tensor]=None, # [M] int index into the list of levels
                  aligned:bool=True, # roi_align's `aligned` (half-pixel offset)
                  backend:str="auto", # "auto" (Triton on CUDA), "torch" or "triton"
                 ) -> torch.Tensor: # [M,C]
    "RoIAlign (sampling_ratio=1) values at sparse cells of each RoI's grid, without building the dense grid."
    feats = [features] if torch.is_tensor(features) else list(features)
    scales = [spatial_scale] if not isinstance(spatial_scale, (list, tuple)) else list(spatial_scale)
    if len(scales) != len(feats):
        raise ValueError(f"spatial_scale: {len(scales)} values for {len(feats)} feature levels")
    if boxes.ndim != 2 or boxes.shape[1] != 5:
        raise ValueError(f"boxes: expected [R,5] (batch_idx, x1, y1, x2, y2), got {tuple(boxes.shape)}")
    if torch.is_tensor(grid_size) and grid_size.shape != node_roi.shape:
        raise ValueError(f"grid_size: one side per node expected, shape {tuple(node_roi.shape)}, got {tuple(grid_size.shape)}")
    if node_level is None:
        if len(feats) > 1:
            raise ValueError("node_level: required when features is a list of levels")
        node_level = torch.zeros_like(node_roi)
    use_triton = backend == "triton" or (backend == "auto" and _triton_ok(feats[0]))
    if use_triton:
        if not _triton_ok(feats[0]):
            raise RuntimeError("backend='triton' needs CUDA tensors, or TRITON_INTERPRET=1 set before triton is imported")
        return _GatherPointsTriton.apply(boxes, node_yx, node_roi, node_level, grid_size, tuple(scales), aligned,
                                         *feats)  # the kernel reads any strides
    if backend not in ("auto", "torch"):
        raise ValueError(f"backend: expected 'auto', 'torch' or 'triton', got {backend!r}")
    return _gather_torch(feats, scales, boxes, node_yx, node_roi, node_level, grid_size, aligned)


# %% [markdown]
# The Triton kernel is tested on CPU through Triton's interpreter (`TRITON_INTERPRET=1`, set before
# triton is imported, in a subprocess: `tests/test_gather.py`) against the PyTorch path, forward and
# backward; on a CUDA machine `backend="auto"` picks it and the CUDA tests compare it with `roi_align`.
# Speed and memory at 100 RoIs: `benchmarks/bench_gather.py` → `benchmarks/results/gather.json`.
#
# Equal to dense RoIAlign followed by indexing, on two levels, boxes partly outside the image and a
# zero-size box:

# %%
from torchvision.ops import roi_align

g = torch.Generator().manual_seed(0)
p3, p4 = torch.randn(2, 8, 20, 24, generator=g), torch.randn(2, 8, 10, 12, generator=g)
bx = torch.tensor([[0, 10., 12., 90., 70.], [1, -20., -8., 40., 30.], [1, 60., 50., 130., 95.], [0, 33., 33., 33., 33.]])
S = 28
M = 300
yx = torch.randint(0, S, (M, 2), generator=g); roi = torch.randint(0, 4, (M,), generator=g)
lvl = torch.randint(0, 2, (M,), generator=g)
sparse = gather_points([p3, p4], bx, S, yx, roi, [1 / 4, 1 / 8], node_level=lvl)
dense = [roi_align(f, bx, (S, S), sc, 1, True) for f, sc in ((p3, 1 / 4), (p4, 1 / 8))]   # [R,C,S,S]
ref = torch.where((lvl == 0)[:, None], dense[0][roi, :, yx[:, 0], yx[:, 1]], dense[1][roi, :, yx[:, 0], yx[:, 1]])
print((sparse - ref).abs().max())

# %%
assert sparse.shape == (M, 8) and torch.allclose(sparse, ref, atol=1e-5)
one = gather_points(p3, bx, 56, yx * 2 + 1, roi, 1 / 4, aligned=False)
assert torch.allclose(one, roi_align(p3, bx, (56, 56), 1 / 4, 1, False)[roi, :, yx[:, 0] * 2 + 1, yx[:, 1] * 2 + 1], atol=1e-5)
f64 = p3[:1, :2, :6, :7].double().requires_grad_()
b64 = torch.tensor([[0, 1., 2., 20., 18.]], dtype=torch.float64)
assert torch.autograd.gradcheck(lambda f: gather_points(f, b64, 7, yx[:20] % 7, torch.zeros(20, dtype=torch.long), 0.25),
                                (f64,))
try: gather_points([p3, p4], bx, S, yx, roi, [1 / 4, 1 / 8]); raise AssertionError
except ValueError as e: assert "node_level" in str(e)
