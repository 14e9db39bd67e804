#!/bin/bash
# Round 20's none and token-bucket replays re-simulated with the co-location factors measured
# at BurstGPT's mean lengths (README section 17, "The co-location factors at these lengths").
# Run after round20/run.sh (its build/admexp/r20/roundN/cost.txt and binaries).
set -eu
cd "$(git rev-parse --show-toplevel)"
B=build/admexp/bin20k; M=build/admexp/m15k; D=docs/results/admission/round20/colo-long; W=build/admexp/colo
mkdir -p $W
# 1. the profile at the trace's means (prompt 670; decode context 805 = prompt + half output)
deploy/local/tandem-cluster up --run-dir $W/c1 --model $M --bin-dir $B --prefill 1 --decode 1 \
  --http-listen 127.0.0.1:18300 --grpc-listen 127.0.0.1:18351 >/dev/null
python3 bench/profile_cost.py --url http://127.0.0.1:18300 --vocab 32000 --reps 3 --slo-prompt 1960 \
  --slo-tpot-prompt 2215 --decode-prompts 16,192,1024 --colo-prompt 670 --colo-decode-prompt 805 \
  --out $W/cost-a.txt > $W/profile.txt 2>&1
deploy/local/tandem-cluster down --run-dir $W/c1
# 2. each round's cost file with the two factors from that profile, and the replays re-simulated
read -r PX DX < <(awk '/^prefill_extra_when_decoding/{p=$3} /^decode_extra_when_prefilling/{d=$3} END{print p, d}' $W/cost-a.txt)
for r in 1 2 3; do
  sed -e "s/^prefill_extra_when_decoding = .*/prefill_extra_when_decoding = $PX/" \
      -e "s/^decode_extra_when_prefilling = .*/decode_extra_when_prefilling = $DX/" \
      build/admexp/r20/round$r/cost.txt > $W/cost-r$r.txt
  grep -h "tandem-sim run" docs/results/admission/round20/round$r/results.md | grep -E "admission (none|token_bucket)" |
  while read -r line; do
    name=$(basename "$(echo "$line" | grep -o -- "--out [^ ]*" | awk '{print $2}')")
    eval "$(echo "$line" | sed -e "s|--cost [^ ]*|--cost $W/cost-r$r.txt|" -e "s|--out [^ ]*|--out $W/r$r/$name|")" >/dev/null
  done
done
