#!/bin/sh
# Bad input to the command-line tools: each case exits non-zero with one
# line on stderr that names the cause, and nothing is silently accepted or
# silently dropped.
#
# usage: test_bad_input.sh tokenize|generate|loadtest
set -eu
BIN=${TANDEM_BIN_DIR:?}
WHAT=${1:?usage: test_bad_input.sh tokenize|generate|loadtest}
SHARED=${TANDEM_SHARED_DIR:-/nonexistent}
T=$(mktemp -d)
trap 'rm -rf "$T"' EXIT
fail() { echo "FAIL: $*"; exit 1; }

# expect_fail NAME NEEDLE CMD...: a non-zero exit and NEEDLE (fixed string)
# on stderr.
expect_fail() {
    name=$1
    needle=$2
    shift 2
    st=0
    "$@" >"$T/out" 2>"$T/err" || st=$?
    [ "$st" -ne 0 ] || fail "$name: exit 0, want an error (stdout: $(head -c 300 "$T/out"))"
    grep -qF -- "$needle" "$T/err" || fail "$name: stderr lacks '$needle': $(cat "$T/err")"
}

# expect_ok NAME CMD...: exit 0 (stdout in $T/out).
expect_ok() {
    name=$1
    shift
    "$@" >"$T/out" 2>"$T/err" || fail "$name: exit $? ($(cat "$T/err"))"
}

case $WHAT in
tokenize)
    K=$BIN/tandem-tokenize
    TOK=$SHARED/models/stories260K/tok512.bin
    [ -f "$TOK" ] || { echo "skipped: $TOK absent (shared test data)"; exit 77; }
    expect_ok "decode" "$K" "$TOK" --decode 403 407
    expect_fail "decode 12abc" "'12abc' is not a token id" "$K" "$TOK" --decode 403 12abc 407
    expect_fail "decode 1.5" "'1.5' is not a token id" "$K" "$TOK" --decode 1.5
    expect_fail "decode -1" "'-1' is not a token id" "$K" "$TOK" --decode -- -1
    expect_fail "decode empty" "'' is not a token id" "$K" "$TOK" --decode ""
    expect_fail "decode out of range" "id '512' is outside the vocabulary (0..511)" \
        "$K" "$TOK" --decode 3 512
    L3=$SHARED/tokenizers/llama3-style-tiny
    if [ -d "$L3" ]; then
        expect_fail "--bos without BOS" "has no BOS token" "$K" "$L3" --bos hello
        expect_ok "no --bos" "$K" "$L3" hello
    fi
    ;;
