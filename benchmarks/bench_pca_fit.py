"""Benchmark the streaming PCA fit of `segbook.embeddings` (ISTR Eq. 3).

Streams N random 28x28 binary masks (generated in chunks) through `MaskMoments`, solves the
eigenproblem, and records seconds and peak resident memory. Each configuration runs in its own
subprocess so that `ru_maxrss` (a process-lifetime peak) measures that configuration alone; the
reported figure is the peak minus the resident size right after imports. A one-shot fit (all N
masks materialised as one float64 matrix, then XᵀX) at a smaller N shows what streaming avoids.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/bench_pca_fit.py --threads 1 [--n 1000000] [--n-small 100000] [--chunk 65536]

Target (issue #17): the 1M-mask streaming fit in <= 60 s on one thread, with peak memory independent of n.
The 1-minute load average is recorded before and after each run: the machine may be shared.

Writes benchmarks/results/pca_fit.json (temp file + rename).
"""
import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def _rss_mib() -> float:
    "Current resident set size in MiB (Linux /proc)."
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def _run_one(mode: str, n: int, chunk: int, threads: int = 0) -> dict:
    import torch
    from segbook.embeddings import MaskMoments, PCACodec
    if threads:
        torch.set_num_threads(threads)
    torch.manual_seed(0)
    load_before = os.getloadavg()[0]
    base = _rss_mib()
    t0 = time.perf_counter()
    if mode == "streaming":
        moments = MaskMoments(28)
        done = 0
        while done < n:
            b = min(chunk, n - done)
            moments.update((torch.rand(b, 28, 28) < 0.5).to(torch.uint8))
            done += b
    else:  # one-shot: the whole data matrix in memory, in float64
        x = (torch.rand(n, 28, 28) < 0.5).to(torch.float64).reshape(n, -1)
        moments = MaskMoments(28)
        moments.second = x.T @ x
        moments.sum = x.sum(0)
        moments.count = n
    t_acc = time.perf_counter() - t0
    codec = PCACodec.from_moments(moments, 60)
    seconds = time.perf_counter() - t0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
    return dict(mode=mode, n=n, chunk=chunk if mode == "streaming" else None, torch_threads=torch.get_num_threads(),
                loadavg_1min_before=round(load_before, 2), loadavg_1min_after=round(os.getloadavg()[0], 2),
                seconds=round(seconds, 3),
                seconds_accumulate=round(t_acc, 3), masks_per_second=round(n / seconds),
                rss_after_imports_mib=round(base, 1), peak_rss_mib=round(peak, 1),
                peak_delta_mib=round(peak - base, 1), energy_60=round(codec.energy(60), 6))


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=1_000_000, help="masks in the big streaming run")
    ap.add_argument("--n-small", type=int, default=100_000, help="masks in the streaming vs one-shot comparison")
    ap.add_argument("--chunk", type=int, default=65536, help="masks per streamed chunk")
    ap.add_argument("--threads", type=int, default=0, help="torch intra-op threads (0: leave torch's default)")
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "pca_fit.json"))
    ap.add_argument("--one", nargs=3, metavar=("MODE", "N", "CHUNK"), help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.one:
        print(json.dumps(_run_one(a.one[0], int(a.one[1]), int(a.one[2]), a.threads)))
        return
    import torch
    if a.threads:
        torch.set_num_threads(a.threads)
    runs = []
    for mode, n in (("streaming", a.n_small), ("one-shot", a.n_small), ("streaming", a.n)):
        out = subprocess.run([sys.executable, __file__, "--one", mode, str(n), str(a.chunk), "--threads", str(a.threads)],
                             check=True, capture_output=True, text=True).stdout
        runs.append(json.loads(out.strip().splitlines()[-1]))
        print(json.dumps(runs[-1]), flush=True)
    result = dict(
        benchmark="pca_fit", command=" ".join([Path(sys.executable).name, *sys.argv]),
        device="cpu", cpu=platform.processor() or platform.machine(), cpu_count=os.cpu_count(),
        torch_threads=torch.get_num_threads(), torch=torch.__version__, python=platform.python_version(),
        load_average=os.getloadavg(), date=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), runs=runs,
        note="peak_delta_mib = ru_maxrss - RSS after imports, one subprocess per run; "
             "streaming memory should not grow with n, one-shot grows as n*784*8 bytes",
        target_seconds_1m_one_thread=60)
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=out.name + ".", suffix=".tmp", dir=out.parent)
    with os.fdopen(fd, "w") as fh:
        fh.write(json.dumps(result, indent=1) + "\n")
    os.replace(tmp, out)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
