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
*)
    fail "unknown section $WHAT"
    ;;
esac
echo "ok: $WHAT"
