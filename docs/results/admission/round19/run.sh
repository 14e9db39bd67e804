#!/bin/bash
# round 19: burst's decode prediction beside prefills (commit e385535) against round 18's burst
# (binaries of 85e70e5), alternately, on round 18's SLOs, capacity and configs; a fresh profile
# first, given to every replay's router and simulation; none at 1.5x and 2x in each round.
set -u
cd "$(git rev-parse --show-toplevel)"
W=build/admexp/r19; A=build/admexp/bin18; B=build/admexp/bin19
R18=docs/results/admission/round18
mkdir -p $W $B && cp build/bin/tandem-* $B/
[ -x $A/tandem-router ] || { echo "round 18's binaries ($A) are missing: build 85e70e5 and copy its build/bin there"; exit 1; }
build/bin/make-test-model --format hf --shape 15m --dtype bf16 --seed 1 --out build/admexp/m15 >/dev/null
up() { nice -n -20 deploy/local/tandem-cluster up --run-dir $1 --model build/admexp/m15 --bin-dir $B --prefill 1 --decode 1 --http-listen 127.0.0.1:18300 --grpc-listen 127.0.0.1:18351 >$1.up.log 2>&1; }
down() { deploy/local/tandem-cluster down --run-dir $1 >/dev/null 2>&1; }
log() { echo "$* $(date -u +%H:%M:%S)" >> $W/log.txt; }
SLO=(--slo-ttft-ms 245.5 --slo-tpot-ms 2.55); CAP=0.929
up $W/prof; nice -n -20 python3 bench/profile_cost.py --url http://127.0.0.1:18300 --vocab 32000 --out $W/cost.txt --json $W/profile.json > $W/profile.txt 2>&1; down $W/prof
log profiled
run() { # $1 variant dir, $2 bin dir, $3 policies, $4 loads
  nice -n -20 python3 bench/admission_experiment.py --cost $W/cost.txt "${SLO[@]}" --model build/admexp/m15 --max-context 256 --max-requests 120 \
    --capacity $CAP --loads $4 --policies $3 --low-load-policies burst --configs $R18/configs \
    --bin-dir $2 --out $W/$1 --work $W/$1-work > $W/$1.log 2>&1
  log "$1"
}
for n in 1 2; do
  if [ $n -eq 1 ]; then run round$n-old $A burst 0.5,1.5,2; run round$n-new $B burst 0.5,1.5,2
  else run round$n-new $B burst 0.5,1.5,2; run round$n-old $A burst 0.5,1.5,2; fi
  run round$n-none $B none 1.5,2
done
