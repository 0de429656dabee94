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
# # Dynamic attention: fusing a query with its RoI
#
# > ISTR §3.3, Eqs. 10–11: the queries talk to each other with self-attention, then each query turns its own RoI feature into an object feature through parameters it generates itself.

# %%
#| default_exp attention

# %% [markdown]
# Every ISTR stage holds, for each of its $k$ queries, two things: a **proposal feature** (one
# $d$-vector, $d=256$) and a **RoI feature** $\mathbf{U}^i$, the $t\times t = 7\times 7$ grid that
# RoIAlign cut out of the feature pyramid under the query's current box. This chapter is the part of
# the stage that mixes them. It has two steps, and the paper gives each an equation:
#
# 1. **Query self-attention** (Eq. 10). The proposal features of one image attend to each other, so
#    a query can learn that a neighbour already covers "its" object (which is what lets ISTR drop NMS).
# 2. **Dynamic attention** (Eq. 11). Each query *generates weights* from its feature and applies them
#    to its RoI tokens: $\mathbf{O}^i = \mathbf{U}^i \cdot \mathrm{fc}(\mathbf{Z})$.
#
# Table 1d of the paper replaces step 2 with ordinary multi-head attention (the query attends to its
# 49 RoI tokens) and loses 12.2 mask AP; `RoIMultiheadAttention` below is that ablation.
#
# Shapes used throughout: `B` images, `Q` queries per image, `N = B·Q` RoIs, `T = t·t = 49` RoI
# tokens, `d` hidden channels.

# %%
#| export
import math

import torch
import torch.nn.functional as F
from torch import nn


# %% [markdown]
# ## Query self-attention (Eq. 10)
#
# $$\mathbf{Z} = \mathrm{softmax}\!\left(\frac{\mathbf{Q}\mathbf{K}^T}{\sqrt d}\right)\mathbf{V},\qquad
# \mathbf{Q},\mathbf{K},\mathbf{V} = (\mathbf{P}+\mathbf{E})\,\mathbf{W}_{Q,K,V}\qquad (10)$$
#
# with 8 heads (§4 "the number of self-attention blocks … is set to 8"). This is exactly
# `torch.nn.MultiheadAttention` with `q = k = v`, so we use it rather than write attention by hand. The
# only thing we add is the batch convention: attention runs **within** one image (`[B, Q, d]`,
# `batch_first=True`), never across images, so a batch of images gives the same result as one image
# at a time. The residual connection and LayerNorm around it belong to the stage (chapter 05), as in
# the official code.

# %%
#| export
class QuerySelfAttention(nn.Module):
    "Eq. 10: multi-head self-attention among the queries of each image (q = k = v)."
    def __init__(self, dim:int=256, # d, the proposal-feature width
                 heads:int=8, # number of attention heads
                 dropout:float=0.0): # attention dropout (0 in ISTR)
        super().__init__()
        self.attn = nn.MultiheadAttention(dim, heads, dropout=dropout, batch_first=True)

    def forward(self, queries:torch.Tensor, # [B, Q, d] proposal features
                need_weights:bool=False): # also return the head-averaged attention [B, Q, Q]
        "[B,Q,d] -> [B,Q,d] (and [B,Q,Q] weights when asked)."
        z, w = self.attn(queries, queries, queries, need_weights=need_weights)
        return (z, w) if need_weights else z


# %% [markdown]
# ## Dynamic attention (Eq. 11)
#
# $$\mathbf{O}^i = \mathbf{U}^i\cdot \mathrm{fc}(\mathbf{Z})\qquad (11)$$
#
# $\mathrm{fc}(\mathbf{Z})$ is one linear layer that turns each query's $d$-vector into the weights of
# a small two-layer network, which is then run on that query's own RoI tokens. It is Sparse R-CNN's
# "dynamic instance interaction" (ref. [37] of the paper); the official ISTR code uses it unchanged:
#
# | step | operation | shape per RoI |
# |---|---|---|
# | parameters | `Linear(d → 2·d·d_dyn)` on the query, split into $P_1$ and $P_2$ | $d\times d_{dyn}$, $d_{dyn}\times d$ |
# | layer 1 | $\mathbf{U} P_1$ → LayerNorm → ELU | $T\times d_{dyn}$ |
# | layer 2 | $\cdot\, P_2$ → LayerNorm → ELU | $T\times d$ |
# | out | flatten → `Linear(T·d → d)` → LayerNorm → ELU | $d$ |
#
# with $d_{dyn}=64$ and two dynamic layers (`NUM_DYNAMIC=2`). The two products are batched matrix
# products (`torch.bmm`) over all $N$ RoIs of the batch at once: no loop over images or queries.
# Note the activation: the official ISTR code uses **ELU** where Sparse R-CNN used ReLU.
#
# The flatten-then-linear at the end is what keeps *where* in the RoI a pattern sits: each of the 49
# positions has its own slice of the output weight matrix, which the mask embedding needs.

