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
# # segbook
#
# > Read, run and trust two instance-segmentation papers: ISTR and Mask Transfiner.
#
# segbook is a Jupyter-first research book. Each chapter derives one idea of a paper — prose, the
# paper's equation, a few short exported cells, an example, tests, a figure — and exports it into the
# `segbook` Python package. The same code runs behind the `segbook` command line for your own
# COCO-format data, and behind papermill experiment notebooks that regenerate the book's figures.
#
# - **ISTR** (Hu et al., 2021): end-to-end instance segmentation — masks as low-dimensional PCA
#   embeddings, bipartite matching with a mask cost, dynamic attention, recurrent refinement, no NMS.
# - **Mask Transfiner** (Ke et al., CVPR 2022): find the incoherent regions of a coarse mask, organise
#   them in a point quadtree, and refine only those sparse nodes with a transformer.
#
# Where the official code differs from the paper, a config switch selects either side. The default is the paper's
# where the paper says, and the code's or neither where the book states why; the appendix
# [Paper vs official code](experiments/paper_vs_code.ipynb) lists all 38 differences, each with its switch, the side
# its default takes, and where the book measures it.
#
# The papers: ISTR, [arXiv 2105.00637](https://arxiv.org/abs/2105.00637), official code
# [hujiecpp/ISTR](https://github.com/hujiecpp/ISTR) at commit 967c901 (the arXiv version: PCA, l = 60, 28×28); Mask
# Transfiner, [arXiv 2111.13673](https://arxiv.org/abs/2111.13673), official code
# [SysCV/transfiner](https://github.com/SysCV/transfiner) at commit 5b61fb5.
#
# Two reading paths, each chapter executable top to bottom on a CPU in about a minute:
#
# - **ISTR:** `02_mask_embeddings` (the PCA codec, Eqs. 1–3) → `03_matching` (the mask-aware matching cost, Eqs. 4–7)
#   → `03b_losses` (the set loss, Eqs. 8–9) → `04_dynamic_attention` (Eqs. 10–11) → `05_istr` (the model, Alg. 1),
#   then `05b_pretrain` for the backbone every trained result starts from.
# - **Mask Transfiner:** `06_incoherent_regions` (Eq. 1) → `07_quadtree` (the point quadtree) → `07b_gather` (sparse
#   features at its nodes) → `08_transfiner` (the refinement transformer, on Mask R-CNN and on ISTR).
#
# `01_data`, `09_evaluation` and `10_config` … `13_report` are the machinery both paths share.

# %% [markdown]
# ## Two commands
#
# On a fresh machine with Python 3.10+, from the repository root. The main job — run every
# experiment notebook at the *smoke* profile with papermill and regenerate the figures and tables
# into `runs/smoke/figures/` (a few minutes on 2 CPU cores; `--data` adds the parts that need real COCO
# masks, leave it out if you have no coco-mini):
#
# ```bash
# bash tools/install.sh && .venv/bin/segbook reproduce --profile smoke --data ../shared/coco-mini --out runs/smoke
# ```
#
# The committed `figures/` and the claims ledger `figures/claims.json` come from the longer *cpu* profile
# (`figures/results_cpu.json` says which notebook ran when, at which commit and with which command). `reproduce`
# writes only under `--out` unless `--figures figures` asks it to update the book's, which is how the cpu
# profile's results are made, in chunks: `--profile cpu --only NAME --out runs/cpu --figures figures`. Every
# trained experiment starts from the book's pretrained backbone, `weights/shapes_resnet18.pt` (chapter
# `05b_pretrain`, remade by `segbook pretrain`).
#
# All tests (the notebooks' own test cells through `nbdev-test`, then `pytest`):
#
# ```bash
# bash tools/test.sh
# ```
#
# Neither command changes the checkout: the tests save the chapters' figures into a temporary folder
# (`SEGBOOK_FIGURES=figures bash tools/test.sh` remakes the committed ones), and `reproduce` writes under `--out`.
#
# `tools/install.sh` makes `.venv/` and installs `segbook[dev]` in editable mode, with torch pinned
# through `constraints.txt` (`torch==2.14.1`, `torchvision==0.29.1`) so pip never pulls a newer
# multi-GB build; `pyproject.toml` itself keeps open version ranges for `pip install segbook` users.
# There is no `settings.ini` or `setup.py`: nbdev 3 keeps its configuration in `pyproject.toml`
# (`[tool.nbdev]`), and nbdev 2's files no longer install against current fastcore/execnb.

