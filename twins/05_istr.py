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
# # ISTR: the model
#
# > ISTR §3.3 and Alg. 1: a ResNet-FPN, k learnable query boxes, N stages of self-attention → dynamic attention → heads, each stage refining the boxes of the one before; inference keeps the top 100 (query, class) pairs with no NMS.

# %%
#| default_exp istr

# %% [markdown]
# This chapter wires the pieces into the network of the paper's Fig. 2:
#
# 1. a torchvision **ResNet-FPN** gives P2–P5;
# 2. **k query boxes** start as the whole image (Alg. 1, line 2) and **k proposal features** start as
#    pooled image features plus learned position embeddings ($\mathbf{P}+\mathbf{E}$, §3.3);
# 3. each of **N stages** pools a 7×7 RoI feature under every query box, runs query self-attention
#    (Eq. 10) and dynamic attention (Eq. 11) from `segbook.attention`, an FFN and three towers, and
#    predicts class logits, box deltas and a mask embedding;
# 4. the predicted boxes become the next stage's query boxes (Alg. 1, line 9), **detached**;
# 5. at inference, `postprocess` decodes the final stage's embeddings with the fixed mask decoder and
#    pastes them into the image.
#
# Where the paper and the official code (`ISTR@967c901`) disagree, the config has a switch and the
# default is named in the prose. Every forward is batched over images and queries: no `.item()`, no
# `nonzero`, no loop over instances (the speed target is to beat torchvision's Mask R-CNN).

# %%
#| export
import copy
import hashlib
import itertools
import math
from collections import OrderedDict
from dataclasses import dataclass, field, fields, asdict
from pathlib import Path

import torch
import torch.nn.functional as F
import torchvision
from torch import nn
from torchvision.models.detection.backbone_utils import BackboneWithFPN
from torchvision.ops import roi_align, box_convert
from torchvision.ops.misc import FrozenBatchNorm2d

from segbook.attention import QuerySelfAttention, DynamicConv, RoIMultiheadAttention
from segbook.config import NONNEG, POSITIVE, PROB, check_ranges, typed_fields


# %% [markdown]
# ## Configuration
#
# One dataclass, one field per knob; the YAML files in `configs/istr_*.yaml` carry the same keys
# under `model:`. The ablation switches of Table 1 are fields:
#
# | field | values | paper |
# |---|---|---|
# | `mask_head` | `'embedding'` (l-d embedding, fixed decoder) / `'raw'` (s×s logits) | Table 1a |
# | `attention` | `'dynamic'` / `'multihead'` | Table 1d |
# | `image_pool`, `pos_embed` | `'avg'`/`'max'`/`'none'`, on/off | Table 1e |
#
# Defaults are the paper's R50 model (k = 300, N = 6, d = 256, l = 60, 28×28 masks, 80 classes) with
# the code's details: 3-layer towers, ELU, box-delta weights (2, 2, 1, 1), `dw, dh` clamped at
# log(10⁵/16), frozen BN with the stem and `layer1` frozen (`FREEZE_AT=2`, i.e. `trainable_layers=3`).

# %%
#| export
@dataclass
class ISTRConfig:
    "Every setting of the ISTR model (keys of the `model:` section of `configs/istr_*.yaml`)."
    backbone:str = "resnet50" # resnet18 | resnet34 | resnet50 | resnet101 (torchvision, weights=None)
    pretrained:str|None = None # local torchvision ResNet state-dict file; None = random init (never downloads)
    frozen_bn:bool = True # FrozenBatchNorm2d in the backbone (as ISTR) instead of BatchNorm2d
    trainable_layers:int = 3 # ResNet stages that train, counted from layer4 (3 = FREEZE_AT 2; 5 = all)
    pretrained_fpn:bool = False # also load the FPN from the `pretrained` file's 'fpn.*' keys (segbook pretrain writes them)
    freeze_fpn:bool = False # keep the FPN fixed too (with trainable_layers=0: the whole backbone is frozen)
    cache_backbone_mb:float = 0.0 # > 0 with trainable_layers=0: reuse the frozen body's (and frozen FPN's) outputs per image (CPU), up to this many MB
    num_classes:int = 80 # C, sigmoid (focal) class logits
    num_queries:int = 300 # k query boxes / proposal features
    num_stages:int = 6 # N recurrent refinement stages (separate weights)
    hidden:int = 256 # d, FPN and head width
    heads:int = 8 # heads of the query self-attention (Eq. 10) and of the multihead ablation
    dim_dynamic:int = 64 # d_dyn of the dynamic attention (Eq. 11)
    num_dynamic:int = 2 # generated layers of the dynamic attention
    ffn:int = 2048 # FFN hidden width
    num_cls:int = 3 # Linear-LN-ELU layers in the class tower
    num_reg:int = 3 # ... in the box tower
    num_mask:int = 3 # ... in the mask tower
    mask_head:str = "embedding" # 'embedding' (predict l-d r, decode with the fixed codec) | 'raw' (s*s logits)
    mask_dim:int = 60 # l, mask embedding dimension (for mask_head='embedding')
    codec_path:str|None = None # PCACodec file (`segbook pca-fit` / `PCACodec.save`) for mask_head='embedding'
    mask_size:int = 28 # s, side of the decoded mask
    attention:str = "dynamic" # 'dynamic' (Eq. 11) | 'multihead' (Table 1d ablation)
    image_pool:str = "avg" # image features from P2-P5: 'avg' | 'max' | 'none' (Table 1e)
    level_sum:bool = True # sum the per-level pooled features (code) instead of averaging them
    pos_embed:bool = True # add learned position embeddings E to the image features (Table 1e)
    pooler_resolution:int = 7 # t, RoIAlign output side
    sampling_ratio:int = 2 # RoIAlign samples per bin side
    box_weights:tuple = (2.0, 2.0, 1.0, 1.0) # box-delta weights (dx, dy, dw, dh)
    scale_clamp:float = math.log(1e5 / 16) # clamp on dw, dh before exp
    prior_prob:float = 0.01 # initial class probability: class bias = -log((1-p)/p)
    _ranges = dict(trainable_layers=NONNEG, cache_backbone_mb=NONNEG, num_classes=POSITIVE, num_queries=POSITIVE,
                   num_stages=POSITIVE, hidden=POSITIVE, heads=POSITIVE, dim_dynamic=POSITIVE, num_dynamic=POSITIVE,
                   ffn=POSITIVE, num_cls=NONNEG, num_reg=NONNEG, num_mask=NONNEG, mask_dim=POSITIVE, mask_size=POSITIVE,
                   pooler_resolution=POSITIVE, sampling_ratio=NONNEG, box_weights=POSITIVE, scale_clamp=POSITIVE,
                   prior_prob=PROB)

    def __post_init__(self):
        choices = dict(backbone=("resnet18", "resnet34", "resnet50", "resnet101"), mask_head=("embedding", "raw"),
                       attention=("dynamic", "multihead"), image_pool=("avg", "max", "none"))
        for k, ok in choices.items():
            if getattr(self, k) not in ok:
                raise ValueError(f"ISTRConfig.{k}={getattr(self, k)!r}: expected one of {ok}")
        if self.image_pool == "none" and not self.pos_embed:
            raise ValueError("ISTRConfig: image_pool='none' with pos_embed=False leaves the queries no initial feature")
        if self.hidden % self.heads:
            raise ValueError(f"ISTRConfig.heads={self.heads} must divide hidden={self.hidden}")
        self.box_weights = tuple(float(w) for w in self.box_weights)

    @property
    def out_mask_dim(self) -> int:
        "Width of the mask output: l for embeddings, s*s for raw masks."
        return self.mask_dim if self.mask_head == "embedding" else self.mask_size ** 2

    @classmethod
    def from_dict(cls, d:dict, # keys = field names
                  source:str="config", # named in errors (e.g. the YAML file)
                  prefix:str="model."): # the section's key path, named in range and type errors
        "Build from a dict, naming `source` and the key when a key is unknown."
        names = {f.name for f in fields(cls)}
        bad = sorted(set(d) - names)
        if bad:
            raise ValueError(f"{source}: unknown ISTR model key(s) {[prefix + k for k in bad]}; known: {sorted(names)}")
        return check_ranges(cls(**typed_fields(cls, d, source, prefix)), source, prefix)

