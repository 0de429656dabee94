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
# # Appendix: paper vs official code — every difference, the switch that selects it, and where the book measures it
#
# > One row per item of the "what differs" lists of `shared/method-details.md` (ISTR at commit 967c901, Mask
# > Transfiner at HEAD 5b61fb5): the paper's choice, the code's choice, the segbook config field that selects
# > either, and the chapter or experiment that measures its effect. The cells below check every named field
# > against the code (it exists, its default is the one stated, and both values are accepted), so the table
# > cannot drift from segbook.
#
# Both papers leave details to their code, and the code does not always do what the paper says. The book's rule:
# where the two differ, a config switch selects either side, the chapter that implements the idea shows both forms,
# and an experiment measures the difference where it can. This appendix is the list. Each switch links to the
# chapter that defines it; the default column says which side segbook takes when nothing is set (the paper's, the
# code's, or neither, as checked against the code below).
#
# A row whose difference segbook cannot switch says **no switch**, and what segbook does instead. "Measured in"
# names only notebooks that exist and that compare the two settings; everything else is **not measured yet**.
# Nothing is trained here: the notebook runs in seconds under every profile.

# %% tags=["parameters"]
profile = "smoke"
out_dir = None
seed = 0
device = "cpu"
shapes_root = "unused"
coco_root = None

# %%
import dataclasses
import inspect
from typing import NamedTuple, Optional

from segbook.config import DataConfig, SolverConfig
from segbook.embeddings import MaskMoments, PCACodec, pca_fit_command
from segbook.evaluation import boundary_dilation
from segbook.istr import ISTRConfig
from segbook.losses import SetLossConfig
from segbook.matching import MatchingConfig
from segbook.reproduce import _repo_root, experiment_context, write_json_atomic, write_table
from segbook.transfiner import TransfinerConfig

ctx = experiment_context(out_dir, shapes_root, coco_root, seed)
NBS = _repo_root() / "nbs"

# %% [markdown]
# ## How a row is written down
#
# A `Switch` names its owner (a config dataclass, or a function whose keyword argument is the switch, such as
# `pca_fit_command`), the field, the value that gives the paper's behaviour, the value that gives the code's, and
# the default this table claims. `paper=None` means the paper does not state the setting (or our copy of its text
# lacks the passage). A row's `measured` lists `(notebook under nbs/, what it measures)`.

# %%
NOT_STATED = None

class Switch(NamedTuple):
    owner: object        # dataclass or function
    field: str           # field / keyword name
    paper: object        # value that selects the paper's behaviour (NOT_STATED: the paper does not say)
    code: object         # value that selects the official code's behaviour
    default: object      # the default this table claims (checked below)

class Row(NamedTuple):
    model: str           # 'ISTR' | 'Transfiner'
    item: str            # number in the method-details "differs" list (or §N for a difference named elsewhere there)
    what: str
    paper: str           # the paper's choice, in words
    code: str            # the official code's choice, in words
    switches: tuple = () # Switch, ...; empty: no switch
    follows: str = ""    # with no switch: which behaviour segbook has
    measured: tuple = () # (notebook path under nbs/, what it shows), ...

