#!/usr/bin/env bash
# GPU checks for kvtransfer: cuda_ipc between two processes on one GPU, and
# nccl between two GPUs when there are two. Skips cleanly without a device.
# Builds into build-gpu/ (CUDA on) unless TANDEM_GPU_BUILD points elsewhere.
# The log goes to $OUT/kvx_gpu.log when OUT is set, else to stdout only.
set -u
cd "$(dirname "$0")/../.."
LOG=/dev/null
if [ -n "${OUT:-}" ]; then mkdir -p "$OUT"; LOG="$OUT/kvx_gpu.log"; fi
exec > >(tee -a "$LOG") 2>&1

if ! command -v nvidia-smi >/dev/null 2>&1 || ! nvidia-smi -L >/dev/null 2>&1; then
  echo "SKIP: no GPU (nvidia-smi finds none)"
  exit 0
fi
nvidia-smi -L
NGPU=$(nvidia-smi -L | grep -c '^GPU')
BUILD=${TANDEM_GPU_BUILD:-build-gpu}
if [ ! -x "$BUILD/bin/tandem-kvx-gpu-check" ]; then
  cmake -S . -B "$BUILD" -DTANDEM_CUDA=ON -DCMAKE_BUILD_TYPE=Release >/dev/null || exit 1
  cmake --build "$BUILD" -j"$(nproc)" --target tandem-kvx-gpu-check test_kvx || exit 1
fi
rc=0
echo "== unit tests (CPU transports, with the GPU build) =="
"$BUILD/bin/test_kvx" || rc=1
echo "== cuda_ipc, two processes, one GPU =="
timeout 120 "$BUILD/bin/tandem-kvx-gpu-check" cuda_ipc 0 0; r=$?
[ $r -ne 0 ] && [ $r -ne 77 ] && rc=1
if [ "$NGPU" -ge 2 ]; then
  echo "== nccl, two processes, GPU 0 -> GPU 1 =="
  timeout 180 "$BUILD/bin/tandem-kvx-gpu-check" nccl 0 1; r=$?
  [ $r -ne 0 ] && [ $r -ne 77 ] && rc=1
else
  echo "SKIP nccl: needs two GPUs (NCCL refuses two ranks on one device)"
fi
echo "kvx gpu checks: $([ $rc -eq 0 ] && echo PASS || echo FAIL)"
exit $rc
