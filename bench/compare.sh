#!/usr/bin/env bash
# Produce bench/results/compare-*.json (+ .png) with `spap compare`, then BENCHMARKS.md.
# CPU-sized protocol (2 cores): 16 calibration windows x 512 tokens, perplexity on the first
# 16 windows x 512 held-out Wikipedia tokens. On a GPU, drop the size flags to get the
# literature's 128 x 2048 calibration and full 2048-token evaluation.
#   usage: bench/compare.sh [smollm2-135m|qwen2.5-coder-0.5b ...]
set -euo pipefail
cd "$(dirname "$0")/.."
SPAP=${SPAP:-.venv/bin/spap}
MODELS=${*:-smollm2-135m qwen2.5-coder-0.5b}
for m in $MODELS; do
  case $m in
    smollm2-135m) SIZES="--nsamples 16 --seqlen 512 --eval-seqlen 512 --eval-windows 16"
                  SPARS=0.2,0.3,0.4,0.5 ;;
    qwen2.5-coder-0.5b) SIZES="--nsamples 8 --seqlen 512 --eval-seqlen 512 --eval-windows 8"
                  SPARS=${QWEN_SPARSITIES:-0.3} ;;
    *) SIZES=""; SPARS=0.2,0.3,0.4,0.5 ;;
  esac
  $SPAP compare "$m" --methods spap,obs,fasp,flap,wanda-sp,magnitude --sparsities "$SPARS" \
    $SIZES --device cpu --json "bench/results/compare-$m.json" --plot "bench/results/compare-$m.png"
done
.venv/bin/python bench/report.py
