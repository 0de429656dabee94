"""segbook.config: YAML loading, `_base_` inheritance, dotted overrides, type checks, errors that name the file and key,
schedules that follow max_iters, linear lr scaling with the batch."""
import dataclasses
from pathlib import Path

import pytest

from segbook.config import (ConfigError, DataConfig, SolverConfig, TrainConfig, config_to_dict, load_config,
                            rescale_schedule, save_config)


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


# --- _base_ inheritance, schedule rescaling, linear lr scaling --------------------------------------------------

REPO = Path(__file__).resolve().parents[1]


def _write(d, name, text):
    (d / name).write_text(text)
    return d / name


def test_base_child_overrides_order(tmp_path):
    _write(tmp_path, "base.yaml", "seed: 1\nmodel: {a: 1, b: 2}\nsolver: {lr: 1e-3, steps: [10, 20], max_iters: 30}\n"
                                  "data: {batch_size: 4, min_size: [100, 200]}\n")
    child = _write(tmp_path, "child.yaml", "_base_: base.yaml\nseed: 2\nmodel: {b: 3}\nsolver: {steps: [25]}\n"
                                           "data: {min_size: [300]}\n")
    cfg = load_config(child, ["seed=3", "model.a=9"])
    assert cfg.seed == 3 and cfg.model == {"a": 9, "b": 3}  # override > child > base; mappings merge key by key
    assert cfg.solver.steps == [25] and cfg.data.min_size == [300]  # lists are replaced, never concatenated
    assert cfg.solver.lr == 1e-3 and cfg.data.batch_size == 4 and cfg.solver.max_iters == 30  # from the base
    assert load_config(child).seed == 2


def test_two_level_chain_relative_to_including_file(tmp_path):
    (tmp_path / "a").mkdir(); (tmp_path / "b").mkdir()
    _write(tmp_path / "a", "root.yaml", "seed: 5\ndevice: cpu\nmodel: {x: 1}\n")
    _write(tmp_path / "b", "mid.yaml", "_base_: ../a/root.yaml\nseed: 6\nmodel: {y: 2}\n")
    leaf = _write(tmp_path, "leaf.yaml", "_base_: b/mid.yaml\nmodel: {z: 3}\n")
    cfg = load_config(leaf)
    assert (cfg.seed, cfg.device, cfg.model) == (6, "cpu", {"x": 1, "y": 2, "z": 3})
    # a list of bases: later ones win, the including file wins over all
    _write(tmp_path, "other.yaml", "seed: 7\n")
    both = _write(tmp_path, "both.yaml", "_base_: [b/mid.yaml, other.yaml]\n")
    assert load_config(both).seed == 7 and load_config(both).model == {"x": 1, "y": 2}


def test_cycle_names_the_files(tmp_path):
    _write(tmp_path, "x.yaml", "_base_: y.yaml\n"); _write(tmp_path, "y.yaml", "_base_: z.yaml\n")
    _write(tmp_path, "z.yaml", "_base_: x.yaml\n")
    with pytest.raises(ConfigError, match="cycle") as e:
        load_config(tmp_path / "x.yaml")
    assert all(n in str(e.value) for n in ("x.yaml", "y.yaml", "z.yaml")), str(e.value)
    _write(tmp_path, "self.yaml", "_base_: self.yaml\n")
    with pytest.raises(ConfigError, match="cycle"):
        load_config(tmp_path / "self.yaml")


def test_missing_base_names_including_file(tmp_path):
    f = _write(tmp_path, "kid.yaml", "_base_: gone.yaml\nseed: 1\n")
    with pytest.raises(ConfigError) as e:
        load_config(f)
    assert "kid.yaml" in str(e.value) and "gone.yaml" in str(e.value), str(e.value)
    with pytest.raises(ConfigError, match="_base_"):
        load_config(_write(tmp_path, "badbase.yaml", "_base_: {a: 1}\n"))


def test_typo_in_base_is_blamed_on_the_base(tmp_path):
    _write(tmp_path, "base.yaml", "solver: {lrr: 1}\n")
    with pytest.raises(ConfigError) as e:
        load_config(_write(tmp_path, "kid.yaml", "_base_: base.yaml\n"))
    assert "base.yaml" in str(e.value) and "kid.yaml" not in str(e.value) and "solver.lrr" in str(e.value)


def test_schedule_follows_max_iters(tmp_path, capsys):
    f = _write(tmp_path, "s.yaml", "solver: {warmup_iters: 100, steps: [2000, 2300], max_iters: 2500}\n")
    cfg = load_config(f, ["solver.max_iters=300"])
    assert (cfg.solver.max_iters, cfg.solver.steps, cfg.solver.warmup_iters) == (300, [240, 276], 12)
    assert capsys.readouterr().out.strip() == \
        "[config] solver.max_iters 2500 -> 300: solver.steps [2000, 2300] -> [240, 276], warmup_iters 100 -> 12"
    longer = load_config(f, ["solver.max_iters=5000"], verbose=False).solver
    assert (longer.steps, longer.warmup_iters) == ([4000, 4600], 200)
    # the run's config.yaml holds the effective values: read again, nothing changes and nothing is printed
    assert load_config(save_config(cfg, tmp_path / "run" / "config.yaml")) == cfg and capsys.readouterr().out == ""
    assert load_config(f).solver.steps == [2000, 2300] and capsys.readouterr().out == ""  # no override: no change


