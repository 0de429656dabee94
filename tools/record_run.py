"""Record a finished `segbook train` run as a committed result: figures/results/NAME.json.

The file holds the exact commands, the machine, the git commit, the training curve summary (loss at the first and
last log, seconds per iteration) and every evaluation the run folder holds (`eval_*/metrics.json`), so a number in a
chapter or an issue note can always be traced to the run that made it.

    .venv/bin/python tools/record_run.py runs/istr_shapes_cpu --name istr_shapes_cpu \
        --command "segbook train --config configs/istr_shapes_cpu.yaml ..." --command "segbook eval ..."
"""
import argparse
import json
import os
import time
from pathlib import Path

import yaml

from segbook.reproduce import device_stamp, git_stamp


def summarise_log(metrics_jsonl:Path) -> dict:
    "First/last logged loss, iterations, mean seconds per iteration, and the periodic evaluations."
    rows = [json.loads(l) for l in metrics_jsonl.read_text().splitlines() if l.strip()]
    logs = [r for r in rows if "loss" in r]
    evals = [{"iter": r["iter"], **{k: v for k, v in r["eval"].items() if "AP" in k and "AR" not in k}}
             for r in rows if "eval" in r and isinstance(r["eval"], dict)]
    times = [r["time"] for r in logs if "time" in r]
    return {"iterations": logs[-1]["iter"] if logs else 0,
            "loss_first": logs[0]["loss"] if logs else None, "loss_last": logs[-1]["loss"] if logs else None,
            "seconds_per_iter_median": sorted(times)[len(times) // 2] if times else None,
            "periodic_eval": evals}


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("run", type=Path, help="run folder of `segbook train`")
    ap.add_argument("--name", required=True, help="figures/results/NAME.json")
    ap.add_argument("--command", action="append", default=[], help="a command that made the run (repeatable)")
    ap.add_argument("--note", default="", help="one line on the setting or the circumstances")
    ap.add_argument("--out", type=Path, default=Path("figures/results"))
    a = ap.parse_args()
    rec = {"name": a.name, "recorded": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "commands": a.command,
           "note": a.note, "device": device_stamp(), "git": git_stamp(),
           "config": yaml.safe_load((a.run / "config.yaml").read_text()),
           "training": summarise_log(a.run / "metrics.jsonl"),
           "evaluations": {p.parent.name: {k: v for k, v in json.loads(p.read_text()).items() if "AR" not in k}
                           for p in sorted(a.run.glob("eval_*/metrics.json"))}}
    a.out.mkdir(parents=True, exist_ok=True)
    path = a.out / f"{a.name}.json"
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(rec, indent=1) + "\n")
    os.replace(tmp, path)
    print(path)


if __name__ == "__main__":
    main()
