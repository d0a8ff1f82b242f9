#!/usr/bin/env bash
# One device call that checks a restructuring (issue 9) and the reliability work (issue 10) on the GPU:
# GPU tests and the CUDA runs of the CPU suites on the current tree, then the kernel sweep of the tree
# before (.stage-before/before.tar, `git archive <rev> hf_ahfa kernels patches eval`) and after, interleaved
# twice in the same run. Both trees are laid out as the installed package and put on PYTHONPATH in turn
# (nothing is pip-installed). Results: one tar in $OUT.
#   usage (device call, carry .stage-before): bash scripts/gpu_check.sh tests|tests+sweep|diag|host|launch|model|decode|next|hostpath|select|sweep|cost|alibi
# (tests: GPU tests and fuzz, CUDA suites; diag: CUDA suites on both trees with tracebacks;
#  host: host time per attention call; next: the checks kernels/NOTES.md lists first; hostpath: the memo path before/after; select: the selection kernels' tests and profile, before/after; launch: direct launches' host time and their GPU tests; model: whole-model speed, MODEL_ARGS passed to scripts/model_prefill_speed.py
#  (MODEL_TREES="before after": on both trees);
#  sweep: the interleaved kernel sweeps; cost: scripts/kernel_cost.py on every .stage-before/*.tar and the current tree;
#  alibi: every launch config with ALiBi in each form (AHFA_ALIBI), then the forms timed in the same rounds;
#  d256: each head-dim-256 forward launch config pinned, checked and timed against cuDNN at Gemma-3's 4/1 heads;
#  d256bwd: the same for the backward's entries and candidates that fit sm90 (forward and backward timed))
set -uo pipefail
export PYTHONUNBUFFERED=1 PYTHONSAFEPATH=1
FINAL=${OUT:-/tmp/ahfa-out}
R=/tmp/ahfa-results
mkdir -p "$R" "$FINAL" /root/stage
cp .stage-p*/* /root/stage/ 2>/dev/null  # a carried model part (scripts/stage_gemma.sh) waits there for a later call
trap 'tar cf "$FINAL/results.tar" -C "$R" .' EXIT
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | tee "$R/gpu.txt"
GPU_TAG=$(grep -o -m1 'H[0-9]00' "$R/gpu.txt" | tr 'H' 'h')  # report names carry the card that measured them
layout() {  # $1: destination, $2: a source tree with hf_ahfa/ kernels/ patches/ eval/
  mkdir -p "$1" && cp -r "$2/hf_ahfa" "$1/" && for s in kernels patches eval; do cp -r "$2/$s" "$1/hf_ahfa/$s"; done
}
layout /tmp/after .
if [ -f .stage-before/before.tar ]; then  # only the sweep and diag stages compare against it
  mkdir -p /tmp/before-src && tar xf .stage-before/before.tar -C /tmp/before-src && layout /tmp/before /tmp/before-src
fi
after() { PYTHONPATH=/tmp/after "$@"; }
before() { PYTHONPATH=/tmp/before "$@"; }
after python3 -c "import torch, triton, transformers, hf_ahfa; print('torch', torch.__version__, 'triton', triton.__version__, 'transformers', transformers.__version__, hf_ahfa.__file__)" | tee "$R/versions.txt"
STAGE=${1:?tests, tests+sweep, diag, host, launch, model, decode, next, hostpath, select, sweep, cost, alibi, d256 or d256bwd}
if [ "$STAGE" = tests ] || [ "$STAGE" = tests+sweep ]; then
# pytest-xdist (in the device image) spreads the cold Triton compiles over the cores; the default launch
# configuration only (AHFA_AUTOTUNE=0: a quarter of the compiles); SIGINT at the limit keeps the summary.
# GPU_K: a pytest -k expression (a subset of the file).
# 4 workers: 16 and 8 ran an H100's 80 GB out of memory (2026-12-05: 110 and 133 tests failed on allocation; one
# test process held 61 GB); 4 ran the file in 133 s
AHFA_AUTOTUNE=0 AHFA_FUZZ_LOG="$R/fuzz-stats.log" after timeout -s INT -k 15 ${GPU_TESTS_S:-240} python3 -m pytest -q -p no:cacheprovider \
  -n ${WORKERS:-4} --tb=short -rfE --durations=8 -m gpu ${GPU_K:+-k "$GPU_K"} ${GPU_FILES:-tests/test_gpu.py} ${FUZZ:-} 2>&1 \
  | grep -v -i benchmark > "$R/gpu-tests.log"
grep -E "^(FAILED|ERROR) |passed|failed" "$R/gpu-tests.log" | tail -25
[ "$STAGE" = tests ] && exit 0
fi
if [ "$STAGE" = diag ]; then
# the CUDA runs of the CPU suites on both trees side by side, and a short GPU fuzz, with tracebacks
SUITES=(tests/test_kernels.py tests/test_router.py tests/test_reliability.py tests/test_compile.py tests/test_adaptive.py)
PYT=(python3 -m pytest -q -p no:cacheprovider --tb=short -rfE)
after timeout -s INT -k 15 ${DIAG_S:-200} "${PYT[@]}" -n 6 "${SUITES[@]}" > "$R/suites-after.log" 2>&1 &
before timeout -s INT -k 15 ${DIAG_S:-200} "${PYT[@]}" -n 6 "${SUITES[@]}" > "$R/suites-before.log" 2>&1 &
AHFA_FUZZ_GPU_CONFIGS=${FUZZ_N:-48} after timeout -s INT -k 15 ${DIAG_S:-200} "${PYT[@]}" -n 4 -m gpu \
  tests/test_fuzz.py > "$R/fuzz-after.log" 2>&1 &
wait
for f in "$R"/suites-*.log "$R"/fuzz-after.log; do echo "== $f"; grep -E "^(FAILED|ERROR) |passed|failed" "$f" | tail -25; done
exit 0
fi
if [ "$STAGE" = cost ]; then
# per-feature kernel cost: one tree per .stage-before/*.tar (named by the tar) and the current tree ("after");
# a first pass of all trees at once compiles (its timings are discarded), then ROUNDS interleaved passes
TREES=()
for t in .stage-before/*.tar; do
  n=$(basename "$t" .tar); [ "$n" = before ] && continue
  mkdir -p "/tmp/src-$n" && tar xf "$t" -C "/tmp/src-$n" && layout "/tmp/$n" "/tmp/src-$n" && TREES+=("$n")
done
TREES+=(after)
export AHFA_AUTOTUNE=0  # the same (first fitting) launch config in every tree: the A/B is the kernel code
for n in "${TREES[@]}"; do PYTHONPATH=/tmp/$n timeout ${COST_S:-240} python3 scripts/kernel_cost.py --label "$n" --jsonl /tmp/warm.jsonl > "$R/warm-$n.log" 2>&1 & done
wait
for i in $(seq 1 ${ROUNDS:-2}); do
  for n in "${TREES[@]}"; do PYTHONPATH=/tmp/$n timeout ${COST_S:-240} python3 scripts/kernel_cost.py --label "$n" --jsonl "$R/cost.jsonl"; done
done
after python3 scripts/kernel_cost.py --report "$R/cost.jsonl" --trees "$(IFS=,; echo "${TREES[*]}")" --out-dir "$R" --name kernel-cost
exit 0
fi
if [ "$STAGE" = host ]; then
# host time per attention call (issue 11): decode (1 query) with a profile of the routed call, and 16 queries
export AHFA_AUTOTUNE=0
after python3 scripts/host_overhead.py --device cuda --kv-lens 16,1024,8192 --q-len 1 --profile 3000 --out-dir "$R" \
  --name host-overhead-decode-${GPU_TAG:-gpu} 2>&1 | tail -5
after python3 scripts/host_overhead.py --device cuda --kv-lens 64,1024 --q-len 16 --out-dir "$R" \
  --name host-overhead-q16-${GPU_TAG:-gpu} 2>&1 | tail -4
exit 0
fi
if [ "$STAGE" = launch ]; then
# direct launches (kernels/launch.py): host time per call of a Gemma-3 sliding layer (4/1 heads, D=256, window 512,
# bf16) with them and through Triton, profiled; then the GPU tests and the router suite on CUDA with them
for direct in $([ "${LAUNCH_HOST:-1}" = 1 ] && echo 1 0); do  # LAUNCH_HOST=0: the tests only
  AHFA_DIRECT_LAUNCH=$direct AHFA_AUTOTUNE=0 after timeout ${HOST_S:-150} python3 scripts/host_overhead.py --device cuda \
    --dtype bfloat16 --heads 4,1,256 --q-len 128 --kv-lens 128,2048 --window 512 --profile 2000 --out-dir "$R" \
    --name "host-overhead-gemma3-sliding-direct$direct" 2>&1 | tail -4
done
# the two suites side by side (together they fit an H100's memory: the router suite's tensors are small)
AHFA_AUTOTUNE=0 after timeout -s INT -k 15 ${GPU_TESTS_S:-240} python3 -m pytest -q -p no:cacheprovider -n ${WORKERS:-4} \
  --tb=short -rfE -m gpu tests/test_gpu.py > "$R/gpu-tests.log" 2>&1 &
after timeout -s INT -k 15 ${ROUTER_S:-150} python3 -m pytest -q -p no:cacheprovider -n 4 --tb=short -rfE \
  tests/test_router.py tests/test_launch.py > "$R/router-cuda.log" 2>&1 &
wait
for f in "$R/gpu-tests.log" "$R/router-cuda.log"; do echo "== $f"; grep -E "^(FAILED|ERROR) |passed|failed" "$f" | tail -15; done
exit 0
fi
if [ "$STAGE" = next ]; then
# the twenty-first session's open checks (kernels/NOTES.md): the packed-decode router test on CUDA, an A/A pairing of
# the paired decode (is Qwen2's 0.93 the measurement's own?), and the route and host time of a 16-query call
after timeout -s INT -k 20 ${ROUTER_S:-90} python3 -m pytest -q -p no:cacheprovider --tb=short -rfE tests/test_router.py \
  -k "packed or masked_gqa or plain_transformers" 2>&1 | tail -4
after timeout ${MODEL_S:-150} python3 scripts/model_prefill_speed.py --out-dir "$R" --layout qwen2 --seq-lens 1024 \
  --rounds 1 --decode-tokens 16 --prefill-logits last --no-own-kernels --paired 20 --paired-aa \
  --name "model-speed-qwen2-0.5b-aa-${GPU_TAG:-gpu}" 2>&1 | tail -6
AHFA_AUTOTUNE=0 after timeout ${HOST_S:-120} python3 scripts/host_overhead.py --device cuda --kv-lens 64,1024 --q-len 16 \
  --profile 2000 --out-dir "$R" --name "host-overhead-q16-${GPU_TAG:-gpu}" 2>&1 | tail -4
after python3 - <<'PY'
import torch, hf_ahfa
from hf_ahfa import fastest
q = torch.randn(1, 16, 9, 64, device="cuda")
for K in (64, 1024):
    k, v = (torch.randn(1, K, 3, 64, device="cuda") for _ in "kv")
    with hf_ahfa.record() as rec:
        hf_ahfa.attention(q, k[:, :16], v[:, :16], causal=True)
    print(K, rec[0]["route"], rec[0]["backend"])
print(fastest.measured())
PY
exit 0
fi
if [ "$STAGE" = hostpath ]; then
# the twenty-second session's memo-path change (kernels/NOTES.md): whole-model decode and prefill paired against sdpa
# on the tree before it (.stage-before/before.tar: `git archive 6220f85 hf_ahfa kernels patches eval`) and this one,
# then the host time per decode call of each tree
for t in before after; do
  PYTHONPATH=/tmp/$t timeout ${MODEL_S:-240} python3 scripts/model_prefill_speed.py --out-dir "$R" --layout qwen2 \
    --seq-lens ${SEQ_LENS:-1024,4096} --rounds 1 --decode-tokens 16 --prefill-logits last --no-own-kernels \
    --paired 20 --floor \
    --name "model-speed-qwen2-0.5b-hostpath-$t-${GPU_TAG:-gpu}" 2>&1 | grep -v "^|---" | tail -5
done
for t in before after; do
  PYTHONPATH=/tmp/$t timeout 40 python3 scripts/host_overhead.py --device cuda --kv-lens 1024,4096 --heads 14,2,64 \
    --dtype bfloat16 --rounds 3 --out-dir "$R" --name "host-overhead-decode-hostpath-$t-${GPU_TAG:-gpu}" 2>&1 | tail -2
done
exit 0
fi
if [ "$STAGE" = select ]; then
# the selection kernels (twenty-third session): the adaptive suite on CUDA, then where an adaptive call's time goes
# (estimator, selection, the whole call against exact) on the tree before them and this one
# (8 workers: the suite's tensors are small; 4 left 4 of its 53 tests unfinished after 150 s, mostly compiling)
# (SELECT_TESTS_S=0: no tests; PROFILE_TREES: the trees profiled, e.g. "after": calls that carry a model part each
# can share the stage out)
if [ "${SELECT_TESTS_S:-180}" != 0 ]; then
after timeout -s INT -k 15 ${SELECT_TESTS_S:-180} python3 -m pytest -q -p no:cacheprovider -n ${WORKERS:-8} --tb=short \
  -rfE ${SELECT_K:+-k "$SELECT_K"} tests/test_adaptive.py > "$R/adaptive-cuda.log" 2>&1
grep -E "^(FAILED|ERROR) |passed|failed" "$R/adaptive-cuda.log" | tail -15
fi
# KEPT (e.g. 0.2,0.4,0.6): the block-sparse kernels alone at those kept shares, on the current tree
for t in ${PROFILE_TREES:-before after}; do
  KEPT_ARG=(); [ "$t" = after ] && [ -n "${KEPT:-}" ] && KEPT_ARG=(--kept "$KEPT")
  PYTHONPATH=/tmp/$t timeout ${PROFILE_S:-100} python3 scripts/profile_adaptive.py --seq-lens ${SEQ_LENS:-8192,32768,131072} \
    --strides ${STRIDES:-16,8} "${KEPT_ARG[@]}" --profile --out-dir "$R" --label $t \
    --name "profile-adaptive-$t-${GPU_TAG:-gpu}" > "$R/profile-adaptive-$t-${GPU_TAG:-gpu}.txt" 2>&1
  grep "^T=" "$R/profile-adaptive-$t-${GPU_TAG:-gpu}.txt"
done
exit 0
fi
if [ "$STAGE" = alibi ]; then
# every launch config with each form of the ALiBi bias (AHFA_ALIBI), then the forms' speed in the same rounds
if [ "${ALIBI_CONFIGS:-1}" = 1 ]; then  # 0 where the tests stage of the same tree ran them
AHFA_AUTOTUNE=0 after timeout -s INT -k 15 ${GPU_TESTS_S:-240} python3 -m pytest -q -p no:cacheprovider -n ${WORKERS:-4} \
  --tb=short -rfE -m gpu tests/test_gpu.py -k "every_launch_config and (distance or keys)" > "$R/alibi-configs.log" 2>&1
grep -E "^(FAILED|ERROR) |passed|failed" "$R/alibi-configs.log" | tail -15
fi
# ALIBI_TREES="before after": each tree's ALiBi cost against its own kernel without it (a change to the bias)
for t in ${ALIBI_TREES:-after}; do
  PYTHONPATH=/tmp/$t timeout ${ALIBI_S:-300} python3 scripts/alibi_speed.py --out-dir "$R" \
    --forms ${FORMS:-distance,keys,fwd-keys} --head-dims ${HEAD_DIMS:-64,128} --seq-lens ${SEQ_LENS:-4096,16384} \
    --name alibi-forms-$t 2>&1 | tail -30
done
exit 0
fi
if [ "$STAGE" = d256 ]; then
# the order of the D=256 forward table (its default was never checked on Hopper): 32K tokens per batch
for TB in 8192:4 16384:2; do
  after timeout ${D256_S:-240} python3 scripts/launch_config_check.py --trees after=/tmp/after --table FWD --head-dims 256 \
    --causal yes --heads 4 --kv-heads 1 --seq-len ${TB%:*} --batch ${TB#*:} --time --out-dir "$R" --name "fwd-d256-${TB%:*}" \
    2>&1 | tail -8
done
exit 0
fi
if [ "$STAGE" = d256bwd ]; then
# the D=256 backward table (Gemma-3 training) was never timed: its entries, then tiles that compile within sm90's
# shared memory on the CPU (kernels/NOTES.md); an entry joins the table once it passes here and is faster
# (fifteenth session: (64, 64, 8, 2) led at 0.57x cuDNN; these eight-warp tiles also fit sm90 and are untimed)
CANDIDATES="64,64,8,2;64,64,8,1;128,32,8,2;64,32,8,2;128,64,8,1"
after timeout ${D256_S:-400} python3 scripts/launch_config_check.py --trees after=/tmp/after --table BWD --head-dims 256 \
  --causal yes --heads 4 --kv-heads 1 --seq-len 8192 --batch 2 --time --configs "$CANDIDATES" --out-dir "$R" \
  --name bwd-d256-8192 2>&1 | tail -12
exit 0
fi
if [ "$STAGE" = model ]; then
# whole model (issue 11): ahfa as routed and on its own kernels against sdpa; MODEL_TREES="before after" runs the
# script (of the current tree) on each tree in turn, reports named <MODEL_NAME>-<tree>
for t in ${MODEL_TREES:-after}; do
  PYTHONPATH=/tmp/$t timeout ${MODEL_S:-300} python3 scripts/model_prefill_speed.py --out-dir "$R" ${MODEL_ARGS:-} \
    ${MODEL_TREES:+--name ${MODEL_NAME:-model-speed}-$t} 2>&1 | tail -${MODEL_TAIL:-30}
done
exit 0
fi
if [ "$STAGE" = decode ]; then
# own split-KV decode against SDPA on both trees, twice, interleaved (the twenty-seventh session's 0.82x at 128K),
# then the padded-batch prefill and training step of the 0.5B layout on each tree (key-padding runs)
DEC=(-m hf_ahfa.eval.cli speed --seq-lens= --decode-lens ${DECODE_LENS:-4096,8192,32768,131072} --providers ahfa sdpa
     --out-dir "$R")
for i in 1 2; do for t in before after; do
  PYTHONPATH=/tmp/$t timeout ${DECODE_S:-80} python3 "${DEC[@]}" --name "decode-$t-$i-$GPU_TAG" > /dev/null 2>&1
  echo "$t $i: $(grep -E '^\| [0-9]+ \| ahfa ' "$R/decode-$t-$i-$GPU_TAG.md" | tr -d '\n')"
done; done
[ "${PADDED:-1}" = 1 ] && for t in before after; do
  PYTHONPATH=/tmp/$t timeout ${PADDED_S:-200} python3 scripts/padded_speed.py --out-dir "$R" \
    --name "padded-speed-qwen2-0.5b-$t-$GPU_TAG" 2>&1 | tail -8
done
exit 0
fi
# kernels: the sweep before and after, twice, interleaved; after also with ahfa-auto (the router's choice)
SWEEP=(-m hf_ahfa.eval.cli speed --seq-lens 8192,32768 --head-dims 128 --masks causal --modes fwd fwd+bwd
       --decode-lens 8192,32768,131072 --out-dir "$R")
for i in $(seq 1 ${ROUNDS:-2}); do
  before timeout ${SWEEP_S:-100} python3 "${SWEEP[@]}" --providers ahfa sdpa sdpa-cudnn --name "arch-before-$i" 2>&1 | tail -14
  after timeout ${SWEEP_S:-100} python3 "${SWEEP[@]}" --providers ahfa ahfa-auto sdpa sdpa-cudnn --name "arch-after-$i" 2>&1 | tail -16
done
rm -f "$R"/*.jsonl