generate)
    G=$BIN/tandem-generate
    D=$SHARED/models/stories260K
    M=$D/stories260K.bin
    [ -f "$M" ] || { echo "skipped: $M absent (shared test data)"; exit 77; }
    # Formats by content: not a checkpoint at all, a tokenizer, a JSON file.
    expect_fail "licence as model" "is not a model checkpoint (a text file)" "$G" --model "$D/LICENSE"
    expect_fail "tokenizer as model" "is not a model checkpoint" "$G" --model "$D/tok512.bin"
    printf '{"vocab_size": 3}' >"$T/config.json"
    expect_fail "JSON as model" "(a JSON file)" "$G" --model "$T/config.json"
    expect_fail "device as model" "is not a regular file" "$G" --model /dev/zero
    HF=$SHARED/models/stories260K-hf
    if [ -f "$HF/model.safetensors" ]; then
        expect_ok ".safetensors file" "$G" --model "$HF/model.safetensors" --max-tokens 8 --json
        grep -q '"tokens":\[[0-9]' "$T/out" || fail ".safetensors file: no tokens: $(cat "$T/out")"
    fi
    # A GGUF file carries its tokenizer: no --tokenizer needed, same text as the .bin.
    GG=$SHARED/models/stories260K-gguf/stories260K.gguf
    if [ -f "$GG" ]; then
        expect_ok "GGUF without --tokenizer" "$G" --model "$GG" --prompt "Once upon" --max-tokens 40
        cp "$T/out" "$T/gguf.txt"
        expect_ok "llama2.c" "$G" --model "$M" --prompt "Once upon" --max-tokens 40
        cmp -s "$T/out" "$T/gguf.txt" || fail "GGUF text differs: $(cat "$T/gguf.txt")"
    fi
    # Vocabulary sizes checked at load, both ways, before generating.
    if [ -x "$BIN/make-test-model" ]; then
        "$BIN/make-test-model" --format llama2c --shape 15m --seed 1 --out "$T/m15/m15.bin" \
            >/dev/null 2>&1 || fail "make-test-model 15m"
        expect_fail "small tokenizer" "the tokenizer has 512 tokens but the model 32000" \
            "$G" --model "$T/m15/m15.bin" --tokenizer "$D/tok512.bin" --max-tokens 4
        expect_fail "large tokenizer" "the tokenizer has 32000 tokens but the model only 512" \
            "$G" --model "$M" --tokenizer "$T/m15/tokenizer.bin" --max-tokens 4
        rm -rf "$T/m15"
    fi
    expect_fail "explicit tokenizer missing" "tokenizer $T/none" \
        "$G" --model "$M" --tokenizer "$T/none" --prompt-tokens 1,2 --json
    # NaN weights: the first 1,000 floats of the embedding.
    head -c 28 "$M" >"$T/nan.bin"
    i=0
    while [ $i -lt 1000 ]; do printf '\000\000\300\177'; i=$((i + 1)); done >>"$T/nan.bin"
    tail -c +4029 "$M" >>"$T/nan.bin"
    expect_fail "NaN weights" "logits contain NaN at step 0" \
        "$G" --model "$T/nan.bin" --tokenizer "$D/tok512.bin" --max-tokens 4
    # Prompt ids: whole decimals inside the vocabulary only.
    expect_fail "prompt-tokens junk" "--prompt-tokens: '2abc' is not a token id" \
        "$G" --model "$M" --prompt-tokens 1,2abc --max-tokens 2 --json
    expect_fail "prompt-tokens sign" "--prompt-tokens: '+2' is not a token id" \
        "$G" --model "$M" --prompt-tokens 1,+2 --max-tokens 2 --json
    expect_fail "prompt-tokens range" "--prompt-tokens: '512' is outside the model's vocabulary" \
        "$G" --model "$M" --prompt-tokens 1,512 --max-tokens 2 --json
    # A prompt that fills the context leaves no room; one token more exceeds it.
    ids=$(i=0; while [ $i -lt 512 ]; do printf '1,'; i=$((i + 1)); done)
    expect_fail "prompt fills context" "prompt of 512 tokens fills the context of 512" \
        "$G" --model "$M" --prompt-tokens "${ids%,}" --max-tokens 3
    expect_fail "prompt exceeds context" "prompt of 513 tokens exceeds the context of 512" \
        "$G" --model "$M" --prompt-tokens "${ids}1" --max-tokens 3
    # --ignore-eos: max_tokens is the only end (llama2.c models also stop at BOS otherwise).
    expect_ok "ignore-eos" "$G" --model "$M" --ignore-eos --max-tokens 400 --json
    n=$(sed -n 's/.*"tokens":\[\([^]]*\)\].*/\1/p' "$T/out" | tr ',' '\n' | grep -c .)
    [ "$n" -eq 400 ] || fail "--ignore-eos: $n tokens, want 400"
    grep -q '"finish_reason":"length"' "$T/out" || fail "--ignore-eos: $(cat "$T/out")"
    ;;
loadtest)
    L=$BIN/tandem-loadtest
    # Traces: devices refused, line length capped (with the line named).
    expect_fail "trace /dev/zero" "/dev/zero: not a regular file" \
        "$L" fit --trace /dev/zero --format burstgpt
    expect_fail "trace directory" "not a regular file" "$L" fit --trace "$T" --format azure
    { printf 'TIMESTAMP,ContextTokens,GeneratedTokens\n'
      head -c 1100000 /dev/zero | tr '\0' 'x'
      printf '\n'; } >"$T/long.csv"
    expect_fail "long line" "line 2: longer than 1048576 bytes" \
        "$L" fit --trace "$T/long.csv" --format azure
    # Every request failing (nothing listens on port 9): the reason on stderr.
    expect_fail "all requests fail" "all 5 requests failed; reasons: error: connect:" \
        "$L" synth --n 5 --rate 100 --url http://127.0.0.1:9/v1/completions \
        --out "$T/run" --no-plots
    [ -s "$T/run/requests.csv" ] || fail "all requests fail: no requests.csv"
    ;;
*)
    fail "unknown section $WHAT"
    ;;
esac
echo "ok: $WHAT"
