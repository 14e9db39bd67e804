#!/bin/bash
# round 17: burst with speed tracking (speed-track 0.1) against burst as in round 16 (speed-step 0.05), and none.
set -u
cd "$(git rev-parse --show-toplevel)"
W=build/admexp/r17; B=build/admexp/bin17
up() { nice -n -20 deploy/local/tandem-cluster up --run-dir $1 --model build/admexp/m15 --bin-dir $B --prefill 1 --decode 1 --http-listen 127.0.0.1:18300 --grpc-listen 127.0.0.1:18351 >$1.up.log 2>&1; }
down() { deploy/local/tandem-cluster down --run-dir $1 >/dev/null 2>&1; }
TTFT=342.3; TPOT=7.73; CAP=2.570; SLO=(--slo-ttft-ms $TTFT --slo-tpot-ms $TPOT)
for n in 1 2 3 4; do
  P=$W/round$n; mkdir -p $P
  up $P/prof
  nice -n -20 python3 bench/profile_cost.py --url http://127.0.0.1:18300 --vocab 32000 --out $P/cost.txt --json $P/profile.json > $P/profile.txt 2>&1
  down $P/prof
  LO=1.5,2; [ $n -le 2 ] && LO=0.5,1.5,2
  nice -n -20 python3 bench/admission_experiment.py --cost $P/cost.txt "${SLO[@]}" --model build/admexp/m15 --max-context 256 --max-requests 120 \
    --capacity $CAP --loads $LO --policies burst,none --low-load-policies burst --configs $W/confA \
    --bin-dir $B --out $P/out --work $P/work > $P/run.log 2>&1
  nice -n -20 python3 bench/admission_experiment.py --cost $P/cost.txt "${SLO[@]}" --model build/admexp/m15 --max-context 256 --max-requests 120 \
    --capacity $CAP --loads $LO --policies burst --low-load-policies burst --configs $W/confB \
    --bin-dir $B --out $P/out-track --work $P/work-track > $P/run-track.log 2>&1
  echo "round $n done $(date -u +%H:%M)" >> $W/log.txt
done
