#!/usr/bin/env bash
# GPU check of the fused kernels, in one call on a CUDA machine:
#   1. tests/kernels on CUDA, every dtype (fp32/fp16/bf16): RLHF_TEST_DEVICE=cuda, interpreter off;
#   2. the GPU benchmark (bf16, the GPU shapes in bench_kernels.py) -> benchmarks/results/.
# Usage: bash benchmarks/gpu_check.sh            (env: PY=python to force an interpreter,
#        BENCH_ARGS="--providers ours_triton torch_eager" to narrow the benchmark,
#        SKIP_BENCH=1 to run the tests only)
# Needs on that machine: torch with CUDA, triton, pytest (transformers optional: one test skips).
set -uo pipefail
cd "$(dirname "$0")/.."
ROOT=$(pwd)
OUT_DIR="$ROOT/benchmarks/results"
mkdir -p "$OUT_DIR"

# An interpreter whose torch sees the GPU: $PY, else the project venv, else python3 / python.
pick_python() {
  for cand in ${PY:-} "$ROOT/.venv/bin/python" python3 python; do
    [ -n "$cand" ] || continue
    command -v "$cand" >/dev/null 2>&1 || [ -x "$cand" ] || continue
    if "$cand" -c "import torch, triton, sys; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; then
      echo "$cand"; return 0
    fi
  done
  return 1
}
PYBIN=$(pick_python) || { echo "gpu_check: no python with CUDA torch + triton found (set PY=...)" >&2; exit 2; }

unset TRITON_INTERPRET                  # compile the kernels for the GPU
export RLHF_TEST_DEVICE=cuda HF_HUB_OFFLINE=1
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"   # `kernels` importable without an install

{
  echo "# gpu_check $(date -u +%FT%TZ)"
  "$PYBIN" -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__, torch.cuda.get_device_name())"
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null || true
} | tee "$OUT_DIR/kernels_gpu_check.log"

if ! "$PYBIN" -c "import pytest" 2>/dev/null; then
  echo "gpu_check: pytest missing for $PYBIN" | tee -a "$OUT_DIR/kernels_gpu_check.log"; exit 2
fi
"$PYBIN" -m pytest -q -p no:cacheprovider tests/kernels -rs 2>&1 | tee -a "$OUT_DIR/kernels_gpu_check.log"
test_rc=${PIPESTATUS[0]}
echo "tests exit code: $test_rc" | tee -a "$OUT_DIR/kernels_gpu_check.log"

bench_rc=0
if [ -z "${SKIP_BENCH:-}" ]; then
  # shellcheck disable=SC2086  # BENCH_ARGS is a word list on purpose
  "$PYBIN" benchmarks/bench_kernels.py --device cuda --out "$OUT_DIR" ${BENCH_ARGS:-} 2>&1 \
    | tee -a "$OUT_DIR/kernels_gpu_check.log"
  bench_rc=${PIPESTATUS[0]}
  echo "benchmark exit code: $bench_rc" | tee -a "$OUT_DIR/kernels_gpu_check.log"
fi
# The tests decide the verdict; a benchmark failure is reported but is not a correctness failure.
exit $(( test_rc != 0 ? test_rc : bench_rc ))
