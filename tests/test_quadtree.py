"Pyramid levels, quadtree construction, node sequences and propagation (Transfiner §3.2)."
import pytest
import torch

from segbook.quadtree import (NodeSequence, build_quadtree, nodes_to_masks, propagate, roi_pyramid_levels,
                              sample_nodes, select_nodes, values_at_nodes)


def _tree(seed=0, n=3, sizes=(4, 8, 16), p=0.4):
    g = torch.Generator().manual_seed(seed)
    return build_quadtree([torch.rand(n, s, s, generator=g) < p for s in sizes])


def test_pyramid_levels_rule():
    boxes = torch.tensor([[0, 0, 224, 224], [0, 0, 448, 448], [0, 0, 50, 60], [10, 10, 10, 10.]])
    lv = roi_pyramid_levels(boxes)
    assert lv[:, 0].tolist() == [4, 5, 2, 2] and (lv[:, 1:] <= lv[:, :-1]).all() and (lv >= 2).all()
    assert roi_pyramid_levels(boxes, first_offset=1)[0].tolist() == [3, 2, 2]


def test_children_only_under_nodes():
    tree = _tree()
    for l in (1, 2):
        n, y, x = tree[l].nonzero().unbind(1)
        assert tree[l - 1][n, y // 2, x // 2].all()
    with pytest.raises(ValueError, match="twice"):
        build_quadtree([torch.ones(1, 4, 4, dtype=torch.bool), torch.ones(1, 6, 6, dtype=torch.bool)])


def test_select_all_roundtrip_and_caps():
    tree = _tree(1)
    seq = select_nodes(tree)
    assert all(torch.equal(a, b) for a, b in zip(nodes_to_masks(seq, (4, 8, 16)), tree))
    assert int(seq.dropped) == 0
    g = torch.Generator().manual_seed(2)
    scores = [torch.rand(t.shape, generator=g) for t in tree]
    capped = select_nodes(tree, scores, max_per_roi=7, max_total=12)
    total = int(sum(t.sum() for t in tree))
    assert capped.valid.shape[1] == 7 and int(capped.valid.sum()) == 12 and int(capped.dropped) == total - 12
    kept_min = capped.score[capped.valid].min()
    # every node of a RoI that kept fewer than 7 and was cut by the global budget scores below the kept ones
    dropped = torch.cat([s[t] for s, t in zip(scores, tree)]).sort(descending=True).values
    assert kept_min >= dropped[total - 1]


def test_training_sampling_tiles_and_invalidates():
    tree = _tree(4, n=2, p=0.2)
    seq = sample_nodes(tree, num_per_level=150, generator=torch.Generator().manual_seed(0))
    assert seq.yx.shape == (2, 450, 2)
    for i in range(2):
        for l in range(3):
            on = seq.level[i] == l
            y, x = seq.yx[i, on].unbind(-1)
            if tree[l][i].any():
                assert tree[l][i, y, x].all()
                assert len(set(zip(y.tolist(), x.tolist()))) == int(tree[l][i].sum())  # all nodes used, tiled
    empty = [t.clone() for t in tree]; empty[2][1] = False
    s2 = sample_nodes(empty, 10, min_nodes=1)
    assert not s2.valid[1].any()
    assert bool(s2.valid[0].all()) == all(bool(t[0].any()) for t in empty)
    full = [torch.ones(2, s, s, dtype=torch.bool) for s in (4, 8, 16)]
    assert sample_nodes(full, 10).valid.all()


def test_propagation_nearest_and_bilinear():
    coarse = torch.full((1, 2, 2), 0.2)
    seq = NodeSequence(torch.zeros(1, 2, dtype=torch.long), torch.tensor([[0, 2]]),
                       torch.tensor([[[1, 0], [7, 7]]]), torch.tensor([[True, True]]))
    out = propagate(coarse, seq, torch.tensor([[0.9, 0.0]]), sizes=(2, 4, 8))
    assert out.shape == (1, 8, 8)
    assert (out[0, 4:, :4] == 0.9).all() and out[0, 7, 7] == 0 and (out[0, :4] == 0.2).all()
    bil = propagate(coarse, seq, torch.tensor([[0.9, 0.0]]), sizes=(2, 4, 8), mode="bilinear")
    assert 0.2 < bil[0, 3, 3] < 0.9
    with pytest.raises(ValueError, match="sizes"):
        propagate(torch.zeros(1, 3, 3), seq, torch.zeros(1, 2), sizes=(2, 4, 8))


def test_values_at_nodes():
    tree = _tree(5)
    seq = select_nodes(tree)
    grids = [torch.randn(t.shape) for t in tree]
    v = values_at_nodes(grids, seq)
    for i in range(3):   # tokens are ordered coarse to fine, row-major: the same order as boolean indexing
        assert torch.equal(v[i][seq.valid[i]], torch.cat([g[i][t[i]] for g, t in zip(grids, tree)]))
    assert (v[~seq.valid] == 0).all()
