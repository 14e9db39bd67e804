#!/usr/bin/env bash
# Builds Tandem and runs the main job: greedy generation with the real tiny
# Llama (stories260K) from the shared models folder, or, when that folder is
# absent, with a random-weight model written by make-test-model.
# The serving cluster (router, prefill, decode) will replace this job.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/build.sh
SHARED=${TANDEM_SHARED_DIR:-../shared}
MODEL="$SHARED/models/stories260K/stories260K.bin"
if [ -f "$MODEL" ]; then
  echo "run.sh: greedy generation, stories260K (llama2.c format), 200 tokens from BOS" >&2
  exec build/bin/tandem-generate --model "$MODEL" \
    --tokenizer "$SHARED/models/stories260K/tok512.bin" --max-tokens 200 --temperature 0
fi
echo "run.sh: $MODEL not found; using a random 'tiny' model (its text is noise)" >&2
OUT=$(mktemp -d)
trap 'rm -rf "$OUT"' EXIT
build/bin/make-test-model --format hf --shape tiny --dtype f32 --seed 1 --out "$OUT/tiny"
build/bin/tandem-generate --model "$OUT/tiny" --prompt "Once upon a time" --max-tokens 32 \
  --temperature 0 --json
