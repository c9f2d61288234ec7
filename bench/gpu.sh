#!/usr/bin/env bash
# The GPU benchmark on one machine with an NVIDIA GPU and no package index (docs/BENCHMARKS.md, "GPU").
#
#   bash bench/gpu_wheels.sh .whl          # here, with the package index: the wheel folder for that machine
#   bash bench/gpu.sh [WHEEL_DIR] [bench/gpu.py options...]   # there
#
# WHEEL_DIR holds the wheels of everything the project needs that the machine lacks (bench/gpu_wheels.sh resolves
# them against the machine's packages, bench/gpu_machine.txt, and checks they install with --no-index; about
# 20 MiB), plus an nvidia_dali_cuda*.whl when there is room for its ~424 MB (without it the DALI rows are skipped
# and evaluation decodes with torch on the GPU). Then bench/gpu.py runs the gpu-marked and dependency-floor tests,
# ViT-B/14 bf16 ZeRO-2 training, evaluation and DALI, prints one table and writes bench/results/gpu.json.
# GPU_BENCH_SECONDS (default 330) bounds the whole run, installs included: parts that no longer fit are skipped.
# Without a GPU (a dry check of this script) the GPU parts run their code paths on the CPU, tiny, marked "smoke".
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
WHEELS=""
if [[ $# -gt 0 && $1 != -* ]]; then
  WHEELS=$1
  shift
fi
started=$(date +%s)

missing=()
for spec in deepspeed:deepspeed astropy:astropy astropy_healpix:astropy-healpix webdataset:webdataset zarr:zarr pytest:pytest; do
  "$PY" -c "import ${spec%%:*}" 2>/dev/null || missing+=("${spec#*:}")
done
if ((${#missing[@]})); then
  if [[ -z $WHEELS || ! -d $WHEELS ]]; then
    echo "error: missing ${missing[*]} and no wheel folder given (bash bench/gpu.sh WHEEL_DIR)" >&2
    exit 2
  fi
  echo "installing ${missing[*]} from $WHEELS ($(du -sm --exclude='nvidia_dali*' "$WHEELS" | cut -f1) MiB without DALI)"
  "$PY" -m pip install --quiet --no-index --find-links "$WHEELS" "${missing[@]}"
fi
if ! "$PY" -c "import nvidia.dali" 2>/dev/null; then
  dali=$(ls "${WHEELS:-/nonexistent}"/nvidia_dali_cuda*.whl 2>/dev/null | head -n 1 || true)
  if [[ -n $dali ]]; then
    "$PY" -m pip install --quiet --no-index --find-links "$WHEELS" "$dali"
  else
    echo "note: no nvidia-dali installed and no nvidia_dali_cuda*.whl in ${WHEELS:-the (absent) wheel folder}:" \
         "the DALI rows are skipped, evaluation decodes with torch"
  fi
fi

export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
smoke=()
if ! "$PY" -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)"; then
  echo "no CUDA GPU: a dry check; the GPU parts run tiny on the CPU and their numbers are not measurements"
  smoke=(--smoke)
fi
# What the installs took comes off bench/gpu.py's budget.
budget=$((${GPU_BENCH_SECONDS:-330} - ($(date +%s) - started)))
rc=0
"$PY" bench/gpu.py "${smoke[@]}" --budget-s "$budget" "$@" || rc=$?

# The service row (bench/serve.py, docs/BENCHMARKS.md "Service"): ViT-B/14 behind `python -m launch serve` on the GPU.
# Guarded: it needs the 'serve' extra (fastapi, uvicorn, python-multipart; from WHEEL_DIR when there), runs only on
# a GPU, is bounded by SERVE_BENCH_SECONDS (default 150) and can never change this script's exit status.
if ((${#smoke[@]} == 0)); then
  if [[ -n $WHEELS && -d $WHEELS ]]; then
    "$PY" -m pip install --quiet --no-index --find-links "$WHEELS" fastapi uvicorn python-multipart \
        prometheus-client httpx 2>/dev/null || true
  fi
  if "$PY" -c "import fastapi, uvicorn, httpx, prometheus_client, multipart" 2>/dev/null; then
    timeout "${SERVE_BENCH_SECONDS:-150}" "$PY" bench/serve.py --model-config base --image-size 224 --device cuda \
        --concurrency 8,32 \
        --requests 400 --cores 16 --json bench/results/serve_gpu.json \
      || echo "note: the ViT-B service row failed or ran out of time (exit $?); the rows above stand"
  else
    echo "note: no fastapi/uvicorn/python-multipart here (the 'serve' extra): the ViT-B service row is skipped"
  fi
fi
exit "$rc"
