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
# # Reproducing the tables and figures
#
# > `segbook reproduce`: run every experiment notebook under `nbs/experiments/` with papermill, with the
# > parameters of one profile, and gather its figures, tables and a stamped `results.json`.

# %%
#| default_exp reproduce

# %%
#| export
import fcntl
import hashlib
import json
import os
import platform
import shutil
import subprocess
import statistics
import sys
import tempfile
import time
import traceback
from pathlib import Path

from segbook.io import write_json_atomic, write_text_atomic
from types import SimpleNamespace

import papermill
from tqdm.auto import tqdm

from segbook.data import find_coco_mini

# %% [markdown]
# ## What one run does
#
# Each experiment is a notebook in `nbs/experiments/` with a cell tagged `parameters` (papermill's
# convention). Its defaults are the *smoke* settings, so `nbdev-test` (which also executes that folder) and a
# reader opening it in JupyterLab get a run of under a minute. `reproduce_command` executes each notebook
# into `OUT/notebooks/NAME.ipynb` (never in place) with the profile's parameters injected, from the
# notebook's own folder as working directory.
#
# **Where outputs go.** While a notebook runs, `SEGBOOK_FIGURES` points at `OUT/figures`, so
# `segbook.viz.save_figure` and the tables (`figures_dir()/'tables'/*.md`) land in the run folder. Run
# without the driver, an experiment notebook points `SEGBOOK_FIGURES` at a temporary folder, so a
# `nbdev-test` pass never rewrites the committed figures. A run writes only under `OUT`; with `--figures DIR`
# (the book's own runs pass the repository's `figures/`) the driver then copies `OUT/figures` into `DIR` together
# with `results.json` and merges the claims ledger there: the committed figures are always the output of one named
# profile, and a reader's first `segbook reproduce` leaves the checkout as it was.
#
# **What it deletes.** `OUT/figures` is emptied at the start of a run, so only this run's tables are gathered — but
# only if an earlier `reproduce` made it (it leaves a marker file there); a folder of someone else's files is
# refused with an error, not deleted.
#
# Each notebook also gets `out_dir` (its own folder under `OUT/runs/`, for checkpoints) and may write
# `out_dir/results.json` (its numbers); the driver copies that into the `results` of its entry.
#
# **Profiles.** *smoke*: CPU, a small generated shapes set (+ coco-mini when given), a handful of
# iterations — it only proves the whole path runs and takes ≤ 30 min on 2 cores. *cpu*: the shapes
# schedules that give meaningful (but still tiny-data) numbers, ≤ 2.5 h on 2 cores. *gpu*: paper-like
# sizes scaled to one GPU; run it in `--only` chunks that each end within 10 min (`GPU_CHUNKS`).

# %%
#| export
EXPERIMENTS = ["paper_vs_code", "istr_fig1_energy", "transfiner_table1", "transfiner_headroom", "transfiner_table7_efficiency",
               "istr_ablations", "istr_stages", "compare_maskrcnn", "transfiner_large", "transfiner_tables"]

