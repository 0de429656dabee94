"Small stand-ins shared by the matching and loss tests."
import pytest
import torch

from segbook.embeddings import PCACodec


@pytest.fixture
def one_thread():
    "These tensors are tiny: one intra-op thread avoids OpenMP spin-waits on a busy 2-core machine (10x here)."
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def OrthoCodec(s=8, l=16, seed=0):
    "Stand-in codec: a random orthonormal basis of the s² pixel space; with l = s², decode(encode(m)) == m."
    return PCACodec.random_orthonormal(s, l, seed)


def rect_masks(boxes, h, w):
    "Binary masks [N,h,w] uint8 filling each xyxy box (pixel centres inside)."
    ys, xs = torch.arange(h)[:, None] + 0.5, torch.arange(w)[None] + 0.5
    if len(boxes) == 0:
        return torch.zeros(0, h, w, dtype=torch.uint8)
    return torch.stack([((xs >= x0) & (xs < x1) & (ys >= y0) & (ys < y1)) for x0, y0, x1, y1 in boxes.tolist()]).to(torch.uint8)
