"Tests for segbook.attention: shapes, batching invariance, per-query kernels, gradients."
import pytest
import torch

from segbook.attention import DynamicConv, QuerySelfAttention, RoIMultiheadAttention

B, Q, D, T = 3, 6, 32, 49


@pytest.fixture
def inputs():
    g = torch.Generator().manual_seed(0)
    return torch.randn(B, Q, D, generator=g), torch.randn(B * Q, T, D, generator=g)


def test_shapes(inputs):
    feats, roi = inputs
    z = QuerySelfAttention(D, heads=4)(feats)
    assert z.shape == (B, Q, D)
    zf = z.flatten(0, 1)
    assert DynamicConv(D, dim_dynamic=8)(zf, roi).shape == (B * Q, D)
    o, w = RoIMultiheadAttention(D, heads=4)(zf, roi, need_weights=True)
    assert o.shape == (B * Q, D) and w.shape == (B * Q, T)
    assert torch.allclose(w.sum(-1), torch.ones(B * Q), atol=1e-5)
    p1, p2 = DynamicConv(D, dim_dynamic=8).kernels(zf)
    assert p1.shape == (B * Q, D, 8) and p2.shape == (B * Q, 8, D)


def test_self_attention_stays_within_an_image(inputs):
    feats, _ = inputs
    sa = QuerySelfAttention(D, heads=4).eval()
    with torch.no_grad():
        together = sa(feats)
        alone = torch.cat([sa(feats[i:i + 1]) for i in range(B)])
        assert torch.allclose(together, alone, atol=1e-6)
        # changing image 1 must not change image 0's output
        other = feats.clone(); other[1] += 5
        assert torch.allclose(sa(other)[0], together[0], atol=1e-6)
        assert not torch.allclose(sa(other)[1], together[1], atol=1e-3)


@pytest.mark.parametrize("cls", [DynamicConv, RoIMultiheadAttention])
def test_per_roi_step_is_per_roi(inputs, cls):
    feats, roi = inputs
    m = cls(D, 8) if cls is DynamicConv else cls(D, 4)
    m.eval()
    zf = feats.flatten(0, 1)
    with torch.no_grad():
        all_at_once = m(zf, roi)
        per_image = torch.cat([m(zf[i * Q:(i + 1) * Q], roi[i * Q:(i + 1) * Q]) for i in range(B)])
    assert torch.allclose(all_at_once, per_image, atol=1e-5)


def test_kernels_depend_on_the_query(inputs):
    feats, roi = inputs
    dyn = DynamicConv(D, dim_dynamic=8)
    p1, _ = dyn.kernels(feats[0, :2])
    assert (p1[0] - p1[1]).abs().max() > 1e-3
    # same RoI, different queries -> different outputs
    with torch.no_grad():
        o = dyn(feats[0, :2], roi[:1].expand(2, -1, -1))
    assert (o[0] - o[1]).abs().max() > 1e-3


def test_dynamic_conv_uses_roi_position():
    "Flatten + Linear keeps where a pattern sits: permuting RoI tokens changes the output."
    dyn = DynamicConv(D, dim_dynamic=8).eval()
    q, roi = torch.randn(1, D), torch.randn(1, T, D)
    with torch.no_grad():
        assert (dyn(q, roi) - dyn(q, roi[:, torch.randperm(T)])).abs().max() > 1e-3


def test_gradients_flow(inputs):
    feats, roi = inputs
    feats, roi = feats.clone().requires_grad_(), roi.clone().requires_grad_()
    sa, dyn, mha = QuerySelfAttention(D, 4), DynamicConv(D, 8), RoIMultiheadAttention(D, 4)
    z = sa(feats).flatten(0, 1)
    (dyn(z, roi).square().sum() + mha(z, roi).square().sum()).backward()
    for m in (sa, dyn, mha):
        for name, p in m.named_parameters():
            assert p.grad is not None and p.grad.abs().sum() > 0, (type(m).__name__, name)
    assert feats.grad.abs().sum() > 0 and roi.grad.abs().sum() > 0


def test_num_dynamic_other_than_two_is_an_error():
    with pytest.raises(ValueError, match="num_dynamic"):
        DynamicConv(D, 8, num_dynamic=3)
