"Sparse RoIAlign at nodes: equal to dense roi_align + index (CPU), gradcheck, Triton (interpreter on CPU, CUDA if present)."
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from torchvision.ops import roi_align

from segbook.gather import gather_points


def _case(seed=0, C=6, M=400):
    g = torch.Generator().manual_seed(seed)
    feats = [torch.randn(2, C, 24, 30, generator=g), torch.randn(2, C, 12, 15, generator=g)]
    boxes = torch.tensor([[0, 10., 12., 90., 70.], [1, -25., -8., 40., 30.], [1, 60., 50., 140., 110.],
                          [0, 33., 33., 33., 33.], [1, 100., 80., 100., 95.], [0, -50., -50., -10., -10.]])
    return g, feats, boxes


def _dense_ref(feats, scales, boxes, S, yx, roi, lvl, aligned=True):
    outs = [roi_align(f, boxes, (S, S), sc, 1, aligned)[roi, :, yx[:, 0], yx[:, 1]] for f, sc in zip(feats, scales)]
    return torch.stack(outs)[lvl, torch.arange(len(lvl))]


@pytest.mark.parametrize("S", [7, 28, 112])
@pytest.mark.parametrize("aligned", [True, False])
def test_equals_dense_roi_align(S, aligned):
    g, feats, boxes = _case(S)
    M = 400
    yx = torch.randint(0, S, (M, 2), generator=g)
    roi = torch.randint(0, len(boxes), (M,), generator=g)
    lvl = torch.randint(0, 2, (M,), generator=g)
    scales = [1 / 4, 1 / 8]
    out = gather_points(feats, boxes, S, yx, roi, scales, node_level=lvl, aligned=aligned, backend="torch")
    ref = _dense_ref(feats, scales, boxes, S, yx, roi, lvl, aligned)
    assert out.shape == (M, feats[0].shape[1])
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    cl = gather_points([f.to(memory_format=torch.channels_last) for f in feats], boxes, S, yx, roi, scales,
                       node_level=lvl, aligned=aligned, backend="torch")           # the no-copy path
    torch.testing.assert_close(cl, ref, atol=1e-5, rtol=1e-5)
    one = gather_points(feats[1], boxes, S, yx, roi, 1 / 8, aligned=aligned)      # single level
    torch.testing.assert_close(one, roi_align(feats[1], boxes, (S, S), 1 / 8, 1, aligned)[roi, :, yx[:, 0], yx[:, 1]],
                               atol=1e-5, rtol=1e-5)


def test_one_grid_side_per_node_equals_one_call_per_side():
    "Nodes of a quadtree live on 28/56/112 grids at once: a per-node side must equal separate calls per side."
    g, feats, boxes = _case(3)
    M, scales = 300, [1 / 4, 1 / 8]
    side = torch.tensor([7, 14, 28])[torch.randint(0, 3, (M,), generator=g)]
    yx = (torch.rand(M, 2, generator=g) * side[:, None]).long()
    roi, lvl = torch.randint(0, len(boxes), (M,), generator=g), torch.randint(0, 2, (M,), generator=g)
    out = gather_points(feats, boxes, side, yx, roi, scales, node_level=lvl, backend="torch")
    for s in (7, 14, 28):
        on = side == s
        ref = gather_points(feats, boxes, s, yx[on], roi[on], scales, node_level=lvl[on], backend="torch")
        torch.testing.assert_close(out[on], ref, atol=1e-6, rtol=1e-6)
        torch.testing.assert_close(out[on], _dense_ref(feats, scales, boxes, s, yx[on], roi[on], lvl[on]), atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="grid_size"):
        gather_points(feats, boxes, side[:-1], yx, roi, scales, node_level=lvl)


def test_outside_box_gives_zero_and_empty_nodes():
    _, feats, boxes = _case()
    out = gather_points(feats[0], boxes, 4, torch.zeros(1, 2, dtype=torch.long), torch.tensor([5]), 1 / 4)
    assert (out == 0).all()                                     # box fully outside the map
    empty = gather_points(feats[0], boxes, 4, torch.zeros(0, 2, dtype=torch.long), torch.zeros(0, dtype=torch.long), 1 / 4)
    assert empty.shape == (0, feats[0].shape[1])


def test_gradcheck_float64():
    g = torch.Generator().manual_seed(1)
    f = torch.randn(2, 3, 7, 9, dtype=torch.float64, generator=g).requires_grad_()
    boxes = torch.tensor([[0, 1., 2., 30., 22.], [1, -4., 3., 12., 40.]], dtype=torch.float64)
    yx = torch.randint(0, 5, (30, 2), generator=g)            # duplicates included: gradients must accumulate
    roi = torch.randint(0, 2, (30,), generator=g)
    assert torch.autograd.gradcheck(lambda t: gather_points(t, boxes, 5, yx, roi, 0.25, backend="torch"), (f,))
    lvl = torch.randint(0, 2, (30,), generator=g)
    f2 = torch.randn(2, 3, 4, 5, dtype=torch.float64, generator=g).requires_grad_()
    for fmt in (torch.contiguous_format, torch.channels_last):    # both multi-level paths
        assert torch.autograd.gradcheck(lambda a, b: gather_points([a.contiguous(memory_format=fmt), b.contiguous(memory_format=fmt)],
                                        boxes, 5, yx, roi, [0.25, 0.125], node_level=lvl, backend="torch"), (f, f2))