# %% [markdown]
# ## Chapters
#
# | chapter | module | paper |
# |---|---|---|
# | `01_data` — COCO instances, transforms, batching, bad-input errors | `segbook.data` | – |
# | `01b_shapes` — the synthetic *shapes* dataset (COCO JSON + PNG, no download) | `segbook.shapes` | – |
# | `02_mask_embeddings` — PCA mask codec, energy, DCT and autoencoder alternatives | `segbook.embeddings` | ISTR §3.1, Eqs. 1–3, Fig. 1 |
# | `03_matching` — matching cost and Hungarian assignment | `segbook.matching` | ISTR §3.2, Eqs. 4–7 |
# | `03b_losses` — the set prediction loss with deep supervision | `segbook.losses` | ISTR §3.2, Eqs. 8–9 |
# | `04_dynamic_attention` — dynamic attention and its alternatives | `segbook.attention` | ISTR Eqs. 10–11 |
# | `05_istr` — the ISTR model, recurrent refinement, inference without NMS | `segbook.istr` | ISTR §3.3, Alg. 1 |
# | `05b_pretrain` — the book's ImageNet: a ResNet-18-FPN pretrained by dense prediction on its own shapes split | `segbook.pretrain` | ISTR §4.1 / Transfiner §4 (ImageNet init) |
# | `06_incoherent_regions` — incoherent regions on a mask pyramid | `segbook.incoherent` | Transfiner §3.1, Eq. 1 |
# | `07_quadtree` — point quadtree, node sampling, propagation | `segbook.quadtree` | Transfiner §3.2 |
# | `07b_gather` — sparse feature gather at quadtree nodes (torch + Triton) | `segbook.gather` | Transfiner §3.2 |
# | `08_transfiner` — incoherence detector, refinement transformer, heads on ISTR and Mask R-CNN | `segbook.transfiner` | Transfiner §3.2–3.3 |
# | `09_evaluation` — COCO AP and Boundary AP | `segbook.evaluation` | – |
# | `09b_bench` — speed and memory against torchvision's Mask R-CNN | `segbook.bench` | – |
# | `10_config` — configs: YAML + `key=value`, `_base_` inheritance, schedules that follow `max_iters`, lr scaled with the batch | `segbook.config` | – |
# | `10_engine` — training loop, exact resume, torchrun/DDP | `segbook.engine` | – |
# | `10b_pipeline` — train / eval / predict wired from config to COCO results | `segbook.pipeline` | – |
# | `11_cli` — the `segbook` command | `segbook.cli` | – |
# | `12_reproduce` — papermill experiments that regenerate `figures/` | `segbook.reproduce` | – |
# | `13_report` — AP tables, per-class AP, run curves, predictions beside ground truth | `segbook.report` | – |
# | `90_viz` — overlays and figure saving | `segbook.viz` | – |
#
# The experiment notebooks under `nbs/experiments/` are not chapters: `segbook reproduce` runs them
# with papermill parameters per profile (smoke / cpu / gpu).

# %% [markdown]
# ## What the book has tested so far
#
# Every paper claim the experiments test is a row of the claims ledger, `figures/claims.json`, rendered as
# [`figures/tables/claims.md`](../figures/tables/claims.md): the paper's value beside ours per seed, and a verdict
# (replicated / reversed / not separable / not run; the rule is in chapter 12). `segbook reproduce --profile cpu
# --out runs/cpu --figures figures` rewrites it; below is the committed one (in the README too, written by `tools/make_readme.py`).