# %%
#| export
class DynamicConv(nn.Module):
    "Eq. 11: each query generates a two-layer network and applies it to its own RoI tokens."
    def __init__(self, dim:int=256, # d, width of queries and RoI features
                 dim_dynamic:int=64, # d_dyn, width of the generated hidden layer
                 num_dynamic:int=2, # number of generated layers (ISTR/Sparse R-CNN: 2)
                 roi_tokens:int=49): # T = t*t RoI positions (7x7)
        super().__init__()
        if num_dynamic != 2:
            raise ValueError(f"DynamicConv: num_dynamic={num_dynamic}; only 2 (d -> d_dyn -> d) is defined")
        self.dim, self.dim_dynamic = dim, dim_dynamic
        self.dynamic_layer = nn.Linear(dim, num_dynamic * dim * dim_dynamic)  # fc(.) of Eq. 11
        self.norm1, self.norm2 = nn.LayerNorm(dim_dynamic), nn.LayerNorm(dim)
        self.out_layer = nn.Linear(roi_tokens * dim, dim)
        self.norm3 = nn.LayerNorm(dim)

    def kernels(self, queries:torch.Tensor): # [N, d] query features
        "The generated parameters: P1 [N, d, d_dyn] and P2 [N, d_dyn, d]."
        p = self.dynamic_layer(queries)
        n, k = self.dim * self.dim_dynamic, queries.shape[0]
        return p[:, :n].view(k, self.dim, self.dim_dynamic), p[:, n:].view(k, self.dim_dynamic, self.dim)

    def forward(self, queries:torch.Tensor, # [N, d] one feature per RoI
                roi:torch.Tensor): # [N, T, d] RoI tokens (RoIAlign output flattened, channels last)
        "[N,d], [N,T,d] -> [N,d] object features O."
        p1, p2 = self.kernels(queries)
        x = F.elu(self.norm1(torch.bmm(roi, p1)))        # [N, T, d_dyn]
        x = F.elu(self.norm2(torch.bmm(x, p2)))           # [N, T, d]
        return F.elu(self.norm3(self.out_layer(x.flatten(1))))  # [N, d]


# %% [markdown]
# ## The Table 1d alternative: multi-head attention over the RoI tokens
#
# The ablation "replaces the dynamic attention with the multi-head attention module". The paper gives
# no more detail, so we take the plainest reading: the query is the single attention query, the 49
# RoI tokens are keys and values, 8 heads, `nn.MultiheadAttention`. One choice is ours: a learned
# position embedding is added to the keys (as in DETR), because without it attention is blind to
# *where* in the RoI a token sits and the mask embedding could not be predicted at all; that would make
# the comparison unfair to the alternative rather than informative. Same signature as `DynamicConv`,
# so the stage switches between them with `attention='dynamic'|'multihead'`.

# %%
#| export
class RoIMultiheadAttention(nn.Module):
    "Table 1d ablation: the query attends to its T RoI tokens with multi-head attention."
    def __init__(self, dim:int=256, # d
                 heads:int=8, # attention heads
                 roi_tokens:int=49, # T RoI positions
                 key_pos:bool=True): # add a learned position embedding to the keys
        super().__init__()
        self.attn = nn.MultiheadAttention(dim, heads, batch_first=True)
        self.key_pos = nn.Parameter(torch.zeros(1, roi_tokens, dim)) if key_pos else None
        if key_pos: nn.init.normal_(self.key_pos, std=0.02)
        self.norm = nn.LayerNorm(dim)

    def forward(self, queries:torch.Tensor, # [N, d]
                roi:torch.Tensor, # [N, T, d]
                need_weights:bool=False): # also return the attention over tokens [N, T]
        "[N,d], [N,T,d] -> [N,d] (and [N,T] weights when asked)."
        keys = roi + self.key_pos if self.key_pos is not None else roi
        o, w = self.attn(queries[:, None], keys, roi, need_weights=need_weights)
        o = F.elu(self.norm(o[:, 0]))
        return (o, w[:, 0]) if need_weights else o


