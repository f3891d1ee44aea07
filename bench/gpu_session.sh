#!/usr/bin/env bash
# One GPU-machine call: install the wheelhouse, compile FlashInfer's kernels in parallel, then run the
# steps named as arguments (tests, kernels, model, serve, profile, attention, gemm, mlp), teeing every log to $OUT.
#   bash bench/gpu_session.sh tests kernels
#   SERVE_ARGS="--clients 64" bash bench/gpu_session.sh serve     (bench/serve_bench.py, full stack)
#   TEST_PATHS="tests/gpu/test_extend_split.py" bash bench/gpu_session.sh tests profile   (some tests; the
#   cached step's per-kernel profile, bench/gpu_profile.py)
#   ATTN_ARGS="--cases 1x100_over_10k" bash bench/gpu_session.sh attention   (bench/extend_attention_bench.py)
#   STRUCTURED_ARGS="--tokenizer .bench/smollm2_tokenizer.json.gz" bash bench/gpu_session.sh structured
#     (bench/structured_bench.py; the tokenizer file is carried, git-ignored: export it with
#     python -m bench.structured_bench --export-tokenizer .bench/smollm2_tokenizer.json.gz)
set -uo pipefail
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1
export FLASHINFER_WORKSPACE_BASE=/tmp/fiws FLASHINFER_NVCC_THREADS=4
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.total,clocks.sm,clocks.max.sm,temperature.gpu,power.draw --format=csv | tee "$OUT/gpu_smi.txt"
# Kernels compiled on an earlier machine (bench results carry them back as jit.tar.part0) load as
# FlashInfer AOT modules: <package>/data/aot/<name>/<name>.so skips the JIT build entirely.
if [ -d .jitcache ]; then
  mkdir -p /tmp/jitx
  # xz-compressed (jit.txz.part*, half gzip's size: the carried tree is capped at 64 MiB) or gzip (older)
  if ls .jitcache/*.txz.part* >/dev/null 2>&1; then
    cat .jitcache/*.txz.part* | python3 -c "import sys, tarfile; tarfile.open(fileobj=sys.stdin.buffer, mode='r|xz').extractall('/tmp/jitx')"
  else
    cat .jitcache/*.tar.part* | tar -xz -C /tmp/jitx
  fi
  for so in $(find /tmp/jitx -name '*.so'); do
    name=$(basename "$so" .so); mkdir -p "/tmp/site/flashinfer/data/aot/$name"; cp "$so" "/tmp/site/flashinfer/data/aot/$name/"
  done
fi
python3 bench/gpu_warm.py 2>&1 | tee "$OUT/warm.log"
# SMI_TRACE=1: the card's clocks, power and temperature every 200 ms while the steps run (to tell the
# card's own drift from a change in the code when figures move between rounds).
if [ "${SMI_TRACE:-0}" = 1 ]; then
  nvidia-smi --query-gpu=timestamp,clocks.sm,clocks.mem,power.draw,temperature.gpu,clocks_event_reasons.active \
    --format=csv,nounits -lms 200 > "$OUT/smi_trace.csv" 2>&1 &
fi
# Each step under its own time limit (STEP_TIMEOUT seconds), so one that hangs leaves the rest their time.
T="timeout ${STEP_TIMEOUT:-590}"
for step in "$@"; do
  case $step in
    tests) $T python3 -m pytest -q -m gpu ${TEST_PATHS:-tests/gpu} -p no:cacheprovider 2>&1 | tee "$OUT/tests.log" ;;
    profile) $T python3 bench/gpu_profile.py --out "$OUT/gpu_profile.json" ${PROFILE_ARGS:-} 2>&1 | tee "$OUT/profile.log" ;;
    serve) $T python3 -m bench.serve_bench --out "$OUT/serve_bench.json" ${SERVE_ARGS:-} 2>&1 | tee "$OUT/serve.log" ;;
    kernels) $T python3 bench/gpu_kernels.py --out "$OUT/gpu_kernels.json" 2>&1 | tee "$OUT/kernels.log" ;;
    attention) $T python3 bench/extend_attention_bench.py --out "$OUT/extend_attention.json" ${ATTN_ARGS:-} 2>&1 | tee "$OUT/attention.log" ;;
    model) $T python3 bench/gpu_model_bench.py --out "$OUT/gpu_model.json" ${MODEL_ARGS:-} 2>&1 | tee "$OUT/model.log" ;;
    gemm) $T python3 bench/gemm_bench.py --out "$OUT/gemm.json" 2>&1 | tee "$OUT/gemm.log" ;;
    mlp) $T python3 bench/fused_mlp_bench.py --out "$OUT/fused_mlp.json" ${MLP_ARGS:-} 2>&1 | tee "$OUT/mlp.log" ;;
    structured) $T python3 -m bench.structured_bench --out "$OUT/structured.json" ${STRUCTURED_ARGS:-} 2>&1 | tee "$OUT/structured.log" ;;
    *) echo "unknown step $step"; exit 2 ;;
  esac
done
du -sh /tmp/fiws/.cache/flashinfer 2>/dev/null; find /tmp/fiws -name '*.so' -exec ls -la {} \; 2>/dev/null | head -20
# The compiled kernels travel back only if they fit beside the 53 MiB wheelhouse in the 64 MiB tree.
if [ -n "$(find /tmp/fiws -name '*.so' 2>/dev/null)" ]; then
  mkdir -p /tmp/jitx && find /tmp/fiws -name '*.so' -exec cp {} /tmp/jitx/ \;
  python3 -c "
import pathlib, tarfile
with tarfile.open('/tmp/jit.txz', 'w:xz') as t:
    for p in pathlib.Path('/tmp/jitx').glob('*.so'):
        t.add(p, p.name)" && ls -la /tmp/jit.txz || exit 0
  if [ "$(stat -c %s /tmp/jit.txz)" -lt 9500000 ]; then cp /tmp/jit.txz "$OUT/jit.txz.part0"; fi
fi
