#!/usr/bin/env bash
# One command for a CUDA machine: the checks and benchmarks that need a GPU, in under 8 minutes.
#
#   bash tools/gpu_check.sh
#
# Steps (each under its own `timeout`, 465 s in all; a failed or timed-out step is recorded and the next one runs):
#   1. tests       pytest of the tests that skip without CUDA (Triton gather vs roi_align, PCA codec on CUDA)
#   2. gather      Triton gather_points = torch gather_points on CUDA, values and gradients, float32
#   3. bench_fp32  segbook bench ISTR-R50 vs Mask R-CNN R50 at 800x1333, float32
#   4. bench_bf16  the same under bf16 autocast
#   5. refine      Mask Transfiner refinement efficiency (experiment transfiner_table7_efficiency, gpu profile)
#   6. chunk1      the rest of the gpu profile's first chunk (segbook.reproduce.GPU_CHUNKS[0]): with step 5
#                  this is `segbook reproduce --profile gpu --only <GPU_CHUNKS[0]>`
# Results: benchmarks/results/gpu/<device>_*.json and benchmarks/results/gpu/<device>_gpu_check.json (every
# step's status, seconds and command), <device> = torch.cuda.get_device_name() as a file-name slug; executed
# notebooks and their figures under runs/gpu_check/ (the repository's figures/ are not touched). If $OUT is
# set (a device runner's output folder), both are copied there too.
#
# Environment (the device has no network; the caller carries what is missing):
#   PYTHON            interpreter with torch, torchvision and triton installed (default: .venv/bin/python if
#                     the checkout has one, else python3)
#   SEGBOOK_WHEELS    folder of wheels for segbook's other dependencies, installed with --no-index --no-deps
#                     when they are not importable. Build it on a machine with network:
#                         pip wheel -w wheels/ ".[dev]" && rm -f wheels/torch-* wheels/torchvision-* wheels/triton-* wheels/nvidia_* wheels/segbook-*
#                     segbook itself is not installed: it runs from this checkout (PYTHONPATH), `python -m segbook.cli`.
#   SEGBOOK_COCO_MINI coco-mini root for the chunk's parts that need real masks (default: ../shared/coco-mini if present)
#
# Without a CUDA device it prints one line and exits 1, running nothing.
set -uo pipefail
cd "$(dirname "$0")/.."
REPO=$(pwd)
PY=${PYTHON:-python3}
if [ -z "${PYTHON:-}" ] && [ -x .venv/bin/python ]; then PY=.venv/bin/python; fi
export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}"

if ! "$PY" -c "import torch" >/dev/null 2>&1; then
  echo "gpu_check: $PY cannot import torch; install torch/torchvision/triton first (or set PYTHON)"; exit 1
fi
if ! "$PY" -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)" >/dev/null 2>&1; then
  echo "gpu_check: no CUDA device (torch.cuda.is_available() is False); nothing run"; exit 1
fi

DEPS="import yaml, pycocotools, scipy, matplotlib, papermill, tqdm, pytest, segbook.cli, segbook.reproduce"
if ! "$PY" -c "$DEPS" >/dev/null 2>&1; then
  if [ -z "${SEGBOOK_WHEELS:-}" ] || [ ! -d "${SEGBOOK_WHEELS}" ]; then
    echo "gpu_check: segbook's dependencies are not importable and SEGBOOK_WHEELS names no wheel folder (see the header of tools/gpu_check.sh)"; exit 1
  fi
  "$PY" -m pip install --quiet --no-index --no-deps "$SEGBOOK_WHEELS"/*.whl || { echo "gpu_check: pip install from $SEGBOOK_WHEELS failed"; exit 1; }
  "$PY" -c "$DEPS" || { echo "gpu_check: still missing a dependency after installing $SEGBOOK_WHEELS"; exit 1; }
fi

DEVICE_NAME=$("$PY" -c "import torch; print(torch.cuda.get_device_name(0))")
SLUG=$(printf '%s' "$DEVICE_NAME" | tr -cs 'A-Za-z0-9' '_' | sed 's/^_*//; s/_*$//')
RES="benchmarks/results/gpu"; RUNS="runs/gpu_check"
mkdir -p "$RES" "$RUNS"
COCO=${SEGBOOK_COCO_MINI:-}
if [ -z "$COCO" ] && [ -d ../shared/coco-mini ]; then COCO=../shared/coco-mini; fi
DATA_ARG=(); if [ -n "$COCO" ]; then DATA_ARG=(--data "$COCO"); fi
CHUNK1=$("$PY" -c "from segbook.reproduce import GPU_CHUNKS; print(' '.join(n for n in GPU_CHUNKS[0] if n != 'transfiner_table7_efficiency'))")
STEPS_JSON="$RUNS/steps.jsonl"; : > "$STEPS_JSON"
echo "gpu_check: $DEVICE_NAME -> $RES/${SLUG}_*.json"

