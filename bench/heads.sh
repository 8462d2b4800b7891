#!/usr/bin/env bash
# Attention pruning on SmolLM2-135M (9 query heads in 3 KV groups), same protocol and tokens as
# bench/compare.sh (64 x 512 calibration, 32 x 512 perplexity windows, 8 probe windows):
#   heads   -> bench/results/heads-smollm2-135m.json: the head decisions at the same heads
#              removed (--sparsities 0: the MLP untouched), one query head of every KV group
#              (heads=0.34) and one whole KV group (kv_groups=0.34): obs (least squares over
#              head blocks with the shared ridge refit) against wanda-sp's, FLAP's and the
#              magnitude head scores, each as published (dense columns) and with the same
#              shared refit (head.update=true);
#   params  -> bench/results/params-smollm2-135m.json: 30% of the non-embedding parameters
#              removed by MLP channels only, by one query head per KV group plus MLP, and by
#              one KV group plus MLP, for spap and obs-ridge;
#   kv      -> bench/results/speed-smollm2-135m-kv.json: spap bench of the KV-group-pruned
#              model against the dense one at a 2048-token context.
#   usage: bench/heads.sh [heads|params|kv ...]      (default: all three)
# Set OMP_NUM_THREADS=1 to run it beside another job on two cores.
set -euo pipefail
cd "$(dirname "$0")/.."
SPAP=${SPAP:-.venv/bin/spap}
SIZES="--nsamples 64 --seqlen 512 --eval-seqlen 512 --eval-windows 32 --probe-windows 8"
out=bench/results
for what in ${*:-heads params kv}; do
  case $what in
    heads)
      m=""
      for g in heads kv_groups; do
        tag=${g%_groups}
        m+="$tag-obs=obs:$g=0.34,"
        for h in wanda-sp flap magnitude; do
          m+="$tag-$h=obs:$g=0.34;head_method=$h,$tag-$h-refit=obs:$g=0.34;head_method=$h;head.update=true,"
        done
      done
      $SPAP compare smollm2-135m --methods "${m%,}" --sparsities 0 $SIZES --device cpu \
        --json $out/heads-smollm2-135m.json ;;
    params)
      m=""
      for s in mlp heads kv; do
        m+="spap-$s=spap:params=0.3;params_of=non-embedding;params_split=$s,"
        m+="obs-ridge-$s=obs:refit=ridge;params=0.3;params_of=non-embedding;params_split=$s,"
      done
      $SPAP compare smollm2-135m --methods "${m%,}" --sparsities 0 $SIZES --device cpu \
        --json $out/params-smollm2-135m.json ;;
    kv)
      tmp=$(mktemp -d)
      # (speed does not depend on the calibration size: 16 x 512 keeps this step short)
      $SPAP prune smollm2-135m --sparsity 0 --kv-groups 0.34 --method obs \
        --nsamples 16 --seqlen 512 --device cpu --out "$tmp/kv"
      $SPAP bench "$tmp/kv" --vs smollm2-135m --device cpu --prompt-lens 2048 --gen-tokens 32 \
        --json $out/speed-smollm2-135m-kv.json
      rm -rf "$tmp" ;;
    *) echo "unknown: $what (heads, params or kv)" >&2; exit 2 ;;
  esac
done
.venv/bin/python bench/report.py
