#!/usr/bin/env bash
# What each piece of SPAP contributes, and what it costs, on the protocol of bench/compare.sh,
# with wanda-sp and obs in the same run as time and quality references:
#   spap              the default: greedy OBS start + LOO penalty iterations (keep the best
#                     iterate) + refit toward the dense weights, strength chosen on held-out
#                     calibration windows; float32 solve
#   spap-exact-greedy the default with exact greedy OBS (one column per step, not 16)
#   spap-greedy       same without penalty iterations (greedy OBS mask + held-out ridge refit)
#   spap-fast         one-shot OBS-score mask + held-out ridge refit (no greedy, no penalty)
#   spap-exact-refit  the default decision with the exact (damped) least-squares refit
#   spap-lp           the paper's penalty as first written: binary LP s-step from the OBS
#                     score, exact refit
#   spap-f64          the default in float64 (SmolLM2 only: 4x the solve time on Qwen)
#   spap-recover      the default + up to 2 rounds of alternating (up, down) refit toward the
#                     dense layer output, the number of rounds chosen per layer on held-out
#                     tokens (SmolLM2 only)
#   usage: bench/ablation.sh [model] [sparsity]
set -euo pipefail
cd "$(dirname "$0")/.."
m=${1:-smollm2-135m}
case $m in
  smollm2-135m) s=${2:-0.5}; SIZES="--nsamples 16 --seqlen 512 --eval-seqlen 512 --eval-windows 16"
                F64=",spap-f64=spap:solve_dtype=float64,spap-recover=spap:recovery_rounds=2" ;;
  qwen2.5-coder-0.5b) s=${2:-0.3}; SIZES="--nsamples 8 --seqlen 512 --eval-seqlen 512 --eval-windows 8"
                F64="" ;;
  *) s=${2:-0.5}; SIZES=""; F64="" ;;
esac
ALL="wanda-sp,obs,spap,spap-exact-greedy=spap:greedy_block=1,spap-greedy=spap:iters=0,spap-fast=spap:starts=obs;iters=0,spap-exact-refit=spap:ridge_grid=,spap-lp=spap:s_step=lp;starts=obs;ridge_grid=$F64"
# ABLATION_METHODS overrides the list. The Qwen run left out spap-exact-greedy and spap-lp
# (about 8 minutes each there on one core); spap-recover was started last and stopped: about
# 110 s per layer on one core, 45 minutes for the model. The Qwen JSON came from
#   ABLATION_METHODS="wanda-sp,spap,spap-fast=spap:starts=obs;iters=0,spap-greedy=spap:iters=0,obs,spap-exact-refit=spap:ridge_grid=" \
#     bench/ablation.sh qwen2.5-coder-0.5b
.venv/bin/spap compare "$m" --sparsities "$s" --methods "${ABLATION_METHODS:-$ALL}" \
  $SIZES --device cpu \
  --json "bench/results/ablation-$m.json" --plot "bench/results/ablation-$m.png"
.venv/bin/python bench/report.py
