#!/usr/bin/env bash
# Builds Tandem and runs the main job.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/build.sh
SHARED=${TANDEM_SHARED_DIR:-../shared}
MODEL="$SHARED/models/stories260K/stories260K.bin"
if [ -x build/bin/tandem-generate ] && [ -f "$MODEL" ]; then
  exec build/bin/tandem-generate --model "$MODEL" \
    --tokenizer "$SHARED/models/stories260K/tok512.bin" --max-tokens 200 --temperature 0
fi
echo "run.sh: built into build/bin:"; ls build/bin
