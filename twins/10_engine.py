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
# # The training engine
#
# > One model-agnostic loop for ISTR, Transfiner and Mask R-CNN: seeded data order, AdamW/SGD with warm-up and steps, clipping, AMP, atomic checkpoints that resume a killed run exactly, and torchrun + DDP.

# %%
#| default_exp engine

# %%
#| export
import bisect
import json
import math
import os
import random
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

from segbook.io import remove_stale_temps, torch_save_atomic, write_text_atomic

import numpy as np
import torch
import atexit
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, Dataset, Sampler, get_worker_info
from tqdm.auto import tqdm

from segbook.config import ConfigError, SolverConfig, TrainConfig, config_to_dict, save_config, scale_lr_to_batch

# %% [markdown]
# The engine knows one contract and nothing else about a model (`CONTRIBUTING.md`): in train mode
# `model(images, targets)` returns a dict of `loss_*` tensors (plus, optionally, their sum as `loss`);
# in eval mode it returns torchvision-style predictions, which only the `evaluate_fn` you pass ever
# looks at. The chapter runs every mechanism on a toy detector defined at the end of the section
# below, so each runs in a second on CPU.
#
# ## A toy detector and data set
#
# Not exported — the tests define their own copy. A conv net predicts one box and one class per
# image; the images hold one coloured square; a random horizontal flip (drawn from torch's global
# RNG, like a real augmentation) and dropout make the run depend on every random stream the engine
# must checkpoint.

# %%
import torch.nn.functional as F
torch.set_num_threads(1)  # tiny tensors: on a shared 2-core machine one thread is ~10x faster than two

class ToySquares(Dataset):
    "`n` images [3,s,s] with one square whose colour is the label; random flips from the global torch RNG."
    def __init__(self, n=32, size=16, seed=0):
        g = torch.Generator().manual_seed(seed)
        self.size, self.labels = size, torch.randint(0, 3, (n,), generator=g)
        xy = torch.randint(0, size - 6, (n, 2), generator=g)
        self.boxes = torch.cat([xy, xy + 6], 1).float()
    def __len__(self): return len(self.labels)
    def __getitem__(self, i):
        img = torch.zeros(3, self.size, self.size)
        x0, y0, x1, y1 = self.boxes[i].long().tolist()
        img[self.labels[i], y0:y1, x0:x1] = 1.0
        box = self.boxes[i].clone()
        if torch.rand(()) < 0.5:  # augmentation: the engine must make this reproducible
            img, box = img.flip(-1), torch.stack([self.size - box[2], box[1], self.size - box[0], box[3]])
        return img, {"boxes": box[None], "labels": self.labels[i][None]}

def toy_collate(batch): return torch.stack([b[0] for b in batch]), [b[1] for b in batch]

class ToyDetector(nn.Module):
    "Train mode: dict of `loss_*`; eval mode: one box per image, torchvision style."
    def __init__(self, num_classes=3, size=16, dropout=0.1):
        super().__init__()
        self.size = size
        self.features = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 16, 3, padding=1),
                                      nn.ReLU(), nn.Flatten(), nn.Dropout(dropout))
        self.norm = nn.LayerNorm(16 * size * size)
        self.box, self.cls = nn.Linear(16 * size * size, 4), nn.Linear(16 * size * size, num_classes)
    def forward(self, images, targets=None):
        h = self.norm(self.features(images))
        boxes, logits = self.box(h).sigmoid() * self.size, self.cls(h)
        if self.training:
            gt_boxes = torch.cat([t["boxes"] for t in targets]); gt_labels = torch.cat([t["labels"] for t in targets])
            return {"loss_box": F.l1_loss(boxes, gt_boxes) / self.size, "loss_cls": F.cross_entropy(logits, gt_labels)}
        p = logits.softmax(-1)
        return [{"boxes": b[None], "labels": s.argmax()[None], "scores": s.max()[None]} for b, s in zip(boxes, p)]


# %% [markdown]
# ## Seeds
#
# One seed in the config seeds Python, NumPy and torch (`seed_everything`). Data-loader workers get
# their torch seed from the loader's `generator`; `seed_worker` (the `worker_init_fn`) passes it on
# to Python and NumPy, which PyTorch leaves alone. `deterministic=True` also asks for deterministic
# kernels (`torch.use_deterministic_algorithms`); CPU runs are bitwise repeatable without it.

# %%
#| export
def seed_everything(seed:int, # one seed for Python, NumPy and torch (all devices)
                    deterministic:bool=False, # also require deterministic kernels (slower on CUDA)
                   ) -> None:
    "Seed Python's `random`, NumPy's global RNG and torch."
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    if deterministic:
        torch.use_deterministic_algorithms(True, warn_only=True)

def seed_worker(worker_id:int) -> None:
    "`worker_init_fn`: seed Python and NumPy in a data-loader worker from the torch seed the loader gave it."
    s = torch.initial_seed() % 2**32
    random.seed(s)
    np.random.seed(s)


# %% [markdown]
# ## Distributed: torchrun and DDP
#
# No home-made launcher: `torchrun --nproc_per_node N -m segbook.cli train ...` starts `N` processes
# and sets `RANK`, `WORLD_SIZE`, `LOCAL_RANK`, `MASTER_ADDR`, `MASTER_PORT`. `init_distributed`
# reads them and joins the process group — NCCL on CUDA, gloo on CPU — and leaves it again at exit
# (`leave_distributed`: a gloo group left to the interpreter's shutdown can abort a rank as it exits), and `train` wraps the model
# in `DistributedDataParallel`, which averages gradients over processes in the backward pass. Only
# rank 0 writes checkpoints, logs and runs `evaluate_fn`.
#
# Each rank's loss is the mean over its own share of the batch; DDP's averaging then gives the
# gradient of the global mean when shares are equal. Losses normalised by a *count* across the
# batch (ISTR's number of ground-truth boxes, Eq. 9) must all-reduce that count so every rank
# divides by the global number — that is the criterion's job, not the engine's.