def load_istr_config(path:str|Path, # YAML file with a `model:` section
                     overrides:list|tuple=()) -> ISTRConfig: # 'key=value' strings (values parsed as YAML)
    "Read an `ISTRConfig` from the `model:` section of a YAML file, then apply `key=value` overrides."
    import yaml
    from segbook.config import read_config_file
    path = Path(path)
    raw = read_config_file(path)  # with its `_base_` chain merged
    if not isinstance(raw, dict) or not isinstance(raw.get("model"), dict):
        raise ValueError(f"{path}: expected a mapping with a 'model:' section")
    d = dict(raw["model"])
    for o in overrides:
        if "=" not in o:
            raise ValueError(f"override {o!r}: expected key=value")
        k, v = o.split("=", 1)
        d[k.removeprefix("model.")] = yaml.safe_load(v)
    return ISTRConfig.from_dict(d, source=str(path))


# %% [markdown]
# ## Backbone: ResNet-FPN, P2–P5
#
# torchvision's `BackboneWithFPN` around a torchvision ResNet, returning the outputs of `layer1..4` as
# P2..P5 (strides 4..32). The FPN width is `hidden` (256 in the paper; smaller for CPU tests). ISTR
# builds a P6 and never uses it; torchvision's extra max-pool level (`'pool'`) is likewise ignored.
# Weights: `weights=None` always; `pretrained` names a **local** torchvision ResNet state dict (e.g.
# `resnet50-0676ba61.pth`) and a missing file or a missing key is an error naming the file.
# We build the FPN ourselves rather than call `resnet_fpn_backbone` because that fixes the width to 256.

# %%
#| export
FPN_LEVELS = ("p2", "p3", "p4", "p5")

def build_resnet_fpn(cfg:ISTRConfig) -> BackboneWithFPN: # a ResNetFPN (below)
    "torchvision ResNet (`cfg.backbone`) + FPN of width `cfg.hidden`; returns {'p2'..'p5', 'pool'}."
    norm = FrozenBatchNorm2d if cfg.frozen_bn else nn.BatchNorm2d
    body = getattr(torchvision.models, cfg.backbone)(weights=None, norm_layer=norm)
    state = None
    if cfg.pretrained:
        p = Path(cfg.pretrained)
        if not p.is_file():
            raise FileNotFoundError(f"ISTRConfig.pretrained: no file {p}")
        state = torch.load(p, map_location="cpu", weights_only=True)
        state = state.get("state_dict", state) if isinstance(state, dict) else state
        missing, unexpected = body.load_state_dict({k: v for k, v in state.items() if not k.startswith("fpn.")}, strict=False)
        missing = [k for k in missing if not k.startswith("fc.")]
        if missing:
            raise ValueError(f"{p}: not a torchvision {cfg.backbone} state dict; missing e.g. {missing[:3]}")
    elif cfg.pretrained_fpn:
        raise ValueError("ISTRConfig.pretrained_fpn=True needs a `pretrained` file")
    if not 0 <= cfg.trainable_layers <= 5:
        raise ValueError(f"ISTRConfig.trainable_layers={cfg.trainable_layers}: expected 0..5")
    train = ["layer4", "layer3", "layer2", "layer1", "conv1"][:cfg.trainable_layers] + (["bn1"] if cfg.trainable_layers == 5 else [])
    for name, prm in body.named_parameters():
        prm.requires_grad_(any(name.startswith(t) for t in train))
    if cfg.cache_backbone_mb > 0 and (cfg.trainable_layers or not cfg.frozen_bn):
        raise ValueError(f"cache_backbone_mb={cfg.cache_backbone_mb}: caching needs a frozen body "
                         f"(trainable_layers=0 and frozen BN), got trainable_layers={cfg.trainable_layers}, frozen_bn={cfg.frozen_bn}")
    c = body.inplanes // 8  # 64 for resnet18/34, 256 for resnet50/101
    net = ResNetFPN(body, {f"layer{i + 1}": lvl for i, lvl in enumerate(FPN_LEVELS)}, [c * 2 ** i for i in range(4)], cfg.hidden)
    if cfg.pretrained_fpn:
        fpn_state = {k[4:]: v for k, v in state.items() if k.startswith("fpn.")}
        if not fpn_state:
            raise ValueError(f"{cfg.pretrained}: pretrained_fpn=True but the file has no 'fpn.*' keys (a plain torchvision file)")
        try:
            net.fpn.load_state_dict(fpn_state)
        except RuntimeError as e:
            raise ValueError(f"{cfg.pretrained}: its FPN does not fit hidden={cfg.hidden}: {str(e).splitlines()[-1].strip()}") from None
    net.fpn.requires_grad_(not cfg.freeze_fpn)
    net.cache_mb = float(cfg.cache_backbone_mb)
    return net


# %% [markdown]
# ### Frozen BN folded into the convolutions, for inference
#
# A `FrozenBatchNorm2d` after a convolution is an affine map per channel, $y = a\,(W * x) + b$ with
# $a = \gamma/\sqrt{\sigma^2+\epsilon}$ and $b = \beta - \mu a$, so it folds into the convolution:
# $W' = a W$, bias $b$. `fold_frozen_bn` makes a copy of the ResNet body with every conv → frozen-BN
# pair replaced by one biased conv (the stem, every block's convs and its downsample). The model
# itself is untouched — its state dict, its training and its exact resume stay as they are.
# `build_resnet_fpn` returns a `ResNetFPN`: torchvision's `BackboneWithFPN` (same submodules, same
# state dict) whose forward, on the CPU without autograd, runs the folded copy on a channels-last
# batch, rebuilding the copy whenever a body tensor has changed. Being the backbone's own forward,
# hooks on the backbone (the Transfiner head reads the FPN levels that way) see it. The copy costs the
# body's weights once more (90 MB for ResNet-50).

# %%
#| export
def _folded_conv(conv:nn.Conv2d, bn:FrozenBatchNorm2d) -> nn.Conv2d:
    "One biased conv equal to bn(conv(x))."
    a = bn.weight * (bn.running_var + bn.eps).rsqrt()                        # [C_out]
    b = bn.bias - bn.running_mean * a
    if conv.bias is not None:
        b = b + conv.bias * a
    new = nn.Conv2d(conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding, conv.dilation,
                    conv.groups, bias=True, padding_mode=conv.padding_mode, device=conv.weight.device, dtype=conv.weight.dtype)
    new.weight.copy_(conv.weight * a[:, None, None, None])
    new.bias.copy_(b)
    return new

