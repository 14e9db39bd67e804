#!/bin/bash
# The decode steps of a none replay at 1.5x against the profiler's decode fit (README section 19).
# 1. a profile with the decode prompts of rounds 20-21 (16, 192, 1,024 tokens);
# 2. a none replay at 1.5x (0.6255 req/s) on a fresh cluster whose workers log every step;
# 3. a profile with prompts of 16, 1,024 and 2,560 tokens (the profiler's default since);
# 4. the replay simulated with each profile's cost file, and its steps against both fits.
# Run from a build of commit 725d022 or later (the workers' step events).
set -u
cd "$(git rev-parse --show-toplevel)"
W=build/admexp/steps; B=$W/bin; M=build/admexp/m15k; D=docs/results/admission/round22/steps
TRACE=../shared/data/burstgpt/BurstGPT_1_head.csv
mkdir -p $B && cp build/bin/tandem-* $B/
[ -d $M ] || build/bin/make-test-model --format hf --shape 15m-4k --dtype bf16 --seed 1 --out $M >/dev/null
up() { nice -n -20 deploy/local/tandem-cluster up --run-dir $1 --model $M --bin-dir $B --prefill 1 --decode 1 --http-listen 127.0.0.1:18300 --grpc-listen 127.0.0.1:18351 >$1.up.log 2>&1; }
down() { deploy/local/tandem-cluster down --run-dir $1 >/dev/null 2>&1; }
profile() { up $W/prof-$1; nice -n -20 python3 bench/profile_cost.py --url http://127.0.0.1:18300 --vocab 32000 --reps 3 \
  --slo-prompt 1960 --slo-tpot-prompt 2215 --decode-prompts $2 --out $W/cost-$1.txt --json $W/profile-$1.json > $W/profile-$1.txt 2>&1; down $W/prof-$1; }
profile 16-192-1024 16,192,1024
TANDEM_LOG_LEVEL=debug up $W/replay
nice -n -20 $B/tandem-loadtest replay --trace $TRACE --format burstgpt --url http://127.0.0.1:18300 --model m15k --rate 0.6255 \
  --max-requests 120 --max-context 4096 --slo-ttft-ms 4285.3 --slo-tpot-ms 11.27 --out $W/none-1.5x > $W/replay.log 2>&1
down $W/replay
profile 16-1024-2560 16,1024,2560
for p in 16-192-1024 16-1024-2560; do
  $B/tandem-sim run --trace $TRACE --format burstgpt --rate 0.6255 --max-requests 120 --max-context 4096 --prefill 1 --decode 1 \
    --kv-blocks 16384 --cost $W/cost-$p.txt --slo-ttft-ms 4285.3 --slo-tpot-ms 11.27 --admission none --out $W/sim-none-1.5x-$p --no-plots
done
python3 bench/step_fit.py --logs $W/replay --save $W/none-1.5x-steps.csv.gz $W/cost-16-192-1024.txt $W/cost-16-1024-2560.txt
