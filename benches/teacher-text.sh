#!/usr/bin/env bash
# Teacher-generated distillation text (LLM-QAT's data-free recipe): N samples of
# up to L tokens from the model, at temperature 1 and top-p 0.9, each started by
# a short generic prompt, written one after another to OUT. Distilling on the
# teacher's own text teaches its distribution broadly, where a training set
# teaches it on one domain (BENCHMARKS.md, "Depth": Tiny Shakespeare healed a
# folded model's held-out Shakespeare by 39% and WikiText-2 by 7%).
#
#   benches/teacher-text.sh [MODEL] [N] [L] [OUT]
#   (defaults: smollm2-135m 128 320 exports/teacher-text.txt)
#
# Sampling runs on the integer runtime from a Q8_0 bundle of the model
# (llama.cpp's grid, near-lossless; Burn's f32 decode is ~4x slower here).
set -euo pipefail
model=${1:-smollm2-135m}
n=${2:-128}
len=${3:-320}
out=${4:-exports/teacher-text.txt}
oqt=${OQT:-target/release/oqt}
mkdir -p "$(dirname "$out")"
q8="$(dirname "$out")/teacher-q8_0.oqt"
[ -f "$q8" ] || "$oqt" quantize --recipe gguf-q8_0 "$model" --no-eval --output "$q8" >/dev/null
prompts=("The" "In" "A" "It" "This" "When" "One" "There" "We" "After" "Many" "During" "His" "Her" "As" "For")
tmp="$out.tmp"
: > "$tmp"
for ((i = 0; i < n; i++)); do
  p=${prompts[$((i % ${#prompts[@]}))]}
  "$oqt" generate --bundle "$q8" --raw -p "$p" -n "$len" --temperature 1.0 --seed "$i" --json |
    python3 -c 'import json, sys; print(sys.argv[1] + json.load(sys.stdin)["text"] + "\n")' "$p" >> "$tmp"
done
mv "$tmp" "$out"
echo "$out: $(wc -c < "$out") bytes from $n samples"