_SMOKE_TRAIN = dict(iters=4, batch_size=2, eval_images=16)
PROFILES = {
    "smoke": {
        "_shapes": dict(n_train=64, n_val=16, size=128),
        "istr_fig1_energy": dict(max_masks=4000, dims=[10, 20, 40, 60]),
        "transfiner_table1": dict(splits=["val2017"]),
        "transfiner_headroom": dict(n_large=8, n_default=8),
        "transfiner_table7_efficiency": dict(rois=[10, 50], repeats=1, max_tokens=30000),
        "istr_ablations": dict(_SMOKE_TRAIN, variants="all"),
        "istr_stages": dict(_SMOKE_TRAIN),
        "compare_maskrcnn": dict(_SMOKE_TRAIN),
        "transfiner_tables": dict(runs_from="transfiner_large", seeds=[0], calib_images=4, eval_images=4, bench_iters=1, bench_images=2),
        "transfiner_large": dict(n_train=8, n_val=4, seeds=[0], iters=4, calib_images=4, eval_images=4),
        "paper_vs_code": dict(),
    },
    "cpu": {
        "_shapes": dict(n_train=2000, n_val=200, size=128),
        "istr_fig1_energy": dict(max_masks=20000, dims=[10, 20, 40, 60, 80, 100]),
        "transfiner_table1": dict(splits=["val2017", "train2017"]),
        "transfiner_headroom": dict(n_large=200, n_default=200),
        "transfiner_table7_efficiency": dict(rois=[10, 50, 100], repeats=3, max_tokens=100000),
        # Table 1 and Fig. 3 share one recipe: the paper's head on the frozen pretrained backbone. Table 1 trains it
        # 3000 iterations x 4 (6 epochs), ~11 min a run on one core; all 13 rows x 2 seeds would take ~4.8 h of one core,
        # so the cpu profile trains seven rows, one or more from each of Table 1 a-e (the baseline; a: raw 28x28 masks,
        # the claim the paper is built on, and l = 40; b: no mask cost in the matching; c: the dice loss alone; d:
        # multi-head attention, the paper's largest gap; e: max-pooled image features), two runs at a time (~1.5 h on
        # two cores), and marks the other six 'not run' (the gpu profile runs all).
        # Fig. 3 and the headline ISTR number train the baseline longer (7500 iterations, 15 epochs, ~28 min a run).
        "istr_ablations": dict(iters=3000, batch_size=4, eval_images=200, seeds=[0, 1], workers=2,
                               variants=["l=60 (baseline)", "raw 28×28 mask", "l=40", "mask cost: none", "loss: dice",
                                         "attention: multi-head", "image feat.: max"]),
        "istr_stages": dict(iters=7500, batch_size=4, eval_images=200, seeds=[0, 1], workers=2),
        "compare_maskrcnn": dict(iters=1500, batch_size=4, eval_images=200, seeds=[0, 1]),
        "transfiner_tables": dict(runs_from="transfiner_large", seeds=[0, 1], calib_images=100, eval_images=None, bench_images=20),
        # the large preset (320²): Mask R-CNN 1800 and ISTR 4000 iterations x 2 per seed (~65 / ~70 min on one core),
        # two at a time: ~2.3 h on two cores for the four runs, then ~30 min of evaluation
        "transfiner_large": dict(n_train=600, n_val=100, seeds=[0, 1], workers=2, calib_images=100, iters=None),
        "paper_vs_code": dict(),
    },
    "gpu": {
        "_shapes": dict(n_train=2000, n_val=200, size=128),
        "istr_fig1_energy": dict(max_masks=200000, dims=[10, 20, 40, 60, 80, 100]),
        "transfiner_table1": dict(splits=["val2017", "train2017"]),
        "transfiner_headroom": dict(n_large=500, n_default=500),
        "transfiner_table7_efficiency": dict(rois=[10, 50, 100, 300], repeats=10),
        "istr_ablations": dict(iters=3000, batch_size=16, eval_images=200, variants="all", seeds=[0, 1]),
        "istr_stages": dict(iters=3000, batch_size=16, eval_images=200, seeds=[0, 1]),
        "compare_maskrcnn": dict(iters=3000, batch_size=16, eval_images=200, seeds=[0, 1]),
        "transfiner_tables": dict(runs_from="transfiner_large", seeds=[0, 1], calib_images=100, eval_images=None, bench_images=20),
        "transfiner_large": dict(n_train=600, n_val=100, seeds=[0, 1], workers=2, calib_images=100, iters=None),
        "paper_vs_code": dict(),
    },
}
# `--only` chunks for the gpu profile, each meant to end within a 10-minute device command. The sizes are estimates
# no GPU has run yet (cpu s/iteration scaled down); a chunk that is cut off can be run again with the same `--out`:
# istr_ablations reuses every variant folder that finished (`train_istr_variant` resumes), so it goes on from there.
GPU_CHUNKS = [["paper_vs_code", "istr_fig1_energy", "transfiner_table1", "transfiner_headroom", "transfiner_table7_efficiency"],
              ["istr_ablations"], ["istr_stages"], ["compare_maskrcnn"], ["transfiner_large", "transfiner_tables"]]


# %% [markdown]
# ## Stamps
#
# A results file that cannot say which code, data and machine produced it is not evidence. Each run is
# stamped with the git commit (and whether the tree had local changes), the profile, the data set(s),
# the device, the seed, and per notebook its wall time and status.

# %%
#| export
def _repo_root() -> Path:
    "The checkout this package was imported from (its parent folder)."
    import segbook
    return Path(segbook.__file__).resolve().parents[1]

def git_stamp(repo:Path|None=None) -> dict:
    "The commit of `repo` (default: this package's checkout) and whether its tracked files have local changes."
    repo = Path(repo or _repo_root())
    def git(*args):
        r = subprocess.run(["git", "-C", str(repo), *args], capture_output=True, text=True, timeout=30)
        return r.stdout.strip() if r.returncode == 0 else None
    commit = git("rev-parse", "HEAD")
    dirty = git("status", "--porcelain", "--untracked-files=no")
    return {"commit": commit, "dirty": None if dirty is None else bool(dirty)}

