#!/bin/bash
# The local cluster on the AVX-512 kernels for every shape (A) against the
# AVX2 set (B, first run) and against the default choice (B, second run:
# AVX-512 from 4 rows of x, AVX2 below on a core whose 512-bit FMAs run at
# the 256-bit rate). Same binaries on both sides. docs/cpu-throughput.md,
# "Seventh round".
set -euo pipefail
cd "$(git rev-parse --show-toplevel)"
mkdir -p build/admexp/isa-bin
cp build/bin/tandem-* build/admexp/isa-bin/
build/bin/make-test-model --format hf --shape 15m --dtype bf16 --seed 1 --out build/admexp/m15
python3 bench/capacity_ab.py --a-bin build/admexp/isa-bin --b-bin build/admexp/isa-bin \
    --a-env TANDEM_CPU_AVX512=1 --b-env TANDEM_CPU_NO_AVX512=1 --model build/admexp/m15 \
    --rates 2.5,3.5,4.5 --slo-ttft-ms 342.3 --slo-tpot-ms 7.73 --max-requests 120 --rounds 2 \
    --out build/admexp/isa-ab
python3 bench/capacity_ab.py --a-bin build/admexp/isa-bin --b-bin build/admexp/isa-bin \
    --a-env TANDEM_CPU_AVX512=1 --model build/admexp/m15 \
    --rates 3.5,4.5 --slo-ttft-ms 342.3 --slo-tpot-ms 7.73 --max-requests 120 --rounds 1 \
    --out build/admexp/isa-ab2
