#!/usr/bin/env bash
# Builds Tandem and runs the whole test suite through CTest.
# Usage: scripts/test.sh           Release build, every test
#        scripts/test.sh --asan    ASan+UBSan build (build-asan/), unit tests
#        scripts/test.sh --tsan    ThreadSanitizer build (build-tsan/), threaded tests
set -euo pipefail
cd "$(dirname "$0")/.."

BUILD_DIR=${BUILD_DIR:-build}
CTEST_ARGS=()
case "${1:-}" in
  --asan)
    bash scripts/build.sh --asan
    BUILD_DIR=${BUILD_DIR}-asan
    CTEST_ARGS=(-L unit)
    export ASAN_OPTIONS=detect_leaks=1:abort_on_error=1
    export UBSAN_OPTIONS=print_stacktrace=1:halt_on_error=1
    ;;
  --tsan)
    bash scripts/deps.sh
    BUILD_DIR=${BUILD_DIR}-tsan
    cmake -S . -B "$BUILD_DIR" -DTANDEM_CUDA=OFF -DCMAKE_BUILD_TYPE=Debug \
      -DCMAKE_C_FLAGS="-fsanitize=thread -g -O1" -DCMAKE_EXE_LINKER_FLAGS=-fsanitize=thread >/dev/null
    cmake --build "$BUILD_DIR" -j"$(nproc)"
    # Debian's gRPC is not instrumented: tests/tsan.supp hides reports with its
    # frames (docs/concurrency.md).
    export TSAN_OPTIONS="suppressions=$PWD/tests/tsan.supp"
    CTEST_ARGS=(-R 'mpscq|metrics|cpu_backend|kvx|loadtest|sched|rpc')
    ;;
  "")
    bash scripts/build.sh
    ;;
  *)
    echo "test.sh: unknown option $1" >&2
    exit 2
    ;;
esac
cd "$BUILD_DIR"
ctest --output-on-failure -j"$(nproc)" "${CTEST_ARGS[@]}"