I, T = "ISTR", "Transfiner"
ROWS = [
    Row(I, "1", "class head and classification loss", "softmax classifier",
        "sigmoid per class, focal loss (α 0.25, γ 2), sigmoid scores", follows="as the code (sigmoid focal; no softmax head)"),
    Row(I, "1", "class term of the matching cost (Eq. 6)", "−p̃(c), the probability of the GT class",
        "focal-style α(1−p)^γ(−log p) − (1−α)p^γ(−log(1−p))",
        (Switch(MatchingConfig, "class_cost", "prob", "focal", "focal"),)),
    Row(I, "2", "image features from P2–P5", "\"averaging and summing\" the levels (read here as: averaged)",
        "spatial mean per level, summed over the 4 levels (no /4), padded pixels included",
        (Switch(ISTRConfig, "level_sum", False, True, True),)),
    Row(I, "3", "PCA centring (Eq. 3)", "DDᵀ of the raw masks, no mean", "mean subtracted (IncrementalPCA)",
        (Switch(pca_fit_command, "mean", False, True, False), Switch(PCACodec.from_moments, "mean", False, True, False)),
        measured=(("02_mask_embeddings.ipynb", "reconstruction mIoU, paper codec vs mean+whiten+logit (figures/tables/embeddings_miou.md)"),)),
    Row(I, "3", "PCA whitening", "orthonormal D, embeddings unscaled", "embeddings divided by √eigenvalue (whiten=True)",
        (Switch(pca_fit_command, "whiten", False, True, False), Switch(PCACodec.from_moments, "whiten", False, True, False)),
        measured=(("02_mask_embeddings.ipynb", "same table (the three switches together)"),
                  ("09_evaluation.ipynb", "trained ISTR on shapes, paper codec vs mean+whiten+logit together: val AP "
                   "(figures/results/istr_shapes_cpu*.json)"))),
    Row(I, "3", "PCA domain", "0/1 pixels", "noisy logits log(p/(1−p)), p = 1−u / u, u∈[0.01, 0.05]; GT embeddings re-drawn on every call",
        (Switch(pca_fit_command, "logit", False, True, False), Switch(MaskMoments, "logit", False, True, False)),
        measured=(("02_mask_embeddings.ipynb", "same table (the three switches together)"),)),
    Row(I, "4", "form of the embedding loss L_L2 (Eq. 9)", "\"L2 loss\"", "MSE averaged over the l dims, summed over pairs, /N",
        follows="as the code (`segbook.losses.loss_mask_embed`)"),
    Row(I, "4", "form of the dice loss (Eq. 9)", "dice (form not given)", "1 − 2Σpt/(Σp² + Σt² + 1e−5) on sigmoid-decoded masks",
        follows="as the code (`segbook.losses.loss_dice`)"),
    Row(I, "5", "activations of the stage head", "not stated (Sparse R-CNN base: ReLU)", "ELU everywhere (the config says relu)",
        follows="as the code (ELU)"),
    Row(I, "5", "class tower depth", "not stated (Sparse R-CNN base: 1 layer)", "3 × [Linear, LN, ELU]",
        (Switch(ISTRConfig, "num_cls", NOT_STATED, 3, 3),)),
    Row(I, "6", "random-crop augmentation", "not mentioned", "p = 0.5: resize to {400,500,600}, then a 0.7×0.7 relative crop",
        follows="as the paper (no crop: `DataConfig` has resize and flip only)"),
    Row(I, "7", "box a GT mask is cropped to (PCA fit and training target)", "not stated", "the GT box",
        follows="as the code (`segbook.matching.prepare_targets` crops to the GT box)"),
    Row(I, "8", "later (TIP-2024) code at HEAD: mask size", "28×28", "112×112 (HEAD 0ee0157)",
        (Switch(ISTRConfig, "mask_size", 28, 112, 28),)),
    Row(I, "8", "… embedding size l", "60", "256 (HEAD)", (Switch(ISTRConfig, "mask_dim", 60, 256, 60),)),
    Row(I, "8", "… loss weights dice / feat", "2 / 2", "5 / 1 (HEAD)",
        (Switch(SetLossConfig, "weight_dice", 2.0, 5.0, 2.0), Switch(SetLossConfig, "weight_mask_embed", 2.0, 1.0, 2.0))),
    Row(I, "8", "… conv mask head on 28² RoI features, class logits of stages 3–6 averaged", "linear mask tower, last stage",
        "conv head, averaged logits (HEAD)", follows="as the paper (967c901)"),
    Row(T, "1", "incoherence ground truth", "Eq. 1 per level: nearest down/up-sampling, OR-pooling",
        "once at image resolution: bilinear residual, thresholds 0.01/0.05, RoIAligned to 28² only",
        (Switch(TransfinerConfig, "incoherent_target", "nearest", "bilinear", "nearest"),),
        measured=(("06_incoherent_regions.ipynb", "share of the box marked incoherent, Eq. 1 vs the code's target (figures/tables/transfiner_table1_percent.md)"),
                  ("experiments/transfiner_table1.ipynb", "same share on coco-mini (Eq. 1 vs code target @28²)"))),
    Row(T, "2", "incoherence detector", "cascade over levels: 4 convs at the coarsest, 1×1 fusions with upsampled guidance (Fig. 5)",
        "one 28² detector, nearest-upsampled to 56²/112²",
        (Switch(TransfinerConfig, "detector_mode", "cascade", "single", "cascade"),)),
    Row(T, "2", "incoherence detector loss", "BCE (reported; the passage is missing from our copy)", "Dice + BCE, weight 0.5",
        (Switch(TransfinerConfig, "detector_loss", "bce", "bce+dice", "bce"),)),
    Row(T, "3", "RoI pyramid", "28/56/112 from P_i, P_{i−1}, P_{i−2}", "coarse 14 from P_i; nodes at 28/56/112 from P_{i−1..i−3}",
        (Switch(TransfinerConfig, "first_offset", 0, 1, 0),)),
    Row(T, "3", "196 coarse 14×14 tokens prepended to every sequence", "no", "yes (also supervised by L_Refine)",
        follows="as the paper (no coarse tokens)"),
    Row(T, "3", "P2 semantic residual branch P2 += f(P2)", "no", "4 convs, also feeding a semantic head",
        follows="as the paper (no branch)"),
    Row(T, "4", "nodes per level in training", "100", "150 (first push: 100); a random permutation tiled when fewer",
        (Switch(TransfinerConfig, "nodes_per_level", 100, 150, 100),)),
    Row(T, "4", "node thresholds on the detector output", "0.5", "test 1e−6 / 0.125 / 0.8 (train 0.125 / 0.5 / 0.5)",
        (Switch(TransfinerConfig, "inc_threshold", [0.5, 0.5, 0.5], [1e-6, 0.125, 0.8], [0.5, 0.5, 0.5]),)),
    Row(T, "4", "training nodes from", "GT incoherence", "predicted (detached) incoherence",
        (Switch(TransfinerConfig, "train_nodes", "gt", "pred", "gt"),)),
    Row(T, "5", "3×3 neighbourhood context cue (Table 4)", "yes", "absent",
        (Switch(TransfinerConfig, "node_context", True, False, True),)),
    Row(T, "5", "coarse-mask cue of a node", "\"coarse segmentation feature\" (how it is fused: not in our text)",
        "one probability, concatenated with the features, then one linear layer (a 1×1 conv)",
        (Switch(TransfinerConfig, "node_fusion", NOT_STATED, "concat", "sum"),)),
    Row(T, "5", "positional encoding", "a cue of the node (how it enters: not in our text)", "2-D sine within the RoI, added to Q and K in every layer",
        follows="neither: the sine code is added once to the token (`NodeEncoder`)"),
    Row(T, "6", "propagation to finer levels", "nearest-neighbour duplication", "bilinear (align_corners=True), then overwrite nodes",
        (Switch(TransfinerConfig, "propagation", "nearest", "bilinear", "nearest"),)),
    Row(T, "7", "extra semantic (0.25) and boundary (0.5) losses", "no", "yes", follows="as the paper (neither loss)"),
    Row(T, "7", "RoIs refined in training", "not stated", "first 30 positives per GPU batch (LIMIT)",
        (Switch(TransfinerConfig, "max_train_rois", NOT_STATED, 30, 30),)),
    Row(T, "7", "detections refined at test", "not stated", "top 10 per image (others keep the coarse mask)",
        follows="neither: every kept detection is refined, under node caps `max_nodes_per_roi`/`max_nodes_total`"),
    Row(T, "7", "skip an RoI with few nodes (training)", "not stated", "fewer than 10 on any level",
        (Switch(TransfinerConfig, "min_nodes", NOT_STATED, 10, 1),)),
    Row(T, "8", "learning-rate warm-up", "constant", "linear (detectron2 default)",
        (Switch(SolverConfig, "warmup_method", "constant", "linear", "linear"),)),
    Row(T, "9", "loss weight λ of L_Inc", "λ₁..λ₄ (values not in our copy of §3.3)", "0.5 on L_Inc, 1 on the others",
        (Switch(TransfinerConfig, "w_incoherent", NOT_STATED, 0.5, 0.5), Switch(TransfinerConfig, "w_refine", NOT_STATED, 1.0, 1.0))),
    Row(T, "§11", "form of L_Refine", "not in our copy of §3.3", "L1 between node probabilities and 0/1 labels",
        (Switch(TransfinerConfig, "refine_loss", NOT_STATED, "l1", "bce"),)),
    Row(T, "10", "coarse mask head", "four 3×3 convs on a 28×28 RoI", "4 convs on a 14×14 RoI, deconv to 28×28",
        follows="as the code (torchvision `MaskRCNNHeads` on 14×14)"),
    Row(T, "11", "Boundary AP band (Cheng et al.)", "dilation 0.02 of the diagonal, IoU = min(mask, boundary)", "no evaluation script",
        (Switch(boundary_dilation, "dilation_ratio", 0.02, NOT_STATED, 0.02),),
        measured=(("09_evaluation.ipynb", "implements the API's band and min(mask, boundary) IoU; checks them on synthetic and perturbed GT"),)),
]
len(ROWS)


