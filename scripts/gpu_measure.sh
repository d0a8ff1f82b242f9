#!/usr/bin/env bash
# Real-model measurements on the accelerator machine (issue 4). Model files travel in parts: earlier
# calls each carried one .stage-models.tar.part* folder and copied it to /root/stage (see
# scripts/stage_part.sh); this call carries the last part, .stage-data (books, Wikipedia summaries,
# SHA256) and .whl (datasets, dill, multiprocess, gguf wheels), joins the parts and runs.
set -uo pipefail
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
OUT=${OUT:-/tmp/ahfa-out}
repo=$(pwd)
mkdir -p /root/stage /root/models && cp .stage-models.tar.part*/* /root/stage/ 2>/dev/null
(cd /root/models && cat /root/stage/models.tar.part* | tar xf - && sha256sum -c "$repo/.stage-data/SHA256") || exit 1
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site
python3 -m pip install -q --no-deps --no-build-isolation -e . || exit 1
ev() { timeout "$1" python3 -m hf_ahfa.eval.cli "${@:2}" --out-dir "$OUT" 2>&1 | grep -v "Warning\|warn(" | tail -25; }
# SmolLM2-135M: Wikipedia-summary perplexity, exact ahfa vs sdpa
[ "${SKIP_WIKI:-0}" = 1 ] || ev 200 perplexity --model /root/models --gguf-file smollm2.gguf --data-files .stage-data/summaries_en-us.json \
  --text-column extract --max-length 2048 --max-tokens 400000 --batch-size 8 --name ppl-wiki-smollm2
# Gemma-3-270m: long-context perplexity on the four Austen novels at 2K..32K
ev 300 perplexity --protocol long --model /root/models --gguf-file gemma.gguf --data-files .stage-data/austen_*.txt \
  --context-lengths 2048,8192,16384,32768 --score-tokens 512 --window-start bos --name ppl-long-gemma3
# (the GGUF tokenizer under transformers 5.17 does not add Gemma's <bos>; the model needs it)
# Whole-model prefill / decode / training step: SmolLM2 (vocabulary small enough to train at 8K on one GPU)
[ "${SKIP_MODEL_SPEED:-0}" = 1 ] || ev 200 speed --model /root/models --gguf-file smollm2.gguf --seq-lens 1024,2048,4096,8000 --decode-tokens 64 \
  --name model-speed-smollm2
rm -f "$OUT"/*.jsonl  # the resume stores: the JSON files hold the same rows
