"""segbook.engine: schedule, parameter groups, resumable data order, exact resume (also after SIGKILL),
atomic checkpoints, learning, and 2-process gloo DDP == 1 process."""
import json
import math
import os
import signal
import socket
import subprocess
import sys
import textwrap
import time
import warnings
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import Dataset

from segbook import engine
from segbook.config import ConfigError, DataConfig, SolverConfig, TrainConfig, load_config
from segbook.engine import (CheckpointError, ResumableSampler, SeededSamples, WarmupStepSchedule, atomic_save, build_optimizer,
                            build_scheduler, build_train_loader, load_checkpoint, param_groups, seed_everything,
                            total_loss, train)

torch.set_num_threads(1)  # tiny tensors on a shared machine: one thread is far faster than two
TESTS = Path(__file__).resolve().parent
REPO = TESTS.parent


# --- a toy detector and data set (imported by the subprocess scripts below) -------------------------
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
        if torch.rand(()) < 0.5:
            img, box = img.flip(-1), torch.stack([self.size - box[2], box[1], self.size - box[0], box[3]])
        return img, {"boxes": box[None], "labels": self.labels[i][None]}


def toy_collate(batch): return torch.stack([b[0] for b in batch]), [b[1] for b in batch]


class ToyDetector(nn.Module):
    def __init__(self, num_classes=3, size=16, dropout=0.1, delay=0.0):
        super().__init__()
        self.size, self.delay = size, delay
        self.features = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Dropout(dropout))
        self.norm = nn.LayerNorm(8 * size * size)
        self.box, self.cls = nn.Linear(8 * size * size, 4), nn.Linear(8 * size * size, num_classes)
    def forward(self, images, targets=None):
        if self.delay: time.sleep(self.delay)
        h = self.norm(self.features(images))
        boxes, logits = self.box(h).sigmoid() * self.size, self.cls(h)
        if self.training:
            gt_boxes = torch.cat([t["boxes"] for t in targets]); gt_labels = torch.cat([t["labels"] for t in targets])
            return {"loss_box": F.l1_loss(boxes, gt_boxes) / self.size, "loss_cls": F.cross_entropy(logits, gt_labels)}
        return [{"boxes": b[None], "labels": s.argmax()[None], "scores": s.max()[None]} for b, s in zip(boxes, logits.softmax(-1))]


def toy_cfg(max_iters, batch_size=8, num_workers=0, **kw):
    base = dict(seed=0, device="cpu", log_period=5, checkpoint_period=10, eval_period=0,
                data=DataConfig(batch_size=batch_size, num_workers=num_workers),
                solver=SolverConfig(lr=1e-3, warmup_iters=5, steps=[25], max_iters=max_iters))
    base.update(kw)
    return TrainConfig(**base)


def toy_run(out, cfg, resume=False, dropout=0.1, delay=0.0, n=48, **kw):
    seed_everything(0)
    model = ToyDetector(dropout=dropout, delay=delay)
    loader = build_train_loader(ToySquares(n), cfg.data.batch_size, cfg.seed, toy_collate, cfg.data.num_workers)
    result = train(model, loader, cfg, out, resume=resume, progress=False, **kw)
    return model, result


def metrics(out, drop=("time",)):
    return [{k: v for k, v in json.loads(l).items() if k not in drop} for l in (Path(out) / "metrics.jsonl").read_text().splitlines()]


def same_weights(a, b, atol=0.0):
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    return all((torch.equal(sa[k], sb[k]) if atol == 0 else torch.allclose(sa[k], sb[k], atol=atol, rtol=0)) for k in sa)


