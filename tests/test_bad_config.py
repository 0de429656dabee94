"""Bad configuration values are refused before any work, with one error naming the file and the key (issue #16 item 5).

Each case is a `key=value` override on a valid config: the section configs (data, solver, top level) are checked by
`load_config`, the model sections by the model's own `from_dict` — both through `segbook.config.check_ranges`."""
from pathlib import Path

import pytest

from segbook.config import ConfigError, load_config
from segbook.istr import ISTRConfig
from segbook.transfiner import TransfinerConfig

ROOT = Path(__file__).resolve().parents[1]
ISTR_YAML = ROOT / "configs" / "istr_shapes_cpu.yaml"

SECTION_CASES = [  # (override, words the one-line error must contain)
    ("data.batch_size=0", ["data.batch_size", "> 0"]),
    ("data.batch_size=-4", ["data.batch_size", "> 0"]),
    ("data.batch_size=2.5", ["data.batch_size", "integer"]),
    ("data.min_size=[0]", ["data.min_size", "> 0"]),
    ("data.min_size=[128, -1]", ["data.min_size", "> 0"]),
    ("data.max_size_cap=0", ["data.max_size_cap", "> 0"]),
    ("data.test_size=-128", ["data.test_size", "> 0"]),
    ("data.flip=1.5", ["data.flip", "[0, 1]"]),
    ("data.flip=-0.1", ["data.flip", "[0, 1]"]),
    ("data.flip=yes", ["data.flip", "number"]),
    ("data.num_workers=-1", ["data.num_workers", ">= 0"]),
    ("solver.lr=0", ["solver.lr", "> 0"]),
    ("solver.lr=-1e-4", ["solver.lr", "> 0"]),
    ("solver.lr=.nan", ["solver.lr", "nan"]),
    ("solver.lr=.inf", ["solver.lr", "inf"]),
    ("solver.lr=fast", ["solver.lr", "number"]),
    ("solver.weight_decay=-1", ["solver.weight_decay", ">= 0"]),
    ("solver.momentum=1.5", ["solver.momentum", "[0, 1]"]),
    ("solver.betas=[0.9, 1.5]", ["solver.betas", "[0, 1]"]),
    ("solver.warmup_iters=-1", ["solver.warmup_iters", ">= 0"]),
    ("solver.warmup_factor=2", ["solver.warmup_factor", "[0, 1]"]),
    ("solver.gamma=0", ["solver.gamma", "> 0"]),
    ("solver.max_iters=0", ["solver.max_iters", "> 0"]),
    ("solver.steps=[-5]", ["solver.steps", "> 0"]),
    ("solver.clip_grad_norm=-1", ["solver.clip_grad_norm", ">= 0"]),
    ("checkpoint_period=0", ["checkpoint_period", "> 0"]),
    ("log_period=0", ["log_period", "> 0"]),
    ("eval_period=-1", ["eval_period", ">= 0"]),
    ("seed=abc", ["seed", "integer"]),
]


@pytest.mark.parametrize("override,words", SECTION_CASES, ids=[c[0] for c in SECTION_CASES])
def test_bad_section_value_is_one_clear_error(override, words):
    with pytest.raises(ConfigError) as e:
        load_config(ISTR_YAML, [override], verbose=False)
    msg = str(e.value)
    assert "\n" not in msg and all(w in msg for w in words), msg


MODEL_CASES = [  # (model class, key, bad value, words)
    (ISTRConfig, "num_queries", 0, ["model.num_queries", "> 0"]),
    (ISTRConfig, "num_queries", 2.5, ["model.num_queries", "integer"]),
    (ISTRConfig, "num_stages", 0, ["model.num_stages", "> 0"]),
    (ISTRConfig, "hidden", -64, ["model.hidden", "> 0"]),
    (ISTRConfig, "mask_dim", 0, ["model.mask_dim", "> 0"]),
    (ISTRConfig, "mask_size", 0, ["model.mask_size", "> 0"]),
    (ISTRConfig, "prior_prob", 1.5, ["model.prior_prob", "[0, 1]"]),
    (ISTRConfig, "cache_backbone_mb", -1, ["model.cache_backbone_mb", ">= 0"]),
    (ISTRConfig, "num_classes", 0, ["model.num_classes", "> 0"]),
    (ISTRConfig, "pos_embed", "maybe", ["model.pos_embed", "true/false"]),
    (TransfinerConfig, "nodes_per_level", 0, ["model.nodes_per_level", "> 0"]),
    (TransfinerConfig, "dropout", 1.5, ["model.dropout", "[0, 1]"]),
    (TransfinerConfig, "inc_threshold", [0.5, 2.0, 0.5], ["model.inc_threshold", "[0, 1]"]),
    (TransfinerConfig, "sizes", [28, 0, 112], ["model.sizes", "> 0"]),
    (TransfinerConfig, "w_refine", -1.0, ["model.w_refine", ">= 0"]),
    (TransfinerConfig, "refine_topk", 0, ["model.refine_topk", "> 0"]),
]


@pytest.mark.parametrize("cls,key,value,words", MODEL_CASES, ids=[f"{c[0].__name__}.{c[1]}={c[2]}" for c in MODEL_CASES])
def test_bad_model_value_is_one_clear_error(cls, key, value, words):
    with pytest.raises(ConfigError) as e:
        cls.from_dict({key: value}, source="run.yaml")
    msg = str(e.value)
    assert msg.startswith("run.yaml: ") and "\n" not in msg and all(w in msg for w in words), msg


def test_good_values_still_load():
    assert ISTRConfig.from_dict({"num_queries": 40, "cache_backbone_mb": 3000, "prior_prob": 0.01}).cache_backbone_mb == 3000.0
    assert TransfinerConfig.from_dict({"refine_topk": None, "inc_threshold": [1e-6, 0.125, 0.8]}).refine_topk is None
    cfg = load_config(ISTR_YAML, ["data.flip=0", "solver.clip_grad_norm=0", "eval_period=0"], verbose=False)
    assert cfg.data.flip == 0.0 and cfg.solver.clip_grad_norm == 0.0
