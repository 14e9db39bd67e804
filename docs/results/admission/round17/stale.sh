#!/bin/bash
# round 17b: both burst variants with a stale, pessimistic profile (round 16's round 5: taken in a slow stretch).
# Usage: stale.sh [ROUND...] (default 1 2 3; rounds 4 5 6 ran later with `stale.sh 4 5 6`)
set -u
cd "$(git rev-parse --show-toplevel)"
W=build/admexp/r17; B=build/admexp/bin17
TTFT=342.3; TPOT=7.73; CAP=2.570; SLO=(--slo-ttft-ms $TTFT --slo-tpot-ms $TPOT)
COST=docs/results/admission/round16/round5/cost.txt
ROUNDS=("$@"); [ $# -eq 0 ] && ROUNDS=(1 2 3)
for n in "${ROUNDS[@]}"; do
  P=$W/stale$n; mkdir -p $P
  nice -n -20 python3 bench/admission_experiment.py --cost $COST "${SLO[@]}" --model build/admexp/m15 --max-context 256 --max-requests 120 \
    --capacity $CAP --loads 1.5,2 --policies burst --configs $W/confA \
    --bin-dir $B --out $P/out --work $P/work > $P/run.log 2>&1
  nice -n -20 python3 bench/admission_experiment.py --cost $COST "${SLO[@]}" --model build/admexp/m15 --max-context 256 --max-requests 120 \
    --capacity $CAP --loads 1.5,2 --policies burst --configs $W/confB \
    --bin-dir $B --out $P/out-track --work $P/work-track > $P/run-track.log 2>&1
  echo "stale $n done $(date -u +%H:%M)" >> $W/log.txt
done
