#!/usr/bin/env bash
# Download, on this (networked) machine, the wheels the GPU machine's image lacks for the
# PPO-vs-TRL benchmark: trl==1.12.0 and datasets with its two missing dependencies, for the
# image's Python 3.12 on x86-64 (versions = the ones this project's .venv resolved). They land in
# .whl/ (git-ignored); benchmarks/gpu_check.sh installs them to /tmp/site when .whl/ is carried:
#   bash benchmarks/fetch_gpu_wheels.sh      then a device run with carry [".whl"]
set -euo pipefail
cd "$(dirname "$0")/.."
mkdir -p .whl
PY=${PY:-python3}
"$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
  -d .whl trl==1.12.0 datasets==5.2.0 dill==0.4.1 multiprocess==0.70.19
ls -l .whl
