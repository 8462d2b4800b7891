#!/usr/bin/env bash
# What each piece of SPAP contributes, and what it costs, on the protocol of bench/compare.sh
# (same calibration, evaluation and probe tokens, so its records sit beside the compare
# table's), at one sparsity:
#   spap-norec   decision (greedy OBS mask) + the shared ridge refit, no recovery: what the
#                baselines can have too (it is obs-ridge with 16 columns per greedy step)
#   spap-joint   recovery by Adam on gate, up and down at once instead of alternating
#                (Adam on gate/up, closed-form down)
#   spap-model   recovery toward the dense model's own MLP output (SPAP_METHOD.md section 4,
#                the other target) instead of the dense MLP on the pruned model's inputs
#   wanda-sp     the time reference
#   usage: bench/ablation.sh [model] [sparsity]     (default smollm2-135m 0.5)
set -euo pipefail
cd "$(dirname "$0")/.."
m=${1:-smollm2-135m}
s=${2:-0.5}
case $m in
  smollm2-135m) SIZES="--nsamples 64 --seqlen 512 --eval-seqlen 512 --eval-windows 32 --probe-windows 8" ;;
  qwen2.5-coder-0.5b) SIZES="--nsamples 16 --seqlen 512 --eval-seqlen 512 --eval-windows 16 --probe-windows 4" ;;
  *) SIZES="" ;;
esac
ALL="wanda-sp,spap-norec=spap:recovery=none,spap-joint=spap:recovery=joint,spap-model=spap:recovery_target=model"
.venv/bin/spap compare "$m" --sparsities "$s" --methods "${ABLATION_METHODS:-$ALL}" \
  $SIZES --device cpu \
  --json "bench/results/ablation-$m.json" --plot "bench/results/ablation-$m.png"
.venv/bin/python bench/report.py