# %%
#| export
@dataclass
class DistInfo:
    "Where this process sits in a (possibly one-process) run."
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    @property
    def is_main(self) -> bool: return self.rank == 0

def dist_info() -> DistInfo:
    "Rank, world size and local rank of the current process group (0, 1, 0 without one)."
    if dist.is_available() and dist.is_initialized():
        return DistInfo(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", 0)))
    return DistInfo()

def init_distributed(backend:str=None, # default: 'nccl' with CUDA, else 'gloo'
                    ) -> DistInfo:
    "Join the process group torchrun describes in `RANK`/`WORLD_SIZE`/`LOCAL_RANK`; a no-op for one process."
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1: return dist_info()
    if not dist.is_initialized():
        local = int(os.environ.get("LOCAL_RANK", 0))
        backend = backend or ("nccl" if torch.cuda.is_available() else "gloo")
        if backend == "nccl": torch.cuda.set_device(local)
        dist.init_process_group(backend)
        atexit.register(leave_distributed)
    return dist_info()

def leave_distributed():
    "Destroy the process group `init_distributed` joined (at exit): its communication threads end before the interpreter does."
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()

def unwrap(model:nn.Module) -> nn.Module:
    "The model inside `DistributedDataParallel`, or `model` itself."
    return model.module if isinstance(model, DistributedDataParallel) else model


# %%
assert dist_info() == DistInfo(0, 1, 0) and init_distributed().is_main  # no torchrun here: one process


# %% [markdown]
# ## A data order that can be resumed
#
# Training counts iterations, not epochs, so the loader is an endless stream (detectron2's
# `TrainingSampler` does the same). For a killed run to resume *exactly*, the stream must be a pure
# function of the seed and the position in it:
#
# - epoch `e`'s order is `randperm(n)` from a generator seeded with `seed + e`; a process in a
#   distributed run takes every `world_size`-th element starting at its `rank` (as
#   `DistributedSampler`, padded by wrapping so every rank gets the same count), and
#   `set_start(k)` skips the first `k` samples of this rank's stream without drawing them;
# - each position also gets its own *sample seed* from the same generator, and `SeededSamples`
#   seeds Python, NumPy and torch with it just before calling the wrapped data set. Augmentations
#   then depend only on (seed, epoch, position) — not on which worker process happened to load the
#   sample, nor on how many samples that worker had loaded since the loader started, which is what
#   changes when a run restarts. In the main process (`num_workers=0`) the training RNG state is
#   saved and restored around the call, so loading never perturbs dropout.
#
# With the interleaved split, rank `r`'s `j`-th batch of `B` is the `r`-th slice of the one-process
# stream's `j`-th batch of `B x world_size`: the global batch is the same however many processes
# share it.

# %%
#| export
class ResumableSampler(Sampler):
    "Endless stream of `(index, sample_seed)` for one process; a function of (seed, epoch, position) only."
    def __init__(self, size:int, # number of samples in the data set
                 seed:int=0, # epoch e is shuffled by a generator seeded with seed + e
                 rank:int=0, world_size:int=1, # this process and the number of processes
                 shuffle:bool=True): # False: each epoch in index order (sample seeds still vary)
        if size < 1: raise ValueError("ResumableSampler: the data set is empty")
        self.size, self.seed, self.rank, self.world_size, self.shuffle = size, seed, rank, world_size, shuffle
        self.per_rank = math.ceil(size / world_size)
        self.start = 0

    def set_start(self, consumed:int):
        "Skip the first `consumed` samples of this rank's stream (used when resuming)."
        self.start = int(consumed)

    def epoch_order(self, epoch:int) -> tuple:
        "This rank's `(indices, sample_seeds)` for `epoch`, two lists of length `per_rank`."
        g = torch.Generator().manual_seed(self.seed + epoch)
        order = torch.randperm(self.size, generator=g) if self.shuffle else torch.arange(self.size)
        total = self.per_rank * self.world_size
        order = order.repeat(math.ceil(total / self.size))[:total]  # pad by wrapping, like DistributedSampler
        seeds = torch.randint(0, 2**62, (total,), generator=g)
        return order[self.rank::self.world_size].tolist(), seeds[self.rank::self.world_size].tolist()

    def __iter__(self):
        epoch, offset = divmod(self.start, self.per_rank)
        while True:
            order, seeds = self.epoch_order(epoch)
            for i in range(offset, self.per_rank):
                yield order[i], seeds[i]
            epoch, offset = epoch + 1, 0


# %%
#| export
def capture_rng_state(cuda:bool=True) -> dict:
    "Python, NumPy, torch CPU (and CUDA if in use) RNG states, as plain values `torch.load(weights_only=True)` accepts."
    name, keys, pos, has_gauss, cached = np.random.get_state()
    state = {"python": random.getstate(),
             "numpy": {"name": name, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                       "has_gauss": int(has_gauss), "cached_gaussian": float(cached)},
             "torch": torch.get_rng_state()}
    if cuda and torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state

def restore_rng_state(state:dict) -> None:
    "Put back the RNG states `capture_rng_state` returned."
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    n = state["numpy"]
    np.random.set_state((n["name"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached_gaussian"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])

class SeededSamples(Dataset):
    "Wrap `dataset` so item `(index, seed)` is loaded with Python, NumPy and torch's CPU RNG seeded by `seed`."
    def __init__(self, dataset): self.dataset = dataset
    def __len__(self): return len(self.dataset)
    def __getitem__(self, key):
        index, seed = key
        saved = capture_rng_state(cuda=False) if get_worker_info() is None else None
        random.seed(seed); np.random.seed(seed % 2**32); torch.default_generator.manual_seed(seed)
        try:
            return self.dataset[index]
        finally:
            if saved is not None: restore_rng_state(saved)


# %%
#| export
def build_train_loader(dataset, # map-style data set: dataset[i] -> one sample
                       batch_size:int, # global batch, split evenly over the processes
                       seed:int, # the run's seed: data order and augmentations derive from it
                       collate_fn=None, # e.g. `segbook.data.collate`
                       num_workers:int=0,
                       shuffle:bool=True,
                       rank:int=None, world_size:int=None, # default: from the process group, if any
                      ) -> DataLoader:
    "An endless, resumable training loader: `ResumableSampler` + `SeededSamples` + seeded workers."
    if rank is None or world_size is None:
        info = dist_info(); rank, world_size = info.rank, info.world_size
    if batch_size % world_size:
        raise ConfigError(f"data.batch_size={batch_size} is the global batch and must divide evenly "
                          f"over {world_size} processes")
    sampler = ResumableSampler(len(dataset), seed=seed, rank=rank, world_size=world_size, shuffle=shuffle)
    return DataLoader(SeededSamples(dataset), batch_size=batch_size // world_size, sampler=sampler,
                      num_workers=num_workers, collate_fn=collate_fn, worker_init_fn=seed_worker,
                      generator=torch.Generator().manual_seed(seed + rank),
                      pin_memory=torch.cuda.is_available())


# %% [markdown]
# The sampler before and after a "restart": skipping 5 samples gives the stream's tail, and two
# ranks interleave to the one-process stream. The same flip comes out of a sample whichever way it
# is reached.

# %%
s1 = ResumableSampler(10, seed=3)
stream = [next(it) for it in [iter(s1)] for _ in range(25)]
s1.set_start(5); tail = [x for _, x in zip(range(20), iter(s1))]
ranks = [ResumableSampler(10, seed=3, rank=r, world_size=2) for r in range(2)]
r0, r1 = ([x for _, x in zip(range(5), iter(s))] for s in ranks)
ds = SeededSamples(ToySquares(10))
[i for i, _ in stream[:12]]

# %%
assert tail == stream[5:] and sorted(i for i, _ in stream[:10]) == list(range(10))  # an epoch is a permutation
assert [x for pair in zip(r0, r1) for x in pair] == stream[:10]  # 2 ranks interleave to 1 process
assert [i for i, _ in stream[10:20]] != [i for i, _ in stream[:10]]  # epochs differ
torch.manual_seed(0); before = torch.rand(3)
torch.manual_seed(0); a = ds[stream[7]]; b = ds[stream[7]]; after = torch.rand(3)
assert torch.equal(a[0], b[0]) and torch.equal(before, after)  # same sample; the caller's RNG untouched
loader = build_train_loader(ToySquares(16), batch_size=4, seed=1, collate_fn=toy_collate, num_workers=0)
assert len(next(iter(loader))[1]) == 4

# %% [markdown]
# ## Optimiser: which parameters decay
#
# AdamW (Loshchilov & Hutter) for ISTR, SGD with momentum for the Mask R-CNN/Transfiner recipe,
# picked by an explicit `if`. Weight decay is set per parameter group. The official ISTR code
# decays everything (`decay_norm_bias=True`, the default); `False` puts biases and the weights of
# normalisation and embedding layers in a group without decay — they set scale and offset, not
# capacity, and shrinking them towards zero only fights the normalisation.

# %%
#| export
_NO_DECAY_MODULES = (nn.modules.batchnorm._NormBase, nn.GroupNorm, nn.LayerNorm, nn.LocalResponseNorm,
                     nn.Embedding) + ((nn.RMSNorm,) if hasattr(nn, "RMSNorm") else ())

def param_groups(model:nn.Module, weight_decay:float, decay_norm_bias:bool=True) -> list:
    "Trainable parameters split into a decayed group and (unless `decay_norm_bias`) an undecayed one."
    decay, no_decay, seen = [], [], set()
    for module in model.modules():
        for name, p in module.named_parameters(recurse=False):
            if not p.requires_grad or id(p) in seen: continue
            seen.add(id(p))
            exempt = not decay_norm_bias and (isinstance(module, _NO_DECAY_MODULES) or name == "bias")
            (no_decay if exempt else decay).append(p)
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return [g for g in groups if g["params"]]

def build_optimizer(model:nn.Module, solver:SolverConfig) -> torch.optim.Optimizer:
    "AdamW or SGD over `param_groups(model, ...)` as `solver` says."
    groups = param_groups(model, solver.weight_decay, solver.decay_norm_bias)
    if solver.optimizer == "adamw":
        return torch.optim.AdamW(groups, lr=solver.lr, betas=tuple(solver.betas))
    elif solver.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=solver.lr, momentum=solver.momentum)
    raise ConfigError(f"solver.optimizer: '{solver.optimizer}' is not 'adamw' or 'sgd'")


# %%
m = ToyDetector()
g_all = param_groups(m, 1e-4)
g_split = param_groups(m, 1e-4, decay_norm_bias=False)
[(g["weight_decay"], sum(p.numel() for p in g["params"])) for g in g_split]

# %%
n_params = sum(p.numel() for p in m.parameters())
assert len(g_all) == 1 and sum(p.numel() for p in g_all[0]["params"]) == n_params
assert [len(g["params"]) for g in g_split] == [4, 6]  # 2 kernels + 2 matrices; 4 biases + LayerNorm's weight and bias
assert sum(p.numel() for g in g_split for p in g["params"]) == n_params  # every parameter exactly once
assert isinstance(build_optimizer(m, SolverConfig(optimizer="sgd")), torch.optim.SGD)


# %% [markdown]
# ## Schedule: linear warm-up, then steps
#
# The learning rate at iteration $t$ is $\eta_t = \eta\,w(t)\,\gamma^{\#\{s \in \text{steps}: s \le t\}}$
# with the warm-up factor $w(t) = f + (1-f)\,t/T$ for $t < T$ (`'linear'`, what both official
# configs run; the Transfiner paper's `'constant'` keeps $w = f$) and $w = 1$ afterwards. It is a
# `LambdaLR`; the multiplier is a small callable object rather than a lambda so that its settings
# go into the scheduler's `state_dict`.

# %%
#| export
class WarmupStepSchedule:
    "Learning-rate multiplier at iteration `t`: warm-up factor times gamma per step passed."
    def __init__(self, warmup_iters:int, warmup_factor:float, steps:list, gamma:float, method:str="linear"):
        if method not in ("linear", "constant"):
            raise ConfigError(f"solver.warmup_method: '{method}' is not 'linear' or 'constant'")
        if list(steps) != sorted(steps): raise ConfigError(f"solver.steps must increase, got {steps}")
        self.warmup_iters, self.warmup_factor, self.steps, self.gamma, self.method = \
            warmup_iters, warmup_factor, list(steps), gamma, method
    def __call__(self, t:int) -> float:
        f = self.gamma ** bisect.bisect_right(self.steps, t)
        if t < self.warmup_iters:
            a = t / self.warmup_iters
            f *= self.warmup_factor * (1 - a) + a if self.method == "linear" else self.warmup_factor
        return f

def build_scheduler(optimizer:torch.optim.Optimizer, solver:SolverConfig) -> torch.optim.lr_scheduler.LambdaLR:
    "`LambdaLR` with `WarmupStepSchedule`; call `.step()` once per iteration."
    return torch.optim.lr_scheduler.LambdaLR(optimizer, WarmupStepSchedule(
        solver.warmup_iters, solver.warmup_factor, solver.steps, solver.gamma, solver.warmup_method))


# %%
sol = SolverConfig(lr=1.0, warmup_iters=10, warmup_factor=0.01, steps=[30, 40], gamma=0.1)
opt = build_optimizer(nn.Linear(1, 1), sol); sched = build_scheduler(opt, sol)
lrs = []
for t in range(50): lrs.append(opt.param_groups[0]["lr"]); opt.step(); sched.step()

# %%
assert math.isclose(lrs[0], 0.01) and math.isclose(lrs[5], 0.01 * 0.5 + 0.5) and lrs[10] == 1.0
assert lrs[29] == 1.0 and math.isclose(lrs[30], 0.1) and math.isclose(lrs[39], 0.1) and math.isclose(lrs[40], 0.01)
assert WarmupStepSchedule(10, 0.01, [], 0.1, "constant")(9) == 0.01

# %%
import matplotlib.pyplot as plt
from segbook.viz import save_figure
fig, ax = plt.subplots(figsize=(4.5, 2.4))
ax.plot(lrs, drawstyle="steps-post"); ax.set_yscale("log"); ax.set_xlabel("iteration"); ax.set_ylabel("lr / base lr")
ax.set_title("linear warm-up (10 it, from 0.01), steps at 30 and 40")
save_figure(fig, "engine_lr_schedule.png"); plt.close(fig)

# %% [markdown]
# ## Checkpoints that survive a crash
#
# A checkpoint holds everything the next iteration depends on: model, optimizer, scheduler and
# GradScaler states, the iteration, the data position (samples this rank has consumed) and every
# RNG state — of every rank, gathered to rank 0. It is written to a temporary file in the same
# folder and renamed over `last.pt` with `os.replace`, which is atomic on POSIX: a run killed while
# saving leaves the previous `last.pt` whole, never half a file. Everything in it is tensors and
# plain values, so it loads with `torch.load(weights_only=True)`.

# %%
#| export
atomic_save = torch_save_atomic   # `torch.save` through a unique temporary file, flushed, renamed (chapter 00b)

class CheckpointError(ValueError):
    "A checkpoint that cannot be used: unreadable, incomplete, non-finite, or not for this model; the message names file and entry."

def load_checkpoint(path, # a `train` checkpoint (last.pt) or a plain state dict
                    require:tuple=(), # entries it must have, e.g. ("model", "optimizer") to resume
                   ) -> dict:
    "Read a checkpoint (tensors and plain values only: `weights_only=True`); `CheckpointError` names what is wrong."
    path = Path(path)
    if not path.is_file(): raise FileNotFoundError(f"{path}: no such checkpoint file")
    try:
        ck = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:   # truncated, not a torch file, or pickled objects other than tensors and plain values
        lines = [l.strip() for l in str(e).splitlines() if l.strip()] or [""]
        detail = next((l for l in lines if "Unsupported global" in l), lines[0])[:200]   # weights_only's own reason
        raise CheckpointError(f"{path}: cannot read checkpoint ({type(e).__name__}: {detail})") from e
    if not isinstance(ck, dict):
        raise CheckpointError(f"{path}: a checkpoint holds a dict, this file holds {type(ck).__name__}")
    missing = [k for k in require if k not in ck]
    if missing: raise CheckpointError(f"{path}: no {missing[0]!r} entry" + (f" (nor {', '.join(map(repr, missing[1:]))})" if missing[1:] else "")
                                      + f"; it has {sorted(map(str, ck))[:8]}")
    state = ck.get("model", ck)
    if isinstance(state, dict):
        bad = next((k for k, v in state.items() if torch.is_tensor(v) and v.is_floating_point() and not bool(torch.isfinite(v).all())), None)
        if bad is not None: raise CheckpointError(f"{path}: tensor '{bad}' holds NaN or inf")
    return ck

def load_model_state(model:nn.Module, state:dict, path) -> None:
    "`model.load_state_dict(state)` (strict), with a one-line `CheckpointError` when the weights are for another model."
    try:
        model.load_state_dict(state)
    except RuntimeError as e:
        own = model.state_dict()
        missing, extra = [k for k in own if k not in state], [k for k in state if k not in own]
        shape = [k for k in own if k in state and torch.is_tensor(state[k]) and state[k].shape != own[k].shape]
        eg = (missing or extra or shape or [""])[0]
        raise CheckpointError(f"{path}: weights do not fit this model ({len(missing)} missing, {len(extra)} unexpected, "
                              f"{len(shape)} of another shape, e.g. '{eg}'): a checkpoint of another config?") from e

def _gather_rng_states(info:DistInfo) -> list:
    "Every rank's RNG state, in rank order (a collective: all ranks must call it)."
    state = capture_rng_state()
    if info.world_size == 1: return [state]
    states = [None] * info.world_size
    dist.all_gather_object(states, state)
    return states


# %% [markdown]
# ## The loop
#
# `train` applies the linear lr scaling of chapter 10 (`scale_lr_to_batch`: only a `TrainConfig` built in code
# still has `solver.reference_batch` > 0; one from `load_config` has it applied already, and every rank computes
# the same lr because `data.batch_size` is the global batch), builds the optimizer and scheduler from `cfg.solver`, resumes from `out_dir/last.pt` when
# asked, wraps the model in DDP when a process group exists, and then per iteration: forward under
# `torch.autocast` (bf16, or fp16 with a `GradScaler`; CUDA only — CPU runs fp32), backward,
# gradient-norm clipping over all parameters (on unscaled gradients), optimizer and scheduler steps.
# Losses are accumulated as detached tensors and turned into numbers only every `log_period`
# iterations. Two checks do wait on the device every step, as detectron2's trainer does: a non-finite
# total loss stops the run *before* `backward`, naming each `loss_*` term that is NaN/inf and the iteration (all
# ranks agree through one all-reduce, so none is left waiting), and a non-finite gradient norm stops it before
# the optimizer step (unless fp16's `GradScaler`, which skips such steps by design, is on). Either way no NaN
# reaches the weights or a checkpoint: the last `last.pt` stays the last good one. Each log line of
# `out_dir/metrics.jsonl` holds `iter`, `lr`, the period's mean of each loss and of the gradient norm
# (averaged over ranks), and seconds per iteration; evaluation results are lines with an `eval` key.
# TensorBoard scalars are written too when `tensorboard` is installed.
#
# A fresh run seeds its training randomness with `cfg.seed + rank` at iteration 0 (build the model
# after `seed_everything(cfg.seed)` so the initial weights are seeded too) and starts quietly: `resume=True`
# (what `segbook train` passes unless `--no-resume`) only means "continue if there is a checkpoint", so
# its absence is not worth a warning. A resumed run says one line (`[resume] OUT/last.pt: iteration N of M`),
# restores everything and drops the lines of `metrics.jsonl` past the checkpoint, which the killed run
# may have logged; with `checkpoint_period` a multiple of `log_period` the resumed file equals the
# uninterrupted one except for timings. `evaluate_fn(model)` runs on rank 0 under `torch.no_grad()`
# in eval mode with the RNG state saved and restored around it, so evaluating never changes the
# training that follows.

# %%
#| export
def to_device(obj, device):
    "Move the tensors in nested lists/tuples/dicts to `device`."
    if torch.is_tensor(obj): return obj.to(device, non_blocking=True)
    if isinstance(obj, dict): return {k: to_device(v, device) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)): return type(obj)(to_device(v, device) for v in obj)
    return obj

def total_loss(losses:dict) -> torch.Tensor:
    "`losses['loss']` if the model gives it, else the sum of its `loss_*` terms."
    if "loss" in losses: return losses["loss"]
    terms = [v for k, v in losses.items() if k.startswith("loss_")]
    if not terms: raise ValueError(f"model returned no 'loss' or 'loss_*' entries: {sorted(losses)}")
    return sum(terms)

def resolve_device(name:str, info:DistInfo) -> torch.device:
    "`'auto'` means CUDA (this process's local GPU) when available, else CPU."
    if name == "auto": name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda":
        if not torch.cuda.is_available(): raise ConfigError("device: 'cuda' asked for, but CUDA is not available")
        return torch.device("cuda", info.local_rank)
    if name != "cpu": raise ConfigError(f"device: '{name}' is not 'auto', 'cpu' or 'cuda'")
    return torch.device("cpu")

def _truncate_metrics(path:Path, last_iter:int):
    "Keep the complete lines of a JSONL metrics file with `iter <= last_iter` (rewritten atomically)."
    if not path.exists(): return
    keep = []
    for line in path.read_text().splitlines():
        try: rec = json.loads(line)
        except json.JSONDecodeError: continue  # a line cut short by the kill
        if rec.get("iter", 0) <= last_iter: keep.append(line)
    write_text_atomic("".join(l + "\n" for l in keep), path)

def _write_line(f, record:dict):
    f.write(json.dumps(record, default=float) + "\n"); f.flush()


# %%
#| export
def _evaluate(model:nn.Module, evaluate_fn) -> dict:
    "evaluate_fn on the unwrapped model in eval mode, without a gradient; train mode and the RNG state restored."
    rng = capture_rng_state()
    net = unwrap(model); net.eval()
    with torch.no_grad(): result = evaluate_fn(net)
    net.train(); restore_rng_state(rng)
    return result

def _last_note(last:Path) -> str:
    return f"the last checkpoint {last} is untouched" if last.exists() else "no checkpoint written yet"

def _check_finite_loss(loss:torch.Tensor, losses:dict, iteration:int, last:Path, info:DistInfo):
    "Stop before `backward` when the loss is NaN/inf on any process, naming the loss terms that are (one host sync per step)."
    ok = torch.isfinite(loss.detach()).float()
    if info.world_size > 1: dist.all_reduce(ok, op=dist.ReduceOp.MIN)   # every process stops together
    if not bool(ok):
        bad = [f"{k}={float(v.detach().float().sum()):.4g}" for k, v in losses.items()
               if k.startswith("loss_") and not bool(torch.isfinite(v.detach()).all())]
        raise FloatingPointError(f"iteration {iteration}: non-finite loss ({', '.join(bad) or 'on another process'}); "
                                 f"no optimizer step taken, {_last_note(last)}")

def train(model:nn.Module, # train mode: (images, targets) -> dict of loss_* tensors
          train_loader, # endless loader, ideally from `build_train_loader` (exact resume)
          cfg:TrainConfig,
          out_dir, # gets last.pt, metrics.jsonl, config.yaml
          evaluate_fn=None, # evaluate_fn(model) -> dict of numbers, on rank 0
          resume:bool=False, # continue from out_dir/last.pt if it exists
          progress:bool=True, # tqdm bar on rank 0
          find_unused_parameters:bool=False, # passed to DistributedDataParallel
         ) -> dict:
    "Train `model` for `cfg.solver.max_iters` iterations; returns the last iteration, checkpoint, metrics and eval."
    cfg = scale_lr_to_batch(cfg)  # solver.reference_batch > 0 in a TrainConfig built in code (no-op after load_config)
    info, sol, out_dir = dist_info(), cfg.solver, Path(out_dir)
    device = resolve_device(cfg.device, info)
    if sol.amp not in ("none", "bf16", "fp16"): raise ConfigError(f"solver.amp: '{sol.amp}' is not none/bf16/fp16")
    if cfg.log_period < 1: raise ConfigError(f"log_period must be >= 1, got {cfg.log_period}")
    use_amp = sol.amp != "none" and device.type == "cuda"
    if sol.amp != "none" and not use_amp:
        warnings.warn(f"solver.amp={sol.amp} applies to CUDA only; this {device.type} run uses fp32")
    amp_dtype = torch.bfloat16 if sol.amp == "bf16" else torch.float16
    model.to(device)
    optimizer = build_optimizer(model, sol)
    scheduler = build_scheduler(optimizer, sol)
    scaler = torch.amp.GradScaler(device.type, enabled=use_amp and sol.amp == "fp16")
    per_rank_batch = getattr(train_loader, "batch_size", None) or 1
    last, metrics_path = out_dir / "last.pt", out_dir / "metrics.jsonl"

    start = 0
    if info.is_main:   # temporary files of a writer killed mid-checkpoint (never read: the rename did not happen)
        stale = remove_stale_temps(last)
        if stale: print(f"[resume] removed {stale} unfinished checkpoint file(s) beside {last}", flush=True)
    if resume and last.exists():
        ck = load_checkpoint(last, require=("model", "optimizer", "scheduler", "scaler", "iteration", "rng", "data"))
        load_model_state(unwrap(model), ck["model"], last)
        optimizer.load_state_dict(ck["optimizer"]); scheduler.load_state_dict(ck["scheduler"])
        scaler.load_state_dict(ck["scaler"])
        start = ck["iteration"]
        if info.is_main: print(f"[resume] {last}: iteration {start} of {sol.max_iters}", flush=True)
        if ck["data"]["world_size"] != info.world_size or ck["data"]["per_rank_batch"] != per_rank_batch:
            warnings.warn(f"{last}: saved with {ck['data']['world_size']} processes x {ck['data']['per_rank_batch']}"
                          f" images, resumed with {info.world_size} x {per_rank_batch}: data order and RNG not exact")
        restore_rng_state(ck["rng"][min(info.rank, len(ck["rng"]) - 1)])
        saved = {k: v for k, v in ck.get("config", {}).get("solver", {}).items() if k != "max_iters"}
        changed = sorted(k for k, v in config_to_dict(cfg)["solver"].items() if k in saved and saved[k] != v)
        if changed:
            warnings.warn(f"{last}: solver.{', solver.'.join(changed)} differ from the checkpoint's; the optimizer "
                          "and schedule continue with the checkpoint's settings (only max_iters may change)")
    else:  # a fresh run (also with resume=True and no checkpoint yet): nothing to say
        seed_everything(cfg.seed + info.rank)
    sampler = getattr(train_loader, "sampler", None)
    if hasattr(sampler, "set_start"): sampler.set_start(start * per_rank_batch)
    elif start: warnings.warn("train_loader's sampler cannot skip ahead: the resumed data order is not exact")

    writer = None
    if info.is_main:
        out_dir.mkdir(parents=True, exist_ok=True)
        save_config(cfg, out_dir / "config.yaml")
        if start: _truncate_metrics(metrics_path, start)
        else: metrics_path.unlink(missing_ok=True)
        try:
            from torch.utils.tensorboard import SummaryWriter
            writer = SummaryWriter(str(out_dir / "tb"))
        except ImportError: pass
    if info.world_size > 1:
        model = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None,
                                        find_unused_parameters=find_unused_parameters)
    model.train()
    log_file = open(metrics_path, "a") if info.is_main else None
    bar = tqdm(total=sol.max_iters, initial=start, disable=not (progress and info.is_main), dynamic_ncols=True)
    sums, n_sum, t_period, record, eval_record = {}, 0, time.perf_counter(), None, None
    batches = iter(train_loader)

    for it in range(start, sol.max_iters):
        images, targets = to_device(next(batches), device)
        with torch.autocast(device.type, dtype=amp_dtype, enabled=use_amp):
            losses = model(images, targets)
        loss = total_loss(losses)
        _check_finite_loss(loss, losses, it + 1, last, info)
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        stats = {"loss": loss.detach().float(), **{k: v.detach().float() for k, v in losses.items() if k.startswith("loss_")}}
        scaler.unscale_(optimizer)
        grad_norm = nn.utils.clip_grad_norm_(model.parameters(), sol.clip_grad_norm if sol.clip_grad_norm > 0 else math.inf)
        if sol.clip_grad_norm > 0: stats["grad_norm"] = grad_norm
        if not scaler.is_enabled() and not bool(torch.isfinite(grad_norm)):   # fp16's scaler skips such steps itself
            raise FloatingPointError(f"iteration {it + 1}: the gradient norm is {float(grad_norm)} (finite loss "
                                     f"{float(loss.detach()):.4g}); no optimizer step taken, {_last_note(last)}")
        lr = optimizer.param_groups[0]["lr"]
        scaler.step(optimizer); scaler.update(); scheduler.step()
        for k, v in stats.items(): sums[k] = sums[k] + v if k in sums else v
        n_sum += 1
        bar.update(1)
        done = it + 1

        if done % cfg.log_period == 0 or done == sol.max_iters:
            keys = sorted(sums)
            vec = torch.stack([sums[k] for k in keys]) / n_sum
            if info.world_size > 1: dist.all_reduce(vec); vec /= info.world_size
            vals = vec.tolist()
            record = {"iter": done, "lr": lr, **dict(zip(keys, vals)),
                      "time": (time.perf_counter() - t_period) / n_sum}
            if not math.isfinite(record["loss"]):
                raise FloatingPointError(f"loss is {record['loss']} around iteration {done}")
            if log_file: _write_line(log_file, record)
            if writer:
                for k, v in record.items():
                    if k != "iter": writer.add_scalar(k, v, done)
            bar.set_postfix(loss=f"{record['loss']:.4g}", lr=f"{lr:.3g}")
            sums, n_sum, t_period = {}, 0, time.perf_counter()

        if (cfg.checkpoint_period and done % cfg.checkpoint_period == 0) or done == sol.max_iters:
            rng_states = _gather_rng_states(info)
            if info.is_main:
                atomic_save({"model": unwrap(model).state_dict(), "optimizer": optimizer.state_dict(),
                             "scheduler": scheduler.state_dict(), "scaler": scaler.state_dict(),
                             "iteration": done, "rng": rng_states,
                             "data": {"samples_per_rank": done * per_rank_batch, "per_rank_batch": per_rank_batch,
                                      "world_size": info.world_size, "seed": cfg.seed},
                             "config": config_to_dict(cfg)}, last)
        # evaluate after saving: the weights are on disk before a long evaluation (which another process may
        # want to read, and a kill must not lose); the evaluation restores the RNG state it used
        if evaluate_fn is not None and ((cfg.eval_period and done % cfg.eval_period == 0) or done == sol.max_iters):
            if info.is_main:
                result = _evaluate(model, evaluate_fn)
                eval_record = {"iter": done, "eval": result}
                _write_line(log_file, eval_record)
                if writer:
                    for k, v in result.items():
                        if isinstance(v, (int, float)): writer.add_scalar(f"eval/{k}", v, done)
            if info.world_size > 1: dist.barrier()

    bar.close()
    if start >= sol.max_iters and evaluate_fn is not None and info.is_main:
        # resumed a finished run: nothing to train, but a caller still gets the final evaluation it asked for
        # (without it an interrupted experiment that is re-run reports no numbers for the runs it had finished)
        eval_record = {"iter": start, "eval": _evaluate(model, evaluate_fn)}
        logged = [json.loads(l) for l in metrics_path.read_text().splitlines() if l.strip()] if metrics_path.exists() else []
        if not any(r.get("iter") == start and "eval" in r for r in logged):  # killed during its final evaluation
            _write_line(log_file, eval_record)
    if log_file: log_file.close()
    if writer: writer.close()
    return {"iteration": max(start, sol.max_iters), "checkpoint": str(last), "metrics": record, "eval": eval_record}


# %% [markdown]
# ## Wiring it to a real model
#
# What `segbook train` does, in order (the CLI maps `model_type` to a model class with an explicit
# `if/elif`). Seed before building the model so the initial weights are the same on every rank; build
# the training transforms *without* their own `generator` so their draws come from the torch RNG that
# `SeededSamples` seeds per sample — that is what makes augmentations survive a restart.
#
# ```python
# cfg = load_config(args.config, args.overrides)
# init_distributed()                      # no-op without torchrun
# seed_everything(cfg.seed)
# model = ISTR(ISTRConfig(**cfg.model))   # if cfg.model_type == "istr": ... elif ...
# tf = build_transforms(True, cfg.data.min_size, cfg.data.max_size, cfg.data.max_size_cap, cfg.data.flip)
# ds = CocoInstances(cfg.data.root, cfg.data.train_split, transforms=tf)
# loader = build_train_loader(ds, cfg.data.batch_size, cfg.seed, collate, cfg.data.num_workers)
# train(model, loader, cfg, out_dir, evaluate_fn=my_eval, resume=args.resume)
# ```
#
# Launched as `torchrun --nproc_per_node 4 -m segbook.cli train ...` it runs 4 processes of
# `batch_size / 4` images each.

# %% [markdown]
# ## Example: the toy detector learns, and a stopped run resumes exactly
#
# 60 iterations at batch 8 on CPU. Then the same run stopped at iteration 30 (a run with
# `max_iters=30`), and a *fresh* model, optimizer and loader resuming from its `last.pt` to 60: the
# weights match the uninterrupted run bit for bit, and so do the metrics except timings. (The tests
# also `SIGKILL` a real training process and resume it, with loader workers, and check 2 gloo
# processes under torchrun against one.)

# %%
import tempfile
from segbook.config import DataConfig

def toy_run(out, max_iters, resume=False, evaluate_fn=None):
    seed_everything(0)
    model = ToyDetector()
    cfg = TrainConfig(seed=0, device="cpu", log_period=10, checkpoint_period=30, eval_period=30,
                      data=DataConfig(batch_size=8, num_workers=0),
                      solver=SolverConfig(lr=1e-3, warmup_iters=10, steps=[45], max_iters=max_iters))
    loader = build_train_loader(ToySquares(64), cfg.data.batch_size, cfg.seed, toy_collate, cfg.data.num_workers)
    train(model, loader, cfg, out, evaluate_fn=evaluate_fn, resume=resume, progress=False)
    return model

val = ToySquares(32, seed=1)
def toy_eval(model):
    images, targets = toy_collate([val[i] for i in range(len(val))])
    preds = model(images)
    acc = float(np.mean([p["labels"].item() == t["labels"].item() for p, t in zip(preds, targets)]))
    return {"accuracy": acc}

tmp = Path(tempfile.mkdtemp())
t0 = time.perf_counter()
full = toy_run(tmp / "full", 60, evaluate_fn=toy_eval)
toy_run(tmp / "stopped", 30, evaluate_fn=toy_eval)
resumed = toy_run(tmp / "stopped", 60, resume=True, evaluate_fn=toy_eval)
print(f"3 toy runs: {time.perf_counter() - t0:.1f}s")
read = lambda p: [json.loads(l) for l in (p / "metrics.jsonl").read_text().splitlines()]
logs = read(tmp / "full")
[(r["iter"], round(r["loss"], 3)) for r in logs if "loss" in r], [r for r in logs if "eval" in r]

# %%
assert all(torch.equal(a, b) for a, b in zip(full.state_dict().values(), resumed.state_dict().values()))
strip = lambda rs: [{k: v for k, v in r.items() if k != "time"} for r in rs]
assert strip(read(tmp / "full")) == strip(read(tmp / "stopped"))
losses = [r["loss"] for r in logs if "loss" in r]
assert losses[-1] < 0.6 * losses[0], losses  # it learns: both terms fall
train_logs = [r for r in logs if "loss" in r]
assert all(train_logs[-1][k] < 0.7 * train_logs[0][k] for k in ("loss_box", "loss_cls")), train_logs
ck = load_checkpoint(tmp / "full" / "last.pt")
assert ck["iteration"] == 60 and ck["data"]["samples_per_rank"] == 480 and len(ck["rng"]) == 1
assert not any(p.name.startswith(".") for p in (tmp / "full").iterdir())  # no temp files left behind
import contextlib, io
with warnings.catch_warnings(record=True) as caught, contextlib.redirect_stdout(io.StringIO()) as said:
    warnings.simplefilter("always"); toy_run(tmp / "fresh", 2, resume=True)  # resume=True, nothing to resume
assert not caught and "resume" not in said.getvalue(), (caught, said.getvalue())  # a fresh run starts quietly
with contextlib.redirect_stdout(io.StringIO()) as said: toy_run(tmp / "fresh", 4, resume=True)
assert f"[resume] {tmp / 'fresh' / 'last.pt'}: iteration 2 of 4" in said.getvalue(), said.getvalue()

# %%
fig, ax = plt.subplots(figsize=(4.5, 2.4))
for key in ("loss_box", "loss_cls"):
    ax.plot([r["iter"] for r in logs if key in r], [r[key] for r in logs if key in r], marker="o", label=key)
ax.set_xlabel("iteration"); ax.set_ylabel("mean over 10 iterations"); ax.legend(); ax.set_title("toy detector, CPU")
save_figure(fig, "engine_toy_losses.png"); plt.close(fig)
