#!/usr/bin/env bash
# GPU check, in one call on a CUDA machine (STAGES picks, default "tests kernels pipeline ppo"):
#   tests:    tests/kernels on CUDA, every dtype (fp32/fp16/bf16): RLHF_TEST_DEVICE=cuda, interpreter off;
#   kernels:  the kernel benchmark (bf16, the GPU shapes in bench_kernels.py) -> benchmarks/results/; exits non-zero,
#             printing TARGET MISSED, when ours_triton forward + backward is below 60 % of the measured matmul peak;
#   pipeline: `rlhf pipeline --preset tiny` with every phase on the GPU (device 'auto') ->
#             benchmarks/results/pipeline_cuda.{log,json};
#   fsdp2:    FSDP2 PPO smoke on that pipeline's models: 2 ranks sharing the GPU over gloo
#             (RLHF_DIST_BACKEND=gloo; NCCL refuses two ranks on one device), --ppo.parallel fsdp2,
#             bf16 mixed precision, sharded reference -> benchmarks/results/ppo_fsdp2_cuda.{log,json};
#   ppo:     PPO vs TRL 1.12 on Pythia-shaped 160M/410M/1B in bf16 -> benchmarks/results/ppo_vs_trl_cuda.*
#            (needs trl: run benchmarks/fetch_gpu_wheels.sh here first and carry .whl; skipped without it);
#   vllm:    generation, torch engine vs the colocated vLLM engine, fp32 and bf16, 8 M and 29 M Llamas, 64 prompts
#            x 128 tokens -> benchmarks/results/rollout_engines_cuda.{json,md} (needs the CUDA `vllm` package on
#            that machine: the lent image has none and its ~400 MB wheel does not fit the 64 MiB carry, so this
#            stage says "skipped" there; VLLM_ARGS narrows it).
# Usage: bash benchmarks/gpu_check.sh            (env: PY=python to force an interpreter,
#        BENCH_ARGS="--providers ours_triton torch_eager" to narrow the kernel benchmark,
#        PPO_ARGS="--scales pythia-1b --repeats 3" to narrow the PPO one, STAGES="ppo" for one stage)
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

