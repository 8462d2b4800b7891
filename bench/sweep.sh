#!/usr/bin/env bash
# The margin as a function of data: SmolLM2-135M at sparsity 0.5, spap against the strongest
# obs variant (obs-ridge), calibration 8, 32 and 128 windows of 512 tokens (64 is the compare
# table), same evaluation and probe windows as bench/compare.sh.
#   usage: bench/sweep.sh [windows ...]     (default 8 32 128)
set -euo pipefail
cd "$(dirname "$0")/.."
for n in ${*:-8 32 128}; do
  .venv/bin/spap compare smollm2-135m --sparsities 0.5 \
    --methods "${SWEEP_METHODS:-spap,obs-ridge=obs:refit=ridge}" \
    --nsamples "$n" --seqlen 512 --eval-seqlen 512 --eval-windows 32 --probe-windows 8 \
    --device cpu --json "bench/results/sweep-smollm2-135m-n$n.json"
done
.venv/bin/python bench/report.py
