#!/bin/sh
# End-to-end check of tandem-sim: a synthetic trace simulated twice gives
# byte-identical reports; `tandem-loadtest compare` reads them; admission
# max_outstanding rejects what none admits; the BurstGPT head (when the
# shared data is present); tune on a small trace; usage errors.
set -eu
BIN=${TANDEM_BIN_DIR:?}
SIM=$BIN/tandem-sim
LT=$BIN/tandem-loadtest
WORK=$(mktemp -d /tmp/sim-cli-XXXXXX)
trap 'rm -rf "$WORK"' EXIT
fail() { echo "FAIL: $*" >&2; exit 1; }

"$LT" synth --n 2000 --seed 5 --req-max 2000 --resp-max 300 \
    --write-trace "$WORK/t.jsonl" --log-level warn
COMMON="--trace $WORK/t.jsonl --format mooncake --rate 8 --max-context 1024 --prefill 2
        --decode 2 --kv-blocks 512 --slo-ttft-ms 1000 --slo-tpot-ms 40 --no-plots"
# shellcheck disable=SC2086
"$SIM" run $COMMON --out "$WORK/a" >"$WORK/a.txt" 2>/dev/null
# shellcheck disable=SC2086
"$SIM" run $COMMON --out "$WORK/b" >/dev/null 2>&1
for f in summary.json requests.csv tokens.csv timeseries.dat cdf.dat; do
    cmp -s "$WORK/a/$f" "$WORK/b/$f" || fail "$f differs between two identical runs"
done
grep -q '^requests 2000 ' "$WORK/a.txt" || fail "summary table: $(cat "$WORK/a.txt")"
grep -q '^goodput ' "$WORK/a.txt" || fail "no goodput line"
grep -q '"leaked_blocks":	0' "$WORK/a/summary.json" || grep -q '"leaked_blocks": *0' \
    "$WORK/a/summary.json" || fail "blocks left in a pool"

# Admission: max_outstanding 4 rejects under this load, none does not.
# shellcheck disable=SC2086
"$SIM" run $COMMON --admission max_outstanding --max-outstanding 4 --out "$WORK/c" \
    >"$WORK/c.txt" 2>/dev/null
grep -q ' rejected 0 ' "$WORK/a.txt" || fail "none rejected requests"
grep -q ' rejected 0 ' "$WORK/c.txt" && fail "max_outstanding 4 rejected nothing"
grep -q ',429,rejected,' "$WORK/c/requests.csv" || fail "no 429 rows in requests.csv"
# The same with the client retrying its 429s: both views in summary.json.
# shellcheck disable=SC2086
"$SIM" run $COMMON --admission max_outstanding --max-outstanding 4 --retry-429 2 \
    --out "$WORK/cr" >"$WORK/cr.txt" 2>/dev/null || fail "run --retry-429"
grep -q '^client retries: ' "$WORK/cr.txt" || fail "no client retries line: $(cat "$WORK/cr.txt")"
grep -q '"without_retries"' "$WORK/cr/summary.json" || fail "no without_retries"
"$LT" compare "$WORK/a" "$WORK/c" >"$WORK/cmp.txt" || fail "compare failed"
grep -q goodput "$WORK/cmp.txt" || fail "compare output: $(cat "$WORK/cmp.txt")"

# The load tester's length options, stated in summary.json as a replay states them.
# shellcheck disable=SC2086
"$SIM" run $COMMON --length-scale 0.5 --max-prompt-tokens 200 --max-output-tokens 50 \
    --out "$WORK/len" >/dev/null 2>&1 || fail "run with length options"
grep -q '"length_scale":[[:space:]]*0.5' "$WORK/len/summary.json" || fail "run.lengths"
awk -F, 'NR > 1 && ($8 > 200 || $9 > 50) { bad = 1 } END { exit bad }' "$WORK/len/requests.csv" ||
    fail "lengths not clipped"

# The BurstGPT head, scaled to a 4,096-token context.
HEAD=${TANDEM_SHARED_DIR:-/nonexistent}/data/burstgpt/BurstGPT_1_head.csv
if [ -f "$HEAD" ]; then
    "$SIM" run --trace "$HEAD" --format burstgpt --speedup 100 --max-context 4096 \
        --slo-ttft-ms 2000 --slo-tpot-ms 50 --no-plots --out "$WORK/bg" >"$WORK/bg.txt" 2>/dev/null
    grep -q '^requests 383 ' "$WORK/bg.txt" || fail "BurstGPT head: $(cat "$WORK/bg.txt")"
fi

# tune: a table and one config per policy.
"$LT" synth --n 600 --seed 9 --req-max 1000 --resp-max 200 \
    --write-trace "$WORK/u.jsonl" --log-level warn
"$SIM" tune --trace "$WORK/u.jsonl" --format mooncake --max-context 1024 --loads 1,2 \
    --policies max_outstanding,token_bucket,queue_threshold,burst --slo-ttft-ms 1000 \
    --slo-tpot-ms 40 --out "$WORK/tune" >"$WORK/tune.txt" || fail "tune failed"
