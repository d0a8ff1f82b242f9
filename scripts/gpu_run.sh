#!/usr/bin/env bash
# One device call: install, GPU tests, kernel tests on CUDA, speed benchmark. Results land in $OUT.
# Usage (on the accelerator machine): bash scripts/gpu_run.sh [extra ahfa-eval speed args...]
set -uo pipefail
export PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/ahfa-out}
mkdir -p "$OUT"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv | tee "$OUT/gpu.txt"
python3 -m pip install -q --no-deps --no-build-isolation -e . || exit 1
python3 -c "import torch, triton, transformers; print('torch', torch.__version__, 'triton', triton.__version__, 'transformers', transformers.__version__)"
timeout ${TEST_TIMEOUT:-240} python3 -m pytest -q -m gpu tests/test_gpu.py 2>&1 | tee "$OUT/gpu_tests.log" | tail -25
timeout ${KTEST_TIMEOUT:-120} python3 -m pytest -q -x tests/test_kernels.py 2>&1 | tee "$OUT/kernel_tests_cuda.log" | tail -5
timeout ${BENCH_TIMEOUT:-300} python3 -m hf_ahfa.eval.cli speed --out-dir "$OUT" "$@" 2>&1 | tee "$OUT/speed.log" | tail -60
