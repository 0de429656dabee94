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
# # Training configuration
#
# > Plain dataclasses loaded from YAML and overridden with `key=value`: a reader follows any setting to the code with grep.

# %%
#| default_exp config

# %%
#| export
import dataclasses
import os
import typing
from dataclasses import dataclass, field
from pathlib import Path

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

# %%
#| export
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
    clip_grad_norm: float = 1.0  # max L2 norm of all gradients together; 0 switches clipping off
    amp: str = "none"  # 'none' | 'bf16' | 'fp16' (CUDA only; CPU always runs fp32)

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
    return cls(**kwargs)


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

def load_config(path=None, # YAML file, or None for the defaults
                overrides:list=(), # 'dotted.key=value' strings applied after the file
               ) -> TrainConfig:
    "Read a `TrainConfig` from `path` (YAML) and apply `overrides`; unknown keys raise `ConfigError`."
    raw = {}
    if path is not None:
        path = Path(path)
        if not path.exists(): raise ConfigError(f"{path}: no such config file")
        try: raw = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as e: raise ConfigError(f"{path}: not valid YAML: {e}") from None
    cfg = _check_criterion(_from_dict(TrainConfig, raw, str(path) if path else "<defaults>"), str(path) if path else "<defaults>")
    # overrides start from the checked file so that a bad override is blamed on the override
    merged = dataclasses.asdict(cfg)
    for o in overrides:
        apply_override(merged, o)
        _check_criterion(_from_dict(TrainConfig, merged, f"override '{o}'"), f"override '{o}'")
    return _from_dict(TrainConfig, merged, "overrides")

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
    "Write `cfg` as YAML to `path` (temp file + rename); `load_config(path)` gives it back."
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_text(yaml.safe_dump(config_to_dict(cfg), sort_keys=False))
    os.replace(tmp, path)
    return path


# %% [markdown]
# ## Example
#
# A tiny CPU run's file, two overrides, and what an unknown key looks like.

# %%
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
