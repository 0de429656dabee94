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
# # Training configuration
#
# > Plain dataclasses loaded from YAML and overridden with `key=value`: a reader follows any setting to the code with grep.

# %%
#| default_exp config

# %%
#| export
import dataclasses
import math
import os
import typing
from dataclasses import dataclass, field
from pathlib import Path

from segbook.io import write_text_atomic

import yaml

# %% [markdown]
# ## The sections
#
# A run is described by one `TrainConfig`. It has no registry and builds no class from a string:
# `model_type` is read by an explicit `if/elif` in the command line, and `model` is a plain dict
# handed to that model's own config dataclass (ISTR, Transfiner and Mask R-CNN each own theirs),
# so this module never has to know every model's knobs. ISTR's set criterion has two more such dicts,
# `matching` (`MatchingConfig`: the cost weights and Table 1b's `mask_cost`) and `loss` (`SetLossConfig`: the loss
# weights and Table 1c's `mask_loss`); they are checked against those dataclasses when the file is loaded, so
# `matching.mask_cots=dice` fails there, naming the key.
#
# The solver defaults are ISTR's (`../shared/method-details.md`): AdamW at lr 2.5e-5, weight decay
# 1e-4, linear warm-up over 1000 iterations from 0.01, gradient-norm clipping at 1.0, seed 40244023.
# Mask Transfiner's official recipe (SGD, momentum 0.9, lr 0.02, warm-up factor 0.001) is reached with
# overrides. Two switches record paper-versus-code differences:
#
# - `decay_norm_bias` — the official ISTR code applies weight decay to every parameter (the default);
#   `False` exempts biases, normalisation and embedding weights, the usual choice for AdamW.
# - `warmup_method` — `'linear'` is what both official configs run; the Transfiner paper says
#   `'constant'`.
#
# The `data` fields are the arguments of `segbook.data.build_transforms` (`min_size`, `max_size`,
# `max_size_cap`, `flip` probability, `test_size`). `data.batch_size` is the **global** batch, split evenly over the processes of a distributed run
# (ISTR: 16 = 4 GPUs x 4 images), so the same file gives the same optimisation on 1 or N GPUs.

# %% [markdown]
# Each section also says which values make sense: `_ranges` maps a numeric field to `POSITIVE`, `NONNEG` or `PROB`
# (for a list, every element), checked when a file is loaded (`check_ranges`, below), so `data.flip: 1.5` or
# `model.num_queries: 0` is refused before any work with the file and key named, instead of training with a flip
# that always fires or crashing later inside torch.

# %%
#| export
POSITIVE, NONNEG, PROB = "> 0", ">= 0", "in [0, 1]"

def _shorter_sides() -> list: return list(range(480, 801, 32))

@dataclass
class DataConfig:
    "Where the images are and how a batch is made."
    root: str = "../shared/coco-mini"  # dataset root: annotations/instances_{split}.json + {split}/
    train_split: str = "train2017"
    val_split: str = "val2017"
    min_size: list = field(default_factory=_shorter_sides)  # training shorter side: one of these (or, with max_size, the range's low end)
    max_size: typing.Optional[int] = None  # with a single min_size: shorter side drawn uniformly in [min_size, max_size]
    max_size_cap: int = 1333  # the longer side is at most this (training and test)
    test_size: typing.Optional[int] = None  # test-time shorter side; None: the largest training size
    flip: float = 0.5  # horizontal-flip probability in training (0 switches it off)
    batch_size: int = 16  # global batch: divided by the number of processes
    num_workers: int = 2  # data-loader worker processes per training process
    max_image_pixels: typing.Optional[int] = 89_478_485  # larger images are skipped unread (Pillow's bomb threshold); None: no limit
    _ranges: typing.ClassVar[dict] = dict(min_size=POSITIVE, max_size=POSITIVE, max_size_cap=POSITIVE, test_size=POSITIVE,
                                          flip=PROB, batch_size=POSITIVE, num_workers=NONNEG, max_image_pixels=POSITIVE)