# %%
import json
from pathlib import Path
from IPython.display import Markdown
_ledger = next((p / "figures" / "claims.json" for p in (Path.cwd(), *Path.cwd().parents) if (p / "figures" / "claims.json").exists()), None)
if _ledger is not None:
    from segbook.reproduce import claims_markdown
    display(Markdown("\n".join(claims_markdown(json.loads(_ledger.read_text())))))

# %% [markdown]
# ## Reading the book in JupyterLab
#
# ```bash
# bash tools/install.sh && .venv/bin/jupyter lab --allow-root nbs/
# ```
#
# (`--allow-root` only matters where you are root, as on segbook's machines.) Every chapter runs top to bottom on a
# CPU in about a minute. Chapters that use real COCO masks look for `coco-mini` beside the repository
# (`../shared/coco-mini`, or `$SEGBOOK_COCO_MINI`) and skip those cells when it is absent. Figures land in `figures/`.
# Without that copy, rebuild coco-mini from a COCO 2017 download (images plus the panoptic annotations):
# `python tools/make_coco_mini.py --coco COCO_ROOT --out data/coco-mini`, with the image ids in `tools/coco_mini_ids.json`,
# then point `$SEGBOOK_COCO_MINI` at it.
#
# ## Reading the book as a site
#
# ```bash
# bash tools/docs.sh        # every chapter executed and rendered into _site/; open _site/index.html
# ```
#
# One page per chapter in reading order, each executed at build time so its figures are the ones the current code
# draws, equations typeset as MathML (no network needed to read it), a chapter list beside every page. A rebuild
# re-executes only the chapters whose notebook or package code changed (`_site/.cache/`). `tests/test_site.py` opens
# every page in headless Chromium (`tools/install_chromium.sh` installs Debian's) and checks figures, equations, links
# and that nothing is fetched from the network; CI runs it.
#
# Editing: change a notebook (or its py:percent twin under `twins/`), then `bash tools/sync.sh`
# exports the package and keeps notebooks, twins and this README in step. Never edit `segbook/*.py`
# by hand; `CONTRIBUTING.md` has the loop.

