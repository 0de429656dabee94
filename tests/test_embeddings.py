"Tests of segbook.embeddings: mask cropping, the COCO mask reader, the PCA codec of ISTR Eq. 3, DCT and AE codecs."
import json
import os
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

from segbook.embeddings import (DCTCodec, MaskAutoencoder, MaskMoments, PCACodec, crop_and_resize_masks, dct_matrix,
                                mask_iou, noisy_logit, pca_fit_command, principal_axes,
                                reconstruction_miou, train_autoencoder, zigzag_order)
from segbook.data import iter_coco_masks

COCO_MINI = Path(os.environ.get("SEGBOOK_COCO_MINI", Path(__file__).resolve().parents[2] / "shared" / "coco-mini"))
needs_coco = pytest.mark.skipif(not (COCO_MINI / "annotations").exists(), reason="coco-mini not found")


def ellipses(n, s=28, seed=0):
    "n random axis-aligned filled ellipses as [n,s,s] uint8."
    g = torch.Generator().manual_seed(seed)
    c = torch.rand(n, 2, generator=g) * 0.4 + 0.3
    r = torch.rand(n, 2, generator=g) * 0.3 + 0.2
    yy, xx = torch.meshgrid(torch.linspace(0, 1, s), torch.linspace(0, 1, s), indexing="ij")
    d = ((xx - c[:, :1, None]) / r[:, :1, None]) ** 2 + ((yy - c[:, 1:, None]) / r[:, 1:, None]) ** 2
    return (d <= 1).to(torch.uint8)


@pytest.fixture(scope="module")
def masks():
    return ellipses(1500)


@pytest.fixture(scope="module")
def moments(masks):
    return MaskMoments().update(masks)


def test_crop_and_resize_matches_box_content():
    m = torch.zeros(2, 50, 70, dtype=torch.uint8)
    m[0, 10:30, 20:60] = 1
    m[1, 5:45, 5:25] = 1
    m[1, 5:25, 5:15] = 0  # the top-left quarter of box 1 is empty
    out = crop_and_resize_masks(m, torch.tensor([[20., 10, 60, 30], [5, 5, 25, 45]]), size=10)
    assert out.shape == (2, 10, 10) and out.dtype == torch.float32
    assert (out[0] == 1).all()
    assert out[1, :5, :5].sum() == 0 and out[1, 5:].sum() == 50 and out[1, :5, 5:].sum() == 25


def test_crop_zero_area_box_gives_zeros():
    m = torch.ones(2, 20, 20, dtype=torch.bool)
    out = crop_and_resize_masks(m, torch.tensor([[3., 3, 3, 10], [2, 2, 12, 12]]), size=6)
    assert (out[0] == 0).all() and (out[1] == 1).all()


def _write_coco(path, anns, h=32, w=32):
    anns = [{"category_id": 1, **a} for a in anns]
    path.write_text(json.dumps(dict(images=[dict(id=1, height=h, width=w, file_name="1.png")], annotations=anns,
                                    categories=[dict(id=1, name="thing")])))
    return path


def test_reader_skips_empty_and_zero_area_with_clear_warning(tmp_path):
    anns = [dict(id=10, image_id=1, bbox=[4, 4, 8, 8], iscrowd=0, segmentation=[[4, 4, 12, 4, 12, 12, 4, 12]]),
            dict(id=11, image_id=1, bbox=[4, 4, 0, 8], iscrowd=0, segmentation=[[4, 4, 12, 4, 12, 12, 4, 12]]),
            dict(id=12, image_id=1, bbox=[20, 20, 6, 6], iscrowd=0, segmentation={"size": [32, 32], "counts": [1024]}),
            dict(id=13, image_id=1, bbox=[0, 0, 5, 5], iscrowd=1, segmentation={"size": [32, 32], "counts": [0, 1024]})]
    stats = {}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        batches = list(iter_coco_masks(_write_coco(tmp_path / "a.json", anns), size=8, stats=stats, progress=False))
    assert [b.shape for b in batches] == [(1, 8, 8)] and batches[0].all()
    assert stats == dict(images=1, instances=4, crowd=1, used=1, skipped_zero_area_box=1, skipped_empty_mask=1,
                         skipped_degenerate_polygon=0)
    msg = [str(c.message) for c in caught if "skipped" in str(c.message)]
    assert len(msg) == 1 and "a.json" in msg[0] and "skipped 2 of 4" in msg[0] and "11" in msg[0] and "12" in msg[0]


