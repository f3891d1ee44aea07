#!/usr/bin/env bash
# One GPU-machine call: install the wheelhouse, compile FlashInfer's kernels in parallel, then run the
# steps named as arguments (tests, kernels, model, serve), teeing every log to $OUT.
#   bash bench/gpu_session.sh tests kernels
set -uo pipefail
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1
export FLASHINFER_WORKSPACE_BASE=/tmp/fiws FLASHINFER_NVCC_THREADS=4
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.total,clocks.sm,clocks.max.sm,temperature.gpu,power.draw --format=csv | tee "$OUT/gpu_smi.txt"
if [ -d .jitcache ]; then mkdir -p /tmp/fiws && cat .jitcache/*.tar.part* | tar -x -C /tmp/fiws; fi
python3 bench/gpu_warm.py 2>&1 | tee "$OUT/warm.log"
for step in "$@"; do
  case $step in
    tests) python3 -m pytest -q -m gpu tests/gpu -x -p no:cacheprovider 2>&1 | tee "$OUT/tests.log" ;;
    kernels) python3 bench/gpu_kernels.py --out "$OUT/gpu_kernels.json" 2>&1 | tee "$OUT/kernels.log" ;;
    *) echo "unknown step $step"; exit 2 ;;
  esac
done
du -sh /tmp/fiws/.cache/flashinfer 2>/dev/null; find /tmp/fiws -name '*.so' -size +1M -exec ls -la {} \; 2>/dev/null | head -20