def fold_frozen_bn(body:nn.Module) -> nn.Module:
    "Copy of a torchvision ResNet body with every conv -> FrozenBatchNorm2d pair folded into one biased conv (no grad)."
    with torch.inference_mode(False), torch.no_grad():
        body = copy.deepcopy(body)
        for m in list(body.modules()):
            for c, b in (("conv1", "bn1"), ("conv2", "bn2"), ("conv3", "bn3")):
                conv, bn = getattr(m, c, None), getattr(m, b, None)
                if isinstance(conv, nn.Conv2d) and isinstance(bn, FrozenBatchNorm2d):
                    setattr(m, c, _folded_conv(conv, bn)); setattr(m, b, nn.Identity())
            ds = getattr(m, "downsample", None)
            if isinstance(ds, nn.Sequential) and len(ds) == 2 and isinstance(ds[0], nn.Conv2d) and isinstance(ds[1], FrozenBatchNorm2d):
                ds[0], ds[1] = _folded_conv(ds[0], ds[1]), nn.Identity()
    return body.requires_grad_(False).eval()

class FeatureCache:
    "Per-image outputs of a fixed function (a frozen ResNet body), keyed by the image's bytes; stops adding when full."
    def __init__(self, capacity_bytes:int):
        self.capacity_bytes, self.used, self.hits, self.misses, self.entries = capacity_bytes, 0, 0, 0, {}

    @staticmethod
    def key(image:torch.Tensor) -> tuple: # [3, H, W] CPU tensor
        return (tuple(image.shape), str(image.dtype), hashlib.blake2b(image.contiguous().numpy().tobytes(), digest_size=16).digest())

    def __call__(self, fn, # [B,3,H,W] -> OrderedDict of [B, C_l, H_l, W_l]
                 x:torch.Tensor) -> OrderedDict: # [B, 3, H, W]
        "`fn(x)`, computed in one batched call for the images not seen before, the others read back."
        keys = [self.key(img) for img in x]
        miss = [b for b, k in enumerate(keys) if k not in self.entries]
        self.hits += len(keys) - len(miss); self.misses += len(miss)
        fresh = {}
        if miss:
            out = fn(x[miss])
            for j, b in enumerate(miss):
                fresh[b] = {n: f[j] for n, f in out.items()}
                size = sum(t.numel() * t.element_size() for t in fresh[b].values())
                if self.used + size <= self.capacity_bytes:
                    self.entries[keys[b]] = {n: t.clone() for n, t in fresh[b].items()}; self.used += size
        rows = [fresh.get(b) or self.entries[k] for b, k in enumerate(keys)]
        return OrderedDict((n, torch.stack([r[n] for r in rows])) for n in rows[0])

class ResNetFPN(BackboneWithFPN):
    "torchvision's `BackboneWithFPN`; for CPU inference (no autograd) its ResNet body is the cached `fold_frozen_bn` copy, fed channels-last."
    def inference_body(self) -> nn.Module:
        "`fold_frozen_bn(self.body)`, cached until a body tensor changes (version, storage or device); `body` if no BN is frozen."
        body = self.body
        if not any(isinstance(m, FrozenBatchNorm2d) for m in body.modules()):
            return body
        key = tuple((t.device, t.data_ptr(), None if t.is_inference() else t._version)
                    for t in itertools.chain(body.parameters(), body.buffers()))
        cached = self.__dict__.get("_folded_body")   # not a submodule: no state dict entry, no DDP parameter
        if cached is None or cached[0] != key:
            self.__dict__["_folded_body"] = cached = (key, fold_frozen_bn(body))
        return cached[1]

    cache_mb:float = 0.0 # > 0: keep a frozen body's outputs per image (CPU), up to this many MB (`FeatureCache`)

    def body_is_frozen(self) -> bool:
        "No body parameter trains and no BatchNorm2d updates statistics: the body is a fixed function of its input."
        return (not any(p.requires_grad for p in self.body.parameters())
                and not any(isinstance(m, nn.BatchNorm2d) and m.training for m in self.body.modules()))

    def forward(self, x:torch.Tensor) -> dict: # [B, 3, H, W] -> {'p2'..'p5', 'pool'}
        if not x.is_cuda and not torch.is_grad_enabled():
            return self.fpn(self.inference_body()(x.contiguous(memory_format=torch.channels_last)))
        if self.body_is_frozen():   # a frozen body (trainable_layers=0) keeps no graph, and may reuse its outputs
            fpn_frozen = not any(p.requires_grad for p in self.fpn.parameters())
            fn = (lambda z: self.fpn(self.body(z))) if fpn_frozen else self.body
            with torch.no_grad():
                if self.cache_mb > 0 and not x.is_cuda:
                    cache = self.__dict__.get("_feature_cache")   # not a submodule: no state dict entry
                    if cache is None or cache.capacity_bytes != int(self.cache_mb * 2 ** 20):
                        self.__dict__["_feature_cache"] = cache = FeatureCache(int(self.cache_mb * 2 ** 20))
                    out = cache(fn, x)
                else:
                    out = fn(x)
            return out if fpn_frozen else self.fpn(out)
        return self.fpn(self.body(x))


# %%
torch.manual_seed(0)
_bb = build_resnet_fpn(ISTRConfig(backbone="resnet18", hidden=16)).eval()
for _m in _bb.modules():   # non-trivial frozen statistics, so that folding has something to fold
    if isinstance(_m, FrozenBatchNorm2d):
        _m.weight.uniform_(0.5, 1.5); _m.bias.normal_(); _m.running_mean.normal_(); _m.running_var.uniform_(0.5, 2)
_folded = fold_frozen_bn(_bb.body)
assert not any(isinstance(_m, FrozenBatchNorm2d) for _m in _folded.modules())
assert sum(isinstance(_m, FrozenBatchNorm2d) for _m in _bb.body.modules()) == 20   # resnet18: stem + 8 blocks x 2 + 3 downsamples
_x = torch.randn(1, 3, 64, 96)
with torch.no_grad():
    _ref, _got = _bb.body(_x), _folded(_x)
assert all(torch.allclose(_ref[k], _got[k], rtol=1e-4, atol=1e-4) for k in _ref)

# %% [markdown]
# ### A frozen body, and its outputs cached
#
# With `trainable_layers=0` and frozen BN the ResNet body is a fixed function of the image: it trains nothing
# and keeps no autograd graph (the FPN and the head still train). On a small data set seen for many epochs,
# `cache_backbone_mb > 0` also keeps each image's body outputs (C2–C5) in memory — a `FeatureCache` keyed by
# the image's bytes, so a flipped copy is its own entry and nothing about the data order needs to be known —
# and computes only the images it has not seen. The outputs are those of the same body on the same image:
# for fixed-size images (shapes) training is unchanged, only faster (`benchmarks/bench_frozen_cache.py`
# measures by how much). It is a CPU cache: on CUDA the body is recomputed. With `freeze_fpn=True` as well
# (after `pretrained_fpn=True` has loaded an FPN from the pretraining file) the whole backbone is fixed, the
# cache holds the FPN levels, and only the head trains — no gradient flows back through RoIAlign at all.
# Measured (`benchmarks/results/frozen_cache.json`, one thread, shapes batch 4, the paper's head with 6 stages and
# l = 60, four modes interleaved in one run): 0.64 s per training step fine-tuning layers 2–4 and the FPN, 0.48 s with
# the body frozen, 0.41 s with its outputs cached, 0.20 s with body and FPN frozen and cached — 3.2× faster, which is
# what lets a Table 1 row train for 3000 iterations in about ten minutes.

# %%
torch.manual_seed(0)
_frozen = ISTRConfig(backbone="resnet18", hidden=16, trainable_layers=0)
_plain, _cached = build_resnet_fpn(_frozen), build_resnet_fpn(ISTRConfig(**{**asdict(_frozen), "cache_backbone_mb": 64}))
_cached.load_state_dict(_plain.state_dict())
assert _plain.body_is_frozen() and not build_resnet_fpn(ISTRConfig(backbone="resnet18", hidden=16)).body_is_frozen()
_x = torch.randn(3, 3, 64, 64)
for _batch in (_x[:2], _x[1:], _x):                 # images 1 and 2 come back in new batches
    _a, _b = _plain(_batch), _cached(_batch)
    assert all(torch.allclose(_a[k], _b[k], atol=1e-5) for k in _a)