def device_stamp() -> dict:
    "The machine a run used: CPU count, torch version and CUDA device name when there is one."
    import torch
    d = {"platform": platform.platform(), "python": platform.python_version(), "torch": torch.__version__,
         "cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(), "cuda": torch.cuda.is_available()}
    if d["cuda"]: d["cuda_device"] = torch.cuda.get_device_name(0)
    return d


# %% [markdown]
# ## Running one notebook
#
# papermill raises `PapermillExecutionError` for a failing cell, carrying the error's name, message and
# the cell's source; `run_notebook` turns that (or any other failure, such as a missing kernel) into a
# status record, so one failed experiment does not stop the others. The executed notebook is still written,
# with the traceback in the failing cell, for a reader to open.

# %%
#| export
def run_notebook(notebook, # input .ipynb with a `parameters`-tagged cell
                 output, # executed copy to write (never the input)
                 parameters:dict, # values injected after the parameters cell
                 cwd=None, # working directory of the kernel (default: the notebook's folder)
                 env:dict|None=None, # environment variables set while it runs
                 progress:bool=False) -> dict:
    "Execute `notebook` with papermill -> {'status': 'ok'|'failed', 'seconds', and on failure 'error', 'message', 'cell'}."
    notebook, output = Path(notebook).resolve(), Path(output).resolve()
    if notebook == output: raise ValueError(f"{notebook}: refusing to execute a notebook in place")
    output.parent.mkdir(parents=True, exist_ok=True)
    saved = {k: os.environ.get(k) for k in (env or {})}
    os.environ.update({k: str(v) for k, v in (env or {}).items()})
    t0 = time.perf_counter()
    try:
        papermill.execute_notebook(str(notebook), str(output), parameters=parameters, kernel_name="python3",
                                   cwd=str(cwd or notebook.parent), progress_bar=progress)
        rec = {"status": "ok"}
    except papermill.PapermillExecutionError as e:
        rec = {"status": "failed", "error": e.ename, "message": str(e.evalue)[:2000], "cell": e.exec_count,
               "cell_source": e.source[:2000]}
    except Exception as e:  # kernel died, notebook unreadable, ...: still a record, not a crash of the whole run
        rec = {"status": "failed", "error": type(e).__name__, "message": str(e)[:2000], "cell": None,
               "traceback": traceback.format_exc()[-2000:]}
    finally:
        for k, v in saved.items():
            if v is None: os.environ.pop(k, None)
            else: os.environ[k] = v
    rec["seconds"] = round(time.perf_counter() - t0, 2)
    return rec


# %% [markdown]
# ## The driver
#
# `reproduce_command` is what `segbook reproduce` calls. Every notebook receives the common parameters
# (`profile`, `out_dir`, `shapes_root`, `coco_root`, `seed`, `device`) and its own from `PROFILES`; a
# notebook's parameters cell must declare every name it is given (papermill injects them after that cell,
# and a name the notebook never reads would hide a typo). The shapes data set is generated once per run
# folder (`OUT/data/shapes`) with the profile's seed, size and image counts; one already there is reused only if
# its annotation files say it was made with exactly those (`shapes_mismatch`), and regenerated otherwise.

# %%
#| export
_MADE_BY = ".made-by-segbook-reproduce"

def _is_reproduce_stamp(path) -> bool:
    "True if `path` is the results.json of a `reproduce` run (which made its folder's figures/ before the marker existed)."
    try: d = json.loads(Path(path).read_text())
    except (OSError, ValueError): return False
    return isinstance(d, dict) and {"profile", "notebooks", "git"} <= set(d)

def fresh_figures_dir(path, # OUT/figures
                     ) -> Path:
    "Empty `path` for this run's figures, if an earlier `reproduce` made it; refuse to delete a folder it did not make."
    path = Path(path)
    if path.exists() and any(path.iterdir()) and not (path / _MADE_BY).exists() and not _is_reproduce_stamp(path.parent / "results.json"):
        raise FileExistsError(f"{path} holds files that segbook reproduce did not write: choose another --out, or move them")
    shutil.rmtree(path, ignore_errors=True)
    path.mkdir(parents=True)
    (path / _MADE_BY).write_text("this folder is emptied at the start of every `segbook reproduce --out` into its parent\n")
    return path

def shapes_mismatch(root, seed:int, n_train:int, n_val:int, size:int,
                    preset:str="default") -> str|None: # segbook.shapes.PRESETS key (the default's JSON has no info.preset)
    "Why the shapes set at `root` is not the one asked for (missing, other seed/size/count/preset), or None when it is."
    for split, n in (("train", n_train), ("val", n_val)):
        ann = Path(root) / "annotations" / f"instances_{split}.json"
        if not ann.exists(): return f"no {ann.name}"
        try: d = json.loads(ann.read_text())
        except (OSError, json.JSONDecodeError) as e: return f"{ann.name} unreadable ({type(e).__name__})"
        info = d.get("info") or {}
        have = (info.get("seed"), info.get("size"), len(d.get("images", [])), info.get("preset", "default"))
        if have != (seed, size, n, preset):
            return f"{ann.name} was made with seed/size/images/preset {have}, this profile needs {(seed, size, n, preset)}"
    return None

def merge_profile_results(path, # figures/results_<profile>.json: every notebook's latest run of one profile
                          result:dict, # the reproduce run just finished
                         ) -> dict:
    "One file per profile that `--only` chunks add to: a notebook's entry is replaced by its newer run, others kept."
    path = Path(path)
    old = json.loads(path.read_text()) if path.exists() else {}
    merged = {k: v for k, v in result.items() if k not in ("notebooks", "failed")}
    merged["notebooks"] = {**old.get("notebooks", {}), **result["notebooks"]}
    merged["failed"] = sorted(n for n, r in merged["notebooks"].items() if r["status"] != "ok")
    merged["command"] = "; ".join(dict.fromkeys(r["run"]["command"] for r in merged["notebooks"].values() if "run" in r))
    return merged

#| export
def reproduce_command(profile:str, # 'smoke' | 'cpu' | 'gpu' (keys of PROFILES)
                      out:str, # run folder: notebooks/, runs/, figures/, data/, results.json
                      only:list|None=None, # experiment names to run (default: all of EXPERIMENTS)
                      data:str|None=None, # coco-mini root (annotations/instances_{train,val}2017.json); None: skip its parts
                      figures:str|None=None, # also copy figures, tables/, results.json and the ledger here (e.g. the repository's figures/); None: only OUT/figures
                      notebooks_dir:str|None=None, # folder of the experiment notebooks (default: <repo>/nbs/experiments)
                      profiles:dict|None=None, # profile table (default: PROFILES); tests pass their own
                      seed:int=0, # seed handed to every notebook
                      device:str="auto", # 'auto' | 'cpu' | 'cuda', handed to every notebook
                      progress:bool=True) -> dict:
    "Run the experiment notebooks of `profile` with papermill; gather figures, tables and a stamped results.json."
    profiles = PROFILES if profiles is None else profiles
    if profile not in profiles:
        raise ValueError(f"--profile {profile!r}: expected one of {sorted(profiles)}")
    table = profiles[profile]
    nb_dir = Path(notebooks_dir) if notebooks_dir else _repo_root() / "nbs" / "experiments"
    names = [n for n in (EXPERIMENTS if notebooks_dir is None else sorted(p.stem for p in nb_dir.glob("*.ipynb")))
             if n in table] if not only else list(only)
    unknown = [n for n in names if not (nb_dir / f"{n}.ipynb").exists()]
    if unknown:
        raise ValueError(f"--only {unknown}: no such notebook in {nb_dir} (have {sorted(p.stem for p in nb_dir.glob('*.ipynb'))})")
    out = Path(out).resolve(); out.mkdir(parents=True, exist_ok=True)
    # only this invocation's figures are gathered: an --out reused from an earlier run (another chunk, older code)
    # must not copy its stale tables over newer ones
    fig_out = fresh_figures_dir(out / "figures")
    if data is not None and not (Path(data) / "annotations").is_dir():
        raise FileNotFoundError(f"--data {data}: no annotations/ folder (expected a COCO root such as shared/coco-mini)")
    t_run = time.perf_counter()
    shapes_root = None
    if "_shapes" in table:
        from segbook.shapes import write_shapes_dataset
        shapes_root = out / "data" / "shapes"
        stale = shapes_mismatch(shapes_root, seed=seed, **table["_shapes"])
        if stale:
            if progress: print(f"[reproduce] generating shapes data {table['_shapes']} -> {shapes_root} ({stale})", flush=True)
            for part in ("annotations", "train", "val"): shutil.rmtree(shapes_root / part, ignore_errors=True)
            write_shapes_dataset(shapes_root, seed=seed, **table["_shapes"])
    stamp = {"profile": profile, "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "seed": seed,
             "device_requested": device, "device": device_stamp(), "git": git_stamp(),
             "data": {"shapes": None if shapes_root is None else {"root": str(shapes_root), **table["_shapes"]},
                      "coco": None if data is None else str(Path(data).resolve())},
             "command": f"segbook reproduce --profile {profile}" + (f" --only {' '.join(only)}" if only else "")
                        + (f" --data {data}" if data else "") + f" --out {out}"}
    entries = {}
    bar = tqdm(names, desc=f"reproduce[{profile}]", disable=not progress)
    for name in bar:
        bar.set_postfix_str(name)
        params = {"profile": profile, "out_dir": str(out / "runs" / name), "seed": seed, "device": device,
                  "shapes_root": None if shapes_root is None else str(shapes_root),
                  "coco_root": None if data is None else str(Path(data).resolve()), **table.get(name, {})}
        (out / "runs" / name).mkdir(parents=True, exist_ok=True)
        rec = run_notebook(nb_dir / f"{name}.ipynb", out / "notebooks" / f"{name}.ipynb", params,
                           env={"SEGBOOK_FIGURES": fig_out, "SEGBOOK_REPRODUCE": profile})
        res_file = out / "runs" / name / "results.json"
        if res_file.exists():
            try: rec["results"] = json.loads(res_file.read_text())
            except json.JSONDecodeError as e: rec["results_error"] = f"{res_file}: {e}"
        rec["parameters"] = params
        rec["run"] = {k: stamp[k] for k in ("started", "git", "device", "command")}  # per notebook: chunks get merged
        entries[name] = rec
        msg = f"[reproduce] {name}: {rec['status']} in {rec['seconds']:.1f} s"
        if rec["status"] != "ok": msg += f" — {rec['error']} in cell {rec['cell']}: {rec['message'][:300]}"
        tqdm.write(msg) if progress else None
        write_json_atomic({**stamp, "notebooks": entries, "finished": False}, out / "results.json")
    failed = sorted(n for n, r in entries.items() if r["status"] != "ok")
    result = {**stamp, "notebooks": entries, "finished": True, "failed": failed,
              "wall_seconds": round(time.perf_counter() - t_run, 1)}
    write_json_atomic(result, out / "results.json")
    dest = Path(figures) if figures else None
    claims = [c for r in entries.values() for c in (r.get("results") or {}).get("claims", [])]
    headline = {k: v for r in entries.values() for k, v in (r.get("results") or {}).get("headline", {}).items()}
    if dest is not None:
        dest.mkdir(parents=True, exist_ok=True)
        with open(dest / ".reproduce.lock", "w") as lock:   # chunks may run side by side: one merge at a time
            fcntl.flock(lock, fcntl.LOCK_EX)
            shutil.copytree(fig_out, dest, dirs_exist_ok=True, ignore=shutil.ignore_patterns(_MADE_BY))
            if (claims or headline) and profile != "smoke":
                old = json.loads((dest / "claims.json").read_text()) if (dest / "claims.json").exists() else None
                ledger = merge_claims(old, claims, headline)
                write_json_atomic(ledger, dest / "claims.json")
                write_table(dest / "tables" / "claims.md", claims_markdown(ledger), echo=False)
            write_json_atomic(result, dest / "results.json")
            write_json_atomic(merge_profile_results(dest / f"results_{profile}.json", result), dest / f"results_{profile}.json")
        result["figures"] = str(dest)
    if progress: print(f"[reproduce] {len(names) - len(failed)}/{len(names)} ok, {result['wall_seconds']} s; failed: {failed or 'none'}", flush=True)
    return result


# %% [markdown]
# The CLI returns a non-zero exit code when `result['failed']` is not empty.

# %% [markdown]
# ## The claims ledger
#
# A table is a test of a claim. Each experiment notebook states the paper claims it tests as ledger entries in
# its `results.json` (`"claims": [...]`, and `"headline": {name: [value per seed]}` for the book's key numbers);
# `reproduce` merges them by `id` into `figures/claims.json` — an entry is replaced by its newer run, the others
# kept, so `--only` chunks add up — and renders `figures/tables/claims.md`. The smoke profile never writes the
# ledger: its numbers test nothing.
#
# A claim compares two settings $a$ and $b$ (the paper's better one first). Over seeds, ours gives
# $\bar d = \bar a - \bar b$ and a spread $r = \max(\operatorname{range} a, \operatorname{range} b)$ (the larger seed-to-seed range
# of the two rows). The verdict is **replicated** when $\bar d$ has the paper's sign and $|\bar d| > r$,
# **reversed** when it has the other sign and $|\bar d| > r$, **not separable** otherwise, and **not run** without
# two seeds of both. A claim of a value rather than a ranking (e.g. "≥ 86 % recall") uses `threshold`.

# %%
#| export
VERDICTS = ("replicated", "reversed", "not separable", "not run")

def ranking_verdict(ours_a:list, # our values of the paper's better setting, one per seed
                    ours_b:list, # our values of the other setting, one per seed
                    paper_a:float, paper_b:float, # the paper's values (their order gives the claimed sign)
                    min_seeds:int=2) -> dict: # {'verdict', 'difference', 'spread'}
    "Does our difference a − b have the paper's sign, by more than the seed spread? (see the rule above)"
    a, b = [v for v in ours_a if v is not None], [v for v in ours_b if v is not None]
    if len(a) < min_seeds or len(b) < min_seeds:
        return {"verdict": "not run", "difference": None, "spread": None}
    d = sum(a) / len(a) - sum(b) / len(b)
    spread = max(max(a) - min(a), max(b) - min(b))
    sign = (paper_a > paper_b) - (paper_a < paper_b)
    if abs(d) <= spread or sign == 0:
        v = "not separable"
    else:
        v = "replicated" if (d > 0) == (sign > 0) else "reversed"
    return {"verdict": v, "difference": d, "spread": spread}

def threshold_verdict(ours:list, # our values, one per seed
                      threshold:float, # the claimed level (ours must reach it)
                      min_seeds:int=2) -> dict:
    "`replicated` when every seed reaches `threshold`, `reversed` when none does, `not separable` when the seeds disagree."
    v = [x for x in ours if x is not None]
    if len(v) < min_seeds:
        return {"verdict": "not run", "difference": None, "spread": None}
    hit = sum(x >= threshold for x in v)
    return {"verdict": "replicated" if hit == len(v) else "reversed" if hit == 0 else "not separable",
            "difference": sum(v) / len(v) - threshold, "spread": max(v) - min(v)}

def band_verdict(ours:list, # our values (seeds, or data splits of a deterministic analysis)
                 target:float, # the paper's value
                 tolerance:float) -> dict: # how far from it still counts as the same value
    "`replicated` when every value is within `tolerance` of `target`, `reversed` when none is, `not separable` otherwise."
    v = [x for x in ours if x is not None]
    if not v:
        return {"verdict": "not run", "difference": None, "spread": None}
    hit = sum(abs(x - target) <= tolerance for x in v)
    return {"verdict": "replicated" if hit == len(v) else "reversed" if hit == 0 else "not separable",
            "difference": sum(v) / len(v) - target, "spread": max(v) - min(v)}

def merge_claims(ledger:dict|None, # the current figures/claims.json (None: empty)
                 claims:list, # new entries (each with an 'id')
                 headline:dict|None=None) -> dict: # new headline values (name -> per-seed list)
    "The ledger with `claims` replacing entries of the same id (others kept, sorted by id) and `headline` keys updated."
    ledger = {"claims": [], "headline": {}} if not ledger else {"claims": list(ledger.get("claims", [])),
                                                             "headline": dict(ledger.get("headline", {}))}
    by_id = {c["id"]: c for c in ledger["claims"]}
    for c in claims:
        if c.get("verdict") not in VERDICTS:
            raise ValueError(f"claim {c.get('id')!r}: verdict {c.get('verdict')!r} is not one of {VERDICTS}")
        by_id[c["id"]] = c
    ledger["claims"] = [by_id[k] for k in sorted(by_id)]
    ledger["headline"].update(headline or {})
    return ledger

def claims_markdown(ledger:dict) -> list: # markdown lines
    "figures/tables/claims.md: one row per claim, the paper's values beside ours per seed, and the verdict."
    f = lambda v: "–" if v is None else (f"{v:.1f}" if isinstance(v, (int, float)) else str(v))
    seeds = lambda vs: " / ".join(f(v) for v in vs) if isinstance(vs, list) else f(vs)
    lines = ["Claims ledger: each paper claim this book tests, the paper's value beside ours (one value per seed) and the "
             "verdict (replicated / reversed / not separable / not run; rule in chapter 12). Generated from figures/claims.json.", "",
             "| id | paper | where | claim | metric | paper values | ours (per seed) | verdict | data, profile |", "|---|---|---|---|---|---|---|---|---|"]
    for c in ledger["claims"]:
        pv = "; ".join(f"{k} {f(v)}" for k, v in c.get("paper_values", {}).items())
        ov = "; ".join(f"{k} {seeds(v)}" for k, v in c.get("ours", {}).items())
        lines.append(f"| {c['id']} | {c.get('paper', '')} | {c.get('where', '')} | {c.get('claim', '')} | {c.get('metric', '')} | "
                     f"{pv} | {ov} | **{c['verdict']}** | {c.get('data', '')}, {c.get('profile', '')} |")
    if ledger.get("headline"):
        lines += ["", "Headline numbers (per seed): " + "; ".join(f"`{k}` {seeds(v)}" for k, v in sorted(ledger["headline"].items()))]
    return lines


# %% [markdown]
# The rule on small cases: the paper says $a > b$; ours agrees by more than the spread, agrees by less, disagrees by more.

# %%
assert ranking_verdict([31, 30], [27, 28], 34.2, 31.6)["verdict"] == "replicated"
assert ranking_verdict([31, 30], [30.5, 29], 34.2, 31.6)["verdict"] == "not separable"
assert ranking_verdict([25, 26], [30, 31], 34.2, 31.6)["verdict"] == "reversed"
assert ranking_verdict([31], [27, 28], 34.2, 31.6)["verdict"] == "not run"
assert band_verdict([13.8, 14.1], 14, 2)["verdict"] == "replicated" and band_verdict([20, 13], 14, 2)["verdict"] == "not separable"
assert threshold_verdict([0.9, 0.8], 0.5)["verdict"] == "replicated" and threshold_verdict([0.6, 0.4], 0.5)["verdict"] == "not separable"
_l = merge_claims(None, [{"id": "b", "verdict": "reversed"}, {"id": "a", "verdict": "not run"}], {"x": [1, 2]})
_l = merge_claims(_l, [{"id": "b", "verdict": "replicated"}], {"y": [3]})
assert [c["id"] for c in _l["claims"]] == ["a", "b"] and _l["claims"][1]["verdict"] == "replicated" and _l["headline"] == {"x": [1, 2], "y": [3]}
try: merge_claims(None, [{"id": "c", "verdict": "maybe"}]); raise AssertionError
except ValueError as e: assert "maybe" in str(e)


# %% [markdown]
# ## What every experiment notebook starts with
#
# `experiment_context` is the shared first cell: without the driver (`SEGBOOK_FIGURES` unset), figures go to
# a temporary folder so that a `nbdev-test` pass or a reader's run never rewrites the committed `figures/`;
# `out_dir` defaults to a temporary folder; coco-mini is `coco_root`, else `$SEGBOOK_COCO_MINI`, else a
# `shared/coco-mini` found walking up from the working directory (None when absent: those parts skip); a
# tiny shapes set is generated when no `shapes_root` is given.

# %%
#| export
def experiment_context(out_dir=None, # run folder of the notebook; None: a temporary folder
                       shapes_root=None, # shapes data set; None: generate a tiny one in out_dir/shapes
                       coco_root=None, # coco-mini; None: find_coco_mini()
                       seed:int=0, n_train:int=32, n_val:int=8) -> SimpleNamespace:
    "Folders of one experiment run: `.out`, `.shapes`, `.coco` (or None), `.tables` (figures_dir()/tables)."
    import torch
    from segbook.viz import figures_dir
    torch.set_num_threads(min(2, torch.get_num_threads()))
    if not os.environ.get("SEGBOOK_FIGURES"):
        os.environ["SEGBOOK_FIGURES"] = tempfile.mkdtemp(prefix="segbook-figures-")
    out = Path(out_dir or tempfile.mkdtemp(prefix="segbook-experiment-")); out.mkdir(parents=True, exist_ok=True)
    if shapes_root is None:
        from segbook.shapes import write_shapes_dataset
        shapes_root = out / "shapes"
        if not (shapes_root / "annotations" / "instances_val.json").exists():
            write_shapes_dataset(shapes_root, n_train=n_train, n_val=n_val, size=128, seed=seed)
    coco = Path(coco_root) if coco_root else find_coco_mini()
    tables = figures_dir() / "tables"; tables.mkdir(parents=True, exist_ok=True)
    shared = out.parent / "_shared" if os.environ.get("SEGBOOK_REPRODUCE") else out / "_shared"
    return SimpleNamespace(out=out, shapes=Path(shapes_root), coco=coco, tables=tables, shared=shared)

def size_ranges(ann_file, # a COCO instances JSON
               ) -> str: # one sentence for a table caption
    "How AP_S/M/L are bucketed for this annotation file: its own `info.area_rng` (as segbook.evaluation) or COCO's."
    rng = json.loads(Path(ann_file).read_text()).get("info", {}).get("area_rng")
    if not rng: return "S/M/L: COCO's area ranges (32², 96² px²)."
    return (f"S/M/L on shapes: the data set's own area ranges (info.area_rng, COCO's scaled to the image size): small < "
            f"{rng['small'][1]:.0f} px², medium < {rng['medium'][1]:.0f} px², large above.")

def write_table(path, # .md file to write
                lines:list, # markdown lines
                echo:bool=True) -> Path:
    "Write markdown `lines` to `path` (temp file + rename) and print them."
    write_text_atomic("\n".join(lines) + "\n", path)
    if echo: print("\n".join(lines))
    return Path(path)


# %% [markdown]
# ## One short ISTR training run for an experiment
#
# The ablations (ISTR Table 1) switch the model, the matching cost and the set loss — the config's `model:`,
# `matching:` and `loss:` sections, so each row is also one `segbook train ... matching.mask_cost=dice` away.
# `train_istr_variant` wires the same pieces as `segbook.pipeline.train_command` — data set, classes, PCA codec,
# seeded model, the engine's `train` with a final evaluation — but returns the trained model too (the stage
# analysis evaluates it once per stage). The schedule is rescaled to `iters`: warm-up over the first tenth, one
# ×0.1 step at 80 %.

# %%
#| export
def schedule_overrides(iters:int, # training iterations
                       batch_size:int, # images per iteration
                       seed:int) -> list: # `key=value` strings for load_config
    "An experiment's short schedule: `iters` iterations, warm-up over the first tenth, one ×0.1 step at 80 %, no periodic eval."
    return [f"solver.max_iters={iters}", f"data.batch_size={batch_size}", f"seed={seed}",
            f"solver.warmup_iters={max(1, iters // 10)}", f"solver.steps=[{max(1, int(iters * 0.8))}]",
            "eval_period=0", f"checkpoint_period={iters}", f"log_period={max(1, iters // 10)}", "data.num_workers=0"]

def logged(run_dir, key:str) -> list:
    "Every value of `key` in the training lines the engine wrote to `run_dir`/metrics.jsonl, in order ([] without the file)."
    path = Path(run_dir) / "metrics.jsonl"
    return [r[key] for r in map(json.loads, path.read_text().splitlines()) if key in r] if path.exists() else []

def run_finished(run_dir, # a `segbook train` output folder
                 evaluated:bool=False, # also require the engine's evaluation record
                ) -> bool:
    "Whether the run has its last.pt and logged the last iteration of its own config's schedule (and, if asked, an evaluation)."
    from segbook.config import load_config
    run = Path(run_dir)
    if not (run / "last.pt").exists() or not (run / "metrics.jsonl").exists() or not (run / "config.yaml").exists():
        return False
    recs = [json.loads(l) for l in (run / "metrics.jsonl").read_text().splitlines() if l.strip()]
    done = max((r.get("iter", 0) for r in recs), default=0) == load_config(run / "config.yaml").solver.max_iters
    return done and (not evaluated or any("eval" in r for r in recs))

def seconds_per_iter(run_dir) -> float|None:
    "Median of the per-iteration times the engine logged (metrics.jsonl `time`), None when nothing was logged."
    ts = logged(run_dir, "time")
    return statistics.median(ts) if ts else None


# %%
#| export
def shared_run_dir(root, # folder of shared runs (`experiment_context(...).shared`)
                   *request) -> Path: # everything that decides a training run: config, data, schedule, seed, overrides
    "One folder per distinct training request, so that two experiments asking for the same run (e.g. Fig. 3's model and Table 1's baseline) train it once."
    key = hashlib.sha1(json.dumps([str(r) if isinstance(r, Path) else r for r in request], sort_keys=True, default=str).encode()).hexdigest()[:12]
    return Path(root) / key

def train_istr_variant(config, # YAML file (e.g. configs/istr_shapes_cpu.yaml)
                       data_root, # COCO-layout root (the shapes set)
                       out_dir, # run folder (last.pt, metrics.jsonl, config.yaml, codec.pt)
                       iters:int, # training iterations
                       batch_size:int, # images per iteration
                       eval_images:int|None=None, # evaluate on the first N val images
                       seed:int=0, device:str="cpu",
                       model:dict|None=None, # `model:` keys to override (ISTRConfig fields)
                       matching:dict|None=None, # MatchingConfig fields (Table 1b: mask_cost)
                       loss:dict|None=None, # SetLossConfig fields (Table 1c: mask_loss)
                       progress:bool=False) -> dict:
    "Train one ISTR variant for `iters` iterations and evaluate it -> the engine's summary (its `eval` holds the APs)."
    from segbook.config import load_config
    from segbook.data import collate
    from segbook.engine import build_train_loader, dist_info, resolve_device, seed_everything, train
    from segbook.pipeline import build_model, ensure_codec, eval_dataset, evaluate_model, train_dataset, with_dataset_classes
    ov = [f"data.root={data_root}", f"device={device}", *schedule_overrides(iters, batch_size, seed)]
    ov += [f"{section}.{k}={json.dumps(v)}" for section, d in (("model", model), ("matching", matching), ("loss", loss))
           for k, v in (d or {}).items()]
    cfg = load_config(config, ov)
    out = Path(out_dir); out.mkdir(parents=True, exist_ok=True)
    seed_everything(cfg.seed)
    ds = train_dataset(cfg)
    cfg = with_dataset_classes(cfg, ds)
    cfg = ensure_codec(cfg, out, progress)
    seed_everything(cfg.seed)
    net = build_model(cfg)
    loader = build_train_loader(ds, cfg.data.batch_size, cfg.seed, collate, cfg.data.num_workers)
    dev = resolve_device(cfg.device, dist_info())
    val = eval_dataset(cfg)
    summary = train(net, loader, cfg, out, evaluate_fn=lambda m: evaluate_model(m, val, dev, max_images=eval_images, progress=False),
                    resume=True, progress=progress)
    return {**summary, "model": net, "val": val, "device": str(dev)}

def _variant_job(job:dict) -> dict:
    "One `train_istr_variant` call in a worker process -> its final evaluation and loss/speed summary (or the error)."
    import torch
    torch.set_num_threads(1)
    try:
        r = train_istr_variant(**job)
        loss = logged(job["out_dir"], "loss")
        return {"eval": r["eval"]["eval"], "loss_first": loss[0] if loss else None, "loss_last": loss[-1] if loss else None,
                "s_per_iter": seconds_per_iter(job["out_dir"])}
    except Exception as e:  # one failing variant must not hide the others
        return {"error": f"{type(e).__name__}: {e}"[:300]}

def train_istr_variants(jobs:list, # keyword dicts for `train_istr_variant` (each with its own out_dir)
                        workers:int=1, # processes side by side, one torch thread each (1: in this process)
                       ) -> list: # one summary per job, in order (see `_variant_job`)
    "Train several ISTR variants, `workers` at a time: the 2-core machines of this book train two rows at once."
    if workers <= 1:
        return [_variant_job(j) for j in jobs]
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor
    with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn")) as pool:   # spawn: no forked torch state
        return list(pool.map(_variant_job, jobs))


# %% [markdown]
# ## Example and test
#
# Two throw-away notebooks in a temporary folder: one reads its parameter and writes a figure, a table and a
# `results.json`; the other raises. The failure is recorded with its error and cell, and the other still runs.

# %%
import nbformat

def _toy_notebook(path, body:str):
    nb = nbformat.v4.new_notebook()
    p = nbformat.v4.new_code_cell("profile = 'x'\nout_dir = None\nseed = 0\ndevice = 'cpu'\nshapes_root = None\ncoco_root = None\nk = 1")
    p.metadata["tags"] = ["parameters"]
    nb.cells = [p, nbformat.v4.new_code_cell(body)]
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "python3", "language": "python"}
    nbformat.write(nb, path)

