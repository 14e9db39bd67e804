#!/bin/sh
# End-to-end check of the tandem-loadtest binary: synth -> replay against the
# test SSE server on 127.0.0.1 -> summary.json, CSVs and plots -> compare;
# replay of the BurstGPT head (when the shared data is present); fit; and the
# usage errors.
set -eu
BIN=${TANDEM_BIN_DIR:?}
LT=$BIN/tandem-loadtest
WORK=$(mktemp -d /tmp/lt-cli-XXXXXX)
SRV_PID=
cleanup() {
    if [ -n "$SRV_PID" ]; then kill "$SRV_PID" 2>/dev/null || true; fi
    rm -rf "$WORK"
}
trap cleanup EXIT
fail() { echo "FAIL: $*" >&2; exit 1; }

# The server lives until its stdin (a fifo we hold open) closes.
mkfifo "$WORK/in"
"$BIN/lt-sse-server" ok 0 <"$WORK/in" >"$WORK/port" &
SRV_PID=$!
exec 3>"$WORK/in"
for _ in $(seq 50); do grep -q port= "$WORK/port" 2>/dev/null && break; sleep 0.1; done
PORT=$(sed -n 's/^port=//p' "$WORK/port")
[ -n "$PORT" ] || fail "server did not start"
URL=http://127.0.0.1:$PORT

# synth: write a trace, and replay one directly.
"$LT" synth --n 200 --seed 3 --gamma-scale-s 0.005 --req-max 256 --resp-max 8 \
    --write-trace "$WORK/synth.jsonl" --log-level warn
[ "$(wc -l <"$WORK/synth.jsonl")" -eq 200 ] || fail "synth trace length"
"$LT" replay --trace "$WORK/synth.jsonl" --format mooncake --url "$URL" --rate 100 \
    --slo-ttft-ms 500 --slo-tpot-ms 100 --out "$WORK/a" --log-level warn >"$WORK/a.txt"
"$LT" synth --n 200 --seed 3 --gamma-scale-s 0.005 --req-max 256 --resp-max 8 --url "$URL" \
    --speedup 2 --slo-ttft-ms 500 --slo-tpot-ms 100 --out "$WORK/b" --log-level warn >"$WORK/b.txt"
for d in a b; do
    for f in summary.json requests.csv tokens.csv timeseries.dat cdf.dat; do
        [ -s "$WORK/$d/$f" ] || fail "$d/$f missing"
    done
    grep -q '"ok":[[:space:]]*200' "$WORK/$d/summary.json" || fail "$d: not all 200 ok"
    [ "$(wc -l <"$WORK/$d/requests.csv")" -eq 201 ] || fail "$d/requests.csv rows"
done
if command -v gnuplot >/dev/null; then
    for p in rate_goodput.png ttft.png latency_cdf.png; do
        [ -s "$WORK/a/$p" ] || fail "plot $p missing"
    done
fi
"$LT" compare "$WORK/a" "$WORK/b" >"$WORK/cmp.txt"
grep -q 'goodput.req_per_s' "$WORK/cmp.txt" || fail "compare output"

# Mooncake rows with shared hash ids (prompts built per request from blocks).
cat >"$WORK/mc.jsonl" <<'JSONL'
{"timestamp": 0, "input_length": 1100, "output_length": 3, "hash_ids": [0, 1, 2]}
{"timestamp": 20, "input_length": 700, "output_length": 2, "hash_ids": [0, 1]}
{"timestamp": 40, "input_length": 30, "output_length": 4, "hash_ids": [5]}
JSONL
"$LT" replay --trace "$WORK/mc.jsonl" --format mooncake --url "$URL" --block-tokens 512 \
    --out "$WORK/mc" --no-plots --log-level warn >/dev/null
grep -q '"ok":[[:space:]]*3' "$WORK/mc/summary.json" || fail "mooncake hash_ids replay"

# --max-context: the two long requests shrink to fit 64 tokens, the short one
# (30 + 4) is sent as read.
"$LT" replay --trace "$WORK/mc.jsonl" --format mooncake --url "$URL" --max-context 64 \
    --out "$WORK/mc-fit" --no-plots --log-level warn >/dev/null
grep -q '"context_scaled":[[:space:]]*2' "$WORK/mc-fit/summary.json" || fail "max-context count"
grep -q '"ok":[[:space:]]*3' "$WORK/mc-fit/summary.json" || fail "max-context replay"
awk -F, 'NR > 1 && $8 + $9 > 64 { bad = 1 } NR > 1 && $8 == 30 && $9 == 4 { short = 1 }
    END { exit bad || !short }' "$WORK/mc-fit/requests.csv" ||
    fail "max-context lengths: $(cut -d, -f8,9 "$WORK/mc-fit/requests.csv" | tr '\n' ' ')"
if "$LT" replay --trace "$WORK/mc.jsonl" --format mooncake --url "$URL" --max-context 1 \
    --out "$WORK/x" 2>"$WORK/err"; then
    fail "--max-context 1 accepted"
fi
grep -q -- "--max-context" "$WORK/err" || fail "no --max-context message"

# --length-scale, --max-prompt-tokens, --max-output-tokens: stated in summary.json
# and applied to what was sent: prompts 550, 350, 15 (x 0.5) -> 256, 256, 15;
# outputs 2, 1, 2 (1.5 rounds to 2) -> 1.
"$LT" replay --trace "$WORK/mc.jsonl" --format mooncake --url "$URL" --length-scale 0.5 \
    --max-prompt-tokens 256 --max-output-tokens 1 --out "$WORK/mc-len" --no-plots \
    --log-level warn >/dev/null
