"""segbook.config: YAML loading, dotted overrides, type checks, and errors that name the file and key."""
import pytest

from segbook.config import ConfigError, DataConfig, SolverConfig, TrainConfig, load_config, save_config


def test_defaults_are_istr_recipe():
    cfg = load_config()
    assert cfg == TrainConfig()
    s = cfg.solver
    assert (s.optimizer, s.lr, s.weight_decay, s.warmup_iters, s.warmup_factor, s.clip_grad_norm) == \
        ("adamw", 2.5e-5, 1e-4, 1000, 0.01, 1.0)
    assert s.steps == [210000, 250000] and s.max_iters == 270000 and cfg.seed == 40244023
    assert cfg.data.batch_size == 16 and cfg.data.min_size == list(range(480, 801, 32)) and cfg.data.flip == 0.5
    assert cfg.data.max_size is None and cfg.data.max_size_cap == 1333 and cfg.data.test_size is None
    assert TrainConfig().data.min_size is not DataConfig().min_size  # no shared mutable defaults


def test_yaml_and_overrides(tmp_path):
    f = tmp_path / "run.yaml"
    f.write_text("model_type: transfiner\nmodel: {hidden: 64, levels: [28, 56]}\n"
                 "solver: {optimizer: sgd, lr: 2e-2, weight_decay: 1e-4, warmup_factor: 0.001, steps: [60, 80]}\n"
                 "data: {batch_size: 2, flip: 0, max_size: 800}\nseed: 7\n")
    cfg = load_config(f, ["solver.lr=0.01", "solver.steps=[10, 20]", "model.hidden=128", "model.extra.depth=3",
                          "data.flip=0.25", "data.max_size=null", "solver.amp=bf16", "device=cpu", "solver.clip_grad_norm=0"])
    assert cfg.model_type == "transfiner" and cfg.seed == 7
    assert cfg.model == {"hidden": 128, "levels": [28, 56], "extra": {"depth": 3}}
    assert cfg.solver.lr == 0.01 and cfg.solver.steps == [10, 20] and cfg.solver.optimizer == "sgd"
    assert isinstance(cfg.solver.weight_decay, float) and cfg.solver.weight_decay == 1e-4  # '1e-4' is a YAML string
    assert isinstance(cfg.solver.clip_grad_norm, float) and cfg.solver.clip_grad_norm == 0.0
    assert cfg.data.flip == 0.25 and cfg.data.max_size is None and cfg.data.batch_size == 2 and cfg.solver.amp == "bf16" and cfg.device == "cpu"
    assert load_config(save_config(cfg, tmp_path / "out" / "saved.yaml")) == cfg
    assert not list((tmp_path / "out").glob(".*"))  # no temp file left


@pytest.mark.parametrize("text,words", [
    ("solver:\n  lrr: 0.1\n", ["bad.yaml", "solver.lrr", "unknown"]),
    ("modle_type: istr\n", ["bad.yaml", "modle_type"]),
    ("data:\n  batch_size: four\n", ["bad.yaml", "data.batch_size", "integer"]),
    ("data:\n  flip: true\n", ["bad.yaml", "data.flip", "number"]),  # a probability, not a switch
    ("data:\n  max_size: big\n", ["bad.yaml", "data.max_size", "integer"]),
    ("solver: 5\n", ["bad.yaml", "solver", "mapping"]),
    ("- a\n- b\n", ["bad.yaml", "mapping"]),
    ("solver: {lr: [\n", ["bad.yaml", "YAML"]),
])
def test_bad_files_name_file_and_key(tmp_path, text, words):
    f = tmp_path / "bad.yaml"; f.write_text(text)
    with pytest.raises(ConfigError) as e:
        load_config(f)
    assert all(w in str(e.value) for w in words), str(e.value)


@pytest.mark.parametrize("override,words", [
    ("solver.lrr=1", ["override 'solver.lrr=1'", "solver.lrr"]),
    ("solver.lr=fast", ["solver.lr", "number"]),
    ("seed.x=1", ["seed", "not a section"]),
    ("seed", ["key=value"]),
    ("data.min_size=abc", ["data.min_size", "list"]),
])
def test_bad_overrides_are_named(override, words):
    with pytest.raises(ConfigError) as e:
        load_config(None, [override])
    assert all(w in str(e.value) for w in words), str(e.value)


def test_missing_file(tmp_path):
    with pytest.raises(ConfigError, match="nope.yaml"):
        load_config(tmp_path / "nope.yaml")


def test_sections_are_dataclasses():
    cfg = load_config(None, ["data.min_size=640"])  # a scalar where a list is expected becomes [640]
    assert isinstance(cfg.data, DataConfig) and isinstance(cfg.solver, SolverConfig) and cfg.data.min_size == [640]