# %% [markdown]
# ## Your own COCO-format data
#
# A dataset root needs `annotations/instances_{split}.json` (COCO instances: polygons or RLE) and
# the images in `{split}/`. Everything takes `--data ROOT --split SPLIT`. The walkthrough below runs
# on a CPU with `coco-mini` standing in for your data (`../shared/coco-mini`: 100 + 100 COCO images,
# splits `train2017` and `val2017`); put your own root and split names in its place. The config,
# `configs/istr_own_data_cpu.yaml`, is an ISTR with a ResNet-18-FPN (frozen BatchNorm), 100 queries and
# 3 stages for photographs resized to a shorter side of 256–384 px (longer side ≤ 512), batch 2:
#
# ```bash
# export OMP_NUM_THREADS=1 D=../shared/coco-mini
# .venv/bin/segbook data browse --data $D --split val2017 --out runs/browse     # 1. look at the ground truth
# .venv/bin/segbook pca-fit --data $D --split train2017 --dim 60 --out runs/pca60.pt   # 2. ISTR's mask codec for your masks
# .venv/bin/segbook train --config configs/istr_own_data_cpu.yaml --data $D --out runs/own \
#     --max-iters 300 --eval-images 10 model.codec_path=runs/pca60.pt           # 3. train (about 13 min)
# .venv/bin/segbook eval --checkpoint runs/own/last.pt --split val2017 --per-class   # 4. AP table, RUN/eval_val2017/results.json
# .venv/bin/segbook eval --results runs/own/eval_val2017/results.json --data $D --split val2017 --per-class  # 5. score a results file
# .venv/bin/segbook predict --checkpoint runs/own/last.pt $D/val2017/000000000139.jpg --out runs/pred \
#     --threshold 0.3 --data $D --split val2017                                  # 6. overlays + predictions.json
# .venv/bin/segbook plot runs/own --out runs/own/curves.png                     # 7. loss, lr and AP curves
# .venv/bin/segbook viz --results runs/own/eval_val2017/results.json --data $D --split val2017 --out runs/viz --n 8  # 8. beside GT
# ```
#
# Step 3 prints what it derived from the file: `--max-iters 300` is the override `solver.max_iters=300`,
# and because the same command does not set `solver.steps` or `solver.warmup_iters`, the file's schedule
# for 2000 iterations is scaled to 300 (`[config] solver.max_iters 2000 -> 300: solver.steps [1600, 1850] ->
# [240, 278], warmup_iters 100 -> 15`); give `solver.steps=[...]` yourself to keep your own. The file's lr is
# written for `solver.reference_batch: 4` images, so batch 2 trains at half of it (`[config] solver.lr 0.0002
# -> 0.0001`, the linear scaling rule; `data.batch_size=8` would double it). `runs/own/config.yaml` holds the
# values the run used. Measured on this book's 2-core machine with one thread (shared with other jobs):
# 300 iterations took 12 min 57 s of wall time, median 2.5 s per iteration (load average about 2 on the 2
# cores), including the codec fit (that run let `segbook train` fit it instead of step 2) and the 10-image
# evaluation at the end; 30 iterations took 81 s at a median 1.9 s per iteration. That is a smoke test of the
# pipeline, not a trained model: from scratch, a few hundred iterations leave the APs at zero (that run's
# 10-image evaluation: box and mask AP 0.000). With ImageNet weights on disk, add
# `model.pretrained=/path/to/resnet18-f37072fd.pth model.trainable_layers=3` (segbook never downloads). A longer run on a GPU:
# `torchrun --nproc_per_node 8 -m segbook.cli train --config configs/istr_r50_coco.yaml --data /path/to/coco --out runs/r50`
# (`data.batch_size` is the global batch, split over the processes).
#
# Configs inherit: a file that starts with `_base_: other.yaml` (relative to itself, chains of any depth)
# holds only what it changes — `configs/istr_r101_coco.yaml` is `istr_r50_coco.yaml` with a ResNet-101,
# `configs/transfiner_shapes_cpu_finetune.yaml` is stage 2 over `transfiner_shapes_cpu.yaml`. The order is
# defaults < base < child < `key=value` overrides; mappings merge key by key, lists are replaced
# (chapter `10_config`).
#
# `segbook train` fits the PCA codec on your training split when the config names none (the official
# code only ships COCO's), takes the number of classes from your annotation file, writes checkpoints
# atomically and resumes a killed run exactly (`OUT/last.pt`; rerun the same command). Every switch is a `key=value` override
# of the YAML sections (`model.`, `data.`, `solver.`, and ISTR's `matching.` / `loss.`; a misspelt key
# fails naming it): `matching.mask_cost=dice loss.mask_loss=l2` trains one row of ISTR's Table 1,
# `weights=runs/a/last.pt` fine-tunes from another run. `segbook bench --model CONFIG --vs
# maskrcnn_r50` times a model against torchvision's Mask R-CNN in the same run.
#
# Bad input fails early with the file and field named (a missing image, malformed JSON, an
# annotation for an unknown image or category); a degenerate polygon or a corrupt image met during a
# long run is skipped, counted and warned about, and `train`, `eval` and `pca-fit` end with one line that sums up
# what they left out, by reason (also stored with their metrics). Images of any mode read as RGB (16-bit grey is
# scaled, not clipped); an image over `data.max_image_pixels` is refused before it is decoded. Pretrained backbone
# weights load from a local file path when you have them; segbook never downloads at run time.

# %% [markdown]
# ## What is measured where
#
# No full-COCO training runs here: trained results come from the synthetic *shapes* dataset on CPU,
# analyses that need real masks use `coco-mini` (100 + 100 COCO 2017 images), and every number in
# `figures/` and `benchmarks/results/` is stamped with the command and device that produced it.