def test_bad_input_messages():
    _, feats, boxes = _case()
    yx, roi = torch.zeros(3, 2, dtype=torch.long), torch.zeros(3, dtype=torch.long)
    with pytest.raises(ValueError, match="node_level"):
        gather_points(feats, boxes, 4, yx, roi, [0.25, 0.125])
    with pytest.raises(ValueError, match="boxes"):
        gather_points(feats[0], boxes[:, 1:], 4, yx, roi, 0.25)
    with pytest.raises(ValueError, match="spatial_scale"):
        gather_points(feats, boxes, 4, yx, roi, 0.25, node_level=roi)


_TRITON_SCRIPT = textwrap.dedent("""
    import torch
    from torchvision.ops import roi_align
    from segbook.gather import gather_points
    g = torch.Generator().manual_seed(0)
    feats = [torch.randn(2, 40, 24, 30, generator=g), torch.randn(2, 40, 12, 15, generator=g)]
    boxes = torch.tensor([[0, 10., 12., 90., 70.], [1, -25., -8., 40., 30.], [1, 60., 50., 140., 110.], [0, 33., 33., 33., 33.]])
    M, S = 70, 28
    yx = torch.randint(0, S, (M, 2), generator=g); roi = torch.randint(0, 4, (M,), generator=g)
    lvl = torch.randint(0, 2, (M,), generator=g)
    fa = [f.clone().requires_grad_() for f in feats]; fb = [f.clone().requires_grad_() for f in feats]
    a = gather_points(fa, boxes, S, yx, roi, [0.25, 0.125], node_level=lvl, backend="triton")
    b = gather_points(fb, boxes, S, yx, roi, [0.25, 0.125], node_level=lvl, backend="torch")
    torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    w = torch.randn(a.shape, generator=g)
    (a * w).sum().backward(); (b * w).sum().backward()
    for x, y in zip(fa, fb):
        torch.testing.assert_close(x.grad, y.grad, atol=1e-5, rtol=1e-5)
    cl = gather_points([f.to(memory_format=torch.channels_last) for f in feats], boxes, S, yx, roi, [0.25, 0.125],
                       node_level=lvl, backend="triton")                     # strided input, no copy
    torch.testing.assert_close(cl, b.detach(), atol=1e-5, rtol=1e-5)
    for aligned in (True, False):
        t = gather_points(feats[0], boxes, 7, yx % 7, roi, 0.25, aligned=aligned, backend="triton")
        r = roi_align(feats[0], boxes, (7, 7), 0.25, 1, aligned)[roi, :, yx[:, 0] % 7, yx[:, 1] % 7]
        torch.testing.assert_close(t, r, atol=1e-5, rtol=1e-5)
    side = torch.tensor([7, 14, 28])[torch.randint(0, 3, (M,), generator=g)]       # one grid side per node
    yxs = yx % side[:, None]
    t = gather_points(feats, boxes, side, yxs, roi, [0.25, 0.125], node_level=lvl, backend="triton")
    r = gather_points(feats, boxes, side, yxs, roi, [0.25, 0.125], node_level=lvl, backend="torch")
    torch.testing.assert_close(t, r, atol=1e-5, rtol=1e-5)
    print("TRITON-INTERPRET-OK")
""")


def test_triton_kernel_in_interpreter():
    pytest.importorskip("triton")
    env = dict(os.environ, TRITON_INTERPRET="1")   # must be set before triton is imported: a fresh process
    r = subprocess.run([sys.executable, "-c", _TRITON_SCRIPT], env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0 and "TRITON-INTERPRET-OK" in r.stdout, r.stderr[-3000:]


def test_triton_needs_cuda_or_interpreter():
    if torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1":
        pytest.skip("triton backend available here")
    _, feats, boxes = _case()
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET"):
        gather_points(feats[0], boxes, 4, torch.zeros(1, 2, dtype=torch.long), torch.zeros(1, dtype=torch.long), 0.25,
                      backend="triton")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_triton_cuda_matches_roi_align(dtype):
    g, feats, boxes = _case(7, C=256, M=5000)
    feats = [f.cuda().to(dtype) for f in feats]
    boxes = boxes.cuda()
    M, S = 5000, 112
    yx = torch.randint(0, S, (M, 2), generator=g).cuda(); roi = torch.randint(0, len(boxes), (M,), generator=g).cuda()
    lvl = torch.randint(0, 2, (M,), generator=g).cuda()
    out = gather_points(feats, boxes, S, yx, roi, [0.25, 0.125], node_level=lvl)            # auto -> Triton
    ref = _dense_ref([f.float() for f in feats], [0.25, 0.125], boxes, S, yx, roi, lvl)
    tol = 1e-5 if dtype == torch.float32 else 2e-3
    torch.testing.assert_close(out.float(), ref, atol=tol, rtol=tol)