_cache = _cached.__dict__["_feature_cache"]
assert (_cache.misses, _cache.hits) == (3, 4), (_cache.misses, _cache.hits)
_b["p2"].sum().backward()                         # the FPN trains, the body does not
assert _cached.fpn.inner_blocks[0][0].weight.grad is not None and all(p.grad is None for p in _cached.body.parameters())
try:
    build_resnet_fpn(ISTRConfig(backbone="resnet18", hidden=16, cache_backbone_mb=64)); raise AssertionError
except ValueError as e: assert "frozen body" in str(e)


# %% [markdown]
# ## Query boxes: the whole image (Alg. 1, line 2)
#
# The $k$ boxes are an `nn.Embedding(k, 4)` in normalised $(c_x, c_y, w, h)$, initialised to
# $(0.5, 0.5, 1, 1)$ and scaled by each image's **unpadded** size, so every query starts on the whole
# image. They receive gradient only through stage 1's box prediction (later stages get detached boxes).

# %%
#| export
def query_boxes_for_images(boxes_cxcywh:torch.Tensor, # [k, 4] normalised (cx, cy, w, h)
                           image_sizes:torch.Tensor) -> torch.Tensor: # [B, 2] (h, w) of the unpadded images
    "Scale normalised query boxes to each image: [k,4] x [B,2] -> [B,k,4] xyxy pixels."
    wh = image_sizes.flip(-1).to(boxes_cxcywh.dtype)                   # [B, 2] (w, h)
    xyxy = box_convert(boxes_cxcywh, "cxcywh", "xyxy")                  # [k, 4]
    return xyxy[None] * wh.repeat(1, 2)[:, None]                        # [B, k, 4]


# %% [markdown]
# ## Image features and position embeddings (§3.3, Table 1e)
#
# The paper: "image features $\mathbf{P}$ are first extracted by averaging and summing the features from
# P2 to P5". The code takes the **spatial mean of each level and sums the four** (no division by 4;
# padded pixels included); `level_sum=False` divides by the number of levels instead. Table 1e's
# ablations: `'max'` pooling, or `'none'` (position embeddings alone). The result, repeated to $k$
# queries and added to $\mathbf{E}$, is the initial proposal feature.

# %%
#| export
def pool_image_features(levels:list, # [B, d, H_l, W_l] per FPN level
                        mode:str="avg", # 'avg' | 'max' | 'none'
                        level_sum:bool=True) -> torch.Tensor: # sum over levels (code) or average
    "Global image feature per image, [B,d]: spatial avg/max pool of each level, summed (or averaged) over levels."
    if mode == "none":
        return levels[0].new_zeros(levels[0].shape[:2])
    pooled = torch.stack([f.mean((2, 3)) if mode == "avg" else f.amax((2, 3)) for f in levels])  # [L, B, d]
    return pooled.sum(0) if level_sum else pooled.mean(0)


# %% [markdown]
# ## RoIAlign with FPN level assignment
#
# Each box is pooled from the level $\lfloor 4 + \log_2(\sqrt{wh}/224)\rfloor$ clamped to P2–P5 (the FPN
# paper's rule, detectron2's default), with `ROIAlignV2` semantics: `aligned=True`, 7×7, sampling ratio 2.
# torchvision has `MultiScaleRoIAlign`, but it uses `aligned=False` and groups boxes per level with
# `torch.where(...)[0]` plus an `.item()` while setting up scales — host syncs we avoid. Instead we
# run `torchvision.ops.roi_align` for **every** box on **every** level and keep each box's own level with
# a `torch.where`. That is 4× the RoIAlign work, which is small next to the heads (k·B boxes × 49
# bins) and keeps the forward free of syncs and data-dependent shapes — on a GPU. On the CPU there is no
# device to wait for, and the 4× work is not small (RoIAlign's backward was the largest single cost of a
# training step in a profile of the shapes config), so there each level pools only its own boxes.

# %%
#| export
def fpn_level_of_boxes(boxes:torch.Tensor, # [..., 4] xyxy pixels
                       min_level:int=2, max_level:int=5,
                       canonical_size:float=224.0, canonical_level:int=4) -> torch.Tensor:
    "FPN level of each box, [...] int64 in [min_level, max_level]."
    wh = (boxes[..., 2:] - boxes[..., :2]).clamp(min=0)
    size = (wh[..., 0] * wh[..., 1]).sqrt()
    lvl = torch.floor(canonical_level + torch.log2(size / canonical_size + 1e-8))
    return lvl.clamp(min_level, max_level).long()

def multilevel_roi_align(levels:list, # P2..P5, [B, d, H_l, W_l] with strides 4, 8, 16, 32
                         boxes:torch.Tensor, # [B, Q, 4] xyxy pixels
                         output_size:int=7, sampling_ratio:int=2) -> torch.Tensor:
    "RoI features [B*Q, d, t, t], each box pooled (aligned=True) from its own FPN level."
    B, Q = boxes.shape[:2]
    batch_idx = torch.arange(B, device=boxes.device, dtype=boxes.dtype).repeat_interleave(Q)[:, None]
    rois = torch.cat([batch_idx, boxes.reshape(B * Q, 4)], 1)           # [B*Q, 5]
    lvl = fpn_level_of_boxes(rois[:, 1:]) - 2                           # [B*Q] in 0..3
    if not rois.is_cuda:  # on the CPU a host sync is free: pool each box at its own level only (4x less work)
        out = levels[0].new_zeros(B * Q, levels[0].shape[1], output_size, output_size)
        for i, f in enumerate(levels):
            idx = (lvl == i).nonzero().squeeze(1)
            if len(idx):
                out = out.index_copy(0, idx, roi_align(f, rois[idx].to(f.dtype), output_size, spatial_scale=1.0 / 2 ** (i + 2),
                                                       sampling_ratio=sampling_ratio, aligned=True))
        return out
    out = None
    for i, f in enumerate(levels):
        pooled = roi_align(f, rois.to(f.dtype), output_size, spatial_scale=1.0 / 2 ** (i + 2),
                           sampling_ratio=sampling_ratio, aligned=True)
        out = pooled if out is None else torch.where((lvl == i)[:, None, None, None], pooled, out)
    return out


# %% [markdown]
# ## Box update: deltas on the query box
#
# The box head predicts "the residual values of normalised centre coordinates, height, and width"
# (§3.3): the R-CNN parameterisation, for a box with centre (x, y) and size (w, h),
#
# $$\hat x = x + w\,\frac{\Delta x}{2},\quad \hat y = y + h\,\frac{\Delta y}{2},\quad
# \hat w = w\,e^{\Delta w},\quad \hat h = h\,e^{\Delta h},$$
#
# where the 2s are the code's weights (2, 2, 1, 1) and Δw, Δh are clamped at log(10⁵/16) (`scale_clamp`). torchvision has the same decoder in
# `BoxCoder.decode_single`, but in a private module (`models.detection._utils`) and it builds two scalar
# tensors on the device per call (a host-to-device copy per stage); the five lines below are sync-free,
# and a test pins them to the formula and to torchvision's result.