# --- schedule and optimizer -------------------------------------------------------------------------
def test_schedule_warmup_and_steps():
    f = WarmupStepSchedule(warmup_iters=1000, warmup_factor=0.01, steps=[210000, 250000], gamma=0.1)
    assert f(0) == pytest.approx(0.01) and f(500) == pytest.approx(0.505) and f(999) == pytest.approx(0.01 + 0.99 * 0.999)
    assert f(1000) == 1.0 and f(209999) == 1.0
    assert f(210000) == pytest.approx(0.1) and f(249999) == pytest.approx(0.1) and f(250000) == pytest.approx(0.01)
    c = WarmupStepSchedule(10, 0.001, [], 0.1, method="constant")
    assert c(0) == c(9) == 0.001 and c(10) == 1.0
    with pytest.raises(ConfigError, match="warmup_method"):
        WarmupStepSchedule(10, 0.1, [], 0.1, method="cosine")
    # the LambdaLR actually applies it, and its settings survive state_dict
    sol = SolverConfig(lr=2.5e-5, warmup_iters=4, warmup_factor=0.01, steps=[6], gamma=0.1)
    opt = build_optimizer(nn.Linear(2, 2), sol); sched = build_scheduler(opt, sol)
    lrs = []
    for _ in range(8): lrs.append(opt.param_groups[0]["lr"]); opt.step(); sched.step()
    assert lrs == pytest.approx([2.5e-7, 2.5e-5 * (0.01 + 0.99 / 4), 2.5e-5 * (0.01 + 0.99 / 2),
                                 2.5e-5 * (0.01 + 0.99 * 3 / 4), 2.5e-5, 2.5e-5, 2.5e-6, 2.5e-6])
    assert sched.state_dict()["lr_lambdas"][0]["steps"] == [6]


def test_param_groups_switch_and_optimizers():
    m = ToyDetector()
    n = sum(p.numel() for p in m.parameters())
    (all_,) = param_groups(m, 1e-4)  # official ISTR: everything decays
    assert all_["weight_decay"] == 1e-4 and sum(p.numel() for p in all_["params"]) == n
    decay, no_decay = param_groups(m, 1e-4, decay_norm_bias=False)
    assert {id(p) for p in decay["params"]} == {id(m.features[0].weight), id(m.box.weight), id(m.cls.weight)}
    assert no_decay["weight_decay"] == 0.0 and id(m.norm.weight) in {id(p) for p in no_decay["params"]}
    m.cls.weight.requires_grad_(False)
    assert id(m.cls.weight) not in {id(p) for g in param_groups(m, 1e-4) for p in g["params"]}
    assert isinstance(build_optimizer(m, SolverConfig()), torch.optim.AdamW)
    assert isinstance(build_optimizer(m, SolverConfig(optimizer="sgd", momentum=0.9)), torch.optim.SGD)
    with pytest.raises(ConfigError, match="solver.optimizer"):
        build_optimizer(m, SolverConfig(optimizer="lamb"))


def test_total_loss():
    assert total_loss({"loss_a": torch.tensor(1.0), "loss_b": torch.tensor(2.0), "aux": torch.tensor(9.0)}) == 3.0
    assert total_loss({"loss": torch.tensor(5.0), "loss_a": torch.tensor(1.0)}) == 5.0
    with pytest.raises(ValueError, match="loss"):
        total_loss({"acc": torch.tensor(1.0)})


# --- data order -------------------------------------------------------------------------------------
def test_sampler_is_resumable_and_splits_over_ranks():
    s = ResumableSampler(7, seed=5)
    it = iter(s); stream = [next(it) for _ in range(30)]
    assert sorted(i for i, _ in stream[:7]) == list(range(7)) and sorted(i for i, _ in stream[7:14]) == list(range(7))
    assert stream[:7] != stream[7:14]
    for k in (0, 3, 7, 12):
        s.set_start(k); it = iter(s)
        assert [next(it) for _ in range(30 - k)] == stream[k:]
    # 2 ranks, 7 samples: padded to 8 by wrapping, interleaved = the one-process order of the padded epoch
    r0, r1 = ResumableSampler(7, seed=5, rank=0, world_size=2), ResumableSampler(7, seed=5, rank=1, world_size=2)
    a, b = iter(r0), iter(r1)
    ea, eb = [next(a) for _ in range(4)], [next(b) for _ in range(4)]
    assert {i for i, _ in ea + eb} == set(range(7))
    assert [i for pair in zip(ea, eb) for i, _ in pair][:7] == [i for i, _ in stream[:7]]