@dataclass
class SolverConfig:
    "Optimiser, schedule, clipping and mixed precision."
    optimizer: str = "adamw"  # 'adamw' (ISTR) or 'sgd' (Mask R-CNN / Transfiner)
    lr: float = 2.5e-5
    weight_decay: float = 1e-4
    decay_norm_bias: bool = True  # official ISTR: decay every parameter; False: none on biases/norms/embeddings
    momentum: float = 0.9  # SGD only
    betas: list = field(default_factory=lambda: [0.9, 0.999])  # AdamW only
    warmup_method: str = "linear"  # 'linear' (both official configs) or 'constant' (Transfiner paper)
    warmup_iters: int = 1000
    warmup_factor: float = 0.01  # lr multiplier at iteration 0
    steps: list = field(default_factory=lambda: [210000, 250000])  # lr x gamma at each of these iterations
    gamma: float = 0.1
    max_iters: int = 270000
    reference_batch: int = 0  # > 0: lr x data.batch_size / reference_batch (linear scaling rule); 0: off (or already applied)
    clip_grad_norm: float = 1.0  # max L2 norm of all gradients together; 0 switches clipping off
    amp: str = "none"  # 'none' | 'bf16' | 'fp16' (CUDA only; CPU always runs fp32)
    _ranges: typing.ClassVar[dict] = dict(lr=POSITIVE, weight_decay=NONNEG, momentum=PROB, betas=PROB, warmup_iters=NONNEG,
                                          warmup_factor=PROB, steps=POSITIVE, gamma=POSITIVE, max_iters=POSITIVE,
                                          reference_batch=NONNEG, clip_grad_norm=NONNEG)

@dataclass
class TrainConfig:
    "Everything one training run needs; `model` is passed through to the model's own config."
    model_type: str = "istr"  # 'istr' | 'transfiner' | 'maskrcnn' (mapped by an if/elif in the CLI)
    model: dict = field(default_factory=dict)
    matching: dict = field(default_factory=dict)  # ISTR only: segbook.matching.MatchingConfig fields (cost weights, mask_cost)
    loss: dict = field(default_factory=dict)  # ISTR only: segbook.losses.SetLossConfig fields (loss weights, mask_loss)
    data: DataConfig = field(default_factory=DataConfig)
    solver: SolverConfig = field(default_factory=SolverConfig)
    seed: int = 40244023
    eval_period: int = 7330  # iterations between evaluations (0: only at the end)
    checkpoint_period: int = 5000  # iterations between checkpoints (always one at the end)
    log_period: int = 20  # iterations between lines of metrics.jsonl
    device: str = "auto"  # 'auto' (CUDA when available), 'cpu', 'cuda'
    weights: typing.Optional[str] = None  # checkpoint to start from (a run's last.pt or a state dict; detectron2's MODEL.WEIGHTS)
    _ranges: typing.ClassVar[dict] = dict(eval_period=NONNEG, checkpoint_period=POSITIVE, log_period=POSITIVE)


# %% [markdown]
# ## Loading with checks
#
# YAML is read with `yaml.safe_load`, then each key is matched against the dataclass fields. A typo
# must not silently fall back to a default, so an unknown key is an error that names the file and
# the dotted key. Values are checked against the field's type; ints are accepted for floats, and a
# string that parses as a number is accepted for a float field because PyYAML reads `1e-4` (no dot)
# as a *string* — a classic trap for learning rates.

# %%
#| export
class ConfigError(ValueError):
    "A configuration file or override that does not fit `TrainConfig`; the message names the source and key."