def test_reader_missing_field_names_file_and_field(tmp_path):
    anns = [dict(id=10, image_id=1, iscrowd=0, bbox=[4, 4, 8, 8])]
    with pytest.raises(ValueError, match=r"b\.json.*annotations\[0\] \(id=10\).*'segmentation'"):
        list(iter_coco_masks(_write_coco(tmp_path / "b.json", anns), progress=False))
    (tmp_path / "c.json").write_text(json.dumps(dict(images=[dict(id=1, width=3, file_name="a.png")], categories=[dict(id=1, name="a")],
                                                     annotations=[dict(id=1, image_id=1, category_id=1, bbox=[0, 0, 1, 1], segmentation=[])])))
    with pytest.raises(ValueError, match=r"c\.json.*'height'"):
        list(iter_coco_masks(tmp_path / "c.json", progress=False))


def test_reader_batches_stream(tmp_path):
    anns = [dict(id=i, image_id=1, bbox=[i, i, 10, 10], iscrowd=0, segmentation=[[i, i, i + 10, i, i + 10, i + 10, i, i + 10]])
            for i in range(7)]
    batches = list(iter_coco_masks(_write_coco(tmp_path / "d.json", anns), size=4, batch=3, progress=False))
    assert [len(b) for b in batches] == [3, 3, 1]


def test_components_orthonormal_and_sorted(moments):
    codec = PCACodec.from_moments(moments, 60, dtype=torch.float64)
    D = codec.components
    assert torch.allclose(D @ D.T, torch.eye(60, dtype=torch.float64), atol=1e-10)
    assert (codec.eigenvalues[:-1] >= codec.eigenvalues[1:]).all()


def test_exact_reconstruction_at_full_dimension(masks, moments):
    for kw in (dict(), dict(mean=True), dict(mean=True, whiten=True)):
        codec = PCACodec.from_moments(moments, 784, dtype=torch.float64, **kw)
        assert torch.allclose(codec.decode_raw(codec.encode(masks[:100])), masks[:100].double(), atol=1e-6), kw
    assert codec.energy(784) == pytest.approx(1.0)


def test_pca_beats_random_basis_and_error_is_dropped_energy(masks, moments):
    codec = PCACodec.from_moments(moments, 10, dtype=torch.float64)
    err = ((codec.decode_raw(codec.encode(masks)) - masks.double()) ** 2).sum(dim=(1, 2)).mean()
    assert err == pytest.approx(codec.eigenvalues[10:].sum().item(), rel=1e-6)  # Eq. 3 residual = dropped eigenvalues
    q, _ = torch.linalg.qr(torch.randn(784, 10, dtype=torch.float64))
    rnd = ((masks.flatten(1).double() @ q @ q.T - masks.flatten(1).double()) ** 2).sum(1).mean()
    assert err < rnd


def test_streaming_fit_equals_one_shot():
    x = ellipses(3000, seed=1)
    streamed = MaskMoments()
    for chunk in x.split(257):
        streamed.update(chunk)
    one_shot = x.flatten(1).double()
    second = one_shot.T @ one_shot
    assert streamed.count == 3000
    assert torch.allclose(streamed.second, second, rtol=0, atol=1e-6)
    for mean in (False, True):
        ev_s, ax_s, _ = principal_axes(streamed, mean)
        xc = one_shot - one_shot.mean(0) if mean else one_shot
        ev_o, ax_o = torch.linalg.eigh(xc.T @ xc / (2999 if mean else 3000))
        ev_o, ax_o = ev_o.flip(0), ax_o.flip(1).T
        assert torch.allclose(ev_s, ev_o.clamp_min(0), atol=1e-6)
        top = 20  # well separated eigenvalues: vectors equal up to sign
        dots = (ax_s[:top] * ax_o[:top]).sum(1).abs()
        assert torch.allclose(dots, torch.ones(top, dtype=torch.float64), atol=1e-6)