def test_seeded_samples_independent_of_workers_and_caller_rng():
    ds = SeededSamples(ToySquares(16))
    keys = [(i, 1000 + i) for i in range(16)]
    torch.manual_seed(1); ref = torch.rand(2)
    torch.manual_seed(1); first = [ds[k][0] for k in keys]; after = torch.rand(2)
    assert torch.equal(ref, after)  # loading in the main process leaves the training RNG alone
    loader = torch.utils.data.DataLoader(ds, batch_size=4, sampler=keys, num_workers=2, collate_fn=toy_collate,
                                         worker_init_fn=engine.seed_worker)
    via_workers = torch.cat([imgs for imgs, _ in loader])
    assert torch.equal(via_workers, torch.stack(first))
    seeds_differ = [ds[(3, s)][0] for s in range(20)]
    assert any(not torch.equal(seeds_differ[0], x) for x in seeds_differ)  # the seed does drive the flip


def _coco_mini():
    env = os.environ.get("SEGBOOK_COCO_MINI")
    return Path(env) if env else Path(__file__).resolve().parents[2] / "shared" / "coco-mini"


def test_real_transforms_give_same_batches_with_and_without_workers():
    "COCO images through segbook.data's random resize + flip: the batch stream is a function of the seed only."
    data = pytest.importorskip("segbook.data")
    root = _coco_mini()
    if not (root / "annotations" / "instances_val2017.json").exists():
        pytest.skip(f"no coco-mini at {root}")
    ds = data.CocoInstances(root, "val2017", transforms=data.build_transforms(True, min_size=[64, 96, 128], max_size_cap=160))
    ds = torch.utils.data.Subset(ds, range(4))
    def batches(workers, start=0):
        loader = build_train_loader(ds, 2, seed=3, collate_fn=data.collate, num_workers=workers, rank=0, world_size=1)
        loader.sampler.set_start(start)
        it = iter(loader)
        return [next(it) for _ in range(3 - start // 2)]
    a, b, c = batches(0), batches(2), batches(0, start=2)
    sizes = {tuple(t["size"].tolist()) for imgs, ts in a for t in ts}
    assert len(sizes) > 1  # the random resize did draw different sizes
    for (ia, ta), (ib, tb) in zip(a, b):
        assert torch.equal(ia, ib) and all(torch.equal(x["boxes"], y["boxes"]) for x, y in zip(ta, tb))
    assert len(c) == 2
    for (ia, _), (ic, _) in zip(a[1:], c):  # resumed after 1 batch: the same tail (batch 3 starts epoch 2)
        assert torch.equal(ia, ic)


def test_global_batch_must_divide():
    with pytest.raises(ConfigError, match="batch_size"):
        build_train_loader(ToySquares(8), batch_size=5, seed=0, rank=0, world_size=2)


# --- training ---------------------------------------------------------------------------------------
def test_toy_loss_falls_and_metrics_logged(tmp_path):
    cfg = toy_cfg(40, eval_period=20)
    evals = []
    def evaluate(model):
        assert not model.training and not torch.is_grad_enabled()
        evals.append(1); return {"n": len(evals)}
    model, result = toy_run(tmp_path, cfg, evaluate_fn=evaluate)
    rows = metrics(tmp_path)
    logs = [r for r in rows if "loss" in r]
    assert [r["iter"] for r in logs] == list(range(5, 41, 5))
    assert set(logs[0]) == {"iter", "lr", "loss", "loss_box", "loss_cls", "grad_norm"}
    assert logs[-1]["loss"] < 0.6 * logs[0]["loss"], [r["loss"] for r in logs]
    assert all(logs[-1][k] < 0.8 * logs[0][k] for k in ("loss_box", "loss_cls")), logs
    assert [r["eval"] for r in rows if "eval" in r] == [{"n": 1}, {"n": 2}] and model.training
    assert logs[-1]["lr"] == pytest.approx(1e-4)  # after the step at 25
    assert result["iteration"] == 40 and load_checkpoint(tmp_path / "last.pt")["iteration"] == 40
    assert (tmp_path / "config.yaml").exists()


def test_amp_request_on_cpu_warns_and_runs_fp32(tmp_path):
    cfg = toy_cfg(2, log_period=1)
    cfg.solver.amp = "bf16"
    with pytest.warns(UserWarning, match="CUDA only"):
        model, _ = toy_run(tmp_path, cfg)
    assert all(p.dtype == torch.float32 for p in model.parameters())


def test_resume_after_stop_is_exact(tmp_path):
    full, _ = toy_run(tmp_path / "full", toy_cfg(30))
    stopped, _ = toy_run(tmp_path / "part", toy_cfg(20))          # "killed" after the checkpoint at 20
    assert not same_weights(full, stopped)
    with open(tmp_path / "part" / "metrics.jsonl", "a") as f:  # what a killed run may leave: lines past the
        f.write('{"iter": 25, "loss": 9.0}\n{"iter": 26, "lo')     # checkpoint, the last one cut short
    resumed, _ = toy_run(tmp_path / "part", toy_cfg(30), resume=True)  # fresh model, optimizer, loader
    assert same_weights(full, resumed)
    assert metrics(tmp_path / "full") == metrics(tmp_path / "part")


def test_resuming_a_finished_run_still_returns_its_evaluation(tmp_path):
    "An experiment re-run after an interruption resumes its finished runs: they must still report their numbers."
    evaluate = lambda m: {"w_sum": float(sum(p.sum() for p in m.parameters()))}
    _, first = toy_run(tmp_path, toy_cfg(10), evaluate_fn=evaluate)
    log = (tmp_path / "metrics.jsonl").read_text()
    _, again = toy_run(tmp_path, toy_cfg(10), resume=True, evaluate_fn=evaluate)
    assert first["eval"] is not None and again["eval"] == first["eval"]
    assert (tmp_path / "metrics.jsonl").read_text() == log  # the finished run's log is not appended to
    lines = log.splitlines()                                # killed during its final evaluation: the checkpoint
    (tmp_path / "metrics.jsonl").write_text("\n".join(lines[:-1]) + "\n")  # is saved first, the eval line missing
    _, third = toy_run(tmp_path, toy_cfg(10), resume=True, evaluate_fn=evaluate)
    assert third["eval"] == first["eval"] and (tmp_path / "metrics.jsonl").read_text() == log


def test_resume_with_changed_solver_warns(tmp_path):
    toy_run(tmp_path, toy_cfg(10))
    cfg = toy_cfg(12); cfg.solver.lr = 5e-3
    with pytest.warns(UserWarning, match="solver.lr"):
        toy_run(tmp_path, cfg, resume=True)


def test_fresh_run_starts_quietly_and_a_resumed_one_says_so(tmp_path, capsys):
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # any warning fails the test
        toy_run(tmp_path, toy_cfg(2), resume=True)  # what `segbook train` passes: resume if there is a checkpoint
    assert "resume" not in capsys.readouterr().out
    toy_run(tmp_path, toy_cfg(4), resume=True)
    assert f"[resume] {tmp_path / 'last.pt'}: iteration 2 of 4" in capsys.readouterr().out


def test_lr_scaled_by_global_batch_in_train(tmp_path, capsys):
    "A TrainConfig built in code with solver.reference_batch: train applies the linear rule once and saves the result."
    cfg = toy_cfg(3, batch_size=8, log_period=1)
    cfg.solver.reference_batch, cfg.solver.warmup_iters = 2, 0  # lr 1e-3 x 8 / 2
    _, result = toy_run(tmp_path, cfg)
    assert result["metrics"]["lr"] == pytest.approx(4e-3) and "solver.lr 0.001 -> 0.004" in capsys.readouterr().out
    saved = load_config(tmp_path / "config.yaml")
    assert saved.solver.lr == pytest.approx(4e-3) and saved.solver.reference_batch == 0
    assert load_checkpoint(tmp_path / "last.pt")["config"]["solver"]["lr"] == pytest.approx(4e-3)
    assert cfg.solver.lr == 1e-3  # the caller's config is not modified


_KILL_SCRIPT = """
import sys; sys.path.insert(0, {tests!r})
import torch; torch.set_num_threads(1)
from test_engine import toy_cfg, toy_run
toy_run({out!r}, toy_cfg(40, num_workers=2), delay=0.05)
"""


def test_resume_after_sigkill_is_exact(tmp_path):
    "A real training process (2 loader workers) is SIGKILLed after a checkpoint; resuming gives the uninterrupted weights."
    out = tmp_path / "killed"
    script = tmp_path / "run.py"
    script.write_text(_KILL_SCRIPT.format(tests=str(TESTS), out=str(out)))
    proc = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline, it = time.time() + 40, 0
    try:
        while time.time() < deadline and proc.poll() is None:
            if (out / "last.pt").exists():
                it = load_checkpoint(out / "last.pt")["iteration"]
                if it >= 10: break
            time.sleep(0.05)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    assert proc.returncode == -signal.SIGKILL, proc.stderr.read().decode()[-2000:]
    it = load_checkpoint(out / "last.pt")["iteration"]
    assert 10 <= it < 40, it
    resumed, _ = toy_run(out, toy_cfg(40, num_workers=1), resume=True)   # other worker count: same samples
    full, _ = toy_run(tmp_path / "full", toy_cfg(40, num_workers=0))
    assert same_weights(full, resumed)
    assert metrics(out) == metrics(tmp_path / "full")


# --- atomic checkpoints -----------------------------------------------------------------------------
def test_crash_during_save_keeps_previous_checkpoint(tmp_path, monkeypatch):
    path = tmp_path / "last.pt"
    atomic_save({"iteration": 1, "w": torch.ones(3)}, path)
    real_save = torch.save
    def crashing_save(obj, f, *a, **k):
        f.write(b"PK\x03\x04 half a checkpoint")  # partial bytes into the open temporary file, then the "crash"
        raise OSError("disk full")
    monkeypatch.setattr(torch, "save", crashing_save)
    with pytest.raises(OSError, match="disk full"):
        atomic_save({"iteration": 2, "w": torch.zeros(3)}, path)
    monkeypatch.setattr(torch, "save", real_save)
    ck = load_checkpoint(path)
    assert ck["iteration"] == 1 and torch.equal(ck["w"], torch.ones(3))
    assert [p.name for p in tmp_path.iterdir()] == ["last.pt"]  # temp file removed


def test_crash_in_training_save_keeps_last_good_checkpoint(tmp_path, monkeypatch):
    calls = {"n": 0}
    real_save = torch.save
    def second_save_crashes(obj, f, *a, **k):
        calls["n"] += 1
        if calls["n"] == 2:
            f.write(b"truncated"); raise KeyboardInterrupt  # killed while writing
        return real_save(obj, f, *a, **k)
    monkeypatch.setattr(torch, "save", second_save_crashes)
    with pytest.raises(KeyboardInterrupt):
        toy_run(tmp_path, toy_cfg(30))
    assert load_checkpoint(tmp_path / "last.pt")["iteration"] == 10


def test_resume_removes_what_a_killed_checkpoint_write_left(tmp_path, capsys):
    toy_run(tmp_path, toy_cfg(10))
    (tmp_path / ".last.pt.k1ll3d.tmp").write_bytes(b"PK half")        # SIGKILL between write and rename
    (tmp_path / ".metrics.jsonl.x.tmp").write_text("")                # another file's: left alone
    toy_run(tmp_path, toy_cfg(20), resume=True)
    assert "removed 1 unfinished checkpoint file" in capsys.readouterr().out
    assert sorted(p.name for p in tmp_path.glob(".*.tmp")) == [".metrics.jsonl.x.tmp"]
    assert load_checkpoint(tmp_path / "last.pt")["iteration"] == 20


def test_unreadable_checkpoint_names_file(tmp_path):
    bad = tmp_path / "last.pt"; bad.write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="last.pt: cannot read checkpoint"):
        load_checkpoint(bad)


# --- distributed ------------------------------------------------------------------------------------
_DDP_SCRIPT = """
import sys; sys.path.insert(0, {tests!r})
import torch; torch.set_num_threads(1)
from segbook.engine import init_distributed
info = init_distributed()
assert info.world_size == 2 and torch.distributed.get_backend() == "gloo"
from test_engine import toy_cfg, toy_run
toy_run({out!r}, toy_cfg(6, batch_size=8, log_period=3, checkpoint_period=3), dropout=0.0, n=32)
torch.distributed.destroy_process_group()
"""


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0)); return s.getsockname()[1]