def test_explicit_steps_or_warmup_are_kept(tmp_path, capsys):
    f = _write(tmp_path, "s.yaml", "solver: {warmup_iters: 100, steps: [2000, 2300], max_iters: 2500}\n")
    s = load_config(f, ["solver.steps=[150]", "solver.max_iters=300"]).solver
    assert (s.steps, s.warmup_iters) == ([150], 12)
    assert "kept (given)" in capsys.readouterr().out
    s = load_config(f, ["solver.max_iters=300", "solver.warmup_iters=7"], verbose=False).solver
    assert (s.steps, s.warmup_iters) == ([240, 276], 7)


def test_rescaled_steps_stay_increasing_and_below_max_iters():
    s = SolverConfig(warmup_iters=100, steps=[2000, 2300, 2600], max_iters=2500)  # 2600 was never reached
    assert rescale_schedule(dataclasses.replace(s, max_iters=3), 2500) == dataclasses.replace(
        s, max_iters=3, steps=[2], warmup_iters=0)  # 2.4 -> 2, 2.76 -> 3 clipped to 2 (merged), 2600 dropped
    assert rescale_schedule(dataclasses.replace(s, max_iters=1), 2500).steps == []  # no room for a step after iteration 0
    r = rescale_schedule(dataclasses.replace(s, max_iters=1000), 2500)
    assert r.steps == [800, 920] and r.warmup_iters == 40
    for n in (1, 2, 3, 7, 50, 301, 2499, 10000):
        st = rescale_schedule(dataclasses.replace(s, max_iters=n), 2500).steps
        assert st == sorted(set(st)) and all(1 <= x < n for x in st), (n, st)


def test_linear_lr_scaling_with_the_global_batch(tmp_path, capsys, monkeypatch):
    f = _write(tmp_path, "lr.yaml", "solver: {lr: 2e-4, reference_batch: 4}\ndata: {batch_size: 2}\n")
    cfg = load_config(f)
    assert cfg.solver.lr == pytest.approx(1e-4) and cfg.solver.reference_batch == 0  # applied
    assert "[config] solver.lr 0.0002 -> 0.0001" in capsys.readouterr().out
    assert load_config(f, ["data.batch_size=16"], verbose=False).solver.lr == pytest.approx(8e-4)
    assert load_config(f, ["solver.reference_batch=0"]).solver.lr == 2e-4 and capsys.readouterr().out == ""  # off
    assert load_config(save_config(cfg, tmp_path / "run.yaml")) == cfg  # not scaled twice
    # warm-up and steps are not scaled by the batch rule; max_iters rescaling and lr scaling compose
    both = load_config(f, ["solver.max_iters=27000", "data.batch_size=8"], verbose=False).solver
    assert both.lr == pytest.approx(4e-4) and both.steps == [21000, 25000] and both.warmup_iters == 100
    monkeypatch.setenv("RANK", "1")  # another torchrun process: same values, no line
    assert load_config(f) == cfg and capsys.readouterr().out == ""
    with pytest.raises(ConfigError, match="reference_batch"):
        load_config(f, ["solver.reference_batch=-1"])


def test_every_config_in_the_repo_loads():
    files = sorted((REPO / "configs").glob("*.yaml"))
    assert len(files) >= 8
    for f in files:
        load_config(f, verbose=False)


def test_inheriting_configs_differ_from_their_base_only_where_they_say():
    c = REPO / "configs"
    r50, r101 = (config_to_dict(load_config(c / n)) for n in ("istr_r50_coco.yaml", "istr_r101_coco.yaml"))
    assert r101["model"].pop("backbone") == "resnet101" and r50["model"].pop("backbone") == "resnet50"
    assert r101 == r50 and r50["model"]["num_queries"] == 300 and r50["model"]["mask_dim"] == 60
    mrcnn, tf = (config_to_dict(load_config(c / n)) for n in ("maskrcnn_shapes_cpu.yaml", "transfiner_shapes_cpu.yaml"))
    assert tf["model_type"] == "transfiner" and mrcnn["model_type"] == "maskrcnn"
    assert {k: v for k, v in tf.items() if k not in ("model", "model_type")} == \
        {k: v for k, v in mrcnn.items() if k not in ("model", "model_type")}
    assert {k: tf["model"][k] for k in mrcnn["model"]} == mrcnn["model"] and tf["model"]["d_model"] == 64
    ft = config_to_dict(load_config(c / "transfiner_shapes_cpu_finetune.yaml"))
    assert ft["model"]["train_nodes"] == "pred" and ft["model"]["anchor_sizes"] == [8, 16, 32, 64, 128]
    assert (ft["solver"]["lr"], ft["solver"]["steps"], ft["solver"]["max_iters"], ft["solver"]["optimizer"]) == \
        (1e-4, [1000], 800, "adamw")
    assert ft["weights"] == "runs/transfiner_shapes_cpu/last.pt" and ft["data"] == tf["data"]
