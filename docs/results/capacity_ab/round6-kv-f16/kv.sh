#!/bin/bash
# f32 KV (A) against f16 KV (B), same binaries (the f16 attention read in place), round 16's SLOs.
cd "$(git rev-parse --show-toplevel)"
B=build/admexp/bin18
nice -n -20 python3 bench/capacity_ab.py --a-bin $B --b-bin $B --b-args "--prefill-args '--kv-dtype f16' --decode-args '--kv-dtype f16'" \
  --model build/admexp/m15 --rates 2,2.5,3,3.5 --slo-ttft-ms 342.3 --slo-tpot-ms 7.73 --max-requests 120 --rounds 2 \
  --out build/admexp/r18/kv > build/admexp/r18/kv.log 2>&1
echo "done $(date -u +%H:%M)" >> build/admexp/r18/kv.log