# %%
#| export
def apply_box_deltas(deltas:torch.Tensor, # [N, 4] (dx, dy, dw, dh) as predicted
                     boxes:torch.Tensor, # [N, 4] xyxy reference (query) boxes
                     weights:tuple=(2.0, 2.0, 1.0, 1.0), # divide the deltas by these
                     scale_clamp:float=math.log(1e5 / 16)) -> torch.Tensor: # max dw, dh
    "Refined boxes [N,4] xyxy from deltas relative to `boxes`."
    wh = boxes[:, 2:] - boxes[:, :2]                                    # [N, 2]
    ctr = boxes[:, :2] + 0.5 * wh
    d = torch.stack([deltas[:, i] / w for i, w in enumerate(weights)], 1)  # Python-float weights: no copy
    new_ctr = ctr + d[:, :2] * wh
    new_wh = torch.exp(d[:, 2:].clamp(max=scale_clamp)) * wh
    return torch.cat([new_ctr - 0.5 * new_wh, new_ctr + 0.5 * new_wh], 1)


# %% [markdown]
# ## One stage (Fig. 2, bottom)
#
# Self-attention (Eq. 10) → residual, LN → dynamic attention with the RoI features (Eq. 11) →
# residual, LN → FFN (ELU; the code hard-codes ELU although its config says ReLU) → residual, LN →
# three towers of 3 × [Linear(no bias), LN, ELU] → class logits, box deltas, mask output.
# Queries and RoIs are processed as one batch of `B·Q` rows.

# %%
#| export
def _tower(d:int, n:int) -> nn.Sequential:
    "n x [Linear(d, d, bias=False), LayerNorm, ELU]."
    return nn.Sequential(*[m for _ in range(n) for m in (nn.Linear(d, d, bias=False), nn.LayerNorm(d), nn.ELU())])

class ISTRStage(nn.Module):
    "One refinement stage: attention, FFN, towers, and the class / box / mask predictions."
    def __init__(self, cfg:ISTRConfig):
        super().__init__()
        d, t2 = cfg.hidden, cfg.pooler_resolution ** 2
        self.cfg = cfg
        self.self_attn, self.norm1 = QuerySelfAttention(d, cfg.heads), nn.LayerNorm(d)
        self.roi_attn = (DynamicConv(d, cfg.dim_dynamic, cfg.num_dynamic, t2) if cfg.attention == "dynamic"
                         else RoIMultiheadAttention(d, cfg.heads, t2))
        self.norm2 = nn.LayerNorm(d)
        self.ffn = nn.Sequential(nn.Linear(d, cfg.ffn), nn.ELU(), nn.Linear(cfg.ffn, d))
        self.norm3 = nn.LayerNorm(d)
        self.cls_tower, self.reg_tower, self.mask_tower = _tower(d, cfg.num_cls), _tower(d, cfg.num_reg), _tower(d, cfg.num_mask)
        self.class_logits = nn.Linear(d, cfg.num_classes)
        self.box_deltas = nn.Linear(d, 4)
        self.mask_out = nn.Linear(d, cfg.out_mask_dim)

    def forward(self, features:torch.Tensor, # [B, Q, d] proposal features
                roi:torch.Tensor, # [B*Q, d, t, t] RoI features
                boxes:torch.Tensor): # [B, Q, 4] xyxy query boxes of this stage
        "-> (prediction dict: logits [B,Q,C], boxes [B,Q,4], mask_embed [B,Q,l] or mask_logits [B,Q,s,s]; features [B,Q,d])."
        B, Q, d = features.shape
        x = self.norm1(features + self.self_attn(features)).reshape(B * Q, d)
        x = self.norm2(x + self.roi_attn(x, roi.flatten(2).transpose(1, 2)))
        x = self.norm3(x + self.ffn(x))
        new_boxes = apply_box_deltas(self.box_deltas(self.reg_tower(x)), boxes.reshape(B * Q, 4),
                                     self.cfg.box_weights, self.cfg.scale_clamp)
        pred = dict(logits=self.class_logits(self.cls_tower(x)).view(B, Q, -1), boxes=new_boxes.view(B, Q, 4))
        m = self.mask_out(self.mask_tower(x))
        if self.cfg.mask_head == "embedding":
            pred["mask_embed"] = m.view(B, Q, -1)
        else:
            pred["mask_logits"] = m.view(B, Q, self.cfg.mask_size, self.cfg.mask_size)
        return pred, x.view(B, Q, d)


# %% [markdown]
# ## The model: N-stage recurrent refinement (Alg. 1)
#
# **Algorithm 1** (ISTR), with the function of this book that carries each line:
#
# | | training | here |
# |---|---|---|
# | 1 | learn the mask encoder g and decoder f by Eq. 2 | `segbook.embeddings.PCACodec` (chapter 02) |
# | 2 | initialise the learnable query boxes $\tilde{\mathbf{B}}^0$ | `ISTR.query_boxes` (an `nn.Embedding`), `ISTR.initial_queries` |
# | 3–4 | repeat; for stage $i = 1, \dots, N$: | `ISTR.forward` |
# | 5 | RoI features by RoIAlign with $\tilde{\mathbf{B}}^{i-1}$ | `multilevel_roi_align` |
# | 6 | predict with the ISTR encoder and heads | `ISTRStage` (Eqs. 10–11) |
# | 7 | match predictions with labels by Eq. 4 | `segbook.matching.hungarian_match` |
# | 8 | loss by Eq. 8 | `segbook.losses.SetCriterion` |
# | 9 | $\tilde{\mathbf{B}}^{i} \leftarrow$ update of $\tilde{\mathbf{B}}^{i-1}$ by the predicted boxes | `apply_box_deltas` |
#
# At inference lines 7–8 drop out and the last stage's set of predictions is the output (`postprocess`).
#
# `ISTR.forward(images, image_sizes)` returns `{'stages': [pred_1, …, pred_N]}`: every stage's
# predictions, so the losses can supervise all of them (deep supervision, each stage with its own
# matching) and Fig. 3's stage analysis can read any of them. Between stages the boxes are
# **detached** (`bboxes = pred_bboxes.detach()` in the code) while the object features are passed on
# with their gradient.
#
# The mask output depends on the Table 1a switch: `mask_embed` [B, k, l] for `mask_head='embedding'`
# (decoded by the fixed codec), `mask_logits` [B, k, s, s] for `'raw'` — the two keys `segbook.losses`
# and `segbook.matching` understand.
#
# **Training interface.** As torchvision's detectors (and as `segbook.engine.train` calls every model):
# `model(images, targets)` with the list of target dicts returns the loss dict of the `criterion` the
# model was built with (`SetCriterion` of `segbook.losses`: `{'loss': total, 'loss_ce_s1': …}`); the
# image sizes are read from each target's `size`. `model(images, image_sizes)` with a [B, 2] tensor
# returns the stage predictions, in train or eval mode alike. Putting the loss inside `forward` is
# what DistributedDataParallel needs. `model.loss(outputs, targets)` is the same loss on outputs you
# already have. `build_istr(cfg)` assembles model, codec and criterion from a config.
#
# **CPU inference** (no autograd, not CUDA) runs the backbone differently, with the same numbers up
# to float rounding: the ResNet body is the `fold_frozen_bn` copy (one biased conv per conv + frozen
# BN, cached on the backbone and rebuilt when any body tensor's version or storage changed, e.g. after an
# optimiser step or `load_state_dict`), and the batch is handed over channels-last, in which oneDNN's
# convolutions and the elementwise ops between them run faster on this CPU. `benchmarks/profile_istr.py`
# measures what each buys (`benchmarks/results/istr_cpu_profile.json`). Training keeps the plain
# NCHW path, and on CUDA the layout and the backbone are left as they are.
#
# **Init** (code): Xavier-uniform for every stage weight with more than one dimension; the class bias
# set to $-\log((1-\pi)/\pi)$ with $\pi = 0.01$ so the focal loss starts calm. The code selects "any
# parameter whose last dimension equals num_classes"; we set the class-logit bias by name, which is the
# same tensor without the risk of catching another one of equal width.

