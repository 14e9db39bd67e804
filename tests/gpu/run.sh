#!/usr/bin/env bash
# Device checks, one script: the CUDA backend (correctness against the CPU
# backend, batch invariance, throughput) and kvtransfer's GPU transports
# (cuda_ipc between two processes on one GPU; nccl between two GPUs when
# there are two). Skips cleanly without a device. Ends with one table.
#
# Builds into build-gpu/ (CUDA on, from a clean tree when it has no cache)
# unless TANDEM_GPU_BUILD names a build folder that already holds the
# binaries. The log goes to $OUT/gpu_checks.log when OUT is set (the kvx part
# also to $OUT/kvx_gpu.log, as before), else to stdout only.
set -u
cd "$(dirname "$0")/../.." || exit 1
LOG=/dev/null
if [ -n "${OUT:-}" ]; then mkdir -p "$OUT"; LOG="$OUT/gpu_checks.log"; fi
exec > >(tee -a "$LOG") 2>&1
START=$(date +%s)

if ! command -v nvidia-smi >/dev/null 2>&1 || ! nvidia-smi -L >/dev/null 2>&1; then
  echo "SKIP: no GPU (nvidia-smi finds none)"
  exit 0
fi
nvidia-smi -L
NGPU=$(nvidia-smi -L | grep -c '^GPU')
BUILD=${TANDEM_GPU_BUILD:-build-gpu}
TARGETS="tandem-kvx-gpu-check test_kvx tandem-backend-gpu-check test_cpu_backend make-test-model
  tandem-generate tandem-prefill tandem-decode tandem-decode-cli"
if [ ! -x "$BUILD/bin/tandem-backend-gpu-check" ] || [ -z "${TANDEM_GPU_BUILD:-}" ]; then
  echo "== build ($BUILD, CUDA on) =="
  if [ ! -f "$BUILD/CMakeCache.txt" ]; then
    mkdir -p "$BUILD"
    if ! cmake -S . -B "$BUILD" -DTANDEM_CUDA=ON -DCMAKE_BUILD_TYPE=Release \
        >"$BUILD/configure.log" 2>&1; then
      tail -20 "$BUILD/configure.log"
      echo "FAIL: configure failed (build dependencies missing here? run binaries built"
      echo "elsewhere with TANDEM_GPU_BUILD=DIR, see tests/gpu/README.md)"
      exit 1
    fi
  fi
  # shellcheck disable=SC2086
  cmake --build "$BUILD" -j"$(nproc)" --target $TARGETS || exit 1
  echo "build: $(( $(date +%s) - START )) s"
fi
BIN="$BUILD/bin"
TMP=$(mktemp -d)
trap 'rm -rf "$TMP"' EXIT
TABLE="$TMP/table"
: >"$TABLE"
rc=0
# The lines of a check's output that go into the table.
DETAIL_RE='^(FAIL|SKIP|PASS prefill|PASS disagg|PASS cuda_ipc|PASS nccl|INFO decode|INFO prefill|INFO transfer)'
# row NAME STATUS DETAIL
row() { printf '%-34s %-8s %s\n' "$1" "$2" "$3" >>"$TABLE"; }
# Checks that would start after this many seconds are reported as not run, so
# that the script ends well inside a device session.
BUDGET=${TANDEM_GPU_BUDGET_S:-420}
# check NAME TIMEOUT CMD...: runs CMD, a row from its exit status (77: skip).
check() {
  local name=$1 t=$2
  shift 2
  if [ $(( $(date +%s) - START )) -gt "$BUDGET" ]; then
    row "$name" "NOT RUN" "time budget (${BUDGET} s) spent"
    : >"$TMP/out"
    return
  fi
  echo "== $name =="
  timeout "$t" "$@" >"$TMP/out" 2>&1
  local r=$?
  cat "$TMP/out"
  local detail
  detail=$(grep -E "$DETAIL_RE" "$TMP/out" | head -4 | tr '\n' ' ')
  if [ $r -eq 0 ]; then row "$name" PASS "$detail"
  elif [ $r -eq 77 ]; then row "$name" SKIP "$(tail -1 "$TMP/out")"
  else row "$name" FAIL "exit $r $detail"; rc=1; fi
}

# ---- (a) CUDA backend against the CPU backend ----
check "conformance suite (cpu + cuda)" 300 "$BIN/test_cpu_backend"
for shape in 15m tiny-qwen2 tiny-mistral; do
  for dt in f32 bf16; do
    d="$TMP/$shape-$dt"
    if ! "$BIN/make-test-model" --format hf --shape "$shape" --dtype "$dt" --seed 1 --out "$d" \
        >/dev/null 2>&1; then
      row "correct $shape $dt" FAIL "make-test-model failed"; rc=1; continue
    fi
    if [ "$dt" = f32 ]; then
      check "correct $shape $dt" 120 "$BIN/tandem-backend-gpu-check" correct "$d" 1e-4 --exact-tokens
    else
      check "correct $shape $dt" 120 "$BIN/tandem-backend-gpu-check" correct "$d" 2e-2
    fi
  done
done
S260=../shared/models/stories260K/stories260K.bin
if [ -f "$S260" ]; then
  check "correct stories260K f32" 120 "$BIN/tandem-backend-gpu-check" correct "$S260" 1e-4 \
    --exact-tokens
else
  row "correct stories260K f32" SKIP "$S260 absent"
fi

# ---- (b), (c) throughput at a Llama-3-8B shape, random BF16 weights ----
check "decode bench (8B shape, b 1/8/64)" 240 "$BIN/tandem-backend-gpu-check" decode-bench
check "prefill bench (8B shape, 2048 tok)" 180 "$BIN/tandem-backend-gpu-check" prefill-bench

# ---- (d) disaggregated prefill + decode workers on one GPU ----
if command -v python3 >/dev/null 2>&1; then
  check "disaggregated, cuda_ipc, 1 GPU" 240 python3 tests/gpu/workers_gpu.py "$BIN"
else
  row "disaggregated, cuda_ipc, 1 GPU" SKIP "python3 absent"
fi

# ---- kvtransfer GPU transports ----
KVLOG=/dev/null
if [ -n "${OUT:-}" ]; then KVLOG="$OUT/kvx_gpu.log"; fi
check "kvx unit tests (GPU build)" 120 "$BIN/test_kvx"
cat "$TMP/out" >>"$KVLOG"
check "kvx cuda_ipc, 2 processes, 1 GPU" 120 "$BIN/tandem-kvx-gpu-check" cuda_ipc 0 0
cat "$TMP/out" >>"$KVLOG"
if [ "$NGPU" -ge 2 ]; then
  check "kvx nccl, GPU 0 -> GPU 1" 180 "$BIN/tandem-kvx-gpu-check" nccl 0 1
  cat "$TMP/out" >>"$KVLOG"
else
  row "kvx nccl" "NOT RUN" "needs two GPUs (NCCL refuses two ranks on one device)"
fi

echo
echo "== summary ($(( $(date +%s) - START )) s) =="
printf '%-34s %-8s %s\n' CHECK RESULT DETAIL
cat "$TABLE"
echo "gpu checks: $([ $rc -eq 0 ] && echo PASS || echo FAIL)"
exit $rc
