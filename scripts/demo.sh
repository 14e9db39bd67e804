#!/usr/bin/env bash
# The Tandem demo: installs what is missing, builds, starts a local cluster
# (router + 1 prefill + 1 decode worker), streams one completion with curl,
# replays about a minute of the BurstGPT trace (or a synthetic BurstGPT-shaped
# workload) with tandem-loadtest, prints the summary and the plots, and stops
# the cluster (also on an error or Ctrl-C).
#
# Usage: scripts/demo.sh [--model PATH] [--rate RPS] [--duration S]
#                        [--http-listen HOST:PORT] [--grpc-listen HOST:PORT]
set -euo pipefail
cd "$(dirname "$0")/.."

usage() {
  cat <<'EOF'
usage: scripts/demo.sh [--model PATH] [--rate RPS] [--duration S]
                       [--http-listen HOST:PORT] [--grpc-listen HOST:PORT]

  --model PATH        serve this checkpoint (HF directory, llama2.c .bin, GGUF);
                      default: ../shared/models/stories260K, else a random 15m model
  --rate RPS          replay rate in requests/s (default: from the model's size)
  --duration S        replay length in seconds (default 60)
  --http-listen A     router's HTTP address (default 127.0.0.1:8000)
  --grpc-listen A     router's gRPC address (default 127.0.0.1:50051)
EOF
}

MODEL=
RATE=
DURATION=60
CLUSTER_ARGS=()
while [ $# -gt 0 ]; do
  case "$1" in
    --model) MODEL=${2:?--model needs a path}; shift 2 ;;
    --rate) RATE=${2:?--rate needs a number}; shift 2 ;;
    --duration) DURATION=${2:?--duration needs seconds}; shift 2 ;;
    --http-listen | --grpc-listen) CLUSTER_ARGS+=("$1" "${2:?$1 needs host:port}"); shift 2 ;;
    -h | --help) usage; exit 0 ;;
    *) echo "demo.sh: unknown option $1" >&2; usage >&2; exit 2 ;;
  esac
done
if [ -n "$MODEL" ]; then
  [ -e "$MODEL" ] || { echo "demo.sh: --model $MODEL: not found" >&2; exit 2; }
  CLUSTER_ARGS+=(--model "$(cd "$(dirname "$MODEL")" && pwd)/$(basename "$MODEL")")
fi
case "$DURATION" in '' | *[!0-9]*) echo "demo.sh: --duration: whole seconds" >&2; exit 2 ;; esac

step() { printf '\n==> %s\n' "$*"; }

# build.sh runs scripts/deps.sh first: the Debian packages that are missing
# (compilers, libraries, curl, gnuplot) are installed, nothing else.
step "Building (scripts/build.sh installs missing packages first)"
bash scripts/build.sh

BIN=$PWD/build/bin
CLUSTER=deploy/local/tandem-cluster
RUN_DIR=$PWD/build/demo/cluster
OUT=$PWD/build/demo/replay
SHARED=${TANDEM_SHARED_DIR:-../shared}
CLUSTER_UP=0

