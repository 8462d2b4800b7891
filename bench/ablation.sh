#!/usr/bin/env bash
# What each piece of SPAP contributes, on the protocol of bench/compare.sh:
#   spap              the default: LOO penalty decision (greedy + uniform starts) + refit toward dense
#   spap-exact-refit  same decision, exact (damped) least-squares refit
#   spap-lp           the paper's penalty as first written: binary LP s-step from the OBS score, exact refit
#   spap-fast         greedy OBS mask only (no penalty iterations) + refit toward dense
# (recovery_rounds=1, alternating (up, down) refit chosen on held-out tokens, is available
#  as an option but is not in this run: about 40 s per layer on one core)
#   usage: bench/ablation.sh [model] [sparsities]
set -euo pipefail
cd "$(dirname "$0")/.."
m=${1:-smollm2-135m}
s=${2:-0.5}
OMP_NUM_THREADS=${OMP_NUM_THREADS:-1} .venv/bin/spap compare "$m" --sparsities "$s" \
  --methods "spap,spap-exact-refit=spap:ridge_grid=,spap-lp=spap:s_step=lp;starts=obs;ridge_grid=,spap-fast=spap:starts=greedy;iters=0" \
  --nsamples 16 --seqlen 512 --eval-seqlen 512 --eval-windows 16 --device cpu \
  --json "bench/results/ablation-$m.json" --plot "bench/results/ablation-$m.png"
.venv/bin/python bench/report.py