# %% [markdown]
# ## The checks
#
# For each switch: the field exists on its owner; its default equals the stated one; and for a dataclass, an
# instance built with the paper's value and with the code's value passes its own validation (`__post_init__`).
# Every notebook named under "measured in" exists. A failure names the row and the field.

# %%
def owner_name(o) -> str:
    return o.__qualname__ if not inspect.ismethod(o) else f"{o.__self__.__name__}.{o.__name__}"

def field_default(owner, # dataclass or function
                  name:str): # field / keyword name
    "The default of `owner.name` (a dataclass field or a keyword argument); KeyError when there is none."
    if dataclasses.is_dataclass(owner):
        f = {f.name: f for f in dataclasses.fields(owner)}.get(name)
        if f is None: raise KeyError(f"{owner_name(owner)} has no field {name!r}")
        if f.default is not dataclasses.MISSING: return f.default
        if f.default_factory is not dataclasses.MISSING: return f.default_factory()
        raise KeyError(f"{owner_name(owner)}.{name} has no default")
    p = inspect.signature(owner).parameters.get(name)
    if p is None or p.default is inspect.Parameter.empty:
        raise KeyError(f"{owner_name(owner)} has no keyword argument {name!r} with a default")
    return p.default

def check_switch(row:Row, s:Switch) -> str:
    "Check one switch; return which side its default selects ('paper' | 'code' | 'neither' | 'paper = code')."
    where = f"{row.model} {row.item} ({row.what}): {owner_name(s.owner)}.{s.field}"
    d = field_default(s.owner, s.field)
    assert d == s.default, f"{where}: default is {d!r}, the table says {s.default!r}"
    for side in ("paper", "code"):
        v = getattr(s, side)
        if v is NOT_STATED: continue
        if dataclasses.is_dataclass(s.owner):
            s.owner(**{s.field: v})                     # raises when the value is refused
        else:
            assert isinstance(v, type(d)), f"{where}: {side} value {v!r} is not a {type(d).__name__}"
    picks = [side for side in ("paper", "code") if getattr(s, side) is not NOT_STATED and getattr(s, side) == d]
    return " = ".join(picks) if picks else "neither"