grep -q '^capacity' "$WORK/tune.txt" || fail "tune: $(cat "$WORK/tune.txt")"
grep -q '^SLO: TTFT <= 1000 ms' "$WORK/tune.txt" || fail "tune prints no SLO"
grep -q '^admission = max_outstanding' "$WORK/tune/admission-max_outstanding.conf" ||
    fail "no max_outstanding config"
grep -q '^max-outstanding = ' "$WORK/tune/admission-max_outstanding.conf" || fail "no key"
grep -q '^bucket-rate = ' "$WORK/tune/admission-token_bucket.conf" || fail "no bucket-rate"
grep -q '^bucket-burst = ' "$WORK/tune/admission-token_bucket.conf" || fail "no bucket-burst"
grep -q '^queue-max-ms = ' "$WORK/tune/admission-queue_threshold.conf" || fail "no queue-max-ms"
for k in hold-max-ms burst-rate-ratio burst-cv short-window-s long-window-s slo-margin \
    speed-step slo-ttft-ms slo-tpot-ms; do
    grep -q "^$k = " "$WORK/tune/admission-burst.conf" || fail "burst config lacks $k"
done
# Every key written is a router key, and the simulator reads the same file.
if [ -x "$BIN/tandem-router" ]; then
    "$BIN/tandem-router" --help >"$WORK/router-help.txt" 2>&1 || true
    for f in "$WORK"/tune/admission-*.conf; do
        for k in $(sed -n 's/^\([a-z-]*\) = .*/\1/p' "$f"); do
            grep -q -- "--$k" "$WORK/router-help.txt" || fail "$k of $f is not a router key"
        done
    done
fi
# --target-capacity: the bucket's rate is written as the same multiple of the
# capacity given as of the simulated one; the other knobs are untouched.
cap=$(sed -n 's/^capacity .*: \([0-9.]*\) req\/s$/\1/p' "$WORK/tune.txt")
[ -n "$cap" ] || fail "no capacity in: $(head -1 "$WORK/tune.txt")"
"$SIM" tune --trace "$WORK/u.jsonl" --format mooncake --max-context 1024 --loads 1,2 \
    --policies token_bucket --slo-ttft-ms 1000 --slo-tpot-ms 40 --target-capacity 0.5 \
    --out "$WORK/tune-t" >"$WORK/tune-t.txt" || fail "tune --target-capacity failed"
grep -q '^configs written for a capacity of 0.500 req/s' "$WORK/tune-t.txt" ||
    fail "tune --target-capacity: $(cat "$WORK/tune-t.txt")"
key() { sed -n "s/^$1 = //p" "$2"; }
awk -v a="$(key bucket-rate "$WORK/tune/admission-token_bucket.conf")" \
    -v b="$(key bucket-rate "$WORK/tune-t/admission-token_bucket.conf")" -v cap="$cap" \
    'BEGIN { r = (b / 0.5) / (a / cap); exit !(r > 0.998 && r < 1.002) }' ||
    fail "bucket-rate not rescaled to the target capacity (capacity $cap)"
# The table under the policy shows the rate as written, not the simulated one.
awk -v t="$(sed -n 's/.*bucket-rate=\([0-9.e+-]*\).*/\1/p' "$WORK/tune-t.txt")" \
    -v b="$(key bucket-rate "$WORK/tune-t/admission-token_bucket.conf")" \
    'BEGIN { exit !(t > 0 && t / b > 0.999 && t / b < 1.001) }' ||
    fail "table's bucket-rate differs from the config's: $(cat "$WORK/tune-t.txt")"
[ "$(key bucket-burst "$WORK/tune/admission-token_bucket.conf")" = \
    "$(key bucket-burst "$WORK/tune-t/admission-token_bucket.conf")" ] ||
    fail "bucket-burst changed with --target-capacity"
"$SIM" run --trace "$WORK/u.jsonl" --format mooncake --max-context 1024 --rate 20 --no-plots \
    --config "$WORK/tune/admission-burst.conf" --out "$WORK/bu" >"$WORK/bu.txt" 2>/dev/null ||
    fail "run --config admission-burst.conf failed"
grep -q '"admission":	*"burst"' "$WORK/bu/summary.json" ||
    grep -q '"admission": *"burst"' "$WORK/bu/summary.json" || fail "the config was not used"

# Usage errors exit 2.
st=0; "$SIM" run --trace "$WORK/t.jsonl" --format mooncake >/dev/null 2>&1 || st=$?
[ "$st" = 2 ] || fail "missing --out: exit $st"
printf 'no_such_key = 1\n' >"$WORK/bad.cost"
st=0; "$SIM" run --trace "$WORK/t.jsonl" --format mooncake --out "$WORK/x" \
    --cost "$WORK/bad.cost" >/dev/null 2>&1 || st=$?
[ "$st" = 2 ] || fail "bad cost file: exit $st"
st=0; "$SIM" run --trace "$WORK/t.jsonl" --format mooncake --out "$WORK/x" \
    --admission no_such >/dev/null 2>&1 || st=$?
[ "$st" = 2 ] || fail "unknown policy: exit $st"
"$SIM" run --help | grep -q -- '--kv-blocks' || fail "--help"
echo "sim cli: ok"
