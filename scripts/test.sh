#!/usr/bin/env bash
# Builds Tandem and runs the whole test suite through CTest.
# Usage: scripts/test.sh [--asan]   (--asan: ASan+UBSan build, unit tests only)
set -euo pipefail
cd "$(dirname "$0")/.."

BUILD_DIR=${BUILD_DIR:-build}
LABEL_ARGS=()
if [ "${1:-}" = "--asan" ]; then
  bash scripts/build.sh --asan
  BUILD_DIR=${BUILD_DIR}-asan
  LABEL_ARGS=(-L unit)
  export ASAN_OPTIONS=detect_leaks=1:abort_on_error=1
  export UBSAN_OPTIONS=print_stacktrace=1:halt_on_error=1
else
  bash scripts/build.sh
fi
cd "$BUILD_DIR"
ctest --output-on-failure -j"$(nproc)" "${LABEL_ARGS[@]}"