checked = {}
for r in ROWS:
    for s in r.switches:
        checked[(r.model, r.item, r.what, owner_name(s.owner), s.field)] = check_switch(r, s)
    for nb, _ in r.measured:
        assert (NBS / nb).exists(), f"{r.model} {r.item} ({r.what}): 'measured in' names {nb}, not found under {NBS}"
    assert r.switches or r.follows, f"{r.model} {r.item} ({r.what}): a row without a switch must say what segbook follows"
len(checked)


# %% [markdown]
# ## Writing the table
#
# Each switch cell names the field, how a reader sets it, both sides' values and which one the default selects; the
# rendered copy below links every switch to the chapter that defines it.

# %%
def fmt(v, missing:str="not stated") -> str:
    return missing if v is NOT_STATED else f"`{v!r}`"

SET_WITH = {  # how a reader sets each owner's fields
    ISTRConfig: "YAML `model.{}`, model_type istr", TransfinerConfig: "YAML `model.{}`, model_type transfiner",
    SolverConfig: "YAML `solver.{}`", DataConfig: "YAML `data.{}`",
    MatchingConfig: "YAML `matching.{}`, model_type istr", SetLossConfig: "YAML `loss.{}`, model_type istr",
    pca_fit_command: "`segbook pca-fit --{}`", boundary_dilation: "argument `{}`"}

def set_with(s:Switch) -> str:
    how = next((v for k, v in SET_WITH.items() if k == s.owner), "Python argument `{}`")
    return how.format(s.field)

CHAPTER_OF = {ISTRConfig: "05_istr", TransfinerConfig: "08_transfiner", MatchingConfig: "03_matching",
              SetLossConfig: "03b_losses", pca_fit_command: "02_mask_embeddings", PCACodec.from_moments: "02_mask_embeddings",
              MaskMoments: "02_mask_embeddings", DataConfig: "10_config", SolverConfig: "10_config",
              boundary_dilation: "09_evaluation"}

