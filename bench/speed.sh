#!/usr/bin/env bash
# Speed and memory of a 30%-pruned model against its dense base, timed side by side in one
# process by `spap bench`; writes bench/results/speed-<model>.json.
#   usage: bench/speed.sh [model ...]   (default: qwen2.5-coder-0.5b)
# Speed depends only on the pruned shapes, which every method gives alike at one sparsity, so
# the pruned folder is made with the data-free `magnitude` method (seconds, not minutes).
# One torch thread, so that the timing owns one core of this 2-core machine even while other
# benchmarks run on the other. The settings are explicit (two prompt lengths, 16 generated
# tokens) so the published table is reproduced whatever `spap bench`'s device-sized defaults.
set -euo pipefail
cd "$(dirname "$0")/.."
SPAP=${SPAP:-.venv/bin/spap}
for m in ${*:-qwen2.5-coder-0.5b}; do
  out=bench/models/$m-mag30
  [ -f "$out/spap.json" ] || $SPAP prune "$m" --sparsity 0.3 --out "$out" --overwrite \
      --method magnitude --nsamples 1 --seqlen 32 --device cpu
  OMP_NUM_THREADS=1 $SPAP bench "$out" --vs "$m" --batch-sizes 1 --prompt-lens 128,512 \
      --gen-tokens 16 --reps 3 --threads 1 --device cpu --json "bench/results/speed-$m.json"
done
.venv/bin/python bench/report.py
