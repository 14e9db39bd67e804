#!/bin/sh
# tandem-generate on the real stories260K model, in both formats: greedy text
# from BOS must equal what llama2.c prints (expected-greedy-200.txt), exactly.
# Also checks --json, --logits-out, --prompt-tokens, seeded sampling and errors.
# Exits 77 (skipped) when the shared models are absent.
set -eu
BIN="${TANDEM_BIN_DIR:?}/tandem-generate"
SHARED="${TANDEM_SHARED_DIR:?}"
M="$SHARED/models/stories260K"
HF="$SHARED/models/stories260K-hf"
EXPECTED="$M/expected-greedy-200.txt"
if [ ! -f "$M/stories260K.bin" ] || [ ! -f "$HF/model.safetensors" ] || [ ! -f "$EXPECTED" ]; then
    echo "skipped: stories260K models absent under $SHARED/models"
    exit 77
fi
TMP=$(mktemp -d)
trap 'rm -rf "$TMP"' EXIT
fail() { echo "FAIL: $*"; exit 1; }

# 1. Exact text, llama2.c checkpoint and HF directory (tokenizer found beside it).
"$BIN" --model "$M/stories260K.bin" --tokenizer "$M/tok512.bin" --max-tokens 200 \
    --temperature 0 > "$TMP/l2c.txt" 2> "$TMP/l2c.err" || fail "llama2.c run: $(cat "$TMP/l2c.err")"
cmp "$TMP/l2c.txt" "$EXPECTED" || { diff "$TMP/l2c.txt" "$EXPECTED" | head; fail "llama2.c text differs"; }
"$BIN" --model "$HF" --max-tokens 200 --temperature 0 > "$TMP/hf.txt" 2> "$TMP/hf.err" ||
    fail "hf run: $(cat "$TMP/hf.err")"
cmp "$TMP/hf.txt" "$EXPECTED" || { diff "$TMP/hf.txt" "$EXPECTED" | head; fail "hf text differs"; }

# 2. --json and --logits-out agree with each other and with the text.
"$BIN" --model "$HF" --max-tokens 200 --temperature 0 --json --logits-out "$TMP/logits.bin" \
    > "$TMP/out.json" 2> "$TMP/json.err" || fail "json run: $(cat "$TMP/json.err")"
python3 - "$TMP/out.json" "$TMP/logits.bin" "$EXPECTED" <<'PY' || fail "json/logits check"
import json, struct, sys
o = json.load(open(sys.argv[1]))
assert o["prompt_tokens"] == [1], o["prompt_tokens"]
toks = o["tokens"]
assert len(toks) == 200, len(toks)
want = open(sys.argv[3]).read()
assert o["text"] + "\n" == want, repr(o["text"][:80])
raw = open(sys.argv[2], "rb").read()
assert len(raw) == 200 * 512 * 4, len(raw)
for i, t in enumerate(toks):
    row = struct.unpack_from("<512f", raw, i * 512 * 4)
    best = max(range(512), key=lambda j: (row[j], -j))
    assert best == t, (i, best, t)
PY

# 3. --prompt-tokens continues the same text: feed BOS + the first 10 greedy tokens.
FIRST=$(python3 -c 'import json,sys; print(",".join(map(str,[1]+json.load(open(sys.argv[1]))["tokens"][:10])))' "$TMP/out.json")
"$BIN" --model "$HF" --prompt-tokens "$FIRST" --max-tokens 20 --temperature 0 --json \
    > "$TMP/cont.json" || fail "prompt-tokens run"
python3 - "$TMP/out.json" "$TMP/cont.json" <<'PY' || fail "continuation differs"
import json, sys
a = json.load(open(sys.argv[1]))["tokens"]
b = json.load(open(sys.argv[2]))["tokens"]
assert b == a[10:30], (a[10:30], b)
PY

# 4. Seeded sampling is reproducible, and the seed matters.
run_seed() { "$BIN" --model "$M/stories260K.bin" --tokenizer "$M/tok512.bin" --max-tokens 40 \
    --temperature 1 --top-p 0.9 --seed "$1" --json 2> /dev/null |
    python3 -c 'import json,sys; print(json.load(sys.stdin)["tokens"])'; }
[ "$(run_seed 5)" = "$(run_seed 5)" ] || fail "same seed, different output"
[ "$(run_seed 5)" != "$(run_seed 6)" ] || fail "different seeds, same output"

# 5. Errors: a missing model and a bad option fail with a message.
if "$BIN" --model "$TMP/nope.bin" --max-tokens 1 2> "$TMP/e1"; then fail "missing model accepted"; fi
grep -q "nope.bin" "$TMP/e1" || fail "missing-model message: $(cat "$TMP/e1")"
if "$BIN" --model "$HF" --bogus 2> /dev/null; then fail "bad option accepted"; fi
echo "ok"
