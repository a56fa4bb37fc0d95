#!/usr/bin/env bash
# One GPU against two on one host (nvidia-h200-x2), same commit, same process environment: the 30B shape with random
# weights, `generate --json` per mesh. Usage: scripts/multi_gpu_check.sh TOKENS PATTERN SPEC...
# Each run is bounded by `timeout`, so a hang costs minutes, not the session; results go to $OUT (or /tmp).
set -u
tokens=$1; pattern=$2; shift 2
out=${OUT:-/tmp}
prompt=$out/prompt_$tokens.txt
python3 -c "import sys; t = open('README.md').read() * 200; open(sys.argv[1], 'w').write(t[:int(sys.argv[2])])" \
  "$prompt" "$tokens"
base=(python3 -m ic_jax.generate --config glm47_flash_dsa --init random --pattern "$pattern" --prompt-file "$prompt"
      --max-new-tokens 24 --temperature 0 --warmup --json --chunk-size 16384)
for spec in "$@"; do  # one | a mesh (tensor=2) | a mesh on the XLA path (tensor=2+xla)
  args=(); env=()
  case $spec in one) env=(CUDA_VISIBLE_DEVICES=0) ;; *) args=(--mesh "${spec%+xla}") ;; esac
  [[ $spec == *+xla ]] && args+=(--impl xla)
  name=${pattern}_${tokens}_${spec//[=+,]/_}
  echo "== $tokens tokens, $pattern, $spec"
  env "${env[@]}" timeout ${RUN_TIMEOUT:-240} "${base[@]}" "${args[@]}" 2>"$out/err_$name.txt" | tee "$out/gen_$name.json"
  echo "rc=${PIPESTATUS[0]}"; tail -2 "$out/err_$name.txt"
done
