#!/bin/bash
# round 18: round 16's procedure on the AVX-512 host (split 512-bit FMAs), the build with the
# kernel choice of the seventh CPU round: profile and SLOs, capacity measured cold, tuning, 4 rounds.
set -u
cd "$(git rev-parse --show-toplevel)"
W=build/admexp/r18; B=build/admexp/bin18   # B: binaries copied once, never rebuilt while this runs
mkdir -p $W $B && cp build/bin/tandem-* $B/
build/bin/make-test-model --format hf --shape 15m --dtype bf16 --seed 1 --out build/admexp/m15 >/dev/null
up() { nice -n -20 deploy/local/tandem-cluster up --run-dir $1 --model build/admexp/m15 --bin-dir $B --prefill 1 --decode 1 --http-listen 127.0.0.1:18300 --grpc-listen 127.0.0.1:18351 >$1.up.log 2>&1; }
down() { deploy/local/tandem-cluster down --run-dir $1 >/dev/null 2>&1; }
profile() { mkdir -p $1; up $1/prof; nice -n -20 python3 bench/profile_cost.py --url http://127.0.0.1:18300 --vocab 32000 --out $1/cost.txt --json $1/profile.json > $1/profile.txt 2>&1; down $1/prof; }
log() { echo "$* $(date -u +%H:%M:%S)" >> $W/log.txt; }
# 1. profile and SLOs
profile $W
TTFT=$(grep -o 'TTFT <= [0-9.]*' $W/profile.txt | awk '{print $3}'); TPOT=$(grep -o 'TPOT <= [0-9.]*' $W/profile.txt | awk '{print $3}')
SLO=(--slo-ttft-ms $TTFT --slo-tpot-ms $TPOT); log "slo $TTFT $TPOT"
# 2. capacity, cold
nice -n -20 python3 bench/admission_experiment.py --cost $W/cost.txt "${SLO[@]}" --model build/admexp/m15 --max-context 256 --max-requests 120 \
  --loads 1 --policies none --bin-dir $B --out $W/capacity --work $W/capwork > $W/capacity.log 2>&1
CAP=$(python3 -c "import json; print(json.load(open('$W/capacity/results.json'))['capacity'])"); log "capacity $CAP"
# 3. tuning on the synthetic traces (seed 41, reported on 42)
F=$($B/tandem-loadtest fit --trace ../shared/data/burstgpt/BurstGPT_1_head.csv --format burstgpt 2>/dev/null | python3 -c "import json,sys; f=json.load(sys.stdin); g=f['interarrival_gamma']; print('--gamma-shape %.6g --gamma-scale-s %.6g --req-zipf %.6g --req-max %d --resp-zipf %.6g --resp-max %d' % (g['mle_shape'], g['mle_scale_s'], f['request_zipf_s'], f['request_max'], f['response_zipf_s'], f['response_max']))")
for s in 41 42; do $B/tandem-loadtest synth --n 4000 --seed $s --write-trace $W/synth-$s.jsonl $F > /dev/null 2>&1; done
nice -n -20 $B/tandem-sim tune --trace $W/synth-41.jsonl --holdout $W/synth-42.jsonl --format mooncake --max-context 256 \
  --prefill 1 --decode 1 --kv-blocks 1024 --cost $W/cost.txt "${SLO[@]}" --policies token_bucket,queue_threshold,burst \
  --loads 0.5,1.5,2 --target-capacity $CAP --out $W/tune > $W/tune.txt 2>&1
mkdir -p $W/configs; cp $W/tune/admission-*.conf $W/configs/
echo "speed-step = 0.05" >> $W/configs/admission-burst.conf
log "tuned"
# 4. rounds
for n in 1 2 3 4; do
  P=$W/round$n; profile $P
  LO=1.5,2; [ $n -le 2 ] && LO=0.5,1.5,2
  nice -n -20 python3 bench/admission_experiment.py --cost $P/cost.txt "${SLO[@]}" --model build/admexp/m15 --max-context 256 --max-requests 120 \
    --capacity $CAP --loads $LO --policies burst,none,token_bucket,queue_threshold --low-load-policies burst --configs $W/configs \
    --bin-dir $B --out $P/out --work $P/work > $P/run.log 2>&1
  nice -n -20 python3 bench/admission_experiment.py --cost $P/cost.txt "${SLO[@]}" --model build/admexp/m15 --max-context 256 --max-requests 120 \
    --capacity $CAP --loads 1.5,2 --policies token_bucket --configs docs/results/admission/configs \
    --bin-dir $B --out $P/out-tb8 --work $P/work-tb8 > $P/run-tb8.log 2>&1
  log "round $n done"
done
