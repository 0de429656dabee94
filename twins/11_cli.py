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
# # The `segbook` command line
#
# > One entry point, `segbook`, with a subcommand per job: the same code the chapters derive, for your own COCO-format data.

# %%
#| default_exp cli

# %% [markdown]
# Each subcommand is a thin shell around a function a chapter exports: the parser reads arguments,
# the chapter's function does the work. Imports are lazy, so `segbook --help` answers instantly
# without loading torch.

# %%
#| export
import argparse
import json
import re
import sys
from pathlib import Path


# %%
#| export
def _cmd_data_synth(a):
    from segbook.shapes import write_shapes_dataset
    info = write_shapes_dataset(a.out, n_train=a.n_train, n_val=a.n_val, size=a.size, seed=a.seed, preset=a.preset)
    print(json.dumps(info))

def _cmd_data_browse(a):
    from segbook.data import browse
    paths = browse(a.data, a.split, a.out, n=a.n, seed=a.seed)
    print(json.dumps({"written": [str(p) for p in paths]}))

def _cmd_pca_fit(a):
    from segbook.embeddings import pca_basis_report, pca_fit_command
    if a.from_npz:
        print(json.dumps(pca_basis_report(a.from_npz, a.data, a.split))); return
    if not a.out:
        raise UsageError("pca-fit: --out is required unless --from-npz is given")
    if a.dim > a.size * a.size:
        raise UsageError(f"pca-fit: --dim {a.dim} is more than the {a.size * a.size} pixels of a --size {a.size} mask")
    print(json.dumps(pca_fit_command(a.data, a.split, dim=a.dim, size=a.size, out=a.out,
                                     mean=a.mean, whiten=a.whiten, logit=a.logit)))


def _overrides(a):
    return list(a.overrides or [])

def _cmd_train(a):
    from segbook.pipeline import train_command
    r = train_command(a.config, a.out, data=a.data, device=a.device, max_iters=a.max_iters, overrides=_overrides(a),
                      resume=not a.no_resume, eval_images=a.eval_images)
    print(json.dumps({k: v for k, v in r.items() if k in ("iteration", "checkpoint", "eval")}, default=str))

def _cmd_pretrain(a):
    from segbook.pretrain import pretrain_command
    card = pretrain_command(a.config, a.out, a.export, data=a.data, max_iters=a.max_iters, overrides=_overrides(a))
    print(json.dumps(card, default=str))

class UsageError(Exception):
    "A combination of arguments the parser cannot rule out by itself; reported like argparse's own errors."

def _print_tables(m:dict, per_class:bool):
    "The AP table (and the per-class one) on stderr, so stdout stays one JSON line for scripts."
    from segbook.report import ap_table, per_class_table
    print(ap_table(m), file=sys.stderr)
    if per_class: print("\n" + per_class_table(m.get("per_class", [])), file=sys.stderr)

def _cmd_eval(a):
    if a.results:
        if not (a.data and a.split): raise UsageError("eval --results needs --data ROOT and --split SPLIT (the ground truth)")
        if a.overrides or a.max_images: raise UsageError("eval --results: key=value overrides and --max-images apply to --checkpoint only")
        from segbook.pipeline import eval_results_command
        m = eval_results_command(a.results, a.data, a.split, out=a.out, per_class=a.per_class)
    else:
        from segbook.pipeline import eval_command
        m = eval_command(a.checkpoint, data=a.data, split=a.split, device=a.device, out=a.out, max_images=a.max_images,
                         overrides=_overrides(a), per_class=a.per_class)
    _print_tables(m, a.per_class)
    print(json.dumps(m))

_OVERRIDE = re.compile(r"^[A-Za-z_][\w.]*=")

def split_overrides(items:list) -> tuple:
    "(files, key=value overrides) of predict's positional arguments: `key=value` unless it is an existing file."
    ov = [x for x in items if _OVERRIDE.match(x) and not Path(x).exists()]
    return [x for x in items if x not in ov], ov

def _cmd_predict(a):
    from segbook.pipeline import predict_command
    images, ov = split_overrides(a.inputs)
    if not images: raise UsageError("predict: no image file given (only key=value overrides)")
    print(json.dumps(predict_command(a.checkpoint, images, a.out, device=a.device, score_threshold=a.threshold,
                                     overrides=ov, data=a.data, split=a.split)))