def test_ddp_two_gloo_processes_equal_one(tmp_path):
    "torchrun, 2 CPU processes x 4 images == 1 process x 8 images: same weights after 6 AdamW steps."
    out = tmp_path / "ddp"
    script = tmp_path / "ddp.py"
    script.write_text(_DDP_SCRIPT.format(tests=str(TESTS), out=str(out)))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                        "--master_addr", "127.0.0.1", "--master_port", str(_free_port()), str(script)],
                       capture_output=True, text=True, timeout=120, env=env)
    assert r.returncode == 0, r.stderr[-3000:]
    ck = load_checkpoint(out / "last.pt")
    assert ck["iteration"] == 6 and ck["data"]["world_size"] == 2 and ck["data"]["per_rank_batch"] == 4
    assert len(ck["rng"]) == 2  # both ranks' RNG states
    single, _ = toy_run(tmp_path / "one", toy_cfg(6, batch_size=8, log_period=3, checkpoint_period=3), dropout=0.0, n=32)
    ddp = ToyDetector(dropout=0.0); ddp.load_state_dict(ck["model"])
    seed_everything(0); init = ToyDetector(dropout=0.0)
    assert not same_weights(init, ddp, atol=1e-4)  # it trained
    assert same_weights(single, ddp, atol=1e-6)
    m_ddp, m_one = metrics(out), metrics(tmp_path / "one")
    for a, b in zip(m_ddp, m_one):
        assert a.keys() == b.keys() and all(math.isclose(a[k], b[k], rel_tol=1e-5, abs_tol=1e-7) for k in a), (a, b)


