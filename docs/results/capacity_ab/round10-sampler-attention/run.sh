#!/bin/bash
# The local cluster before this round's sampler and attention changes (commit
# d998fdb, built in BEFORE) against after (commit 7699a51), admission none,
# round 18's SLOs, 120 BurstGPT requests, two rounds alternating.
set -e
BEFORE=${BEFORE:?a checkout of d998fdb built with scripts/build.sh}
python3 bench/capacity_ab.py --a-bin "$BEFORE/build/bin" --b-bin build/bin --model build/admexp/m15 \
    --rates 1.0,1.5 --slo-ttft-ms 245.5 --slo-tpot-ms 2.55 --max-requests 120 --rounds 2 \
    --out build/capab-s28
