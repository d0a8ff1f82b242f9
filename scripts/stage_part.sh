#!/usr/bin/env bash
# Copies the carried .stage-models.tar.part* folder to /root/stage on the warm device machine
# (one part per call; scripts/gpu_measure.sh joins them in the last call).
mkdir -p /root/stage && cp .stage-models.tar.part*/* /root/stage/ && ls -la /root/stage
