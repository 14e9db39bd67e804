#!/bin/bash
# round 17b: both burst variants with a stale, pessimistic profile (round 16's round 5: taken in a slow stretch).
set -u
cd /work/main
W=build/admexp/r17; B=build/admexp/bin17
TTFT=342.3; TPOT=7.73; CAP=2.570; SLO=(--slo-ttft-ms $TTFT --slo-tpot-ms $TPOT)
COST=docs/results/admission/round16/round5/cost.txt
for n in 4 5 6; do
  P=$W/stale$n; mkdir -p $P
  nice -n -20 python3 bench/admission_experiment.py --cost $COST "${SLO[@]}" --model build/admexp/m15 --max-context 256 --max-requests 120 \
    --capacity $CAP --loads 1.5,2 --policies burst --configs $W/confA \
    --bin-dir $B --out $P/out --work $P/work > $P/run.log 2>&1
  nice -n -20 python3 bench/admission_experiment.py --cost $COST "${SLO[@]}" --model build/admexp/m15 --max-context 256 --max-requests 120 \
    --capacity $CAP --loads 1.5,2 --policies burst --configs $W/confB \
    --bin-dir $B --out $P/out-track --work $P/work-track > $P/run-track.log 2>&1
  echo "stale $n done $(date -u +%H:%M)" >> $W/log.txt
done
