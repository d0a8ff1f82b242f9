#!/usr/bin/env bash
# One device call that checks a restructuring (issue 9) and the reliability work (issue 10) on the GPU:
# GPU tests and the CUDA runs of the CPU suites on the current tree, then the kernel sweep of the tree
# before (.stage-before/before.tar, `git archive <rev> hf_ahfa kernels patches eval`) and after, interleaved
# twice in the same run. Both trees are laid out as the installed package and put on PYTHONPATH in turn
# (nothing is pip-installed). Results: one tar in $OUT.
#   usage (device call, carry .stage-before): bash scripts/gpu_check.sh tests|sweep|all
# (tests: GPU tests, CUDA suites, whole-model speed; sweep: the interleaved kernel sweeps)
set -uo pipefail
export PYTHONUNBUFFERED=1 PYTHONSAFEPATH=1
FINAL=${OUT:-/tmp/ahfa-out}
R=/tmp/ahfa-results
mkdir -p "$R" "$FINAL"
trap 'tar cf "$FINAL/results.tar" -C "$R" .' EXIT
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | tee "$R/gpu.txt"
layout() {  # $1: destination, $2: a source tree with hf_ahfa/ kernels/ patches/ eval/
  mkdir -p "$1" && cp -r "$2/hf_ahfa" "$1/" && for s in kernels patches eval; do cp -r "$2/$s" "$1/hf_ahfa/$s"; done
}
layout /tmp/after .
mkdir -p /tmp/before-src && tar xf .stage-before/before.tar -C /tmp/before-src && layout /tmp/before /tmp/before-src
after() { PYTHONPATH=/tmp/after "$@"; }
before() { PYTHONPATH=/tmp/before "$@"; }
after python3 -c "import torch, triton, transformers, hf_ahfa; print('torch', torch.__version__, 'triton', triton.__version__, 'transformers', transformers.__version__, hf_ahfa.__file__)" | tee "$R/versions.txt"
STAGE=${1:-all}
if [ "$STAGE" != sweep ]; then
after timeout ${GPU_TESTS_S:-240} python3 -m pytest -q -s -p no:cacheprovider -m gpu tests/test_gpu.py ${FUZZ:-} 2>&1 | tee "$R/gpu-tests.log" | tail -8
after timeout ${SUITES_S:-150} python3 -m pytest -q -p no:cacheprovider -x tests/test_kernels.py tests/test_router.py tests/test_reliability.py tests/test_compile.py tests/test_adaptive.py 2>&1 | tee "$R/suites-cuda.log" | tail -4
# whole model (issue 11): ahfa as routed and on its own kernels against sdpa
after timeout ${MODEL_S:-150} python3 scripts/model_prefill_speed.py --out-dir "$R" 2>&1 | tail -12
fi
[ "$STAGE" = tests ] && exit 0
# kernels: the sweep before and after, twice, interleaved; after also with ahfa-auto (the router's choice)
SWEEP=(-m hf_ahfa.eval.cli speed --seq-lens 8192,32768 --head-dims 128 --masks causal --modes fwd fwd+bwd
       --decode-lens 8192,32768,131072 --out-dir "$R")
for i in 1 2; do
  before timeout ${SWEEP_S:-100} python3 "${SWEEP[@]}" --providers ahfa sdpa sdpa-cudnn --name "arch-before-$i" 2>&1 | tail -14
  after timeout ${SWEEP_S:-100} python3 "${SWEEP[@]}" --providers ahfa ahfa-auto sdpa sdpa-cudnn --name "arch-after-$i" 2>&1 | tail -16
done
rm -f "$R"/*.jsonl