if [ -d "$ROOT/.whl" ] && ls "$ROOT"/.whl/*.whl >/dev/null 2>&1; then   # carried wheels (trl, datasets)
  "$PYBIN" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
    "$ROOT"/.whl/*.whl && export PYTHONPATH="/tmp/site${PYTHONPATH:+:$PYTHONPATH}"
fi
STAGES=" ${STAGES:-tests kernels pipeline fsdp2 ppo vllm} "
unset TRITON_INTERPRET                  # compile the kernels for the GPU
export RLHF_TEST_DEVICE=cuda HF_HUB_OFFLINE=1
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"   # `kernels` importable without an install

{
  echo "# gpu_check $(date -u +%FT%TZ)"
  "$PYBIN" -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__, torch.cuda.get_device_name())"
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null || true
} | tee "$OUT_DIR/kernels_gpu_check.log"

test_rc=0
if [[ $STAGES == *" tests "* ]]; then
  if ! "$PYBIN" -c "import pytest" 2>/dev/null; then
    echo "gpu_check: pytest missing for $PYBIN" | tee -a "$OUT_DIR/kernels_gpu_check.log"; exit 2
  fi
  "$PYBIN" -m pytest -q -p no:cacheprovider tests/kernels -rs 2>&1 | tee -a "$OUT_DIR/kernels_gpu_check.log"
  test_rc=${PIPESTATUS[0]}
  echo "tests exit code: $test_rc" | tee -a "$OUT_DIR/kernels_gpu_check.log"
fi

bench_rc=0
if [[ $STAGES == *" kernels "* ]] && [ -z "${SKIP_BENCH:-}" ]; then
  # shellcheck disable=SC2086  # BENCH_ARGS is a word list on purpose
  "$PYBIN" benchmarks/bench_kernels.py --device cuda --check-targets --out "$OUT_DIR" ${BENCH_ARGS:-} 2>&1 \
    | tee -a "$OUT_DIR/kernels_gpu_check.log"
  bench_rc=${PIPESTATUS[0]}
  echo "benchmark exit code: $bench_rc" | tee -a "$OUT_DIR/kernels_gpu_check.log"
  if [ "$bench_rc" -ne 0 ]; then   # loud: a missed speed target is a failed check, not a footnote
    echo "gpu_check: KERNEL TARGET MISSED or benchmark failed (exit $bench_rc): see TARGET MISSED lines above" \
      | tee -a "$OUT_DIR/kernels_gpu_check.log" >&2
  fi
fi
run_dir=$(mktemp -d)/pipeline
if [[ $STAGES == *" pipeline "* || $STAGES == *" fsdp2 "* ]]; then
  "$PYBIN" -m rlhf_core pipeline --preset tiny --output-dir "$run_dir" 2>&1 \
    | grep -v -E "Loading weights|Writing model shards" | tail -40 | tee "$OUT_DIR/pipeline_cuda.log"
  pipe_rc=${PIPESTATUS[0]}
  cp "$run_dir/summary.json" "$OUT_DIR/pipeline_cuda.json" 2>/dev/null || true
  echo "pipeline exit code: $pipe_rc" | tee -a "$OUT_DIR/pipeline_cuda.log"
  test_rc=$(( test_rc != 0 ? test_rc : pipe_rc ))
fi

if [[ $STAGES == *" fsdp2 "* ]] && [ -d "$run_dir/sft" ]; then
  RLHF_DIST_BACKEND=gloo "$PYBIN" -m torch.distributed.run --standalone --nproc_per_node 2 -m rlhf_core.cli ppo \
    --policy "$run_dir/sft" --reward "$run_dir/reward" --output-dir "$run_dir/../fsdp2" \
    --ppo.parallel fsdp2 --ppo.mixed_precision bf16 --ppo.shard_reference true --ppo.num_iterations 3 \
    --ppo.eval_every 0 2>&1 | grep -v -E "Loading weights|Writing model shards" | tail -30 \
    | tee "$OUT_DIR/ppo_fsdp2_cuda.log"
  fsdp_rc=${PIPESTATUS[0]}
  cp "$run_dir/../fsdp2/summary.json" "$OUT_DIR/ppo_fsdp2_cuda.json" 2>/dev/null || true
  echo "fsdp2 smoke exit code: $fsdp_rc" | tee -a "$OUT_DIR/ppo_fsdp2_cuda.log"
  test_rc=$(( test_rc != 0 ? test_rc : fsdp_rc ))
fi

if [[ $STAGES == *" ppo "* ]]; then
  if "$PYBIN" -c "import trl, datasets" 2>/dev/null; then
    # shellcheck disable=SC2086  # PPO_ARGS is a word list on purpose
    TRL_EXPERIMENTAL_SILENCE=1 "$PYBIN" benchmarks/bench_ppo_vs_trl.py --device cuda ${PPO_ARGS:-} 2>&1 \
      | grep -v -E "Loading weights|Writing model shards" | tee "$OUT_DIR/ppo_vs_trl_cuda.log"
    ppo_rc=${PIPESTATUS[0]}
    echo "ppo benchmark exit code: $ppo_rc" | tee -a "$OUT_DIR/ppo_vs_trl_cuda.log"
    bench_rc=$(( bench_rc != 0 ? bench_rc : ppo_rc ))
  else
    echo "gpu_check: trl/datasets not importable: PPO benchmark skipped (bash benchmarks/fetch_gpu_wheels.sh, carry .whl)"
  fi
fi
if [[ $STAGES == *" vllm "* ]]; then
  if "$PYBIN" -c "import vllm" 2>/dev/null; then
    # shellcheck disable=SC2086  # VLLM_ARGS is a word list on purpose
    "$PYBIN" benchmarks/rollout_engines.py --device cuda --scales llama-8m,llama-30m --prompts 64 --tokens 128 \
      ${VLLM_ARGS:-} 2>&1 | grep -v -E "Loading weights|Writing model shards" | tee "$OUT_DIR/rollout_engines_cuda.log"
    vllm_rc=${PIPESTATUS[0]}
    echo "vllm rows exit code: $vllm_rc" | tee -a "$OUT_DIR/rollout_engines_cuda.log"
    bench_rc=$(( bench_rc != 0 ? bench_rc : vllm_rc ))
  else
    echo "gpu_check: vllm not importable on this machine: vLLM rows skipped (pip install vllm where a GPU has network)"
  fi
fi
# Any failure fails the check: the tests first (their exit code), then a missed kernel target or benchmark.
[ "$bench_rc" -ne 0 ] && echo "gpu_check: FAILED: a speed target was missed (exit $bench_rc)" >&2
exit $(( test_rc != 0 ? test_rc : bench_rc ))
