#!/bin/bash
# round 22: round 21's procedure (round 20's replays of BurstGPT at its real lengths on 15m-4k,
# the same SLOs, capacity, rates and tuned configs; each round its own profile) on the build after
# issue 13's fourteenth round, with each round's profile fitting the decode step to prompts of 16,
# 1,024 and 2,560 tokens (the profiler's default since this round) instead of 16, 192 and 1,024.
# ROUNDS=2 for the two rounds reported (README section 19).
cd "$(git rev-parse --show-toplevel)" || exit 1
W=build/admexp/r22 B=build/admexp/bin23 DECODE_PROMPTS=16,1024,2560 \
    exec bash docs/results/admission/round21/run.sh