def _cmd_plot(a):
    from segbook.report import plot_command
    print(json.dumps(plot_command(a.run, a.out)))

def _cmd_viz(a):
    from segbook.report import viz_command
    print(json.dumps(viz_command(a.results, a.data, a.split, a.out, n=a.n, threshold=a.threshold)))

def _cmd_bench(a):
    from segbook.bench import bench_command
    if a.threads:
        import torch; torch.set_num_threads(a.threads)
    print(json.dumps(bench_command(model=a.model, vs=a.vs, device=a.device, size=a.size, iters=a.iters,
                                   warmup=a.warmup, amp=a.amp, out=a.out)))


def _cmd_reproduce(a):
    from segbook.reproduce import reproduce_command
    r = reproduce_command(a.profile, a.out, only=a.only, data=a.data, figures=a.figures)
    print(json.dumps(r, default=str))
    if isinstance(r, dict) and r.get("failed"): sys.exit(1)


# %%
#| export
def _number_type(kind, low, low_ok:bool, high=None, what=""):
    "An argparse `type` that parses `kind` and checks the range, so a bad value is argparse's own one-line error (exit 2)."
    def parse(text):
        try: v = kind(text)
        except ValueError: raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}") from None
        if v != v or v in (float("inf"), float("-inf")) or (v < low if low_ok else v <= low) or (high is not None and v > high):
            raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}")
        return v
    parse.__name__ = what   # argparse names the type in some messages
    return parse

positive_int = _number_type(int, 0, False, what="an integer > 0")
nonneg_int = _number_type(int, 0, True, what="an integer >= 0")
probability = _number_type(float, 0.0, True, 1.0, what="a number in [0, 1]")

def image_size(text:str) -> str:
    "`HxW` with positive integers (bench's --size)."
    m = re.fullmatch(r"\s*(\d+)\s*[xX]\s*(\d+)\s*", text)
    if not m or int(m[1]) == 0 or int(m[2]) == 0: raise argparse.ArgumentTypeError(f"expected HxW with positive integers, e.g. 800x800, got {text!r}")
    return text

def device_name(text:str) -> str:
    "'cpu', 'cuda' or 'cuda:N' (and, for train, 'auto'), checked against this machine before any work starts."
    if text in ("auto", "cpu"): return text
    if not re.fullmatch(r"cuda(:\d+)?", text): raise argparse.ArgumentTypeError(f"expected cpu, cuda or cuda:N, got {text!r}")
    import torch
    if not torch.cuda.is_available(): raise argparse.ArgumentTypeError(f"'{text}' asked for, but CUDA is not available on this machine")
    n = int(text.split(":")[1]) if ":" in text else 0
    if n >= torch.cuda.device_count(): raise argparse.ArgumentTypeError(f"'{text}': this machine has {torch.cuda.device_count()} CUDA device(s)")
    return text

def run_device(text:str) -> str:
    "`device_name` for the commands that run a trained model: 'auto' becomes 'cuda' when this machine has one, else 'cpu'."
    text = device_name(text)
    if text != "auto": return text
    import torch
    return "cuda" if torch.cuda.is_available() else "cpu"


