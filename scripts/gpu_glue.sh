#!/usr/bin/env bash
# GLUE measurement on the accelerator machine (issue 4): MiniLM-L6 on the movie-review SST-2-like task.
# The model travels in two parts: an earlier call copied .stage-glue-minilm.tar.partaa to /root/stage
# (scripts/stage_part.sh pattern); this call carries the last part, .stage-glue-data and .whl.
set -uo pipefail
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
OUT=${OUT:-/tmp/ahfa-out}
mkdir -p /root/stage /root/glue && cp .stage-glue-minilm.tar.part*/* /root/stage/ 2>/dev/null
(cd /root/glue && cat /root/stage/minilm.tar.part* | tar xf -) || exit 1
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site
python3 -m pip install -q --no-deps --no-build-isolation -e . || exit 1
timeout 450 python3 -m hf_ahfa.eval.cli glue --task sst2 --model /root/glue/model \
  --movie-reviews .stage-glue-data/vaderSentiment-3.3.2.tar.gz --epochs 1 --lr 1e-4 --batch-size 32 \
  --max-length 64 --seeds 0,1,2 --out-dir "$OUT" --name glue-sst2-minilm-h100 2>&1 \
  | grep -v "it/s\]\|s/it\]\|Warning\|warn(" | tail -40
rm -f "$OUT"/*.jsonl
