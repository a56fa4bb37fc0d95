#!/usr/bin/env bash
# One GPU against a data=2 mesh on the same host (nvidia-h200-x2), 30B shape, random weights: 200K prefill and
# batch-1 decode for all F and FSSS (bench e2e), then the memory plans of the same runs compiled for these GPUs
# (plan --backend local), to set beside the peaks bench e2e measured. JSON under OUT (default results/).
# Usage: scripts/mesh_scaling.sh [CONTEXT]
set -euo pipefail
CTX=${1:-200k}
OUT=${OUT:-results}
mkdir -p "$OUT"
E2E=(python -m ic_jax.bench e2e --contexts "$CTX" --patterns F FSSS --decode-steps 32 --chunk-size 16384)
PLAN=(python -m ic_jax.plan --config glm47_flash_dsa --context "$CTX" --chunk-size 16384 --backend local --json)
CUDA_VISIBLE_DEVICES=0 timeout 300 "${E2E[@]}" --json "$OUT/e2e_one_gpu.json" 2>&1 | grep -v Warning | tail -4
timeout 240 "${E2E[@]}" --mesh data=2 --json "$OUT/e2e_data2.json" 2>&1 | grep -v Warning | tail -4
for pattern in F FSSS; do
  CUDA_VISIBLE_DEVICES=0 timeout 120 "${PLAN[@]}" --pattern $pattern > "$OUT/plan_one_gpu_$pattern.json" || true
  timeout 120 "${PLAN[@]}" --pattern $pattern --mesh data=2 > "$OUT/plan_data2_$pattern.json" || true
done
tail -n +1 "$OUT"/plan_*.json | cut -c1-400
