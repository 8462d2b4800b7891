#!/usr/bin/env bash
# Produce bench/results/compare-*.json (+ .png) with `spap compare`, then BENCHMARKS.md.
# CPU-sized protocol (2 cores): 16 (SmolLM2) or 8 (Qwen) calibration windows x 512 tokens,
# perplexity on the first 16 (8) windows x 512 held-out Wikipedia tokens, held-out layer
# errors on 4 (2) probe windows x 512 from the end of the held-out text. On a GPU, drop the
# size flags to get the literature's 128 x 2048 calibration and full 2048-token evaluation.
#   usage: bench/compare.sh [smollm2-135m|qwen2.5-coder-0.5b ...]
# Set OMP_NUM_THREADS=1 to run two models side by side on two cores.
set -euo pipefail
cd "$(dirname "$0")/.."
SPAP=${SPAP:-.venv/bin/spap}
MODELS=${*:-smollm2-135m qwen2.5-coder-0.5b}
for m in $MODELS; do
  case $m in
    smollm2-135m) SIZES="--nsamples 16 --seqlen 512 --eval-seqlen 512 --eval-windows 16" ;;
    qwen2.5-coder-0.5b) SIZES="--nsamples 8 --seqlen 512 --eval-seqlen 512 --eval-windows 8" ;;
    *) SIZES="" ;;
  esac
  $SPAP compare "$m" --methods spap,obs,fasp,flap,wanda-sp,magnitude \
    --sparsities "${SPARSITIES:-0.2,0.3,0.4,0.5}" $SIZES --device cpu \
    --json "bench/results/compare-$m.json" --plot "bench/results/compare-$m.png"
done
.venv/bin/python bench/report.py
