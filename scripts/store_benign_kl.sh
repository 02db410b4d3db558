#!/usr/bin/env bash
# Measure the benign KL of every shipped control vector at its suggested scale and store it in the
# file (`localsteer kl --save`), for the models given (default: every model with shipped vectors).
#
#   bash scripts/store_benign_kl.sh [MODEL...]
set -euo pipefail
cd "$(dirname "$0")/.."
models=("$@")
if [ ${#models[@]} -eq 0 ]; then
  for dir in vectors/*/; do
    name=$(basename "$dir")
    [ "$name" = datasets ] || models+=("$name")
  done
fi
for model in "${models[@]}"; do
  # every control vector: not the probes, nor the refusal adapters (LoRA files)
  find "vectors/$model" -name '*.gguf' ! -path '*/probes/*' | sort | while read -r v; do
    case "$v" in */refusal/*) [ "$(basename "$v")" = refusal-add.gguf ] || continue ;; esac
    .venv/bin/localsteer kl -m "$model" -v "$v" --save | tail -1
  done
done
