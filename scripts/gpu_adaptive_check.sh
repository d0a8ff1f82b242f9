#!/usr/bin/env bash
# One device call: GPU tests (dense and block-sparse/adaptive), CPU suites of the sparse paths on CUDA, and
# the synthetic block-sparse kernel benchmark (density -> time) beside cuDNN/FA2. Results land in $OUT.
set -uo pipefail
export PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/ahfa-out}
mkdir -p "$OUT"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv | tee "$OUT/gpu.txt"
python3 -m pip install -q --no-deps --no-build-isolation -e . || exit 1
timeout 240 python3 -m pytest -q -m gpu tests/test_gpu.py 2>&1 | tee "$OUT/gpu_tests.log" | tail -15
timeout 120 python3 -m pytest -q tests/test_adaptive.py tests/test_kernels.py -k "block_sparse or adaptive or estimator or tau or fallback or select" 2>&1 | tee "$OUT/adaptive_tests_cuda.log" | tail -5
timeout 200 python3 -m hf_ahfa.eval.cli speed --out-dir "$OUT" --name speed-sparse-h100 --seq-lens 8192,32768 \
  --head-dims 64,128 --masks causal --decode-lens "" \
  --providers ahfa ahfa-sparse-0.5 ahfa-sparse-0.25 ahfa-sparse-0.1 ahfa-estimate sdpa-cudnn sdpa-flash 2>&1 | tail -30
