#!/usr/bin/env bash
# Attention pruning, same protocol and tokens as bench/compare.sh (64 x 512 calibration, 32 x 512
# perplexity windows, 8 probe windows), on MODEL (default smollm2-135m: 9 query heads in 3 KV
# groups; qwen2.5-coder-0.5b has 14 in 2):
#   heads    -> bench/results/heads-MODEL.json: the head decisions at the same heads removed
#               (--sparsities 0: the MLP untouched), one query head of every KV group
#               (heads=0.34) and one whole KV group (kv_groups=0.34): obs (least squares over
#               head blocks with the shared ridge refit) against wanda-sp's, FLAP's and the
#               magnitude head scores, each as published (dense columns) and with the same
#               shared refit (head.update=true);
#   params   -> bench/results/params-MODEL.json: BUDGET (default 0.3) of the non-embedding
#               parameters removed by MLP channels only, by one query head per KV group plus
#               MLP, and by one KV group plus MLP, for spap and BASELINE (default obs-ridge;
#               fasp-ridge on Qwen, its strongest there); a budget other than 0.3 names its
#               variants with a -<percent> suffix, and the pass is merged into the file;
#   kv       -> bench/results/speed-MODEL-kv.json: spap bench of the KV-group-pruned model
#               against the dense one at a 2048-token context.
#   usage: [MODEL=...] [BUDGET=0.2] [METHODS="spap obs-ridge"] bench/heads.sh [heads|params|kv ...]
#          (default: all three; METHODS picks among spap, obs-ridge and fasp-ridge for params,
#          VARIANTS="kv-flap-refit ..." picks among the heads variants)
# Set OMP_NUM_THREADS=1 to run it beside another job on two cores.
set -euo pipefail
cd "$(dirname "$0")/.."
SPAP=${SPAP:-.venv/bin/spap}
PY=${PY:-.venv/bin/python}
MODEL=${MODEL:-smollm2-135m}
BUDGET=${BUDGET:-0.3}
METHODS=${METHODS:-spap obs-ridge}
SIZES="--nsamples 64 --seqlen 512 --eval-seqlen 512 --eval-windows 32 --probe-windows 8"
out=bench/results
mkdir -p runs

# Run a compare pass into runs/, then merge it into bench/results/$1 (or make it that file).
pass() {
  local file=$1; shift
  local tmp=runs/$(basename "$file" .json)-pass-$$.json
  $SPAP compare "$MODEL" "$@" --sparsities 0 $SIZES --device cpu --json "$tmp"
  if [ -f "$out/$file" ]; then $PY bench/merge_compare.py "$out/$file" "$tmp"
  else mv "$tmp" "$out/$file"; fi
}

declare -A SPEC=([spap]="spap:" [obs-ridge]="obs:refit=ridge;" [fasp-ridge]="fasp:refit=ridge;")
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
      if [ -n "${VARIANTS:-}" ]; then  # only the named ones
        keep=""
        for v in ${m//,/ }; do
          for want in $VARIANTS; do [ "${v%%=*}" = "$want" ] && keep+="$v,"; done
        done
        m=$keep
      fi
      pass "heads-$MODEL.json" --methods "${m%,}" ;;
    params)
      pct=$(awk -v b="$BUDGET" 'BEGIN { printf "%d", b * 100 + 0.5 }')
      suffix=$([ "$pct" = 30 ] && echo "" || echo "-$pct")
      m=""
      for meth in $METHODS; do
        for s in mlp heads kv; do
          m+="$meth-$s$suffix=${SPEC[$meth]}params=$BUDGET;params_of=non-embedding;params_split=$s,"
        done
      done
      pass "params-$MODEL.json" --methods "${m%,}" ;;
    kv)
      tmp=$(mktemp -d)
      # (speed does not depend on the calibration size: 16 x 512 keeps this step short)
      $SPAP prune "$MODEL" --sparsity 0 --kv-groups 0.34 --method obs \
        --nsamples 16 --seqlen 512 --device cpu --out "$tmp/kv"
      $SPAP bench "$tmp/kv" --vs "$MODEL" --device cpu --prompt-lens 2048 --gen-tokens 32 \
        --json "$out/speed-$MODEL-kv.json"
      rm -rf "$tmp" ;;
    *) echo "unknown: $what (heads, params or kv)" >&2; exit 2 ;;
  esac
done
$PY bench/report.py