tmp = Path(tempfile.mkdtemp())
(tmp / "nbs").mkdir()
_toy_notebook(tmp / "nbs" / "good.ipynb", "import json, os, pathlib\n"
              "d = pathlib.Path(os.environ['SEGBOOK_FIGURES']) / 'tables'; d.mkdir(parents=True, exist_ok=True)\n"
              "(d / 'good.md').write_text(f'k={k}')\n"
              "pathlib.Path(out_dir, 'results.json').write_text(json.dumps({'k': k, 'claims': [{'id': 'toy.k', 'verdict': 'not run', 'ours': {'k': [k]}}]}))")
_toy_notebook(tmp / "nbs" / "bad.ipynb", "raise KeyError('boom')")
toy = {"toy": {"good": {"k": 7}, "bad": {}}}
res = reproduce_command("toy", tmp / "out", notebooks_dir=tmp / "nbs", profiles=toy, figures=tmp / "figs", progress=False)
{n: (r["status"], r.get("error"), r.get("results")) for n, r in res["notebooks"].items()}

# %%
assert res["failed"] == ["bad"]
assert res["notebooks"]["bad"]["error"] == "KeyError" and "boom" in res["notebooks"]["bad"]["message"]
assert res["notebooks"]["good"]["status"] == "ok" and res["notebooks"]["good"]["results"]["k"] == 7
assert json.loads((tmp / "figs" / "claims.json").read_text())["claims"][0]["ours"] == {"k": [7]}   # the ledger
assert "toy.k" in (tmp / "figs" / "tables" / "claims.md").read_text()
assert (tmp / "figs" / "tables" / "good.md").read_text() == "k=7"
saved = json.loads((tmp / "figs" / "results.json").read_text())
assert saved["profile"] == "toy" and saved["finished"] and "commit" in saved["git"] and saved["failed"] == ["bad"]
assert (tmp / "out" / "notebooks" / "bad.ipynb").exists()  # the executed copy, with its traceback
# an --only chunk replaces its notebook's entry in results_<profile>.json and keeps the others
toy["toy"]["good"] = {"k": 8}
reproduce_command("toy", tmp / "out2", only=["good"], notebooks_dir=tmp / "nbs", profiles=toy, figures=tmp / "figs", progress=False)
merged = json.loads((tmp / "figs" / "results_toy.json").read_text())
assert merged["notebooks"]["good"]["results"]["k"] == 8 and merged["notebooks"]["bad"]["status"] == "failed"
assert json.loads((tmp / "figs" / "claims.json").read_text())["claims"][0]["ours"] == {"k": [8]}   # replaced by id
assert merged["failed"] == ["bad"] and "--only good" in merged["command"]
shutil.rmtree(tmp)
