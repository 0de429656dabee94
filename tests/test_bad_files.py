"""A bad-input corpus of image files, checkpoints and command-line arguments, generated on the fly (issue #16 items 3,
5, 6 and 9).

Images go through the three readers of image files — training (`CocoInstances`: a counted skip), evaluation
(`predict_dataset`: the image is excluded from GT and predictions, counted) and `segbook predict` (one clear error) —
and must end the same way in each. Checkpoints go through `segbook eval`, `segbook predict` and `segbook train`
(resume, `weights=`). Arguments go through `segbook.cli.main`. Every bad case ends in exit status 2 with one line
`segbook: error: ...` naming the file or argument, or in a skip counted under its reason; never a traceback."""
import json
import shutil
import struct
import warnings
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from segbook.cli import main
from segbook.data import CocoInstances, DatasetError, read_rgb

REPO = Path(__file__).resolve().parents[1]
H = W = 32


# ---- image files -------------------------------------------------------------------------------------------------
def png_claiming(width, height):
    "A PNG whose header announces width x height (and holds no pixels): what a decompression bomb looks like unopened."
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)) + chunk(b"IEND", b"")


def palette_image(transparent=False):
    im = Image.new("P", (W, H), 1)
    im.putpalette([0, 0, 0, 10, 200, 30] + [0] * (256 * 3 - 6))
    if transparent: im.info["transparency"] = 1
    return im


def save(im, **kw):
    return lambda p: im.save(p, **kw)


def gif_two_frames(p):
    a, b = palette_image(), Image.new("P", (W, H), 0)
    b.putpalette([250, 0, 0] + [0] * 765)
    a.save(p, save_all=True, append_images=[b])