step() {  # step NAME SECONDS CMD... : run under timeout, log to $RUNS/NAME.log, record status and seconds
  local name=$1 limit=$2; shift 2
  local t0=$SECONDS
  timeout --kill-after=10 "$limit" "$@" > "$RUNS/$name.log" 2>&1
  local rc=$?
  local status=ok; [ $rc -ne 0 ] && status=failed; [ $rc -eq 124 ] || [ $rc -eq 137 ] && status=timeout
  echo "  $name: $status (rc $rc, $((SECONDS - t0)) s, limit $limit s; log $RUNS/$name.log)"
  "$PY" - "$name" "$status" "$rc" "$((SECONDS - t0))" "$limit" "$*" >> "$STEPS_JSON" <<'EOF'
import json, sys
n, s, rc, sec, lim, cmd = sys.argv[1:]
print(json.dumps(dict(step=n, status=s, rc=int(rc), seconds=int(sec), limit_s=int(lim), command=cmd)))
EOF
}

step tests 70 "$PY" -m pytest -q -rs -p no:cacheprovider tests/test_gather.py tests/test_embeddings.py -k cuda

step gather 45 "$PY" - "$RES/${SLUG}_gather_triton_vs_torch.json" <<'EOF'
import json, sys, torch
from segbook.gather import gather_points
g = torch.Generator().manual_seed(0)
dev = "cuda"
feats = [torch.randn(2, 256, 200, 304, generator=g).to(dev), torch.randn(2, 256, 100, 152, generator=g).to(dev)]
R, M, S = 100, 20000, 56
xy = torch.rand(R, 2, generator=g) * 600; wh = torch.rand(R, 2, generator=g) * 400 + 8
boxes = torch.cat([torch.randint(0, 2, (R, 1), generator=g).float(), xy, xy + wh], 1).to(dev)
yx = torch.randint(0, S, (M, 2), generator=g).to(dev); roi = torch.randint(0, R, (M,), generator=g).to(dev)
lvl = torch.randint(0, 2, (M,), generator=g).to(dev)
fa = [f.clone().requires_grad_() for f in feats]; fb = [f.clone().requires_grad_() for f in feats]
a = gather_points(fa, boxes, S, yx, roi, [0.25, 0.125], node_level=lvl, backend="triton")
b = gather_points(fb, boxes, S, yx, roi, [0.25, 0.125], node_level=lvl, backend="torch")
w = torch.randn(a.shape, generator=g).to(dev)
(a * w).sum().backward(); (b * w).sum().backward()
res = dict(device_name=torch.cuda.get_device_name(0), nodes=M, channels=256, grid=S,
           max_abs_diff_values=(a - b).abs().max().item(),
           max_abs_diff_grads=max((x.grad - y.grad).abs().max().item() for x, y in zip(fa, fb)))
json.dump(res, open(sys.argv[1], "w"), indent=1)
print(res)
torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
for x, y in zip(fa, fb):
    torch.testing.assert_close(x.grad, y.grad, atol=1e-4, rtol=1e-4)
EOF

for amp in none bf16; do
  tag=$([ "$amp" = none ] && echo fp32 || echo bf16)
  step "bench_$tag" 90 "$PY" -m segbook.cli bench --model configs/istr_r50_coco.yaml --vs maskrcnn_r50 --device cuda \
    --size 800x1333 --iters 30 --warmup 10 --amp "$amp" --out "$RES/${SLUG}_bench_r50_800x1333_$tag.json"
done

step refine 60 "$PY" -m segbook.cli reproduce --profile gpu --only transfiner_table7_efficiency "${DATA_ARG[@]}" \
  --out "$RUNS/refine" --figures "$RUNS/refine_figures"
[ -f "$RUNS/refine/runs/transfiner_table7_efficiency/results.json" ] && cp "$RUNS/refine/runs/transfiner_table7_efficiency/results.json" "$RES/${SLUG}_transfiner_table7_efficiency.json"

# shellcheck disable=SC2086
step chunk1 110 "$PY" -m segbook.cli reproduce --profile gpu --only $CHUNK1 "${DATA_ARG[@]}" \
  --out "$RUNS/chunk1" --figures "$RUNS/chunk1_figures"

"$PY" - "$STEPS_JSON" "$RES/${SLUG}_gpu_check.json" "$DEVICE_NAME" <<'EOF'
import json, subprocess, sys, datetime, torch
steps = [json.loads(l) for l in open(sys.argv[1]) if l.strip()]
commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip() or None
json.dump(dict(device_name=sys.argv[3], torch=torch.__version__, cuda=torch.version.cuda, commit=commit,
               date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"), steps=steps),
          open(sys.argv[2], "w"), indent=1)
EOF
if [ -n "${OUT:-}" ] && [ -d "${OUT}" ]; then cp -r "$RES" "$OUT/" && cp -r "$RUNS" "$OUT/" 2>/dev/null; fi
FAILED=$(grep -c '"status": "\(failed\|timeout\)"' "$STEPS_JSON")
echo "gpu_check: $((6 - FAILED))/6 steps ok; summary $RES/${SLUG}_gpu_check.json"
[ "$FAILED" -eq 0 ]
