#!/usr/bin/env bash
# Produce bench/results/compare-*.json (+ .png) with `spap compare`, then BENCHMARKS.md.
# Protocol at sizes users run on a CPU: SmolLM2-135M 64 x 512 calibration tokens
# (32,768 tokens against a 1,536-wide Gram), Qwen2.5-Coder-0.5B 16 x 512 (8,192 against
# 4,864); 1/8 of the windows are held out for the ridge and the recovery length, token-disjoint
# from the rest. Perplexity on the first 32 (Qwen: 16) windows x 512 held-out Wikipedia
# tokens; held-out layer errors on 8 (4) probe windows from the end of the held-out text.
# Every baseline that refits also runs with the shared ridge refit (`refit=ridge`), so each
# margin is stated against the strongest variant in the same run. On a GPU, drop the size
# flags to get the literature's 128 x 2048 calibration and full 2048-token evaluation.
#
# The methods run in two passes of the same protocol (same tokens, checked by
# bench/merge_compare.py): first the ones that decide the margin (spap and obs in both
# refits, wanda-sp as the time reference), then the weaker baselines (EXTRA_METHODS), so an
# interrupted run on 2 cores still has the comparison that matters.
#   usage: bench/compare.sh [smollm2-135m|qwen2.5-coder-0.5b ...]
#   SAVE_MODELS=DIR also saves every pruned model (for bench/zeroshot.py)
#   COMPARE_METHODS= (empty) skips the first pass, EXTRA_METHODS= the second
#   MERGE=1 adds the records to an existing compare-<model>.json (other sparsities, say
#   SPARSITIES=0.3) instead of replacing it; the protocols must match
# Set OMP_NUM_THREADS=1 to run two models side by side on two cores.
set -euo pipefail
cd "$(dirname "$0")/.."
SPAP=${SPAP:-.venv/bin/spap}
MODELS=${*:-smollm2-135m qwen2.5-coder-0.5b}
METHODS=${COMPARE_METHODS-spap,spap-drift=spap:refit_target=drift,obs-ridge=obs:refit=ridge,obs-ridge-drift=obs:refit=ridge;refit_target=drift,obs,wanda-sp}
EXTRA=${EXTRA_METHODS-fasp-ridge=fasp:refit=ridge,fasp-ridge-drift=fasp:refit=ridge;refit_target=drift,fasp,flap}
for m in $MODELS; do
  case $m in
    smollm2-135m) SIZES="--nsamples 64 --seqlen 512 --eval-seqlen 512 --eval-windows 32 --probe-windows 8" ;;
    qwen2.5-coder-0.5b) SIZES="--nsamples 16 --seqlen 512 --eval-seqlen 512 --eval-windows 16 --probe-windows 4" ;;
    *) SIZES="" ;;
  esac
  out=bench/results/compare-$m
  for pass in main extra; do
    list=$METHODS; json=$out.json
    if [ $pass = extra ]; then list=$EXTRA; fi
    [ -n "$list" ] || continue
    merge=
    if [ $pass = extra ] || { [ -n "${MERGE-}" ] && [ -f "$out.json" ]; }; then
      json=$out-$pass.json; merge=1
    fi
    $SPAP compare "$m" --methods "$list" \
      --sparsities "${SPARSITIES:-0.5,0.3}" $SIZES --device cpu \
      ${SAVE_MODELS:+--save-models "$SAVE_MODELS/$m"} --json "$json"
    if [ -n "$merge" ]; then .venv/bin/python bench/merge_compare.py "$out.json" "$json"; fi
  done
  .venv/bin/python -c "import json, spap.compare as c; c.plot(json.load(open('$out.json')), '$out.png')"
done
.venv/bin/python bench/report.py || true
