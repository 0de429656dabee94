# ---
# jupyter:
#   jupytext:
#     text_representation:
#       extension: .py
#       format_name: percent
#       format_version: '1.3'
#       jupytext_version: 1.19.6
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
# Where the official code differs from the paper, the paper is the default and the code's choice is
# a config switch the book ablates (`../shared/method-details.md` lists each difference).

# %% [markdown]
# ## Two commands
#
# On a fresh machine with Python 3.10+, from the repository root. The main job — run every
# experiment notebook at the *smoke* profile with papermill and regenerate `figures/` and
# `figures/tables/` (a few minutes on 2 CPU cores; `--data` adds the parts that need real COCO masks,
# leave it out if you have no coco-mini):
#
# ```bash
# bash tools/install.sh && .venv/bin/segbook reproduce --profile smoke --data ../shared/coco-mini --out runs/smoke
# ```
#
# The committed `figures/` come from the longer *cpu* profile (`figures/results_cpu.json` says which
# notebook ran when, at which commit and with which command); the smoke run overwrites them with its
# own tiny-schedule numbers (`figures/results_smoke.json`), and every table's caption names its profile.
#
# All tests (the notebooks' own test cells through `nbdev-test`, then `pytest`):
#
# ```bash
# bash tools/test.sh
# ```
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
# | `06_incoherent_regions` — incoherent regions on a mask pyramid | `segbook.incoherent` | Transfiner §3.1, Eq. 1 |
# | `07_quadtree` — point quadtree, node sampling, propagation | `segbook.quadtree` | Transfiner §3.2 |
# | `07b_gather` — sparse feature gather at quadtree nodes (torch + Triton) | `segbook.gather` | Transfiner §3.2 |
# | `08_transfiner` — incoherence detector, refinement transformer, heads on ISTR and Mask R-CNN | `segbook.transfiner` | Transfiner §3.2–3.3 |
# | `09_evaluation` — COCO AP and Boundary AP | `segbook.evaluation` | – |
# | `09b_bench` — speed and memory against torchvision's Mask R-CNN | `segbook.bench` | – |
# | `10_config` — configs: YAML + `key=value` | `segbook.config` | – |
# | `10_engine` — training loop, exact resume, torchrun/DDP | `segbook.engine` | – |
# | `10b_pipeline` — train / eval / predict wired from config to COCO results | `segbook.pipeline` | – |
# | `11_cli` — the `segbook` command | `segbook.cli` | – |
# | `12_reproduce` — papermill experiments that regenerate `figures/` | `segbook.reproduce` | – |
# | `90_viz` — overlays and figure saving | `segbook.viz` | – |
#
# The experiment notebooks under `nbs/experiments/` are not chapters: `segbook reproduce` runs them
# with papermill parameters per profile (smoke / cpu / gpu).

# %% [markdown]
# ## Reading the book in JupyterLab
#
# ```bash
# bash tools/install.sh && .venv/bin/jupyter lab nbs/
# ```
#
# Every chapter runs top to bottom on a CPU in about a minute. Chapters that use real COCO masks
# look for `coco-mini` beside the repository (`../shared/coco-mini`, or `$SEGBOOK_COCO_MINI`) and
# skip those cells when it is absent. Figures land in `figures/`.
#
# Editing: change a notebook (or its py:percent twin under `twins/`), then `bash tools/sync.sh`
# exports the package and keeps notebooks, twins and this README in step. Never edit `segbook/*.py`
# by hand; `CONTRIBUTING.md` has the loop.

# %% [markdown]
# ## Your own COCO-format data
#
# A dataset root needs `annotations/instances_{split}.json` (COCO instances: polygons or RLE) and
# the images in `{split}/`. Everything takes `--data ROOT --split SPLIT`:
#
# ```bash
# .venv/bin/segbook data browse --data /path/to/coco --split val2017 --out runs/browse   # look at the ground truth
# .venv/bin/segbook pca-fit --data /path/to/coco --split train2017 --dim 60 --out runs/pca60.pt   # ISTR's mask codec for your masks
# .venv/bin/segbook train --config configs/istr_r50_coco.yaml --data /path/to/coco --out runs/r50 data.train_split=train2017 data.val_split=val2017
# .venv/bin/segbook eval --checkpoint runs/r50/last.pt --split val2017          # bbox / segm / boundary AP, COCO results JSON
# .venv/bin/segbook predict --checkpoint runs/r50/last.pt img1.jpg img2.jpg --out runs/pred   # overlays + JSON
# torchrun --nproc_per_node 8 -m segbook.cli train --config configs/istr_r50_coco.yaml --data /path/to/coco --out runs/r50
# ```
#
# `segbook train` fits the PCA codec on your training split when the config names none (the official
# code only ships COCO's), takes the number of classes from your annotation file, writes checkpoints
# atomically and resumes a killed run exactly (`OUT/last.pt`). Every switch is a `key=value` override
# of the YAML sections (`model.`, `data.`, `solver.`, and ISTR's `matching.` / `loss.`; a misspelt key
# fails naming it): `matching.mask_cost=dice loss.mask_loss=l2` trains one row of ISTR's Table 1,
# `weights=runs/a/last.pt` fine-tunes from another run. `segbook bench --model CONFIG --vs
# maskrcnn_r50` times a model against torchvision's Mask R-CNN in the same run.
#
# Bad input fails early with the file and field named (a missing image, malformed JSON, an
# annotation for an unknown image or category); a degenerate polygon or a corrupt image met during a
# long run is skipped, counted and warned about. Pretrained backbone weights load from a local file
# path when you have them; segbook never downloads at run time.

# %% [markdown]
# ## What is measured where
#
# No full-COCO training runs here: trained results come from the synthetic *shapes* dataset on CPU,
# analyses that need real masks use `coco-mini` (100 + 100 COCO 2017 images), and every number in
# `figures/` and `benchmarks/results/` is stamped with the command and device that produced it.