def switch_name(s:Switch, link:bool) -> str:
    name = f"`{owner_name(s.owner)}.{s.field}`"
    chapter = next((v for k, v in CHAPTER_OF.items() if k == s.owner), None)
    return f"[{name}](../{chapter}.ipynb)" if link and chapter else name

def switch_text(r:Row, link:bool=False) -> str:
    if not r.switches: return f"**no switch**; segbook: {r.follows}"
    return "<br>".join(f"{switch_name(s, link)} ({set_with(s)}): paper {fmt(s.paper)}, code {fmt(s.code, 'n/a')}; "
                       f"default {fmt(s.default)} (= {checked[(r.model, r.item, r.what, owner_name(s.owner), s.field)]})" for s in r.switches)

def measured_text(r:Row, link:bool=False) -> str:
    if not r.measured: return "not measured yet"
    name = lambda nb: f"[{nb.removesuffix('.ipynb')}](../{nb})" if link and "/" not in nb else nb.removesuffix('.ipynb')
    return "<br>".join(f"{name(nb)}: {what}" for nb, what in r.measured)

def table_lines(link:bool=False) -> list:
    lines = ["Where the official code differs from the paper (method-details.md, 'what differs' lists; ISTR@967c901, "
             "Transfiner@5b61fb5), the segbook switch that selects each side, and where the book measures the effect. "
             "Every switch was checked against segbook when this table was written (field exists, default as stated, "
             "both values accepted).", "",
             "| model | # | what | paper | official code | segbook switch | measured in |", "|---|---|---|---|---|---|---|"]
    for r in ROWS:
        lines.append(f"| {r.model} | {r.item} | {r.what} | {r.paper} | {r.code} | {switch_text(r, link)} | {measured_text(r, link)} |")
    n_sw = sum(bool(r.switches) for r in ROWS)
    n_meas = sum(bool(r.measured) for r in ROWS)
    lines += ["", f"{len(ROWS)} differences: {n_sw} with a switch, {len(ROWS) - n_sw} without; {n_meas} have a measurement "
              f"in the book, {len(ROWS) - n_meas} are not measured yet. The 02_mask_embeddings table measures the three PCA "
              "switches together (reconstruction mIoU), not one at a time. `segbook train` always fits the paper's codec "
              "(`pipeline.ensure_codec`); the code's codec is reached with `segbook pca-fit --mean --whiten --logit` and "
              "`model.codec_path`."]
    return lines


# %% [markdown]
# ## The table

# %%
from IPython.display import Markdown, display
lines = table_lines()
write_table(ctx.tables / "paper_vs_code.md", lines, echo=False)
n_sw, n_meas = sum(bool(r.switches) for r in ROWS), sum(bool(r.measured) for r in ROWS)
display(Markdown("\n".join(table_lines(link=True))))
records = [dict(model=r.model, item=r.item, what=r.what, paper=r.paper, code=r.code,
                switches=[dict(owner=owner_name(s.owner), field=s.field, paper=s.paper, code=s.code, default=s.default,
                               default_selects=checked[(r.model, r.item, r.what, owner_name(s.owner), s.field)]) for s in r.switches],
                follows=r.follows or None, measured=[nb for nb, _ in r.measured]) for r in ROWS]
write_json_atomic({"profile": profile, "rows": records, "with_switch": n_sw, "measured": n_meas}, ctx.out / "results.json")


# %% [markdown]
# The checks fail when they should: a wrong default, a field that does not exist and a refused value are each
# caught.

# %%
def fails(fn) -> bool:
    try: fn()
    except (AssertionError, KeyError, ValueError, TypeError): return True
    return False

probe = ROWS[1]
assert fails(lambda: check_switch(probe, Switch(MatchingConfig, "class_cost", "prob", "focal", "prob")))    # wrong default
assert fails(lambda: check_switch(probe, Switch(MatchingConfig, "no_such_field", 1, 2, 1)))                # missing field
assert fails(lambda: check_switch(probe, Switch(MatchingConfig, "class_cost", "softmax", "focal", "focal"))) # refused value
assert fails(lambda: check_switch(probe, Switch(pca_fit_command, "whiten", False, 1.0, False)))             # wrong type

# %%
assert len(ROWS) == len(records) >= 30 and all(r.model in (I, T) for r in ROWS)
assert {r.model for r in ROWS if r.switches} == {I, T}
assert (ctx.tables / "paper_vs_code.md").read_text().count("\n| ") == len(ROWS) + 1   # header + one line per row