# %%
#| export
class ISTR(nn.Module):
    "ISTR: ResNet-FPN, k query boxes and features, N refinement stages; returns every stage's predictions."
    def __init__(self, cfg:ISTRConfig, # the model settings
                 criterion:nn.Module|None=None, # set loss: criterion(stages, targets) -> dict of loss_*
                 codec:nn.Module|None=None): # fixed mask decoder for mask_head='embedding' (kept with the model)
        super().__init__()
        self.cfg = cfg
        self.__dict__["criterion"] = criterion  # not a submodule: checkpoints hold the model only
        self.codec = codec.requires_grad_(False) if codec is not None else None
        self.backbone = build_resnet_fpn(cfg)
        self.query_boxes = nn.Embedding(cfg.num_queries, 4)
        self.pos_embed = nn.Embedding(cfg.num_queries, cfg.hidden) if cfg.pos_embed else None
        self.stages = nn.ModuleList(ISTRStage(cfg) for _ in range(cfg.num_stages))
        self.reset_parameters()

    def reset_parameters(self):
        "Whole-image query boxes; Xavier stage weights; class bias from the prior."
        nn.init.constant_(self.query_boxes.weight[:, :2], 0.5)
        nn.init.constant_(self.query_boxes.weight[:, 2:], 1.0)
        bias = -math.log((1 - self.cfg.prior_prob) / self.cfg.prior_prob)
        for stage in self.stages:
            for p in stage.parameters():
                if p.dim() > 1: nn.init.xavier_uniform_(p)
            nn.init.constant_(stage.class_logits.bias, bias)

    def inference_body(self) -> nn.Module:
        "The ResNet body CPU inference runs (`ResNetFPN.inference_body`: frozen BN folded, cached)."
        return self.backbone.inference_body()

    def initial_queries(self, levels:list, # P2..P5 features
                        image_sizes:torch.Tensor): # [B, 2] (h, w)
        "Query boxes [B,k,4] (whole image) and proposal features P + E [B,k,d]."
        B, k = image_sizes.shape[0], self.cfg.num_queries
        boxes = query_boxes_for_images(self.query_boxes.weight, image_sizes)
        feats = pool_image_features(levels, self.cfg.image_pool, self.cfg.level_sum)[:, None].expand(B, k, -1)
        if self.pos_embed is not None:
            feats = feats + self.pos_embed.weight[None]
        return boxes, feats

    def forward(self, images:torch.Tensor, # [B, 3, H, W] normalised, zero-padded batch
                sizes_or_targets): # [B, 2] (h, w) unpadded sizes -> predictions; list of target dicts -> losses
        "{'stages': [dict(logits [B,k,C], boxes [B,k,4] xyxy, mask_embed [B,k,l] | mask_logits [B,k,s,s])]}, or the loss dict."
        targets = sizes_or_targets if isinstance(sizes_or_targets, (list, tuple)) else None
        image_sizes = (torch.stack([torch.as_tensor(t["size"]) for t in targets]) if targets is not None
                       else sizes_or_targets).to(images.device)
        feats = self.backbone(images)   # ResNetFPN: on CPU without autograd, folded BN and channels-last
        levels = [feats[n] for n in FPN_LEVELS]
        boxes, x = self.initial_queries(levels, image_sizes)
        stages = []
        for stage in self.stages:
            roi = multilevel_roi_align(levels, boxes.detach(), self.cfg.pooler_resolution, self.cfg.sampling_ratio)
            pred, x = stage(x, roi, boxes)
            stages.append(pred)
            boxes = pred["boxes"].detach()
        out = {"stages": stages}
        return self.loss(out, targets) if targets is not None else out

    def loss(self, outputs:dict, # what forward returned
             targets:list): # one dict per image (segbook.data.collate convention)
        "Set loss over all stages via the criterion given at construction."
        if self.criterion is None:
            raise RuntimeError("ISTR.loss: the model was built without a criterion (ISTR(cfg, criterion=...))")
        return self.criterion(outputs["stages"], targets)

    @torch.no_grad()
    def predict(self, images:torch.Tensor, # [B, 3, H, W]
                image_sizes:torch.Tensor, # [B, 2] (h, w) the network saw
                orig_sizes:torch.Tensor|None=None, # [B, 2] (H0, W0) to paste into; default image_sizes
                topk:int=100, # detections per image
                stage:int=-1, # which stage's predictions (Fig. 3); default the last
                paste:bool=True): # False: box-local mask crops (see `postprocess`)
        "Torchvision-style detections of one stage (see `postprocess`)."
        out = self(images, image_sizes)["stages"][stage]
        return postprocess(out, image_sizes, image_sizes if orig_sizes is None else orig_sizes, self.codec, topk, paste)


# %% [markdown]
# ## Building a model from a config
#
# `build_istr` is what the CLI and the experiment notebooks call: the model, its fixed codec (loaded
# from `codec_path` for embeddings; none for raw masks) and the `SetCriterion` of `segbook.losses`,
# whose GT crops use the same mask size. A codec whose size or dimension disagrees with the config is
# an error naming the file.

# %%
#| export
def build_istr(cfg:ISTRConfig|dict, # model settings (a dict = the YAML `model:` section)
               codec:nn.Module|None=None, # mask codec; default: load cfg.codec_path
               matching=None, # segbook.matching.MatchingConfig; default: paper weights, mask_size = cfg.mask_size
               loss=None) -> ISTR: # segbook.losses.SetLossConfig; default: paper weights
    "ISTR with its codec and set criterion, ready for `model(images, targets)`."
    from segbook.losses import SetCriterion
    from segbook.matching import MatchingConfig
    cfg = ISTRConfig.from_dict(cfg) if isinstance(cfg, dict) else cfg
    if cfg.mask_head == "embedding" and codec is None:
        if not cfg.codec_path:
            raise ValueError("ISTRConfig.codec_path: mask_head='embedding' needs a PCA codec file (segbook pca-fit)")
        from segbook.embeddings import PCACodec
        codec = PCACodec.load(cfg.codec_path)
    if codec is not None and cfg.mask_head == "embedding":
        dim, size = getattr(codec, "dim", cfg.mask_dim), getattr(codec, "size", cfg.mask_size)
        if (dim, size) != (cfg.mask_dim, cfg.mask_size):
            raise ValueError(f"{cfg.codec_path or 'codec'}: codec is l={dim}, s={size} but ISTRConfig has "
                             f"mask_dim={cfg.mask_dim}, mask_size={cfg.mask_size}")
    codec = codec if cfg.mask_head == "embedding" else None
    matching = matching or MatchingConfig(mask_size=cfg.mask_size)
    return ISTR(cfg, SetCriterion(matching, loss, codec), codec)