def _check_value(value, typ, where:str):
    "Return `value` converted to the field type `typ`, or raise `ConfigError` naming `where`."
    if typing.get_origin(typ) is typing.Union and type(None) in typing.get_args(typ):  # Optional[X]
        if value is None: return None
        typ = next(t for t in typing.get_args(typ) if t is not type(None))
    if typ is float:
        if isinstance(value, bool): raise ConfigError(f"{where}: expected a number, got {value!r}")
        if isinstance(value, (int, float)): return float(value)
        if isinstance(value, str):
            try: return float(value)
            except ValueError: pass
        raise ConfigError(f"{where}: expected a number, got {value!r}")
    if typ is int:
        if isinstance(value, int) and not isinstance(value, bool): return value
        if isinstance(value, float) and value.is_integer(): return int(value)
        raise ConfigError(f"{where}: expected an integer, got {value!r}")
    if typ is bool:
        if isinstance(value, bool): return value
        raise ConfigError(f"{where}: expected true/false, got {value!r}")
    if typ is str:
        if isinstance(value, str): return value
        raise ConfigError(f"{where}: expected a string, got {value!r}")
    if typ is list:
        if isinstance(value, (list, tuple)): return list(value)
        if isinstance(value, (int, float)) and not isinstance(value, bool): return [value]
        raise ConfigError(f"{where}: expected a list, got {value!r}")
    if typ is dict:
        if isinstance(value, dict): return dict(value)
        raise ConfigError(f"{where}: expected a mapping, got {value!r}")
    return value

