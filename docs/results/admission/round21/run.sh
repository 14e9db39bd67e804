#!/bin/bash
# round 21: round 20's replays (BurstGPT at its real lengths on 15m-4k, the same SLOs, capacity,
# rates and tuned configs) on the build with the attention softmax and SwiGLU on the vector
# exponential, which kept 90.0-93.3% of the requests within both SLOs at 0.42 req/s
# (docs/cpu-throughput.md, eleventh round, end to end). Each round takes its own profile.
set -u
cd "$(git rev-parse --show-toplevel)"
# W, B and DECODE_PROMPTS may be given (round22/run.sh does); by default round 21's
W=${W:-build/admexp/r21}; B=${B:-build/admexp/bin22}   # B: binaries copied once, never rebuilt while this runs
DECODE_PROMPTS=${DECODE_PROMPTS:-16,192,1024}
M=build/admexp/m15k; TRACE=../shared/data/burstgpt/BurstGPT_1_head.csv; N=120
ROUNDS=${ROUNDS:-1}; CAP=0.417; SLO=(--slo-ttft-ms 4285.3 --slo-tpot-ms 11.27)
mkdir -p $W $B && [ -x $B/tandem-router ] || cp build/bin/tandem-* $B/
[ -d $M ] || build/bin/make-test-model --format hf --shape 15m-4k --dtype bf16 --seed 1 --out $M >/dev/null
up() { nice -n -20 deploy/local/tandem-cluster up --run-dir $1 --model $M --bin-dir $B --prefill 1 --decode 1 --http-listen 127.0.0.1:18300 --grpc-listen 127.0.0.1:18351 >$1.up.log 2>&1; }
down() { deploy/local/tandem-cluster down --run-dir $1 >/dev/null 2>&1; }
profile() { mkdir -p $1; up $1/prof; nice -n -20 python3 bench/profile_cost.py --url http://127.0.0.1:18300 --vocab 32000 --reps 3 \
  --slo-prompt 1960 --slo-tpot-prompt 2215 --decode-prompts $DECODE_PROMPTS --out $1/cost.txt --json $1/profile.json > $1/profile.txt 2>&1; down $1/prof; }
log() { echo "$* $(date -u +%H:%M:%S)" >> $W/log.txt; }
COMMON=(--model $M --max-context 4096 --max-requests $N --trace $TRACE --bin-dir $B)
log "start"
for n in $(seq ${FIRST:-1} $ROUNDS); do   # FIRST=k: start at round k (a later round on its own)
  P=$W/round$n; profile $P
  nice -n -20 python3 bench/admission_experiment.py --cost $P/cost.txt "${SLO[@]}" "${COMMON[@]}" \
    --capacity $CAP --loads 1.5,2 --policies burst,none,token_bucket,queue_threshold \
    --configs docs/results/admission/round20/configs --out $P/out --work $P/work > $P/run.log 2>&1
  log "round $n done"
done
