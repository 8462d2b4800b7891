#!/usr/bin/env bash
# Speed and memory of SPAP-pruned models against their dense base, timed side by side in one
# process by `spap bench`; writes bench/results/speed-<model>.json.
#   usage: bench/speed.sh [model ...]   (default: qwen2.5-coder-0.5b smollm2-135m)
# The pruned width is what matters for speed, so the fast SPAP setting (greedy start, no
# penalty iterations, refit toward dense) is used to make the pruned folder quickly.
set -euo pipefail
cd "$(dirname "$0")/.."
SPAP=${SPAP:-.venv/bin/spap}
for m in ${*:-qwen2.5-coder-0.5b smollm2-135m}; do
  out=bench/models/$m-spap30
  [ -f "$out/spap.json" ] || $SPAP prune "$m" --sparsity 0.3 --out "$out" --overwrite \
      --nsamples 8 --seqlen 512 --device cpu --option starts=greedy --option iters=0
  $SPAP bench "$out" --vs "$m" --batch-sizes 1,8 --prompt-lens 128,512 --gen-tokens 32 \
      --reps 5 --device cpu --json "bench/results/speed-$m.json"
done
.venv/bin/python bench/report.py