# %% [markdown]
# ## Inference: top-100 (query, class) pairs, no NMS, masks pasted in one pass
#
# As in the code (`inseg.py:inference`): sigmoid scores over all $k\times C$ (query, class) pairs of
# the final stage, the **top 100 over the flattened pairs** (one query may appear with two labels),
# no NMS and no threshold. The kept embeddings go through the fixed decoder to $s\times s$
# probabilities (raw `mask_logits` through a sigmoid), and every mask is **pasted into its box at the
# original image size**: each output pixel centre $(x+\frac12, y+\frac12)$ is mapped to the box's
# normalised coordinates and the mask is sampled there bilinearly, with zeros outside it — what
# `F.grid_sample(mask, grid, align_corners=False, padding_mode='zeros')` computes, and the same
# resize-into-box as detectron2's `paste_masks_in_image`.
#
# We do not call `grid_sample`, though: its grid for N masks is an [N, H, W, 2] tensor (210 MB for
# 100 masks at 512²) and it interpolates every pixel of every canvas, and pasting was 10–15 % of an
# ISTR-R50 call on the CPU. Because the box maps $x$ and $y$ independently, bilinear sampling is
# separable: with $u_y$ the mask row that output row $y$ lands on, the weight of mask row $j$ is the
# tent $\max(0, 1-|u_y - j|)$ (zero for rows outside the mask: the zero padding), so
# $\text{pasted} = R_y\, M\, R_x^{\top}$ with $R_y$ [H, s] and $R_x$ [W, s] — two batched matrix
# products, no grid, no loop over masks, no host sync, the same numbers as `grid_sample` up to float
# rounding (tested to 1e-6 in `tests/test_istr.py`). The boxes are rescaled from the network's input
# size to the original size and clipped; masks are returned as probabilities (evaluation binarises
# at 0.5). Unlike detectron2 we keep empty boxes rather than filter them (a data-dependent shape,
# i.e. a host sync); their masks are all zero.

# %%
#| export
def paste_weights(lo:torch.Tensor, # [N] box start (x0 or y0) in output pixels
                  hi:torch.Tensor, # [N] box end (x1 or y1)
                  n_out:int, # output pixels along this axis (W or H)
                  s:int) -> torch.Tensor: # mask texels along this axis
    "1-D bilinear weights [N, n_out, s] of `grid_sample(align_corners=False, padding_mode='zeros')` into a box."
    c = torch.arange(n_out, device=lo.device, dtype=lo.dtype) + 0.5                  # pixel centres
    g = (c[None] - lo[:, None]) / (hi - lo).clamp(min=1e-6)[:, None] * 2 - 1          # [N, n_out] in [-1, 1] inside the box
    u = ((g + 1) * s - 1) / 2                                                          # texel coordinate (grid_sample's unnormalise)
    return (1 - (u[..., None] - torch.arange(s, device=lo.device, dtype=lo.dtype)).abs()).clamp(min=0)

def paste_masks(masks:torch.Tensor, # [N, s_h, s_w] probabilities
                boxes:torch.Tensor, # [N, 4] xyxy in output pixels
                height:int, width:int) -> torch.Tensor: # output image size
    "Paste every mask into its box on an empty [N,1,H,W] float32 canvas (bilinear, zero outside), all at once: R_y M R_xᵀ."
    dt = torch.float64 if masks.dtype == torch.float64 else torch.float32
    with torch.autocast(masks.device.type, enabled=False):   # the weights must not be rounded to bf16/fp16
        x0, y0, x1, y1 = boxes.to(dt).unbind(-1)
        ry = paste_weights(y0, y1, height, masks.shape[-2])                          # [N, H, s_h]
        rx = paste_weights(x0, x1, width, masks.shape[-1])                           # [N, W, s_w]
        return torch.bmm(torch.bmm(ry, masks.to(dt)), rx.transpose(1, 2))[:, None]

def postprocess(stage_out:dict, # one stage: logits [B,k,C], boxes [B,k,4], mask_embed [B,k,l] or mask_logits [B,k,s,s]
                image_sizes:torch.Tensor, # [B, 2] (h, w) the network saw
                orig_sizes:torch.Tensor, # [B, 2] (H0, W0) to paste into
                codec:nn.Module|None=None, # fixed decoder, decode([N,l]) -> [N,s,s]; needed for mask_embed
                topk:int=100, # detections kept per image
                paste:bool=True, # False: box-local 'mask_crops' [N,s,s] + 'image_size' instead of full-size 'masks'
               ) -> list: # detections per image
    "Top-k (query, class) pairs per image -> list of {'boxes','labels','scores','masks' [N,1,H0,W0]} (or the crops, unpasted)."
    logits = stage_out["logits"]
    B, k, C = logits.shape
    scores, idx = torch.sigmoid(logits).flatten(1).topk(min(topk, k * C), dim=1)   # [B, K]
    K = idx.shape[1]
    query, labels = idx // C, idx % C
    boxes = torch.gather(stage_out["boxes"], 1, query[..., None].expand(-1, -1, 4))   # [B, K, 4]
    rows = (torch.arange(B, device=idx.device)[:, None] * k + query).flatten()        # [B*K]
    if "mask_embed" in stage_out:
        if codec is None:
            raise ValueError("postprocess: 'mask_embed' predictions need the codec to decode them")
        masks = codec.decode(stage_out["mask_embed"].flatten(0, 1)[rows])               # [B*K, s, s]
    else:
        masks = stage_out["mask_logits"].flatten(0, 1)[rows].sigmoid()
    masks = masks.view(B, K, *masks.shape[-2:])
    scale = (orig_sizes.to(boxes) / image_sizes.to(boxes)).flip(-1).repeat(1, 2)  # [B, 4] (sx, sy, sx, sy)
    boxes = boxes * scale[:, None]
    out = []
    for b, (H0, W0) in enumerate(orig_sizes.tolist()):  # a loop over images (not instances): per-image sizes
        bx = torch.stack([boxes[b, :, 0].clamp(0, W0), boxes[b, :, 1].clamp(0, H0),
                          boxes[b, :, 2].clamp(0, W0), boxes[b, :, 3].clamp(0, H0)], -1)
        out.append(dict(boxes=bx, labels=labels[b], scores=scores[b], **pasted_or_crops(masks[b], bx, H0, W0, paste)))
    return out

def pasted_or_crops(masks:torch.Tensor, # [N, s, s] box-local probabilities
                    boxes:torch.Tensor, # [N, 4] xyxy in output pixels
                    height:int, width:int, # output image size
                    paste:bool=True) -> dict:
    "{'masks': [N,1,H,W]} pasted now, or {'mask_crops', 'image_size'} for a consumer that pastes a few at a time (large images)."
    if paste: return {"masks": paste_masks(masks, boxes, int(height), int(width))}
    return {"mask_crops": masks, "image_size": (int(height), int(width))}


# %% [markdown]
# ## Example: a tiny model on two images of different sizes
#
# resnet18, d = 32, k = 10 queries, 2 stages, 5 classes, raw 14×14 masks; two images (64×48 and
# 40×64, padded to one 64×64 batch). Every stage returns its own predictions; `postprocess` pastes the
# top 20 (query, class) pairs at twice the size, as if the images had been downscaled for the network.

# %%
torch.manual_seed(0)
tiny = ISTRConfig(backbone="resnet18", num_classes=5, num_queries=10, num_stages=2, hidden=32, heads=4,
                  dim_dynamic=8, ffn=64, mask_head="raw", mask_size=14)
model = ISTR(tiny).eval()
images = torch.randn(2, 3, 64, 64)
image_sizes = torch.tensor([[64, 48], [40, 64]])
with torch.no_grad():
    out = model(images, image_sizes)
dets = postprocess(out["stages"][-1], image_sizes, torch.tensor([[128, 96], [80, 128]]), topk=20)
print([{k: tuple(v.shape) for k, v in s.items()} for s in out["stages"]])
print([{k: tuple(v.shape) for k, v in d.items()} for d in dets])

# %% [markdown]
# ## Tests
#
# Shapes of every stage and of `postprocess` for two image sizes; the query boxes start on the whole
# unpadded image; the class bias starts at the prior; `apply_box_deltas` matches the R-CNN formula
# written out; level assignment follows the FPN rule; a batched paste matches a known rectangle; no
# gradient reaches stage 1 through stage 2's boxes; all Table 1 switches build and train one step.