class NaNAfter(ToyDetector):
    "The toy detector whose box loss (or, with `grad=True`, only its gradient) turns NaN from iteration `at` on."
    def __init__(self, at, grad=False, **kw):
        super().__init__(**kw); self.at, self.grad, self.calls = at, grad, 0
    def forward(self, images, targets=None):
        out = super().forward(images, targets)
        if self.training:
            self.calls += 1
            if self.calls >= self.at:
                if self.grad:   # finite value, NaN gradient: sqrt at 0 has an infinite derivative, times 0 -> NaN
                    out["loss_box"] = out["loss_box"] + 0.0 * torch.sqrt(self.box.weight.sum() * 0)
                else:
                    out["loss_box"] = out["loss_box"] * float("nan")
        return out


@pytest.mark.parametrize("grad", [False, True])
def test_nan_stops_before_the_step_and_keeps_the_last_good_checkpoint(tmp_path, grad):
    "A NaN loss (named by term) or gradient at iteration 13 stops the run there, before any optimizer step; the"
    " checkpoint of iteration 10 stays as it was and holds finite weights."
    cfg = toy_cfg(30, log_period=5, checkpoint_period=10)
    seed_everything(0)
    model = NaNAfter(13, grad=grad)
    loader = build_train_loader(ToySquares(48), cfg.data.batch_size, cfg.seed, toy_collate, 0)
    with pytest.raises(FloatingPointError, match="iteration 13") as e:
        train(model, loader, cfg, tmp_path, progress=False)
    assert ("gradient norm" in str(e.value)) if grad else ("loss_box=nan" in str(e.value)), str(e.value)
    ck = load_checkpoint(tmp_path / "last.pt")
    assert ck["iteration"] == 10 and all(torch.isfinite(v).all() for v in ck["model"].values() if v.is_floating_point())
    assert all(torch.isfinite(p).all() for p in model.parameters())   # the NaN never reached the weights either
