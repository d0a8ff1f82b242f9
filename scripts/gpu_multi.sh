#!/usr/bin/env bash
# Device calls on a machine with several GPUs (issue 15), every GPU of it used; results as one tar in $OUT.
#   bash scripts/gpu_multi.sh cp      the single-GPU ring-step test, then context parallelism over all GPUs against
#                                     one (scripts/context_parallel_speed.py: the check at 16K, attention and
#                                     whole-model prefill at CP_LENS, default 131072,262144; exact and TAUS)
#   bash scripts/gpu_multi.sh fsdp    a Trainer fine-tune (random-weight Qwen2 layout, ahfa) on one GPU and under FSDP2 on
#                                     all (scripts/fsdp_check.py), loss curves compared
#   bash scripts/gpu_multi.sh eval    ahfa-eval perplexity, one process per GPU (accelerate launch --multi_gpu)
#                                     against one process, rows compared and throughput. Gemma-3's GGUF travels in
#                                     parts: four earlier calls (each any stage, or scripts/stage_part.sh) carry one
#                                     .stage-models.tar.part* each; this one the last part, .stage-data and .whl
set -uo pipefail
export PYTHONUNBUFFERED=1 PYTHONSAFEPATH=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
FINAL=${OUT:-/tmp/ahfa-out}
R=/tmp/ahfa-results
mkdir -p "$R" "$FINAL"
trap 'tar cf "$FINAL/results.tar" -C "$R" .' EXIT
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | tee "$R/gpu.txt"
N=$(nvidia-smi -L | wc -l)
GPU=$(nvidia-smi --query-gpu=name --format=csv,noheader | head -1 | tr -cs 'A-Za-z0-9' '-' | tr 'A-Z' 'a-z')
python3 -m pip install -q --no-deps --no-build-isolation -e . || exit 1
mkdir -p /root/stage && cp .stage-models.tar.part*/* /root/stage/ 2>/dev/null  # a carried model part, if any
case "${1:?cp, fsdp or eval}" in
cp)
  timeout 240 python3 -m pytest -q -p no:cacheprovider -m gpu tests/test_gpu.py -k ring_steps 2>&1 \
    | tee "$R/gpu-tests-ring-steps.log" | tail -3
  timeout ${CP_S:-330} torchrun --nproc_per_node "$N" scripts/context_parallel_speed.py --out-dir "$R" \
    --seq-lens "${CP_LENS:-131072,262144}" --taus "${TAUS:-0.99}" --rounds "${ROUNDS:-3}" \
    --name "context-parallel-${N}x${GPU%-}" 2>&1 | grep -v "^W[0-9]\|OMP_NUM\|^\*\*\*" | tail -40 ;;
fsdp)
  F=(--layers ${LAYERS:-4} --seq-len ${SEQ:-4096} --steps ${STEPS:-8} --global-batch $((2 * N)))
  timeout 200 python3 scripts/fsdp_check.py --out "$R/fsdp-one.json" "${F[@]}" 2>&1 | tail -1
  timeout 250 torchrun --nproc_per_node "$N" scripts/fsdp_check.py --out "$R/fsdp-${N}.json" --fsdp "${F[@]}" 2>&1 | tail -1
  python3 scripts/fsdp_check.py --compare "$R/fsdp-one.json" "$R/fsdp-${N}.json" | tee "$R/fsdp-check.txt" ;;
eval)
  mkdir -p /root/models
  [ -f /root/models/gemma.gguf ] || (cd /root/models && cat /root/stage/models.tar.part* | tar xf - \
    && sha256sum -c "$OLDPWD/.stage-data/SHA256") || exit 1
  python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site
  export AHFA_AUTOTUNE=0  # the default launch configuration on every GPU: timing-chosen ones could differ per GPU
  BOOKS=$(ls .stage-data/*.txt)
  ARGS=(perplexity --protocol long --model /root/models --gguf-file gemma.gguf --window-start bos --data-files $BOOKS
        --context-lengths 8192,16384 --score-tokens 4096 --mode adaptive --tau 0.99 --baseline ahfa --device cuda
        --out-dir "$R")
  t0=$SECONDS
  timeout 250 python3 -m hf_ahfa.eval.cli "${ARGS[@]}" --name ppl-one-gpu 2>&1 | tail -5
  t1=$SECONDS
  timeout 250 accelerate launch --multi_gpu --num_processes "$N" -m hf_ahfa.eval.cli "${ARGS[@]}" \
    --name "ppl-${N}-gpus" 2>&1 | tail -5
  echo "wall seconds (model loading included): one GPU $((t1 - t0)), $N GPUs $((SECONDS - t1))" \
    | tee "$R/ppl-multi-gpu-wall.txt"
  python3 - "$R/ppl-one-gpu.json" "$R/ppl-${N}-gpus.json" <<'EOF' | tee "$R/ppl-multi-gpu-check.txt"
import json, sys
one, many = (json.load(open(p)) for p in sys.argv[1:])
strip = lambda rows: [{k: v for k, v in r.items() if k != "seconds"} for r in rows]
same = strip(one["rows"]) == strip(many["rows"])
secs = [sum(r.get("seconds") or 0 for r in d["rows"]) for d in (one, many)]
print(f"rows identical: {same} ({len(one['rows'])} rows); summed item seconds one GPU {secs[0]:.1f}, "
      f"several {secs[1]:.1f}")
EOF
  ;;
esac