def test_blocked_float32_moments_are_the_float64_moments():
    "0/1 masks are accumulated in float32 blocks; the sums and the fitted basis equal a one-shot float64 fit."
    g = torch.Generator().manual_seed(11)
    density = torch.rand(6000, 1, 1, generator=g)
    x = (torch.rand(6000, 28, 28, generator=g) < density).to(torch.uint8)
    ref = x.flatten(1).double()
    blocked = MaskMoments()
    for chunk in x.split(2500):
        blocked.update(chunk, block=999)              # several blocks per chunk, one partial
    assert torch.equal(blocked.second, ref.T @ ref) and torch.equal(blocked.sum, ref.sum(0)) and blocked.count == 6000
    assert torch.equal(MaskMoments().update(x.bool()).second, blocked.second)
    one_shot = MaskMoments()
    one_shot.second, one_shot.sum, one_shot.count = ref.T @ ref, ref.sum(0), len(ref)
    for mean in (False, True):
        a, b = PCACodec.from_moments(blocked, 60, mean=mean), PCACodec.from_moments(one_shot, 60, mean=mean)
        dots = (a.components.double() * b.components.double()).sum(1).abs()
        assert torch.allclose(dots, torch.ones(60, dtype=torch.float64), atol=1e-5)
        assert torch.allclose(a.eigenvalues, b.eigenvalues, rtol=1e-5, atol=0)


def test_float_and_uint8_inputs_accumulate_the_same():
    x = ellipses(200, seed=2)
    a, b = MaskMoments().update(x), MaskMoments().update(x.double())
    assert torch.equal(a.second, b.second)


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(
    not torch.cuda.is_available(), reason="no CUDA"))])
def test_encode_decode_consistent_on_device(masks, moments, device):
    codec = PCACodec.from_moments(moments, 60).to(device)
    m = masks[:64].to(device)
    r = codec.encode(m)
    assert r.shape == (64, 60) and r.device.type == device
    rec = codec.decode(r)
    assert rec.shape == (64, 28, 28) and rec.min() >= 0 and rec.max() <= 1
    assert torch.allclose(codec.encode(codec.decode_raw(r)), r, atol=1e-4)  # encode∘decode = identity on embeddings
    cpu = PCACodec.from_moments(moments, 60)
    assert torch.allclose(rec.cpu(), cpu.decode(cpu.encode(masks[:64])), atol=1e-5)
    r2 = r.detach().clone().requires_grad_()
    codec.decode(r2).sum().backward()
    assert r2.grad.abs().sum() > 0


def test_switches(masks, moments):
    plain = PCACodec.from_moments(moments, 30)
    centred = PCACodec.from_moments(moments, 30, mean=True)
    white = PCACodec.from_moments(moments, 30, mean=True, whiten=True)
    assert plain.mean.abs().sum() == 0 and centred.mean.abs().sum() > 0
    assert torch.allclose(plain.scale, torch.ones(30)) and not torch.allclose(white.scale, torch.ones(30))
    rw = white.encode(masks)
    assert torch.allclose(rw.var(0), torch.ones(30), atol=1e-3)           # unit variance on the fit data
    assert torch.allclose(rw.mean(0), torch.zeros(30), atol=1e-3)
    assert not torch.allclose(plain.encode(masks).var(0), torch.ones(30), atol=0.1)
    assert centred.energy(30) < plain.energy(30)                          # variance is harder to capture than 2nd moment
    logit = PCACodec.from_moments(MaskMoments(logit=True).update(masks), 60, mean=True, whiten=True)
    g = torch.Generator().manual_seed(0)
    r = logit.encode(masks[:200], generator=g)
    out, raw = logit.decode(r), logit.decode_raw(r)
    assert torch.allclose(out, raw.sigmoid()) and out.min() >= 0 and out.max() <= 1   # decode = sigmoid(raw)
    assert raw.abs().mean() > 2                                           # the raw decode is in logit units
    assert ((out >= 0.5) == masks[:200].bool()).float().mean() > 0.97
    assert torch.equal(plain.decode(plain.encode(masks[:50])), plain.decode_raw(plain.encode(masks[:50])).clamp(0, 1))