# %%
assert len(out["stages"]) == 2
for s in out["stages"]:
    assert s["logits"].shape == (2, 10, 5) and s["boxes"].shape == (2, 10, 4) and s["mask_logits"].shape == (2, 10, 14, 14)
for d_, (H0, W0) in zip(dets, [(128, 96), (80, 128)]):
    assert d_["boxes"].shape == (20, 4) and d_["masks"].shape == (20, 1, H0, W0) and d_["labels"].dtype == torch.int64
    assert (d_["scores"][:-1] >= d_["scores"][1:]).all() and (d_["boxes"][:, 2] <= W0).all()
# whole-image query init, per image
b0, _ = model.initial_queries([torch.zeros(2, 32, 16, 16)] * 4, image_sizes)
assert torch.equal(b0[0, 0], torch.tensor([0., 0., 48., 64.])) and torch.equal(b0[1, 3], torch.tensor([0., 0., 64., 40.]))
assert torch.allclose(torch.sigmoid(model.stages[0].class_logits.bias), torch.tensor(0.01))
# box deltas = the R-CNN formula with weights (2,2,1,1)
dl, rb = torch.tensor([[0.2, -0.4, 0.1, -0.2]]), torch.tensor([[10., 20., 30., 60.]])
w, h = 20 * math.exp(0.1), 40 * math.exp(-0.2); cx, cy = 20 + 0.1 * 20, 40 - 0.2 * 40
assert torch.allclose(apply_box_deltas(dl, rb), torch.tensor([[cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2]]))
assert torch.equal(apply_box_deltas(torch.zeros(1, 4), rb), rb)
from torchvision.models.detection._utils import BoxCoder
dl8, rb8 = torch.randn(8, 4), torch.tensor([[0., 0., 50., 30.]]) + torch.rand(8, 4) * 20
assert torch.allclose(apply_box_deltas(dl8, rb8), BoxCoder((2., 2., 1., 1.), math.log(1e5 / 16)).decode_single(dl8, rb8), atol=1e-4)
# FPN rule: 224 -> P4, 112 -> P3, 448 -> P5, tiny -> P2
assert fpn_level_of_boxes(torch.tensor([[0, 0, 224, 224], [0, 0, 112, 112], [0, 0, 448, 448], [0, 0, 8, 8.]])).tolist() == [4, 3, 5, 2]
# paste: a full mask into a box fills exactly that box
pm = paste_masks(torch.ones(1, 14, 14), torch.tensor([[4., 2., 12., 10.]]), 16, 16)[0, 0]
ref = torch.zeros(16, 16); ref[2:10, 4:12] = 1
assert torch.equal(pm > 0.5, ref.bool())

# %%
# no gradient through the boxes between stages; stage 1's boxes do reach the query-box parameters
model.train(); model.zero_grad()
o = model(images, image_sizes)
o["stages"][1]["boxes"].sum().backward()
assert model.query_boxes.weight.grad is None or model.query_boxes.weight.grad.abs().sum() == 0
assert all(p.grad is None for p in model.stages[0].box_deltas.parameters())
model.zero_grad(); model(images, image_sizes)["stages"][0]["boxes"].sum().backward()
assert model.query_boxes.weight.grad.abs().sum() > 0

# %%
# every Table 1 switch (1a mask head, 1d attention, 1e pooling / position embeddings) builds and trains a step
for sw in [dict(mask_head="embedding", mask_dim=12), dict(attention="multihead"), dict(image_pool="max"),
           dict(image_pool="none"), dict(pos_embed=False), dict(level_sum=False)]:
    m = ISTR(ISTRConfig(**{**asdict(tiny), **sw}))
    o = m(images, image_sizes)
    mask_key = "mask_embed" if sw.get("mask_head") == "embedding" else "mask_logits"
    sum(s["logits"].sum() + s["boxes"].sum() * 1e-3 + s[mask_key].square().sum() for s in o["stages"]).backward()
    assert o["stages"][-1][mask_key].shape[2:] == ((12,) if mask_key == "mask_embed" else (14, 14)), sw
    assert m.stages[0].roi_attn.__class__.__name__ == ("RoIMultiheadAttention" if sw.get("attention") else "DynamicConv")
    assert all(p.grad is not None for p in m.stages[1].parameters()), sw
for bad in [dict(attention="linear"), dict(image_pool="none", pos_embed=False), dict(backbone="vgg")]:
    try: ISTRConfig(**bad); raise AssertionError(bad)
    except ValueError: pass

# %% [markdown]
# The training interface: `build_istr` adds `SetCriterion` (here with raw masks, so no codec file is
# needed), and `model(images, targets)` returns its loss dict: a total `loss` and every term of every
# stage (`loss_ce_s1` … `loss_dice_s2`).

# %%
targets = [dict(boxes=torch.tensor([[4., 6., 30., 40.]]), labels=torch.tensor([1]), size=torch.tensor([64, 48]),
                masks=torch.zeros(1, 64, 48, dtype=torch.uint8).index_fill_(1, torch.arange(6, 40), 1)),
           dict(boxes=torch.tensor([[10., 5., 60., 30.], [0., 0., 20., 20.]]), labels=torch.tensor([0, 4]),
                size=torch.tensor([40, 64]), masks=torch.ones(2, 40, 64, dtype=torch.uint8))]
trained = build_istr(tiny)
losses = trained(images, targets)
print({k: round(float(v.detach()), 3) for k, v in losses.items()})
assert torch.isfinite(losses["loss"]) and "loss_ce_s2" in losses and "loss_dice_s1" in losses
losses["loss"].backward()
assert trained.stages[0].mask_out.weight.grad.abs().sum() > 0
try: build_istr(dict(asdict(tiny), mask_head="embedding")); raise AssertionError("no codec accepted")
except ValueError as e: assert "codec_path" in str(e)

# %% [markdown]
# ## Figure: query boxes through the stages, and the batched paste
#
# Left: a synthetic image, its whole-image query boxes (grey) and the stage-1 / stage-2 boxes of the
# untrained tiny model for three queries: refinement starts from the whole image and moves
# each query's box. Right: the 20 top-scoring raw masks of the untrained model pasted at the original
# size in one call, summed (the untrained masks are near 0.5 inside their boxes, so the sum shows
# the boxes' footprint). Trained behaviour is shown in the experiment notebooks.

# %%
import matplotlib.pyplot as plt
from segbook.viz import save_figure

fig, ax = plt.subplots(1, 2, figsize=(8, 4))
ax[0].imshow(images[0, 0, :64, :48].numpy(), cmap="gray")
cols = ["tab:red", "tab:green", "tab:blue"]
for q, c in zip(range(3), cols):
    for s, (bx, ls) in enumerate([(b0[0, q], ":"), (out["stages"][0]["boxes"][0, q], "--"), (out["stages"][1]["boxes"][0, q], "-")]):
        x0, y0, x1, y1 = bx.tolist()
        ax[0].add_patch(plt.Rectangle((x0, y0), x1 - x0, y1 - y0, fill=False, ec="0.6" if s == 0 else c, ls=ls, lw=1.5))
ax[0].set_title("query boxes: init (grey), stage 1 (--), stage 2 (—)", fontsize=9)
ax[1].imshow(dets[0]["masks"][:, 0].sum(0).numpy(), cmap="viridis")
ax[1].set_title("20 masks pasted at 128×96 in one call", fontsize=9)
for a in ax: a.set_xticks([]); a.set_yticks([])
save_figure(fig, "istr_stages_and_paste.png");