cleanup() {
  local rc=$?
  trap - EXIT INT TERM
  if [ "$CLUSTER_UP" = 1 ]; then
    step "Stopping the cluster"
    "$CLUSTER" down --run-dir "$RUN_DIR" || rc=1
  fi
  exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

step "Starting the cluster: router + 1 prefill + 1 decode (deploy/local/tandem-cluster up)"
mkdir -p "$(dirname "$RUN_DIR")"
"$CLUSTER" up --run-dir "$RUN_DIR" --bin-dir "$BIN" --prefill 1 --decode 1 "${CLUSTER_ARGS[@]}"
CLUSTER_UP=1

# What the cluster serves: endpoint, model name, context (the router's
# GET /v1/models when it says, else read from the model files), chat template.
read -r ENDPOINT NAME CONTEXT CHAT MODEL_PATH < <(python3 - "$RUN_DIR/cluster.json" <<'EOF'
import json, sys, urllib.request
s = json.load(open(sys.argv[1]))
router = next(p for p in s["processes"] if p["role"] == "router")
info = s.get("model_info") or {}
name, context = router.get("served_model_name") or "default", info.get("context") or 0
try:
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    with opener.open(s["endpoint"] + "/v1/models", timeout=5) as r:
        model = json.load(r)["data"][0]
    name, context = model.get("id") or name, model.get("max_model_len") or context
except (OSError, ValueError, KeyError, IndexError):
    pass
print(s["endpoint"], name, context, 1 if info.get("chat_template") else 0, s["model"])
EOF
)

# Streams one request with curl and prints the text as it arrives.
show_stream() {
  python3 -u -c '
import json, sys
for line in sys.stdin:
    line = line.strip()
    if line and not line.startswith(("data:", ":", "event:", "id:", "retry:")):
        print(line, file=sys.stderr)  # not SSE: an error body
    if not line.startswith("data: ") or line == "data: [DONE]":
        continue
    msg = json.loads(line[6:])
    if "error" in msg:
        sys.exit("\nerror: " + json.dumps(msg["error"]))
    for c in msg.get("choices", []):
        text = c.get("text") if "text" in c else (c.get("delta") or {}).get("content")
        print(text or "", end="", flush=True)
print()
'
}
PROMPT="Once upon a time"
SHOWN=
if [ "$CHAT" = 1 ]; then
  API=/v1/chat/completions
  BODY=$(python3 -c 'import json, sys; print(json.dumps({"model": sys.argv[1], "messages": [
    {"role": "user", "content": "Tell me a short story about a cat."}],
    "max_tokens": 96, "temperature": 0, "stream": True}))' "$NAME")
else
  API=/v1/completions
  BODY=$(python3 -c 'import json, sys; print(json.dumps({"model": sys.argv[1],
    "prompt": sys.argv[2], "max_tokens": 96, "temperature": 0, "stream": True}))' \
    "$NAME" "$PROMPT")
  SHOWN=$PROMPT # the answer continues the prompt
fi
step "One streamed completion ($([ "$CHAT" = 1 ] && echo chat || echo "plain; the model has no chat template"))"
echo "\$ curl -N $ENDPOINT$API -H 'Content-Type: application/json' -d '$BODY'"
printf '%s' "$SHOWN"
curl -sS -N --noproxy '*' --fail-with-body "$ENDPOINT$API" \
  -H 'Content-Type: application/json' -d "$BODY" | show_stream

# Lengths fitted to the model's context (leaving room for BOS), and a rate
# this 2-core machine sustains for the model's size unless --rate was given.
if [ "$CONTEXT" -gt 32 ]; then FIT=$((CONTEXT - 16)); else FIT=256; fi
if [ -z "$RATE" ]; then
  BYTES=$(du -sbL "$MODEL_PATH" | cut -f1)
  if [ "$BYTES" -lt 10000000 ]; then RATE=6; elif [ "$BYTES" -lt 200000000 ]; then RATE=2; else RATE=0.5; fi
fi
N=$(python3 -c "import sys; print(max(2, int(float(sys.argv[1]) * int(sys.argv[2]))))" "$RATE" "$DURATION")
LT_ARGS=(--url "$ENDPOINT" --model "$NAME" --rate "$RATE" --max-context "$FIT"
  --slo-ttft-ms 500 --slo-tpot-ms 50 --timeout-s 120 --out "$OUT" --log-level warn)
TRACE=$SHARED/data/burstgpt/BurstGPT_1_head.csv
rm -rf "$OUT"
if [ -f "$TRACE" ]; then
  step "Replaying BurstGPT ($TRACE): up to $N requests at $RATE req/s, lengths fitted to $FIT tokens"
  "$BIN/tandem-loadtest" replay --trace "$TRACE" --format burstgpt --max-requests "$N" "${LT_ARGS[@]}"
else
  step "Replaying a synthetic BurstGPT-shaped workload ($TRACE not found): $N requests at $RATE req/s"
  "$BIN/tandem-loadtest" synth --n "$N" --seed 1 "${LT_ARGS[@]}"
fi
if ls "$OUT"/*.png >/dev/null 2>&1; then
  echo "plots:"
  for p in "$OUT"/*.png; do echo "  $p"; done
else
  echo "plots: none (gnuplot missing); data in $OUT"
fi