def _from_dict(cls, d:dict, source:str, prefix:str=""):
    "Build dataclass `cls` from mapping `d`; unknown keys and wrong types raise `ConfigError`."
    if not isinstance(d, dict):
        raise ConfigError(f"{source}: '{prefix.rstrip('.') or '<top level>'}' must be a mapping, got {type(d).__name__}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    kwargs = {}
    for k, v in d.items():
        if k not in names:
            raise ConfigError(f"{source}: unknown key '{prefix}{k}' (known: {', '.join(sorted(names))})")
        t = hints[k]
        kwargs[k] = (_from_dict(t, v, source, f"{prefix}{k}.") if dataclasses.is_dataclass(t)
                     else _check_value(v, t, f"{source}: '{prefix}{k}'"))
    return check_ranges(cls(**kwargs), source, prefix)

def typed_fields(cls, d:dict, # a dataclass and a mapping of some of its field names (unknown names pass through)
                 source:str="config", prefix:str="") -> dict:
    "`d` with each value checked and converted to its field's type (see `_check_value`), for configs owned by other modules."
    hints = typing.get_type_hints(cls)
    return {k: _check_value(v, hints[k], f"{source}: '{prefix}{k}'") if k in hints else v for k, v in d.items()}

def check_ranges(obj, # a config dataclass with a `_ranges` class attribute {field: POSITIVE | NONNEG | PROB}
                 source:str="config", prefix:str="") -> object:
    "`obj`, or `ConfigError` naming `source` and the key of the first value outside its range (a list: any element)."
    ok = {POSITIVE: lambda x: x > 0, NONNEG: lambda x: x >= 0, PROB: lambda x: 0 <= x <= 1}
    for name, rule in getattr(obj, "_ranges", {}).items():
        value = getattr(obj, name)
        for x in value if isinstance(value, (list, tuple)) else [value]:
            if x is None: continue
            if isinstance(x, bool) or not isinstance(x, (int, float)) or not math.isfinite(x) or not ok[rule](x):
                raise ConfigError(f"{source}: '{prefix}{name}' must be {rule}, got {value!r}")
    return obj


# %% [markdown]
# ## Overrides
#
# `key=value` strings address nested sections with dots (`solver.lr=1e-4`, `model.num_queries=100`).
# The value is parsed with `yaml.safe_load`, so `true`, `[1000, 2000]` and `null` mean what they say.
# Overrides are applied to the raw mapping before the checks, so they get the same errors as the file.

# %%
#| export
def apply_override(raw:dict, # the mapping read from YAML (modified in place)
                   override:str, # 'dotted.key=value'
                  ) -> dict:
    "Set `dotted.key` in `raw` to the YAML-parsed `value`; checks happen later in `_from_dict`."
    if "=" not in override:
        raise ConfigError(f"override '{override}': expected key=value")
    key, text = override.split("=", 1)
    parts = key.strip().split(".")
    if not all(parts): raise ConfigError(f"override '{override}': empty key")
    value = yaml.safe_load(text) if text.strip() else ""
    node = raw
    for p in parts[:-1]:
        nxt = node.setdefault(p, {})
        if not isinstance(nxt, dict):
            raise ConfigError(f"override '{override}': '{p}' is not a section")
        node = nxt
    node[parts[-1]] = value
    return raw


# %% [markdown]
# ## Inheritance: `_base_`
#
# A config may start with `_base_: other.yaml` (or a list of files), read relative to the including
# file, so a variant says only what it changes (`configs/istr_r101_coco.yaml` is `istr_r50_coco.yaml`
# with another backbone). Bases are read first and may have bases of their own, to any depth; a file
# that includes itself through the chain is an error naming every file of the cycle, and a missing
# base is an error naming the file that asked for it. Merging is a recursive dict update: a mapping
# (`model:`, `solver:`, ...) merges key by key, anything else — lists included — is replaced whole,
# so a child's `steps: [500]` never mixes with its base's steps. Each file's own keys are checked
# against `TrainConfig` before merging, so a typo is blamed on the file that has it.

# %%
#| export
BASE_KEY = "_base_"

def merge_config(base:dict, # the mapping read first
                 child:dict, # the mapping that wins
                ) -> dict:
    "`child` over `base`: mappings merge key by key (recursively), anything else — lists included — is replaced."
    out = dict(base)
    for k, v in child.items():
        out[k] = merge_config(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out

def read_config_file(path, # YAML file; its `_base_` files are read first, relative to it
                     _chain:tuple=(), # resolved paths of the files that include this one
                    ) -> dict:
    "The raw mapping of `path` with its `_base_` chain merged under it (no `_base_` key left)."
    path = Path(path)
    here = path.resolve()
    if here in _chain:
        cycle = _chain[_chain.index(here):] + (here,)
        raise ConfigError(f"{path}: _base_ cycle: {' -> '.join(str(p) for p in cycle)}")
    if not path.exists(): raise ConfigError(f"{path}: no such config file")
    try: raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e: raise ConfigError(f"{path}: not valid YAML: {e}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: '<top level>' must be a mapping, got {type(raw).__name__}")
    bases = raw.pop(BASE_KEY, None)
    bases = [] if bases is None else [bases] if isinstance(bases, str) else bases
    if not (isinstance(bases, list) and all(isinstance(b, str) and b for b in bases)):
        raise ConfigError(f"{path}: '{BASE_KEY}' must be a file name or a list of file names, got {bases!r}")
    _check_criterion(_from_dict(TrainConfig, raw, str(path)), str(path))  # this file's own keys, blamed on it
    merged = {}
    for b in bases:
        bp = Path(b).expanduser()
        if not bp.is_absolute(): bp = path.parent / bp
        if not bp.exists(): raise ConfigError(f"{path}: {BASE_KEY} '{b}' not found ({bp})")
        merged = merge_config(merged, read_config_file(bp, _chain + (here,)))
    return merge_config(merged, raw)


# %% [markdown]
# ## Schedules follow `max_iters`
#
# A file's warm-up and lr steps are written for its `max_iters`. Shortening a run with
# `solver.max_iters=300` (or `segbook train --max-iters 300`, which passes that override) while the
# steps stay at `[2000, 2300]` would train 300 iterations without ever decaying — a different recipe,
# silently. So when an override changes `max_iters` and the same override list does not set
# `solver.steps` (or `solver.warmup_iters`) itself, those are scaled by the ratio of the new to the
# old `max_iters` and rounded. Steps stay increasing and inside the run, in `[1, max_iters - 1]` (two that
# round to the same iteration become one; steps the file placed at or past its own `max_iters` were never
# reached and are dropped); the warm-up stays ≥ 0.
# Steps or warm-up given explicitly are kept as given. One line says what changed, and the run's
# `config.yaml` holds the effective values, so reading it again changes nothing.

# %%
#| export
def rescale_schedule(solver:SolverConfig, # settings whose max_iters has already been changed
                     old_max_iters:int, # the max_iters that steps and warmup_iters were written for
                     keep_steps:bool=False, # steps given explicitly: leave them
                     keep_warmup:bool=False, # warmup_iters given explicitly: leave it
                    ) -> SolverConfig:
    "`solver` with warm-up and lr steps scaled by `max_iters / old_max_iters` (rounded; steps increasing, < max_iters)."
    new = solver.max_iters
    if old_max_iters <= 0 or new == old_max_iters: return solver
    r = new / old_max_iters
    steps = solver.steps
    if not keep_steps:  # a step inside the old run lands in [1, new - 1]; one it never reached is dropped
        steps = sorted({s if s <= 0 else min(max(1, round(s * r)), new - 1)
                        for s in solver.steps if s < old_max_iters and (s <= 0 or new >= 2)})
    warmup = solver.warmup_iters if keep_warmup else max(0, round(solver.warmup_iters * r))
    return dataclasses.replace(solver, steps=steps, warmup_iters=warmup)

def _schedule_line(before:SolverConfig, after:SolverConfig, keep_steps:bool, keep_warmup:bool) -> str:
    "The one line `load_config` prints when `max_iters` changed."
    steps = f"solver.steps {before.steps} kept (given)" if keep_steps else f"solver.steps {before.steps} -> {after.steps}"
    warm = (f"warmup_iters {before.warmup_iters} kept (given)" if keep_warmup
            else f"warmup_iters {before.warmup_iters} -> {after.warmup_iters}")
    return f"[config] solver.max_iters {before.max_iters} -> {after.max_iters}: {steps}, {warm}"


# %% [markdown]
# ## Linear learning-rate scaling with the batch
#
# Goyal et al.'s linear scaling rule (detectron2's `REFERENCE_WORLD_SIZE`, mmdetection's
# `--auto-scale-lr`): when `solver.reference_batch` is > 0, the file's `lr` is the lr *for that batch*
# and the run uses `lr × B / reference_batch`, where `B` is the global batch. Here `data.batch_size` **is** the
# global batch — each of the `W` processes of a torchrun job loads `data.batch_size / W` images, so
# `B = (data.batch_size / W) × W = data.batch_size` — hence the same file gives the same lr on 1 or 8
# GPUs, and the rule matters when you change `data.batch_size` (a CPU run at batch 2 of a recipe
# written for 16: lr / 8). Only the lr is scaled, as mmdetection does: iterations, warm-up and steps
# are what the file (or `--max-iters`, above) says. detectron2 also divides the iterations by the
# factor to keep the number of epochs; with `--max-iters` choosing the budget here that would fight
# the user. The effective config has the scaled `lr` and `reference_batch: 0` ("applied"), so a run's
# `config.yaml` read again is not scaled twice. The line is printed by the main process only (`RANK`
# 0, which torchrun sets before the process group exists). `segbook.engine.train` applies the same
# function to a `TrainConfig` built in code, where it is a no-op for one that came from `load_config`.

# %%
#| export
def _is_main_process() -> bool:
    "Rank 0, or no torchrun (`RANK` is set by torchrun before the process group is joined)."
    return int(os.environ.get("RANK", "0")) == 0

def scale_lr_to_batch(cfg:TrainConfig,
                      verbose:bool=True, # print the one line (main process only)
                     ) -> TrainConfig:
    "`cfg` with `solver.lr × data.batch_size / solver.reference_batch` when that is > 0, and reference_batch 0 (applied)."
    ref = cfg.solver.reference_batch
    if ref < 0: raise ConfigError(f"solver.reference_batch: expected >= 0 (0 = off), got {ref}")
    if ref == 0: return cfg
    lr = cfg.solver.lr * cfg.data.batch_size / ref
    if verbose and _is_main_process():
        print(f"[config] solver.lr {cfg.solver.lr:g} -> {lr:g}: linear scaling with the global batch "
              f"(data.batch_size {cfg.data.batch_size} / solver.reference_batch {ref})", flush=True)
    return dataclasses.replace(cfg, solver=dataclasses.replace(cfg.solver, lr=lr, reference_batch=0))


# %% [markdown]
# ## Loading: the order
#
# `load_config(path, overrides)` builds the effective config in this order, each later step winning:
#
# 1. the `TrainConfig` defaults;
# 2. the `_base_` chain, deepest base first, then each including file up to `path`;
# 3. the `key=value` overrides, in the order given (`segbook train` appends `--data`, `--device` and
#    `--max-iters` as `data.root=`, `device=`, `solver.max_iters=` after the ones you typed);
# 4. derived values: the schedule rescaled when the overrides changed `max_iters`, then the lr scaled
#    by the batch when `solver.reference_batch` > 0.

# %%
#| export
def _given_keys(overrides) -> set:
    "Dotted keys the overrides set; a section given as a mapping (`solver={...}`) counts for each of its keys."
    keys = set()
    for o in overrides:
        k, _, text = o.partition("=")
        k = k.strip(); keys.add(k)
        v = yaml.safe_load(text) if text.strip() else None
        if isinstance(v, dict): keys |= {f"{k}.{sub}" for sub in v}
    return keys

def load_config(path=None, # YAML file (may start with `_base_: other.yaml`), or None for the defaults
                overrides:list=(), # 'dotted.key=value' strings applied after the file
                verbose:bool=True, # print a line for each derived change (rescaled schedule, scaled lr)
               ) -> TrainConfig:
    "Read a `TrainConfig` from `path` (YAML, `_base_` chain merged) and apply `overrides`; unknown keys raise `ConfigError`."
    source = str(path) if path is not None else "<defaults>"
    raw = read_config_file(path) if path is not None else {}
    cfg = _check_criterion(_from_dict(TrainConfig, raw, source), source)
    # overrides start from the checked file so that a bad override is blamed on the override
    merged = dataclasses.asdict(cfg)
    for o in overrides:
        apply_override(merged, o)
        _check_criterion(_from_dict(TrainConfig, merged, f"override '{o}'"), f"override '{o}'")
    out = _from_dict(TrainConfig, merged, "overrides")
    if out.solver.max_iters != cfg.solver.max_iters:
        given = _given_keys(overrides)
        keep = "solver.steps" in given, "solver.warmup_iters" in given
        solver = rescale_schedule(out.solver, cfg.solver.max_iters, *keep)
        if verbose and _is_main_process() and not all(keep):  # nothing derived when both were given
            print(_schedule_line(dataclasses.replace(out.solver, max_iters=cfg.solver.max_iters), solver, *keep), flush=True)
        out = dataclasses.replace(out, solver=solver)
    return scale_lr_to_batch(out, verbose)

def _check_criterion(cfg:TrainConfig, source:str) -> TrainConfig:
    "`matching:` and `loss:` hold fields of ISTR's `MatchingConfig` / `SetLossConfig`: checked here like the other sections."
    if cfg.matching or cfg.loss:
        from segbook.losses import SetLossConfig
        from segbook.matching import MatchingConfig
        for name, cls in (("matching", MatchingConfig), ("loss", SetLossConfig)):
            try: _from_dict(cls, getattr(cfg, name), source, f"{name}.")
            except ConfigError: raise
            except ValueError as e: raise ConfigError(f"{source}: {e}") from None  # the dataclass's own check of a switch
    return cfg

def config_to_dict(cfg:TrainConfig) -> dict:
    "A plain nested dict of `cfg` (what `save_config` writes and checkpoints store)."
    return dataclasses.asdict(cfg)

def save_config(cfg:TrainConfig, path) -> Path:
    "Write the effective `cfg` as YAML to `path` (unique temp file + rename); `load_config(path)` gives it back."
    return write_text_atomic(yaml.safe_dump(config_to_dict(cfg), sort_keys=False), path)


# %% [markdown]
# ## Example
#
# A tiny CPU run's file, two overrides, and what an unknown key looks like.

# %%
import math
import tempfile
d = Path(tempfile.mkdtemp())
(d / "tiny.yaml").write_text("""
model_type: istr
model: {num_queries: 20, hidden_dim: 64}
data: {root: data/shapes, train_split: train, val_split: val, min_size: [128], batch_size: 4}
solver: {lr: 1e-4, warmup_iters: 10, steps: [80], max_iters: 100}
""")
cfg = load_config(d / "tiny.yaml", ["solver.amp=bf16", "model.num_queries=50", "data.flip=0"])
cfg.solver, cfg.model

# %%
try: load_config(d / "tiny.yaml", ["solver.lrr=0.1"])
except ConfigError as e: print(e)

# %% [markdown]
# A variant over `tiny.yaml` and one over that: the chain is merged before the overrides. Shortening the
# grandchild to 30 iterations rescales its steps and warm-up; asking for batch 8 against a
# `reference_batch` of 4 doubles the lr.

# %%
(d / "wide.yaml").write_text("_base_: tiny.yaml\nmodel: {hidden_dim: 128}\nsolver: {steps: [60, 90]}\n")
(d / "wide_fast.yaml").write_text("_base_: wide.yaml\nsolver: {lr: 2e-4, reference_batch: 4}\n")
short = load_config(d / "wide_fast.yaml", ["solver.max_iters=30", "data.batch_size=8"])
short.model, short.solver.lr, short.solver.steps, short.solver.warmup_iters, short.solver.reference_batch

# %% [markdown]
# ## Tests

# %%
assert isinstance(cfg.solver.lr, float) and cfg.solver.lr == 1e-4  # '1e-4' arrives as a YAML string
assert cfg.solver.amp == "bf16" and cfg.model == {"num_queries": 50, "hidden_dim": 64} and cfg.data.flip == 0.0
assert cfg.data.min_size == [128] and cfg.solver.steps == [80] and cfg.seed == 40244023  # untouched default
assert load_config(save_config(cfg, d / "saved.yaml")) == cfg  # round trip
for bad, words in [(["solver.lrr=0.1"], ["solver.lrr", "unknown"]), (["data.batch_size=abc"], ["data.batch_size", "integer"]),
                   (["nokey"], ["key=value"]), (["seed.x=1"], ["seed", "not a section"])]:
    try: load_config(d / "tiny.yaml", bad); raise AssertionError(bad)
    except ConfigError as e: assert all(w in str(e) for w in words), str(e)
for bad, words in [(["matching.mask_cots=dice"], ["matching.mask_cots", "unknown", "mask_cost"]),
                   (["loss.mask_loss=l3"], ["loss.mask_loss=l3", "mask_loss", "'l3'"]),
                   (["matching.weight_mask=high"], ["matching.weight_mask", "number"])]:
    try: load_config(d / "tiny.yaml", bad); raise AssertionError(bad)
    except ConfigError as e: assert all(w in str(e) for w in words), str(e)
assert load_config(d / "tiny.yaml", ["matching.mask_cost=dice", "loss.mask_loss=l2"]).matching == {"mask_cost": "dice"}
(d / "typo.yaml").write_text("solver:\n  wramup_iters: 5\n")
try: load_config(d / "typo.yaml"); raise AssertionError("typo accepted")
except ConfigError as e: assert "typo.yaml" in str(e) and "solver.wramup_iters" in str(e)
# inheritance: base < child < overrides; lists replaced, mappings merged
assert short.model == {"num_queries": 20, "hidden_dim": 128} and short.data.root == "data/shapes"
assert load_config(d / "wide.yaml").solver.steps == [60, 90] and load_config(d / "wide.yaml").solver.lr == 1e-4
assert load_config(d / "wide.yaml", ["model.hidden_dim=32"]).model["hidden_dim"] == 32
# schedule: 100 -> 30 iterations rescales steps [60, 90] and warm-up 10; explicit steps are kept
assert (short.solver.max_iters, short.solver.steps, short.solver.warmup_iters) == (30, [18, 27], 3)
kept = load_config(d / "wide.yaml", ["solver.max_iters=30", "solver.steps=[25]"], verbose=False).solver
assert (kept.steps, kept.warmup_iters) == ([25], 3)
# lr: 2e-4 x 8 / 4, marked applied so that the saved config is not scaled again
assert math.isclose(short.solver.lr, 4e-4) and short.solver.reference_batch == 0
assert load_config(save_config(short, d / "short.yaml"), verbose=False) == short
(d / "loop_a.yaml").write_text("_base_: loop_b.yaml\n"); (d / "loop_b.yaml").write_text("_base_: loop_a.yaml\n")
try: load_config(d / "loop_a.yaml"); raise AssertionError("cycle accepted")
except ConfigError as e: assert "cycle" in str(e) and "loop_a.yaml" in str(e) and "loop_b.yaml" in str(e), str(e)