def truncated_png(p):
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (H, W, 3), dtype=np.uint8)).save(p)
    data = p.read_bytes(); p.write_bytes(data[: len(data) // 2])


rgb = lambda *c: np.broadcast_to(np.array(c, np.uint8), (H, W, 3))
# (name, suffix, writer(path), expected): an [H,W,3] array (exact, or (array, tolerance)), or ('bad', reason, words)
IMAGE_CASES = [
    ("rgb_png", "png", save(Image.new("RGB", (W, H), (1, 2, 3))), rgb(1, 2, 3)),
    ("grey_L", "png", save(Image.new("L", (W, H), 77)), rgb(77, 77, 77)),
    ("grey_1bit", "png", save(Image.new("1", (W, H), 1)), rgb(255, 255, 255)),
    ("grey_16bit_png", "png", save(Image.fromarray(np.full((H, W), 100 * 257, np.uint16))), rgb(100, 100, 100)),
    ("grey_32bit_int_tiff_16bit_values", "tiff", save(Image.fromarray(np.full((H, W), 65535, np.int32))), rgb(255, 255, 255)),
    ("palette", "png", save(palette_image()), rgb(10, 200, 30)),
    ("palette_transparent", "png", lambda p: palette_image(True).save(p, transparency=1), rgb(10, 200, 30)),
    ("rgba_alpha_dropped", "png", save(Image.new("RGBA", (W, H), (10, 20, 30, 0))), rgb(10, 20, 30)),
    ("grey_alpha_LA", "png", save(Image.new("LA", (W, H), (90, 5))), rgb(90, 90, 90)),
    ("cmyk_tiff", "tiff", save(Image.new("CMYK", (W, H), (255, 0, 0, 0))), rgb(0, 255, 255)),
    ("cmyk_jpeg", "jpg", save(Image.new("CMYK", (W, H), (0, 255, 0, 0)), quality=100), (rgb(255, 0, 255), 3)),
    ("grey_jpeg", "jpg", save(Image.new("L", (W, H), 128), quality=100), (rgb(128, 128, 128), 2)),
    ("gif_first_frame", "gif", gif_two_frames, rgb(10, 200, 30)),
    ("webp_lossless", "webp", save(Image.new("RGB", (W, H), (5, 6, 7)), lossless=True), rgb(5, 6, 7)),
    ("bmp", "bmp", save(Image.new("RGB", (W, H), (9, 8, 7))), rgb(9, 8, 7)),
    ("truncated_png", "png", truncated_png, ("bad", "bad_image", ["cannot decode image", "images id=1"])),
    ("zero_bytes", "png", lambda p: p.write_bytes(b""), ("bad", "bad_image", ["cannot decode image"])),
    ("text_named_png", "png", lambda p: p.write_text("not an image"), ("bad", "bad_image", ["cannot decode image"])),
    ("wrong_size", "png", save(Image.new("RGB", (W + 8, H))), ("bad", "bad_image", ["image is 40x32", "width=32"])),
    ("int_beyond_16_bits", "tiff", save(Image.fromarray(np.full((H, W), 70000, np.int32))), ("bad", "bad_image", ["16 bits"])),
    ("float_image", "tiff", save(Image.fromarray(np.full((H, W), 0.5, np.float32))), ("bad", "bad_image", ["floating-point"])),
    ("decompression_bomb_header", "png", lambda p: p.write_bytes(png_claiming(100_000, 100_000)),
     ("bad", "image_too_large", ["pixels", "images id=1"])),
    ("over_the_pixel_limit", "png", save(Image.new("RGB", (W, H))), ("bad", "image_too_large", ["over the limit of 1000"])),
]
PIXEL_LIMIT = {"over_the_pixel_limit": 1000}


def image_split(root, name, suffix, writer):
    "A split of two images: id 1 is the case's file, id 2 an ordinary 16x16 PNG; one square annotation each."
    (root / "annotations").mkdir(parents=True)
    (root / "val").mkdir()
    writer(root / "val" / f"1.{suffix}")
    Image.new("RGB", (16, 16), (200, 0, 0)).save(root / "val" / "2.png")
    square = lambda x, y, s: {"segmentation": [[x, y, x + s, y, x + s, y + s, x, y + s]], "bbox": [x, y, s, s], "area": s * s}
    d = {"images": [{"id": 1, "file_name": f"1.{suffix}", "height": H, "width": W},
                    {"id": 2, "file_name": "2.png", "height": 16, "width": 16}],
         "categories": [{"id": 1, "name": "thing"}],
         "annotations": [{"id": 1, "image_id": 1, "category_id": 1, "iscrowd": 0, **square(4, 4, 16)},
                         {"id": 2, "image_id": 2, "category_id": 1, "iscrowd": 0, **square(2, 2, 8)}]}
    (root / "annotations" / "instances_val.json").write_text(json.dumps(d))
    return root / "val" / f"1.{suffix}"


class NoDetections(torch.nn.Module):
    def predict(self, images, sizes, orig, topk=100):
        return [{"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.int64), "scores": torch.zeros(0),
                 "masks": torch.zeros(0, 1, int(h), int(w))} for h, w in orig.tolist()]


@pytest.mark.parametrize("name,suffix,writer,expected", IMAGE_CASES, ids=[c[0] for c in IMAGE_CASES])
def test_image_file_same_verdict_in_training_and_evaluation(tmp_path, name, suffix, writer, expected):
    from segbook.pipeline import evaluate_model
    path = image_split(tmp_path, name, suffix, writer)
    limit = PIXEL_LIMIT.get(name, 89_478_485)
    train = CocoInstances(tmp_path, "val", max_image_pixels=limit)
    evalds = CocoInstances(tmp_path, "val", train=False, on_bad_image="raise", max_image_pixels=limit)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        image, target = train[0]
        m = evaluate_model(NoDetections(), evalds, iou_types=("bbox",), progress=False)
    if is_bad(expected):
        _, reason, words = expected
        assert target["image_id"] == 2 and train.skipped == {reason: 1}            # training: the next image, counted
        assert m["images"] == 1 and m["images_excluded"] == 1 and m["skipped"] == {"image_excluded_from_eval": 1}
        msgs = " ".join(str(w.message) for w in caught)
        assert all(w in msgs for w in words) and str(path) in msgs, msgs
        if name != "wrong_size":   # the file itself is bad (wrong_size is a file at odds with its record)
            with pytest.raises(DatasetError) as e:
                read_rgb(path, limit)
            assert str(path) in str(e.value)
    else:
        want, tol = expected if isinstance(expected, tuple) else (expected, 0)
        got = image.permute(1, 2, 0).numpy()
        assert target["image_id"] == 1 and not train.skipped and got.dtype == np.uint8 and got.shape == (H, W, 3)
        assert np.abs(got.astype(int) - want.astype(int)).max() <= tol, (got[0, 0], want[0, 0])
        assert m["images"] == 2 and m["images_excluded"] == 0 and m["skipped"] == {}


def test_skips_in_dataloader_workers_reach_the_parent(tmp_path):
    "A bad image met inside a DataLoader worker process is still counted by the data set the parent holds."
    image_split(tmp_path, "t", "png", lambda p: p.write_text("not an image"))
    ds = CocoInstances(tmp_path, "val")
    loader = torch.utils.data.DataLoader(ds, batch_size=1, num_workers=2, collate_fn=lambda b: b,
                                         multiprocessing_context="fork")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ids = [b[0][1]["image_id"] for b in loader]
    assert ids == [2, 2] and ds.skipped == {"bad_image": 1}


# ---- a trained run: predict, eval and train with bad files -----------------------------------------------------------
@pytest.fixture(scope="module")
def shapes(tmp_path_factory):
    root = tmp_path_factory.mktemp("bad_files") / "shapes"
    assert main(["data", "synth", "--out", str(root), "--n-train", "4", "--n-val", "2", "--size", "64"]) == 0
    return root


TINY = ["data.batch_size=2", "data.num_workers=0", "eval_period=0", "log_period=1", "model.num_queries=10",
        "model.num_stages=1", "data.min_size=[64]", "data.max_size_cap=64", "checkpoint_period=1"]


@pytest.fixture(scope="module")
def run(shapes):
    "A 1-iteration ISTR run folder (config.yaml, codec.pt, classes.json, last.pt)."
    from segbook.pipeline import train_command
    n = torch.get_num_threads(); torch.set_num_threads(1)
    out = shapes.parent / "run"
    train_command(REPO / "configs" / "istr_shapes_cpu.yaml", out, data=shapes, device="cpu", max_iters=1, progress=False,
                  overrides=TINY, eval_images=1)
    torch.set_num_threads(n)
    return out


def is_bad(expected):
    return isinstance(expected, tuple) and isinstance(expected[0], str) and expected[0] == "bad"


def one_line_error(capsys, argv) -> str:
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("segbook: error: ") and "Traceback" not in err, err
    return err


BAD_FILES = [c[0] for c in IMAGE_CASES if is_bad(c[3]) and c[0] not in PIXEL_LIMIT and c[0] != "wrong_size"]


@pytest.mark.parametrize("name", BAD_FILES)
def test_predict_refuses_a_bad_image_with_one_line(run, tmp_path, capsys, name):
    _, suffix, writer, (_, _, words) = next(c for c in IMAGE_CASES if c[0] == name)
    path = tmp_path / f"x.{suffix}"
    writer(path)
    err = one_line_error(capsys, ["predict", "--checkpoint", str(run / "last.pt"), "--out", str(tmp_path / "p"), str(path)])
    assert str(path) in err and all(w in err for w in words if w != "images id=1"), err


def test_predict_reads_16_bit_and_palette_images(run, tmp_path, capsys):
    paths = []
    for name in ("grey_16bit_png", "palette_transparent", "cmyk_tiff"):
        _, suffix, writer, _ = next(c for c in IMAGE_CASES if c[0] == name)
        paths.append(tmp_path / f"{name}.{suffix}"); writer(paths[-1])
    assert main(["predict", "--checkpoint", str(run / "last.pt"), "--out", str(tmp_path / "p"), "--threshold", "0",
                 *map(str, paths)]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["images"] == 3 and len(out["overlays"]) == 3


def test_train_eval_and_pca_fit_print_and_store_their_skip_counts(shapes, tmp_path, capsys):
    "A degenerate polygon and an unreadable image: each command prints one summary line and stores the counts."
    data = tmp_path / "d"; shutil.copytree(shapes, data)
    ann = data / "annotations" / "instances_train.json"
    d = json.loads(ann.read_text())
    d["annotations"][0]["segmentation"] = [[1, 1, 5, 1]]
    ann.write_text(json.dumps(d))
    (data / "train" / d["images"][1]["file_name"]).write_bytes(b"")
    out = tmp_path / "r"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        rc = main(["train", "--config", str(REPO / "configs" / "istr_shapes_cpu.yaml"), "--data", str(data), "--out", str(out),
                   "--max-iters", "2", *TINY])
    cap = capsys.readouterr()
    assert rc == 0, cap.err[-2000:]
    line = [l for l in cap.err.splitlines() if l.startswith("train (")]
    assert len(line) == 1 and "1 annotation(s) (degenerate_polygon 1)" in line[0] and "bad_image" in line[0], cap.err[-800:]
    last = json.loads((out / "metrics.jsonl").read_text().splitlines()[-1])
    assert last["skipped"]["degenerate_polygon"] == 1 and last["skipped"]["bad_image"] >= 1 and last["images"] == 4
    from segbook.report import read_metrics_log
    train_lines, _ = read_metrics_log(out)
    assert all("skipped" not in r for r in train_lines)           # the plots never see the counts as a training line
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert main(["pca-fit", "--data", str(data), "--split", "train", "--out", str(tmp_path / "c.pt"), "--dim", "8"]) == 0
    cap = capsys.readouterr()
    assert json.loads(cap.out)["skipped"] == {"degenerate_polygon": 1}
    assert any(l.startswith("pca-fit (") and "degenerate_polygon 1" in l for l in cap.err.splitlines())
    val = data / "annotations" / "instances_val.json"
    v = json.loads(val.read_text()); v["annotations"][0]["bbox"] = [0, 0, 0, 5]; val.write_text(json.dumps(v))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert main(["eval", "--checkpoint", str(out / "last.pt"), "--data", str(data), "--max-images", "2"]) == 0
    cap = capsys.readouterr()
    assert json.loads(cap.out.splitlines()[-1])["skipped"] == {"zero_area_box": 1}
    assert any(l.startswith("eval (") and "zero_area_box 1" in l for l in cap.err.splitlines())


# ---- checkpoints ---------------------------------------------------------------------------------------------------
class NotATensor:
    pass


def _copy_run(run, tmp_path):
    dst = tmp_path / "run"; shutil.copytree(run, dst); return dst


CHECKPOINT_CASES = [  # (name, how to break RUN/last.pt, words of the one-line error)
    ("missing_file", lambda p: p.unlink(), ["no such checkpoint file"]),
    ("zero_bytes", lambda p: p.write_bytes(b""), ["cannot read checkpoint"]),
    ("truncated", lambda p: p.write_bytes(p.read_bytes()[: p.stat().st_size // 2]), ["cannot read checkpoint"]),
    ("text_file", lambda p: p.write_text("weights"), ["cannot read checkpoint"]),
    ("a_list", lambda p: torch.save([1, 2], p), ["holds list"]),
    ("no_model_entry", lambda p: torch.save({"iteration": 3}, p), ["no 'model' entry"]),
    ("pickled_object", lambda p: torch.save({"model": NotATensor()}, p), ["cannot read checkpoint", "Unpickl"]),
    ("nan_weight", lambda p: _poke(p, float("nan")), ["holds NaN or inf"]),
    ("inf_weight", lambda p: _poke(p, float("inf")), ["holds NaN or inf"]),
    ("other_model", lambda p: torch.save({"model": {"conv.weight": torch.zeros(3, 3)}}, p), ["do not fit this model", "missing"]),
    ("wrong_shape", lambda p: _reshape(p), ["do not fit this model", "1 of another shape"]),
    ("config_missing", lambda p: (p.parent / "config.yaml").unlink(), ["config.yaml", "missing"]),
]


def _poke(p, value):
    ck = torch.load(p, weights_only=True)
    k = next(k for k, v in ck["model"].items() if v.is_floating_point())
    ck["model"][k].view(-1)[0] = value
    torch.save(ck, p)


def _reshape(p):
    ck = torch.load(p, weights_only=True)
    k = next(k for k, v in ck["model"].items() if v.is_floating_point() and v.dim() == 2)
    ck["model"][k] = torch.zeros(ck["model"][k].shape[0] + 1, ck["model"][k].shape[1])
    torch.save(ck, p)


@pytest.mark.parametrize("name,breaker,words", CHECKPOINT_CASES, ids=[c[0] for c in CHECKPOINT_CASES])
def test_bad_checkpoint_is_one_line_in_eval_and_predict(run, tmp_path, capsys, name, breaker, words):
    r = _copy_run(run, tmp_path)
    breaker(r / "last.pt")
    img = tmp_path / "x.png"; Image.new("RGB", (64, 64)).save(img)
    for argv in (["eval", "--checkpoint", str(r / "last.pt")],
                 ["predict", "--checkpoint", str(r / "last.pt"), "--out", str(tmp_path / "p"), str(img)]):
        err = one_line_error(capsys, argv)
        assert all(w in err for w in words) and str(r) in err, (argv[0], err)


@pytest.mark.parametrize("name", ["truncated", "no_model_entry", "nan_weight", "wrong_shape"])
def test_bad_checkpoint_is_one_line_when_training_resumes(run, shapes, tmp_path, capsys, name):
    "`segbook train` resuming from a broken OUT/last.pt stops at once with one line (it never trains over it)."
    _, breaker, words = next(c for c in CHECKPOINT_CASES if c[0] == name)
    r = _copy_run(run, tmp_path)
    breaker(r / "last.pt")
    before = (r / "last.pt").read_bytes()
    err = one_line_error(capsys, ["train", "--config", str(REPO / "configs" / "istr_shapes_cpu.yaml"), "--data", str(shapes),
                                  "--out", str(r), "--max-iters", "2", *TINY])
    assert all(w in err for w in words), err
    assert (r / "last.pt").read_bytes() == before


def test_resume_needs_the_optimizer_state(run, shapes, tmp_path, capsys):
    r = _copy_run(run, tmp_path)
    ck = torch.load(r / "last.pt", weights_only=True); ck.pop("optimizer"); torch.save(ck, r / "last.pt")
    err = one_line_error(capsys, ["train", "--config", str(REPO / "configs" / "istr_shapes_cpu.yaml"), "--data", str(shapes),
                                  "--out", str(r), "--max-iters", "2", *TINY])
    assert "no 'optimizer' entry" in err


@pytest.mark.parametrize("name", ["text_file", "nan_weight", "other_model"])
def test_bad_weights_file_is_one_line_before_training(run, shapes, tmp_path, capsys, name):
    "`weights=FILE` (fine-tuning) that cannot be read, holds NaN, or matches nothing: one line, no run folder written."
    _, breaker, words = next(c for c in CHECKPOINT_CASES if c[0] == name)
    w = tmp_path / "w.pt"; shutil.copy(run / "last.pt", w); breaker(w)
    words = ["no tensor matches"] if name == "other_model" else words
    err = one_line_error(capsys, ["train", "--config", str(REPO / "configs" / "istr_shapes_cpu.yaml"), "--data", str(shapes),
                                  "--out", str(tmp_path / "r"), "--max-iters", "1", *TINY, f"weights={w}"])
    assert all(x in err for x in words) and str(w) in err, err
    assert not (tmp_path / "r" / "last.pt").exists()


# ---- command-line arguments -----------------------------------------------------------------------------------------
def _argv(tmp_path, shapes, run):
    c, d = str(REPO / "configs" / "istr_shapes_cpu.yaml"), str(shapes)
    ck, o = str(run / "last.pt"), str(tmp_path / "o")
    return [  # (name, argv, words of the one-line error)
        ("train_config_missing", ["train", "--config", "nope.yaml", "--out", o], ["nope.yaml", "no such config file"]),
        ("train_max_iters_zero", ["train", "--config", c, "--out", o, "--max-iters", "0"], ["--max-iters", "> 0"]),
        ("train_max_iters_text", ["train", "--config", c, "--out", o, "--max-iters", "ten"], ["--max-iters", "'ten'"]),
        ("train_eval_images_negative", ["train", "--config", c, "--out", o, "--eval-images", "-3"], ["--eval-images"]),
        ("train_unknown_key", ["train", "--config", c, "--out", o, "--data", d, "foo.bar=1"], ["unknown key 'foo'"]),
        ("train_override_without_value", ["train", "--config", c, "--out", o, "--data", d, "model.num_queries"], ["expected key=value"]),
        ("train_bad_lr", ["train", "--config", c, "--out", o, "--data", d, "solver.lr=-1"], ["solver.lr", "> 0"]),
        ("train_device_unknown", ["train", "--config", c, "--out", o, "--device", "tpu"], ["--device", "'tpu'"]),
        ("train_data_missing", ["train", "--config", c, "--out", o, "--data", str(tmp_path / "none")], ["annotation file not found"]),
        ("eval_nothing_to_score", ["eval", "--data", d], ["--checkpoint", "--results"]),
        ("eval_max_images_zero", ["eval", "--checkpoint", ck, "--max-images", "0"], ["--max-images", "> 0"]),
        ("eval_results_without_split", ["eval", "--results", o, "--data", d], ["--data ROOT and --split SPLIT"]),
        ("eval_results_missing", ["eval", "--results", str(tmp_path / "r.json"), "--data", d, "--split", "val"], ["results file not found"]),
        ("eval_unknown_split", ["eval", "--checkpoint", ck, "--split", "test"], ["instances_test.json"]),
        ("predict_threshold_above_one", ["predict", "--checkpoint", ck, "--out", o, "x.png", "--threshold", "1.5"], ["--threshold", "[0, 1]"]),
        ("predict_threshold_nan", ["predict", "--checkpoint", ck, "--out", o, "x.png", "--threshold", "nan"], ["--threshold"]),
        ("predict_image_missing", ["predict", "--checkpoint", ck, "--out", o, str(tmp_path / "x.png")], ["x.png"]),
        ("predict_only_overrides", ["predict", "--checkpoint", ck, "--out", o, "model.refine=false"], ["no image file given"]),
        ("predict_data_without_split", ["predict", "--checkpoint", ck, "--out", o, "--data", d, "x.png"], ["--data and --split go together"]),
        ("pca_fit_dim_zero", ["pca-fit", "--data", d, "--split", "train", "--out", o, "--dim", "0"], ["--dim", "> 0"]),
        ("pca_fit_dim_too_large", ["pca-fit", "--data", d, "--split", "train", "--out", o, "--dim", "50", "--size", "7"], ["--dim 50", "49 pixels"]),
        ("pca_fit_size_zero", ["pca-fit", "--data", d, "--split", "train", "--out", o, "--size", "0"], ["--size", "> 0"]),
        ("pca_fit_without_out", ["pca-fit", "--data", d, "--split", "train"], ["--out is required"]),
        ("pca_fit_split_missing", ["pca-fit", "--data", d, "--split", "test", "--out", o], ["instances_test.json"]),
        ("synth_negative_count", ["data", "synth", "--out", o, "--n-train", "-1"], ["--n-train", ">= 0"]),
        ("synth_size_zero", ["data", "synth", "--out", o, "--size", "0"], ["--size", "> 0"]),
        ("browse_n_zero", ["data", "browse", "--data", d, "--split", "val", "--out", o, "--n", "0"], ["--n", "> 0"]),
        ("bench_size_malformed", ["bench", "--model", c, "--size", "12x"], ["--size", "HxW"]),
        ("bench_iters_zero", ["bench", "--model", c, "--iters", "0"], ["--iters", "> 0"]),
        ("bench_warmup_negative", ["bench", "--model", c, "--warmup", "-1"], ["--warmup", ">= 0"]),
        ("bench_threads_zero", ["bench", "--model", c, "--threads", "0"], ["--threads", "> 0"]),
        ("reproduce_unknown_profile", ["reproduce", "--profile", "fast", "--out", o], ["--profile", "'fast'"]),
        ("plot_no_metrics", ["plot", str(tmp_path)], ["no metrics.jsonl"]),
        ("unknown_command", ["segment"], ["'segment'"]),
    ] + ([] if torch.cuda.is_available() else [
        ("train_cuda_absent", ["train", "--config", c, "--out", o, "--device", "cuda"], ["CUDA is not available"]),
        ("eval_cuda_absent", ["eval", "--checkpoint", ck, "--device", "cuda"], ["CUDA is not available"]),
        ("bench_cuda_absent", ["bench", "--model", c, "--device", "cuda:0"], ["CUDA is not available"]),
        ("train_config_device_cuda_absent", ["train", "--config", c, "--out", o, "--data", d, "device=cuda"], ["CUDA is not available"]),
    ])


N_ARGV_CASES = 38


def test_bad_arguments_are_one_line_errors_before_any_work(shapes, run, tmp_path, capsys):
    "Every bad argument exits 2 with one `error:` line naming it; none starts work (no output folder is made)."
    cases = _argv(tmp_path, shapes, run)
    assert len(cases) >= N_ARGV_CASES - 4
    for name, argv, words in cases:
        try:
            rc = main(argv)
        except SystemExit as e:   # argparse's own errors
            rc = e.code
        err = capsys.readouterr().err.strip().splitlines()
        assert rc == 2 and err, (name, rc, err)
        last = err[-1]
        assert "error:" in last and "Traceback" not in "\n".join(err), (name, err)
        assert all(w in last for w in words), (name, last)
        assert not (tmp_path / "o").exists(), name


def test_unpasted_predictions_score_like_pasted_ones(run):
    "`predict(..., paste=False)` (what evaluation and predict use, so that big images stay in bounded memory) gives the"
    " same COCO results as pasting every mask at full size."
    from segbook.evaluation import predictions_to_coco
    from segbook.pipeline import load_trained
    model, _ = load_trained(run / "last.pt")
    x = torch.randn(1, 3, 64, 64)
    sizes, orig = torch.tensor([[64, 64]]), torch.tensor([[301, 455]])
    pasted = model.predict(x, sizes, orig, topk=20)
    crops = model.predict(x, sizes, orig, topk=20, paste=False)
    assert "masks" not in crops[0] and crops[0]["image_size"] == (301, 455)
    a, b = predictions_to_coco(pasted, [1], list(range(1, 81))), predictions_to_coco(crops, [1], list(range(1, 81)))
    assert len(a) == 20 and a == b