# %%
#| export
def build_parser() -> argparse.ArgumentParser:
    "The `segbook` argument parser: one subparser per job."
    p = argparse.ArgumentParser(prog="segbook", description="segbook: ISTR and Mask Transfiner, a reproducible research book.")
    sub = p.add_subparsers(dest="command", metavar="COMMAND", required=True)

    data = sub.add_parser("data", help="make the synthetic 'shapes' dataset, or render ground-truth overlays")
    dsub = data.add_subparsers(dest="data_command", metavar="ACTION", required=True)
    s = dsub.add_parser("synth", help="write the seeded 'shapes' dataset as COCO JSON + PNG images")
    s.add_argument("--out", required=True, help="output folder (gets annotations/ train/ val/)")
    s.add_argument("--n-train", type=nonneg_int, default=2000, help="training images")
    s.add_argument("--n-val", type=nonneg_int, default=200, help="validation images")
    s.add_argument("--size", type=positive_int, help="image side in pixels (default: the preset's, 128 or 320)")
    s.add_argument("--seed", type=int, default=0, help="generator seed: same seed, same files")
    s.add_argument("--preset", choices=["default", "large"], default="default",
                   help="'large': 320² images, 1-4 mostly COCO-large objects with fine boundary detail (see chapter 01b)")
    s.set_defaults(func=_cmd_data_synth)
    b = dsub.add_parser("browse", help="render ground-truth overlays of a COCO-format split to PNG")
    b.add_argument("--data", required=True, help="dataset root with annotations/instances_SPLIT.json and SPLIT/")
    b.add_argument("--split", required=True, help="split name, e.g. train, val, train2017, val2017")
    b.add_argument("--out", required=True, help="folder for the PNG overlays")
    b.add_argument("--n", type=positive_int, default=8, help="number of images")
    b.add_argument("--seed", type=int, default=0, help="which images: a seeded sample")
    b.set_defaults(func=_cmd_data_browse)

    f = sub.add_parser("pca-fit", help="fit the PCA mask codec of ISTR Eq. 3 on a dataset's masks")
    f.add_argument("--data", required=True, help="dataset root")
    f.add_argument("--split", required=True, help="split whose masks are used")
    f.add_argument("--dim", type=positive_int, default=60, help="embedding dimension l")
    f.add_argument("--size", type=positive_int, default=28, help="mask side s (masks are s x s)")
    f.add_argument("--out", help="codec file to write (.pt); required unless --from-npz")
    f.add_argument("--from-npz", help="report on this fitted basis (official ISTR .npz or a .pt codec) instead of fitting")
    f.add_argument("--mean", action="store_true", help="subtract the mean (official code; the paper has none)")
    f.add_argument("--whiten", action="store_true", help="whiten the components (official code)")
    f.add_argument("--logit", action="store_true", help="fit in the noisy-logit domain (official code)")
    f.set_defaults(func=_cmd_pca_fit)

    t = sub.add_parser("train", help="train a model from a YAML config on a COCO-format dataset (torchrun for many GPUs)")
    t.add_argument("--config", required=True, help="YAML config (see configs/)")
    t.add_argument("--data", help="dataset root (overrides data.root)")
    t.add_argument("--out", required=True, help="run folder: checkpoints, metrics.jsonl, config.yaml, codec.pt")
    t.add_argument("--device", type=device_name, metavar="{auto,cpu,cuda[:N]}", help="overrides the config's device")
    t.add_argument("--max-iters", type=positive_int, help="overrides solver.max_iters")
    t.add_argument("--eval-images", type=positive_int, help="periodic evaluation on the first N val images only")
    t.add_argument("--no-resume", action="store_true", help="start over even if OUT/last.pt exists")
    t.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides, e.g. solver.lr=1e-4 model.num_stages=3")
    t.set_defaults(func=_cmd_train)

    pt = sub.add_parser("pretrain", help="pretrain a backbone by dense prediction on a shapes split and export it for `pretrained:`")
    pt.add_argument("--config", required=True, help="YAML config with model_type: dense_pretrain (configs/pretrain_shapes_cpu.yaml)")
    pt.add_argument("--out", required=True, help="run folder: checkpoints, metrics.jsonl")
    pt.add_argument("--export", required=True, help="weights file to write (fp16 torchvision ResNet state dict) with its .json card")
    pt.add_argument("--data", help="dataset root (overrides data.root)")
    pt.add_argument("--max-iters", type=positive_int, help="overrides solver.max_iters")
    pt.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides")
    pt.set_defaults(func=_cmd_pretrain)

    e = sub.add_parser("eval", help="COCO bbox / segm / boundary AP of a checkpoint, or of a COCO results file, on a split",
                       description="Score a checkpoint (--checkpoint) or any COCO results file (--results: bbox AP when its "
                       "records carry 'bbox', mask and Boundary AP when they carry 'segmentation'). The AP table (percent) is "
                       "printed on stderr; stdout is one JSON line with the metrics, as metrics.json holds them.")
    src = e.add_mutually_exclusive_group(required=True)
    src.add_argument("--checkpoint", help="last.pt of a `segbook train` run (its folder holds config.yaml)")
    src.add_argument("--results", help="COCO results JSON (detectron2, mmdetection, `segbook predict --data --split`); needs --data and --split")
    e.add_argument("--data", help="dataset root (default with --checkpoint: the run's)")
    e.add_argument("--split", help="split (default with --checkpoint: the config's data.val_split)")
    e.add_argument("--per-class", action="store_true", help="also print (and store under 'per_class') each category's AP")
    e.add_argument("--device", default="cpu", type=run_device, metavar="{auto,cpu,cuda[:N]}")
    e.add_argument("--out", help="folder for metrics.json (and results.json with --checkpoint; default: RUN/eval_SPLIT; "
                                 "with --results nothing is written without --out)")
    e.add_argument("--max-images", type=positive_int, help="--checkpoint: evaluate the first N images only")
    e.add_argument("overrides", nargs="*", metavar="key=value", help="--checkpoint: changes to the run's config, e.g. model.refine=false (coarse masks of a Transfiner run)")
    e.set_defaults(func=_cmd_eval)

    r = sub.add_parser("predict", help="detect instances in image files: overlay PNGs + COCO-style JSON",
                       description="Writes OUT/<image>.png overlays and OUT/predictions.json (COCO results records plus "
                       "'file_name'). image_id is the data set's id when --data and --split are given (each file is looked "
                       "up by file name in the split's annotations), else the file name as a string.")
    r.add_argument("--checkpoint", required=True, help="last.pt of a `segbook train` run")
    r.add_argument("inputs", nargs="+", metavar="IMG|key=value", help="image files, then optional config overrides like eval's, e.g. model.refine=false")
    r.add_argument("--out", required=True, help="output folder")
    r.add_argument("--device", default="cpu", type=run_device, metavar="{auto,cpu,cuda[:N]}")
    r.add_argument("--threshold", type=probability, default=0.4,
                   help="keep detections with score >= T in the overlays and JSON (default 0.4). ISTR's scores are per-class "
                        "sigmoid probabilities of its queries, without NMS: lower T to see weaker detections")
    r.add_argument("--data", help="dataset root whose annotations give the image ids (with --split)")
    r.add_argument("--split", help="split of --data the images belong to")
    r.set_defaults(func=_cmd_predict)

    g = sub.add_parser("plot", help="training curves of a run (loss terms, learning rate, AP) from RUN/metrics.jsonl as a PNG")
    g.add_argument("run", help="run folder of `segbook train` (holds metrics.jsonl)")
    g.add_argument("--out", help="PNG to write (default: RUN/curves.png)")
    g.set_defaults(func=_cmd_plot)

    v = sub.add_parser("viz", help="ground truth beside the predictions of a COCO results file, one PNG per image")
    v.add_argument("--results", required=True, help="COCO results JSON")
    v.add_argument("--data", required=True, help="dataset root")
    v.add_argument("--split", required=True, help="split the results are for")
    v.add_argument("--out", required=True, help="folder for SPLIT_IMAGEID.png")
    v.add_argument("--n", type=positive_int, default=8, help="number of images: the first N (by id) the results mention")
    v.add_argument("--threshold", type=probability, default=0.4, help="draw detections with score >= T (default 0.4)")
    v.set_defaults(func=_cmd_viz)

    k = sub.add_parser("bench", help="latency / FPS / peak memory of a model, optionally against a peer, timed alternately")
    k.add_argument("--model", required=True, help="segbook config YAML, or 'maskrcnn_r50' (torchvision)")
    k.add_argument("--vs", help="peer to time in the same run, e.g. maskrcnn_r50")
    k.add_argument("--device", default="cpu", type=run_device, metavar="{auto,cpu,cuda[:N]}")
    k.add_argument("--size", default="800x800", type=image_size, help="input HxW")
    k.add_argument("--iters", type=positive_int, default=50, help="timed iterations per model")
    k.add_argument("--warmup", type=nonneg_int, default=10, help="untimed warm-up iterations per model")
    k.add_argument("--amp", default="none", choices=["none", "bf16", "fp16"], help="autocast precision (CUDA only)")
    k.add_argument("--threads", type=positive_int, help="torch CPU threads (1 gives steadier CPU timings on a shared machine)")
    k.add_argument("--out", help="JSON file for the results")
    k.set_defaults(func=_cmd_bench)

    q = sub.add_parser("reproduce", help="run the experiment notebooks (papermill) into --out; --figures figures/ updates the book's figures and tables")
    q.add_argument("--profile", default="smoke", choices=["smoke", "cpu", "gpu"], help="smoke: <=30 min on 2 CPU cores; cpu: meaningful shapes numbers; gpu: paper-like, chunked")
    q.add_argument("--only", nargs="*", help="run only these experiment notebooks (names without .ipynb)")
    q.add_argument("--data", help="coco-mini root for the experiments that need real masks (e.g. ../shared/coco-mini)")
    q.add_argument("--out", required=True, help="output folder for the executed notebooks")
    q.add_argument("--figures", help="also copy figures, tables and the claims ledger here, e.g. figures/ to update the book's (default: they stay in OUT/figures)")
    q.set_defaults(func=_cmd_reproduce)
    return p


