#!/bin/bash
# round 20: BurstGPT at its real lengths on the 15m geometry with a 4,096-token context
# (make-test-model --shape 15m-4k): profile and SLOs from the trace's most demanding request,
# capacity measured cold, tuning, then rounds of every policy at 0.5x (burst), 1.5x and 2x.
set -u
cd "$(git rev-parse --show-toplevel)"
W=build/admexp/r20; B=build/admexp/bin20k   # B: binaries copied once, never rebuilt while this runs
M=build/admexp/m15k; TRACE=../shared/data/burstgpt/BurstGPT_1_head.csv; N=120
ROUNDS=${ROUNDS:-2}
mkdir -p $W $B && cp build/bin/tandem-* $B/
build/bin/make-test-model --format hf --shape 15m-4k --dtype bf16 --seed 1 --out $M >/dev/null
# The longest prompt of the first N replayed requests, and the longest context one of them
# decodes at on average (prompt + half its output): the SLOs' lengths.
read -r SLO_P SLO_Q < <(python3 - "$TRACE" $N <<'PY'
import csv, sys
rows = [r for r in csv.DictReader(open(sys.argv[1])) if int(r["Response tokens"]) > 0][:int(sys.argv[2])]
print(max(int(r["Request tokens"]) for r in rows),
      max(int(r["Request tokens"]) + int(r["Response tokens"]) // 2 for r in rows))
PY
)
up() { nice -n -20 deploy/local/tandem-cluster up --run-dir $1 --model $M --bin-dir $B --prefill 1 --decode 1 --http-listen 127.0.0.1:18300 --grpc-listen 127.0.0.1:18351 >$1.up.log 2>&1; }
down() { deploy/local/tandem-cluster down --run-dir $1 >/dev/null 2>&1; }
profile() { mkdir -p $1; up $1/prof; nice -n -20 python3 bench/profile_cost.py --url http://127.0.0.1:18300 --vocab 32000 --reps 3 \
  --slo-prompt $SLO_P --slo-tpot-prompt $SLO_Q --decode-prompts 16,192,1024 --out $1/cost.txt --json $1/profile.json > $1/profile.txt 2>&1; down $1/prof; }
log() { echo "$* $(date -u +%H:%M:%S)" >> $W/log.txt; }
log "start slo-prompt $SLO_P slo-tpot-prompt $SLO_Q"
# 1. profile and SLOs
profile $W
TTFT=$(grep -o 'TTFT <= [0-9.]*' $W/profile.txt | awk '{print $3}'); TPOT=$(grep -o 'TPOT <= [0-9.]*' $W/profile.txt | awk '{print $3}')
SLO=(--slo-ttft-ms $TTFT --slo-tpot-ms $TPOT); log "slo $TTFT $TPOT"
COMMON=(--model $M --max-context 4096 --max-requests $N --trace $TRACE --bin-dir $B)
# 2. capacity, cold
nice -n -20 python3 bench/admission_experiment.py --cost $W/cost.txt "${SLO[@]}" "${COMMON[@]}" \
  --loads 1 --policies none --out $W/capacity --work $W/capwork > $W/capacity.log 2>&1
CAP=$(python3 -c "import json; print(json.load(open('$W/capacity/results.json'))['capacity'])"); log "capacity $CAP"
# 3. tuning on the synthetic traces (seed 41, reported on 42)
F=$($B/tandem-loadtest fit --trace $TRACE --format burstgpt 2>/dev/null | python3 -c "import json,sys; f=json.load(sys.stdin); g=f['interarrival_gamma']; print('--gamma-shape %.6g --gamma-scale-s %.6g --req-zipf %.6g --req-max %d --resp-zipf %.6g --resp-max %d' % (g['mle_shape'], g['mle_scale_s'], f['request_zipf_s'], f['request_max'], f['response_zipf_s'], f['response_max']))")
for s in 41 42; do $B/tandem-loadtest synth --n 4000 --seed $s --write-trace $W/synth-$s.jsonl $F > /dev/null 2>&1; done
nice -n -20 $B/tandem-sim tune --trace $W/synth-41.jsonl --holdout $W/synth-42.jsonl --format mooncake --max-context 4096 \
  --prefill 1 --decode 1 --kv-blocks 16384 --cost $W/cost.txt "${SLO[@]}" --policies token_bucket,queue_threshold,burst \
  --loads 0.5,1.5,2 --target-capacity $CAP --out $W/tune > $W/tune.txt 2>&1
mkdir -p $W/configs; cp $W/tune/admission-*.conf $W/configs/
echo "speed-step = 0.05" >> $W/configs/admission-burst.conf
log "tuned"
# 4. rounds, each with its own profile, a fresh cluster per replay
for n in $(seq 1 $ROUNDS); do
  P=$W/round$n; profile $P
  nice -n -20 python3 bench/admission_experiment.py --cost $P/cost.txt "${SLO[@]}" "${COMMON[@]}" \
    --capacity $CAP --loads 0.5,1.5,2 --policies burst,none,token_bucket,queue_threshold --low-load-policies burst --configs $W/configs \
    --out $P/out --work $P/work > $P/run.log 2>&1
  log "round $n done"
done
