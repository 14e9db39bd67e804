#!/usr/bin/env bash
# Configures and builds Tandem into BUILD_DIR (default: build/).
# Usage: scripts/build.sh [--asan] [--debug]
set -euo pipefail
cd "$(dirname "$0")/.."

BUILD_DIR=${BUILD_DIR:-build}
BUILD_TYPE=Release
SANITIZE=OFF
for arg in "$@"; do
  case "$arg" in
    --asan) SANITIZE=ON; BUILD_TYPE=Debug; BUILD_DIR=${BUILD_DIR}-asan ;;
    --debug) BUILD_TYPE=Debug ;;
    *) echo "build.sh: unknown option $arg" >&2; exit 2 ;;
  esac
done

bash scripts/deps.sh
WERROR=OFF
if [ "${CI:-}" = "true" ]; then WERROR=ON; fi
cmake -S . -B "$BUILD_DIR" -DCMAKE_BUILD_TYPE="$BUILD_TYPE" -DTANDEM_SANITIZE="$SANITIZE" \
  -DTANDEM_WERROR="$WERROR" -DCMAKE_EXPORT_COMPILE_COMMANDS=ON >/dev/null
cmake --build "$BUILD_DIR" -j"$(nproc)"