# %% [markdown]
# What a script can rely on: every command prints its result as one JSON line on stdout; tables meant for a
# person (`segbook eval`'s AP table) and progress bars go to stderr. Bad input — a missing file, a malformed
# annotation or results file (`DatasetError`, `ResultsError`), a config key that does not exist (`ConfigError`) — ends
# with one line `segbook: error: ...` and exit status 2, as argparse's own errors do; anything else is a bug and
# keeps its traceback. `python -m segbook.cli` is the same entry point (what `torchrun -m segbook.cli` needs).

# %%
#| export
def _user_errors() -> tuple:
    "Exception types that mean bad input (a one-line message, exit 2), from the modules this command has loaded."
    types = [FileNotFoundError, UsageError]
    for mod, name in (("segbook.data", "DatasetError"), ("segbook.config", "ConfigError"), ("segbook.engine", "CheckpointError")):
        if mod in sys.modules: types.append(getattr(sys.modules[mod], name))
    return tuple(types)

def main(argv=None) -> int:
    "Entry point of the `segbook` console script: bad input prints `segbook: error: ...` and returns 2; other errors keep their traceback."
    args = build_parser().parse_args(argv)
    try:
        args.func(args)
    except Exception as e:
        if not isinstance(e, _user_errors()): raise
        msg = " ".join(str(e).split()) or type(e).__name__
        print(f"segbook: error: {msg}", file=sys.stderr)
        return 2
    return 0