def test_noisy_logit_range_and_seed():
    m = (torch.rand(100, 784) > 0.5).float()
    z = noisy_logit(m, torch.Generator().manual_seed(3))
    assert z.abs().min() >= np.log(0.95 / 0.05) - 1e-5 and z.abs().max() <= np.log(0.99 / 0.01) + 1e-5
    assert ((z > 0) == m.bool()).all()
    assert torch.equal(z, noisy_logit(m, torch.Generator().manual_seed(3)))


def test_save_load_roundtrip(tmp_path, masks, moments):
    codec = PCACodec.from_moments(moments, 40, mean=True, whiten=True, meta=dict(source="toy", split="train"))
    path = codec.save(tmp_path / "sub" / "codec.pt")
    assert path.exists() and not list(path.parent.glob("*.tmp"))
    back = PCACodec.load(path)
    assert back.dim == 40 and back.size == 28 and back.whitened and back.centred and not back.logit
    assert back.meta["split"] == "train" and back.meta["n_masks"] == 1500 and back.meta["segbook_version"]
    for name in ("components", "mean", "scale", "eigenvalues"):
        assert torch.equal(getattr(back, name), getattr(codec, name))
    torch.save({"format": "other"}, tmp_path / "bad.pt")
    with pytest.raises(ValueError, match=r"bad\.pt.*format"):
        PCACodec.load(tmp_path / "bad.pt")


def test_bad_dim_and_empty_fit():
    with pytest.raises(ValueError, match="dim"):
        PCACodec.from_moments(MaskMoments(4).update(torch.ones(3, 4, 4)), 17)
    with pytest.raises(ValueError, match="no masks"):
        principal_axes(MaskMoments(4))
    with pytest.raises(ValueError, match="16 pixels"):
        MaskMoments(4).update(torch.ones(2, 5, 5))


def test_mask_iou_and_miou(masks, moments):
    assert mask_iou(torch.zeros(2, 3, 3), torch.zeros(2, 3, 3)).tolist() == [1.0, 1.0]
    a = torch.zeros(1, 4, 4); a[0, :2] = 1
    b = torch.zeros(1, 4, 4); b[0, 1:3] = 1
    assert mask_iou(a, b).item() == pytest.approx(1 / 3)
    m5, m60 = (reconstruction_miou(PCACodec.from_moments(moments, l), masks) for l in (5, 60))
    assert 0.5 < m5 < m60 <= 1


def test_dct_matches_scipy_and_is_exact_at_full_dimension():
    import scipy.fft
    x = torch.rand(4, 8, 8, dtype=torch.float64)
    C = dct_matrix(8)
    assert np.allclose((C @ x @ C.T).numpy(), scipy.fft.dctn(x.numpy(), type=2, axes=(1, 2), norm="ortho"))
    order = zigzag_order(8)
    assert sorted(order.tolist()) == list(range(64)) and order[:6].tolist() == [0, 1, 8, 16, 9, 2]
    full = DCTCodec(8, 64, torch.float64)
    assert torch.allclose(full.decode_raw(full.encode(x)), x)
    assert DCTCodec(8, 10).encode(x).shape == (4, 10)


def test_autoencoder_learns():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny matmuls: avoid OpenMP oversubscription on shared cores
    try:
        _autoencoder_learns()
    finally:
        torch.set_num_threads(threads)


def _autoencoder_learns():
    x = ellipses(800, seed=4)
    held = ellipses(300, seed=5)
    untrained = reconstruction_miou(MaskAutoencoder(28, 8), held)
    trained = train_autoencoder(x, dim=8, steps=150)
    assert reconstruction_miou(trained, held) > untrained + 0.3