grep -q '"length_scale":[[:space:]]*0.5' "$WORK/mc-len/summary.json" || fail "length_scale"
grep -q '"prompt_clipped":[[:space:]]*2' "$WORK/mc-len/summary.json" || fail "prompt_clipped"
grep -q '"output_clipped":[[:space:]]*2' "$WORK/mc-len/summary.json" || fail "output_clipped"
awk -F, 'NR > 1 && ($8 > 256 || $9 != 1) { bad = 1 } END { exit bad }' \
    "$WORK/mc-len/requests.csv" || fail "clipped lengths: $(cut -d, -f8,9 "$WORK/mc-len/requests.csv")"

# --retry-429: a server whose first 3 answers are 429 with Retry-After: 1.
# With one retry every request ends ok, retried once after a second;
# summary.json has both views (without retries: all 3 rejected).
mkfifo "$WORK/in2"
"$BIN/lt-sse-server" ok 2 3 <"$WORK/in2" >"$WORK/port2" &
SRV2_PID=$!
exec 4>"$WORK/in2"
for _ in $(seq 50); do grep -q port= "$WORK/port2" 2>/dev/null && break; sleep 0.1; done
PORT2=$(sed -n 's/^port=//p' "$WORK/port2")
[ -n "$PORT2" ] || fail "second server did not start"
"$LT" replay --trace "$WORK/mc.jsonl" --format mooncake --url "http://127.0.0.1:$PORT2" \
    --retry-429 1 --slo-ttft-ms 5000 --out "$WORK/retry" --no-plots --log-level warn \
    >"$WORK/retry.txt"
exec 4>&-
wait "$SRV2_PID" 2>/dev/null || true
grep -q '"ok":[[:space:]]*3' "$WORK/retry/summary.json" || fail "retry: not all ok"
grep -q '"requests_retried":[[:space:]]*3' "$WORK/retry/summary.json" || fail "requests_retried"
grep -q '"retry_429":[[:space:]]*1' "$WORK/retry/summary.json" || fail "run.retry_429"
tr -d ' \t\n' <"$WORK/retry/summary.json" | grep -q '"without_retries":{"ok":0,"rejected":3' ||
    fail "without_retries: $(cat "$WORK/retry/summary.json")"
grep -q '^client retries: 3 requests retried' "$WORK/retry.txt" || fail "retry line: $(cat "$WORK/retry.txt")"

# BurstGPT head: the first 40 requests, rescaled to 40 req/s.
HEAD=${TANDEM_SHARED_DIR:-/nonexistent}/data/burstgpt/BurstGPT_1_head.csv
if [ -f "$HEAD" ]; then
    "$LT" replay --trace "$HEAD" --format burstgpt --url "$URL" --rate 40 --max-requests 40 \
        --out "$WORK/burst" --log-level warn >/dev/null
    grep -q '"trace_failed_skipped":[[:space:]]*[1-9]' "$WORK/burst/summary.json" ||
        fail "failed rows not counted"
    grep -q '"ok":[[:space:]]*40' "$WORK/burst/summary.json" || fail "burstgpt replay"
    # Text prompts of exact length for a real tokenizer (every length verified).
    TOKJ=${TANDEM_SHARED_DIR}/tokenizers/llama2-spm
    if [ -d "$TOKJ" ]; then
        "$LT" replay --trace "$HEAD" --format burstgpt --url "$URL" --rate 40 --max-requests 20 \
            --tokenizer "$TOKJ" --out "$WORK/burst-text" --no-plots --log-level warn >/dev/null
        grep -q '"filler_word"' "$WORK/burst-text/summary.json" || fail "text prompts"
        grep -q '"ok":[[:space:]]*20' "$WORK/burst-text/summary.json" || fail "text replay"
        "$LT" replay --trace "$WORK/mc.jsonl" --format mooncake --url "$URL" --tokenizer "$TOKJ" \
            --block-tokens 64 --out "$WORK/mc-text" --no-plots --log-level warn >/dev/null
        grep -q '"ok":[[:space:]]*3' "$WORK/mc-text/summary.json" || fail "mooncake text replay"
    fi
    "$LT" fit --trace "$HEAD" --format burstgpt --window-s 600 >"$WORK/fit.json"
    grep -q '"mom_shape"' "$WORK/fit.json" || fail "fit output"
else
    echo "skip: $HEAD not present"
fi

# Usage errors exit non-zero with a message.
if "$LT" replay --trace "$WORK/synth.jsonl" --format nope --url "$URL" --out "$WORK/x" 2>"$WORK/err"; then
    fail "bad --format accepted"
fi
grep -q -- "--format" "$WORK/err" || fail "no --format message"
if "$LT" replay --trace "$WORK/synth.jsonl" --format mooncake --url "ftp://x" --out "$WORK/x" 2>"$WORK/err"; then
    fail "bad --url accepted"
fi
printf 'Timestamp,Model,Request tokens,Response tokens,Total tokens,Log Type\n1,a,2,3,5,b\n2,a,x,3,5,b\n' >"$WORK/bad.csv"
if "$LT" fit --trace "$WORK/bad.csv" --format burstgpt 2>"$WORK/err"; then fail "bad row accepted"; fi
grep -q "line 3" "$WORK/err" || fail "no line number in: $(cat "$WORK/err")"
exec 3>&-
wait "$SRV_PID" 2>/dev/null || true
SRV_PID=
echo PASS