if __name__ == "__main__" and "IPython" not in sys.modules:  # `python -m segbook.cli` (a notebook kernel is __main__ too)
    sys.exit(main())

# %% [markdown]
# ## Tests

# %%
p = build_parser()
a = p.parse_args(["data", "synth", "--out", "/tmp/x", "--n-train", "3"])
assert a.n_train == 3 and a.func is _cmd_data_synth and a.preset == "default" and a.size is None
assert p.parse_args(["data", "synth", "--out", "/tmp/x", "--preset", "large"]).preset == "large"
try:
    p.parse_args([]); raise AssertionError("no command must fail")
except SystemExit as e:
    assert e.code == 2
a = p.parse_args(["predict", "--checkpoint", "r/last.pt", "a.png", "b.jpg", "model.refine=false", "--out", "o"])
assert split_overrides(a.inputs) == (["a.png", "b.jpg"], ["model.refine=false"]) and a.threshold == 0.4
a = p.parse_args(["eval", "--results", "r.json", "--data", "d", "--split", "val", "--per-class"])
assert a.results == "r.json" and a.checkpoint is None and a.per_class
for bad in (["eval", "--data", "d"], ["eval", "--checkpoint", "c.pt", "--results", "r.json"]):  # exactly one of the two
    try: p.parse_args(bad); raise AssertionError(f"accepted {bad}")
    except SystemExit as e: assert e.code == 2
import contextlib, io
err = io.StringIO()
with contextlib.redirect_stderr(err): rc = main(["eval", "--results", "r.json"])  # a user error: one line, exit status 2
assert rc == 2 and err.getvalue().startswith("segbook: error: eval --results needs --data") and err.getvalue().count("\n") == 1
with contextlib.redirect_stderr(err): rc = main(["plot", "/nonexistent/run"])
assert rc == 2 and "metrics.jsonl" in err.getvalue().splitlines()[-1]
with contextlib.redirect_stderr(err): rc = main(["pca-fit", "--data", "d", "--split", "train"])
assert rc == 2 and err.getvalue().splitlines()[-1] == "segbook: error: pca-fit: --out is required unless --from-npz is given"
