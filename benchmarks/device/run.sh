#!/usr/bin/env bash
# Run THERE, on the lent GPU machine, from the repo root, with `.whl` carried:
#   device run: command "bash benchmarks/device/run.sh", carry [".whl"], timeout_s 540
# Installs our wheels without dependencies (the image's jax, flax and pluggy are used), then runs
# bench_gpu.py (extra arguments go to it: `--smoke` tries the whole path on a CPU machine); the log
# and JSON land in $OUT, each table as soon as it is measured.
set -euo pipefail
OUT="${OUT:-bench-results}"
mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
  --target /tmp/site .whl/*.whl
export PYTHONPATH=/tmp/site PYTHONUNBUFFERED=1
(nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv || echo "no nvidia-smi") \
  | tee "$OUT/gpu.log"
python3 -c "import jax, flax; print('jax', jax.__version__, 'flax', flax.__version__, jax.devices())" \
  2>&1 | tee -a "$OUT/gpu.log"
python3 benchmarks/bench_gpu.py --json "$OUT/gpu.json" "$@" 2>&1 | tee -a "$OUT/gpu.log"
