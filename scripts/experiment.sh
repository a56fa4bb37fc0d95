#!/usr/bin/env bash
# The RESULTS.md experiment in one go (one GPU, ~9 minutes): train the embedded default and the 24-layer
# model, then overlap, greedy search to 1/2, 1/4, 1/8, distillation of the uniform patterns, and the table.
# Usage: OUT=dir scripts/experiment.sh   (results land in $OUT/results.tgz, the default model in $OUT/default.tgz)
# Knobs: DEFAULT=0 skips the default model, OVERLAP=0 the overlap analysis; TRAIN_S, BATCH, STEPS, RETRIEVAL size
# the 24-layer run; TRAIN=0 reuses runs/code24 and ANALYSIS=0 stops after training (to split the work over two
# device calls: runs/ is git-ignored, so it survives on a machine kept warm); DISTILL_STEPS sizes each distillation;
# BUDGET_S is the whole script's wall-clock budget (a distillation that would not leave 45 s for eval is skipped,
# and eval is cut short to stay inside it).
set -euo pipefail
export PYTHONUNBUFFERED=1 JAX_COMPILATION_CACHE_DIR=/tmp/jaxcache TQDM_MININTERVAL=15
OUT=${OUT:-out}; R=runs; mkdir -p "$OUT" $R/res
PY=${PY:-python3}
trap 'tar czf "$OUT/results.tgz" $R/res' EXIT
t0=$(date +%s); stamp() { echo "== $(( $(date +%s) - t0 ))s: $*"; }

DEFAULT=${DEFAULT:-1} TRAIN_S=${TRAIN_S:-140} BATCH=${BATCH:-8} STEPS=${STEPS:-2000} RETRIEVAL=${RETRIEVAL:-0.25}
BUDGET_S=${BUDGET_S:-585} TRAIN=${TRAIN:-1} ANALYSIS=${ANALYSIS:-1} OVERLAP=${OVERLAP:-1} DISTILL_STEPS=${DISTILL_STEPS:-80} DISTILL_S=55

[ "$DEFAULT" = 1 ] && { stamp "default model"
$PY -m ic_jax.train --config configs/code_small.json --out $R/default --steps 2000 --dense-steps 300 --batch 16 \
  --seq-len 512 --lr 2e-3 --save-every 500 --time-limit 55 --json | tee $R/res/train_default.json
tar czf "$OUT/default.tgz" $R/default; }

[ "$TRAIN" = 1 ] && { stamp "24-layer model"
$PY -m ic_jax.train --config configs/code24.json --out $R/code24 --steps $STEPS --dense-steps $((STEPS / 5)) \
  --batch $BATCH --retrieval-frac $RETRIEVAL --seq-len 1024 --lr 1.5e-3 --save-every 500 --time-limit $TRAIN_S --json | tee $R/res/train_code24.json; }
[ "$ANALYSIS" = 1 ] || { stamp done; exit 0; }

[ "$OVERLAP" = 1 ] && { stamp overlap
$PY -m ic_jax.overlap --ckpt $R/code24 --seqs 8 --out $R/res/overlap --pattern keep:0.25 --json; }

stamp search
for k in 0.5 0.25 0.125; do
  $PY -m ic_jax.search --ckpt $R/code24 --keep $k --calib-seqs 16 --impl xla --out $R/res/search_keep$k.json \
    --json $([ $k = 0.5 ] && echo --measure-compile)
done

stamp distill
for k in 0.25 0.125 0.5; do
  [ $(( $(date +%s) - t0 )) -lt $((BUDGET_S - DISTILL_S - 45)) ] && { stamp "distill keep:$k"
    timeout $DISTILL_S $PY -m ic_jax.distill --ckpt $R/code24 --pattern keep:$k --out $R/distill_keep$k \
      --steps $DISTILL_STEPS --save-every 40 --json || true; }
done

stamp eval
timeout $(( BUDGET_S - $(date +%s) + t0 )) $PY -m ic_jax.eval --ckpt $R/code24 --impl xla --out $R/res/eval.json --patterns FFFFFFFFFFFFFFFFFFFFFFFF \
  keep:0.5 @$R/res/search_keep0.5.json keep:0.25 @$R/res/search_keep0.25.json keep:0.125 @$R/res/search_keep0.125.json \
  --extra-ckpt $(for k in 0.5 0.25 0.125; do [ -f $R/distill_keep$k/config.json ] && echo $R/distill_keep$k; done)
for d in $R/code24 $R/distill_keep*; do [ -f $d/meta.json ] && cp $d/meta.json $R/res/meta_$(basename $d).json; done
if [ -f $R/code24/train_curve.png ]; then cp $R/code24/train_curve.png $R/res/train_code24.png; fi
stamp done