# %% [markdown]
# ## Example
#
# Two images with 5 queries each, $d=32$, a 7×7 RoI per query. We run self-attention on the
# `[B, Q, d]` features, flatten to `[N, d]` for the per-RoI step, and check the shapes.

# %%
torch.manual_seed(0)
B, Q, d, T = 2, 5, 32, 49
feats, rois = torch.randn(B, Q, d), torch.randn(B * Q, T, d)
sa, dyn, mha = QuerySelfAttention(d, heads=4), DynamicConv(d, dim_dynamic=8), RoIMultiheadAttention(d, heads=4)
z = sa(feats)
o_dyn, o_mha = dyn(z.flatten(0, 1), rois), mha(z.flatten(0, 1), rois)
print(z.shape, o_dyn.shape, o_mha.shape, [p.shape for p in dyn.kernels(z.flatten(0, 1))])

# %% [markdown]
# ## Tests
#
# Shapes; **batching invariance** (the queries of two images processed together equal each image
# processed alone: attention never leaks across images, and the per-RoI step is per-RoI); the
# generated kernels differ between queries (that is what "dynamic" means); gradients reach every
# parameter and the inputs.

# %%
assert z.shape == (B, Q, d) and o_dyn.shape == (B * Q, d) and o_mha.shape == (B * Q, d)
sa.eval(); mha.eval()
with torch.no_grad():
    z_alone = torch.cat([sa(feats[i:i + 1]) for i in range(B)])
    assert torch.allclose(sa(feats), z_alone, atol=1e-6)
    zf = z_alone.flatten(0, 1)
    for m in (dyn, mha):
        assert torch.allclose(m(zf, rois), torch.cat([m(zf[:Q], rois[:Q]), m(zf[Q:], rois[Q:])]), atol=1e-6)
    p1, _ = dyn.kernels(zf)
    assert (p1[0] - p1[1]).abs().max() > 1e-3  # each query its own kernel
fq, fr = feats.clone().requires_grad_(), rois.clone().requires_grad_()
zz = sa(fq).flatten(0, 1)
(dyn(zz, fr).square().sum() + mha(zz, fr).square().sum()).backward()
for m in (sa, dyn, mha):
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in m.parameters()), type(m).__name__
assert fq.grad.abs().sum() > 0 and fr.grad.abs().sum() > 0

# %% [markdown]
# ## Figure: what "dynamic" means
#
# One toy RoI (a bright disc on the left half of a 7×7 grid) is shown to three different queries.
# Top: the first 16 columns of each query's generated kernel $P_1$ — different queries, different
# weights. Middle: the first hidden channel after the first dynamic layer, as a 7×7 map, for each
# query: the same RoI is read differently by each query. Bottom: the multi-head alternative's attention
# over the 49 tokens for the same queries (untrained, so nearly uniform: the point is the shape of
# the computation).

# %%
import matplotlib
import matplotlib.pyplot as plt
from segbook.viz import save_figure

torch.manual_seed(1)
yy, xx = torch.meshgrid(torch.arange(7.), torch.arange(7.), indexing="ij")
disc = (((yy - 3) ** 2 + (xx - 2) ** 2) <= 4).float().flatten()      # [49]
roi_toy = (disc[:, None] * torch.randn(1, d) + 0.1 * torch.randn(T, d))[None].repeat(3, 1, 1)
q3 = torch.randn(3, d)
with torch.no_grad():
    k1, _ = dyn.kernels(q3)
    hidden = F.elu(dyn.norm1(torch.bmm(roi_toy, k1)))                   # [3, 49, d_dyn]
    _, attn_w = mha(q3, roi_toy, need_weights=True)                     # [3, 49]
fig, ax = plt.subplots(3, 3, figsize=(7, 7))
for j in range(3):
    ax[0, j].imshow(k1[j, :16].numpy(), cmap="coolwarm"); ax[0, j].set_title(f"query {j}: $P_1$ (16×{k1.shape[2]})", fontsize=8)
    ax[1, j].imshow(hidden[j, :, 0].view(7, 7).numpy(), cmap="viridis"); ax[1, j].set_title("layer-1 channel 0 (7×7)", fontsize=8)
    ax[2, j].imshow(attn_w[j].view(7, 7).numpy(), cmap="magma"); ax[2, j].set_title("multi-head attn (7×7)", fontsize=8)
for a in ax.flat: a.set_xticks([]); a.set_yticks([])
fig.suptitle("Eq. 11: per-query kernels applied to one toy RoI", fontsize=10)
save_figure(fig, "attention_dynamic_kernels.png");
