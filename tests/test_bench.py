"""segbook.bench: the speed/memory harness (fields, ratio, alternation, pre-processing, bad input).

Tiny sizes (64x64), 1-2 timed rounds: these check the harness, never the speed."""
import json
from pathlib import Path

import pytest
import torch

from segbook.bench import (bench_command, bench_table, istr_preprocess, latency_summary, measure_call,
                           parse_size, random_pca_codec, time_alternately, cpu_peak_works)
from segbook.data import build_transforms, collate

ROOT = Path(__file__).resolve().parents[1]
SHAPES_CFG = ROOT / "configs" / "istr_shapes_cpu.yaml"


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    torch.set_num_threads(1)
    out = tmp_path_factory.mktemp("bench") / "sub" / "pair.json"
    rep = bench_command(str(SHAPES_CFG), vs="maskrcnn_r50", device="cpu", size="64x96", iters=2, warmup=1, out=str(out))
    return rep, out


def test_json_fields_and_file(pair):
    rep, out = pair
    on_disk = json.loads(out.read_text())
    assert on_disk == json.loads(json.dumps(rep))                  # the file is the returned dict
    assert [p.name for p in out.parent.iterdir()] == ["pair.json"]  # no temp file left behind
    for k in ("command", "date", "device", "device_name", "torch", "torchvision", "precision", "batch", "size",
              "iters", "warmup", "timed", "memory", "model", "vs", "ratio"):
        assert k in rep, k
    assert rep["batch"] == 1 and rep["size"] == [64, 96] and rep["precision"] == "float32" and rep["device"] == "cpu"
    assert "--vs maskrcnn_r50" in rep["command"] and "--size 64x96" in rep["command"]
    assert rep["model"]["kind"] == "istr" and rep["vs"]["kind"] == "maskrcnn_r50"
    for role in ("model", "vs"):
        m = rep[role]
        assert m["median_ms"] > 0 and m["p90_ms"] >= m["median_ms"] and m["fps"] == pytest.approx(1000 / m["median_ms"])
        # both models paste 100 masks into the full input image
        assert m["detections"] == 100 and m["mask_shape"] == [100, 1, 64, 96]
        assert m["params"] > 0


def test_ratio_is_latency_ratio(pair):
    rep, _ = pair
    assert rep["ratio"] == pytest.approx(rep["vs"]["median_ms"] / rep["model"]["median_ms"], rel=1e-12)


def test_both_models_timed_equally(pair):
    rep, _ = pair
    assert rep["model"]["n_timed"] == rep["vs"]["n_timed"] == 2
    assert len(rep["model"]["latencies_ms"]) == len(rep["vs"]["latencies_ms"]) == 2


def test_alternation_order_and_warmup():
    calls, log = [], []
    fns = {n: (lambda x, n=n: calls.append(n) or x) for n in ("a", "b", "c")}
    res = time_alternately(fns, torch.zeros(1), iters=4, warmup=2, log=log)
    assert calls == ["a", "b", "c"] * 6          # warm-up rounds alternate too
    assert log == ["a", "b", "c"] * 4            # timed: A B C A B C ...
    assert all(len(r["ms"]) == 4 for r in res.values())


def test_latency_summary_values():
    s = latency_summary([float(v) for v in range(10, 0, -1)])
    assert s["median_ms"] == 5.5 and s["p90_ms"] == pytest.approx(9.1) and s["min_ms"] == 1
    assert s["fps"] == pytest.approx(1000 / 5.5)


@pytest.mark.parametrize("bad,msg", [
    (dict(model="resnet_nope"), "neither a segbook config"),
    (dict(model="maskrcnn_r50", vs="mask_rcnn_r101"), "mask_rcnn_r101"),
    (dict(model="maskrcnn_r50", size="64"), "HxW"),
    (dict(model="maskrcnn_r50", size="0x64"), "positive"),
    (dict(model="maskrcnn_r50", amp="bf16"), "CUDA only"),
    (dict(model="maskrcnn_r50", amp="int8"), "expected none"),
    (dict(model="maskrcnn_r50", device="tpu"), "cpu or cuda"),
    (dict(model="maskrcnn_r50", iters=0), "iters"),
])
def test_bad_input_is_named(bad, msg):
    with pytest.raises(ValueError, match=msg):
        bench_command(**(dict(size="64x64", iters=1, warmup=0) | bad))


def test_parse_size():
    assert parse_size("480x640") == (480, 640) and parse_size("32X48") == (32, 48)


def test_preprocess_matches_data_transform():
    img = torch.randint(0, 256, (3, 45, 70), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))
    x, sizes = istr_preprocess(img, 40, 100)
    ref, tgt = collate([build_transforms(False, test_size=40, max_size_cap=100)(
        img, dict(boxes=torch.zeros(0, 4), masks=torch.zeros(0, 45, 70, dtype=torch.uint8)))])
    assert x.shape == ref.shape and torch.allclose(x, ref, atol=1e-6)
    assert sizes.tolist() == [tgt[0]["size"].tolist()]


def test_random_codec_orthonormal_and_shaped():
    c = random_pca_codec(12, 14)
    assert c.dim == 12 and c.size == 14
    assert torch.allclose(c.components @ c.components.T, torch.eye(12), atol=1e-5)
    assert c.decode(torch.randn(3, 12)).shape == (3, 14, 14)


@pytest.mark.skipif(not cpu_peak_works(), reason="VmHWM cannot be reset or does not track allocations here")
def test_cpu_peak_memory_sees_an_allocation():
    junk = [torch.ones(k * 2**20) for k in (3, 50, 7, 100)]; del junk   # freed heap left behind (the CI failure)
    n = 64 * 2**20 // 4                                              # 64 MiB of float32, touched
    ms, peak, out = measure_call(lambda k: torch.ones(k).sum(), n, torch.device("cpu"))
    assert peak is not None and peak > 48 * 2**20
    ms, peak_small, _ = measure_call(lambda k: torch.ones(k).sum(), 1000, torch.device("cpu"))
    assert peak_small < 16 * 2**20


def test_raw_mask_istr_alone_and_table(tmp_path):
    cfg = tmp_path / "tiny.yaml"
    cfg.write_text("model:\n  backbone: resnet18\n  num_queries: 10\n  num_stages: 1\n  hidden: 32\n  heads: 4\n"
                   "  dim_dynamic: 8\n  ffn: 64\n  mask_head: raw\n  mask_size: 14\n")
    rep = bench_command(str(cfg), device="cpu", size="64x64", iters=1, warmup=0, num_classes=3)
    assert "vs" not in rep and "ratio" not in rep and "out" not in rep
    assert rep["model"]["detections"] == 10 * 3 and rep["model"]["mask_shape"] == [30, 1, 64, 64]
    table = bench_table([rep])
    assert table.count("\n") == 3 and "| tiny |" in table


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-CUDA exit; on a GPU machine run tools/gpu_check.sh itself")
def test_gpu_check_without_cuda_says_so_and_runs_nothing(tmp_path):
    import os
    import subprocess
    import sys
    env = dict(os.environ, PYTHON=sys.executable, OUT=str(tmp_path))
    r = subprocess.run(["bash", str(ROOT / "tools" / "gpu_check.sh")], capture_output=True, text=True, env=env, timeout=120)
    assert r.returncode == 1
    assert (r.stdout + r.stderr).strip().splitlines() == [
        "gpu_check: no CUDA device (torch.cuda.is_available() is False); nothing run"]
    assert list(tmp_path.iterdir()) == []