@needs_coco
def test_pca_fit_command_on_coco_mini(tmp_path):
    out = tmp_path / "pca.pt"
    s = pca_fit_command(COCO_MINI, "val2017", dim=20, out=out, progress=False)
    assert s["masks_used"] == 707 and s["masks_skipped"] == 0 and s["crowd_excluded"] == 5
    assert 0.8 < s["energy"] < 1 and 0.6 < s["miou"] < 1 and s["miou_masks"] == 707
    codec = PCACodec.load(out)
    assert codec.dim == 20 and codec.meta["split"] == "val2017" and codec.meta["n_masks"] == 707
    assert json.loads(json.dumps(s)) == s


def test_pca_fit_command_missing_split(tmp_path):
    with pytest.raises(FileNotFoundError, match="instances_nope.json"):
        pca_fit_command(tmp_path, "nope", progress=False)


OFFICIAL_PCA = Path(os.environ.get("SEGBOOK_ISTR_PCA", Path(__file__).resolve().parents[2] / "shared" / "istr-official-pca"))
OFFICIAL_60 = OFFICIAL_PCA / "coco_2017_train_class_agnosticTrue_whitenTrue_sigmoidTrue_60_siz28.npz"
needs_official = pytest.mark.skipif(not OFFICIAL_60.exists(), reason="official ISTR PCA bases not found")


@needs_official
def test_official_basis_encode_decode_are_the_readme_formulas(masks):
    z = np.load(OFFICIAL_60)
    comp, mean, var = z["components_c"][0].astype(np.float64), z["mean_c"].astype(np.float64), z["explained_variance_c"].astype(np.float64)
    codec = PCACodec.from_official_npz(OFFICIAL_60, dtype=torch.float64)
    m = masks[:100]
    r = codec.encode(m, generator=torch.Generator().manual_seed(1))
    u = (0.05 * torch.rand(m.flatten(1).shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)).clamp_min(0.01).numpy()
    soft = np.where(m.flatten(1).numpy() >= 0.5, 1 - u, u)
    assert np.abs(r.numpy() - (np.log(soft / (1 - soft)) - mean) @ comp.T / np.sqrt(var)).max() < 1e-6
    dec = 1 / (1 + np.exp(-(r.numpy() @ (comp * np.sqrt(var[0])[:, None]) + mean)))
    assert np.abs(codec.decode(r).flatten(1).numpy() - dec).max() < 1e-6
    loaded = PCACodec.load(OFFICIAL_60)                                     # a config's codec_path may name the .npz
    assert loaded.dim == 60 and loaded.logit and loaded.centred and loaded.whitened and loaded.components.dtype == torch.float32
    assert loaded.energy() == pytest.approx(float(z["ratio_c"].sum()), abs=1e-6)
    assert torch.equal(loaded.encode(m, generator=torch.Generator().manual_seed(2)),
                       loaded.encode(m, generator=torch.Generator().manual_seed(2)))   # seeded softening is repeatable


def test_official_npz_with_a_missing_field_names_file_and_field(tmp_path):
    bad = tmp_path / "bad.npz"
    np.savez(bad, components_c=np.zeros((1, 2, 16), np.float32), mean_c=np.zeros((1, 16), np.float32))
    with pytest.raises(ValueError, match=r"bad\.npz.*explained_variance_c"):
        PCACodec.load(bad)


@needs_official
@needs_coco
def test_pca_fit_from_npz_reports_on_the_official_basis(capsys):
    from segbook.cli import main
    assert main(["pca-fit", "--from-npz", str(OFFICIAL_60), "--data", str(COCO_MINI), "--split", "val2017"]) == 0
    report = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert report["dim"] == 60 and report["miou_masks"] == 707 and report["energy"] == pytest.approx(0.8136, abs=1e-3)
    assert abs(report["miou"] - 0.944) < 0.01                                # the README's official measurement
