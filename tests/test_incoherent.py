"Eq. 1 (Transfiner), its pyramid, the official-code variant and the coco-mini Percent statistic."
import os
from pathlib import Path

import pytest
import torch

from segbook.incoherent import (crop_masks, incoherent_percent, incoherent_pyramid, incoherent_regions,
                                incoherent_regions_bilinear)

COCO_MINI = Path(os.environ.get("SEGBOOK_COCO_MINI", Path(__file__).resolve().parents[2] / "shared" / "coco-mini"))


def _block_mixed(m):
    n, h, w = m.shape
    b = m.view(n, h // 2, 2, w // 2, 2).permute(0, 1, 3, 2, 4).reshape(n, h // 2, w // 2, 4)
    return b.any(-1) & ~b.all(-1)


def test_eq1_is_block_not_constant():
    g = torch.Generator().manual_seed(3)
    for p in (0.1, 0.5, 0.9):
        m = torch.rand(4, 20, 12, generator=g) < p
        assert torch.equal(incoherent_regions(m), _block_mixed(m))


def test_eq1_edge_cases():
    assert incoherent_regions(torch.zeros(0, 4, 4)).shape == (0, 2, 2)
    half = torch.zeros(1, 4, 4, dtype=torch.bool); half[0, :, :2] = True  # edge on a block boundary
    assert not incoherent_regions(half).any()
    off = torch.zeros(1, 4, 4, dtype=torch.bool); off[0, :, :1] = True    # edge inside a block
    assert incoherent_regions(off)[0, :, 0].all() and not incoherent_regions(off)[0, :, 1].any()
    with pytest.raises(ValueError, match="even"):
        incoherent_regions(torch.zeros(1, 3, 4))


def test_pyramid_shapes_and_band():
    yy, xx = torch.meshgrid(torch.arange(80.), torch.arange(80.), indexing="ij")
    disc = (((yy - 40) ** 2 + (xx - 40) ** 2) < 25 ** 2)[None]
    box = torch.tensor([[15., 15., 65., 65.]])
    pyr = incoherent_pyramid(disc, box)
    assert [tuple(p.shape) for p in pyr] == [(1, 28, 28), (1, 56, 56), (1, 112, 112)]
    shares = [p.float().mean().item() for p in pyr]
    assert shares[0] > shares[1] > shares[2] > 0                       # one-cell band: halves per level
    assert torch.equal(pyr[0], incoherent_regions(crop_masks(disc, box, 56)))
    code = incoherent_regions_bilinear(disc, box, 28)
    assert code.float().mean() > pyr[0].float().mean()
    with pytest.raises(ValueError, match="mode"):
        incoherent_pyramid(disc, box, mode="area")


@pytest.mark.skipif(not (COCO_MINI / "annotations").is_dir(), reason="coco-mini not available")
def test_percent_on_coco_mini():
    r = incoherent_percent(COCO_MINI / "annotations" / "instances_val2017.json", sizes=(14, 28, 112), max_images=5)
    assert r["instances"] > 5
    assert 0.05 < r["eq1_14"] < 0.3 and r["eq1_112"] < r["eq1_28"] < r["eq1_14"]
