#!/bin/sh
# Every binary parses its command line with common/config: --help exits 0
# and lists the options; an unknown flag, a value out of range or of the
# wrong type exits 2 with a message naming the flag (and the rule); a value
# from --config FILE applies, and the same option given as a flag wins over
# it (checked in each binary's output).
#
# usage: test_cli_config.sh generate|tokenize|loadtest|make-test-model|benchmarks
set -eu
BIN=${TANDEM_BIN_DIR:?}
WHAT=${1:?usage: test_cli_config.sh generate|tokenize|loadtest|make-test-model|benchmarks}
T=$(mktemp -d)
trap 'rm -rf "$T"' EXIT
fail() { echo "FAIL: $*"; exit 1; }

# expect_help NAME CMD...: exit 0, the generated help on stdout.
expect_help() {
    name=$1
    shift
    "$@" --help >"$T/out" 2>"$T/err" || fail "$name --help: exit $? ($(cat "$T/err"))"
    grep -q -- "--config=FILE" "$T/out" || fail "$name --help: no --config in: $(head -3 "$T/out")"
}

# expect_error NAME NEEDLE CMD...: exit status 2 and NEEDLE (fixed string) on stderr.
expect_error() {
    name=$1
    needle=$2
    shift 2
    st=0
    "$@" >"$T/out" 2>"$T/err" || st=$?
    [ "$st" -eq 2 ] || fail "$name: exit $st, want 2 (stderr: $(cat "$T/err"))"
    grep -qF -- "$needle" "$T/err" || fail "$name: stderr lacks '$needle': $(cat "$T/err")"
}

# The number of ids in the "tokens" array of tandem-generate --json output.
json_tokens() { sed -n 's/.*"tokens":\[\([^]]*\)\].*/\1/p' "$1" | tr ',' '\n' | grep -c .; }

case $WHAT in
generate)
    G=$BIN/tandem-generate
    expect_help tandem-generate "$G"
    grep -q -- "--max-tokens=INT" "$T/out" || fail "help lacks --max-tokens"
    grep -q -- "--stop=STRING (repeatable)" "$T/out" || fail "help lacks --stop"
    expect_error "unknown flag" "unknown flag '--max-tokns' (did you mean '--max-tokens'?)" \
        "$G" --model x --max-tokns 3
    expect_error "threads out of range" '--threads = "0": out of range [1, 256]' \
        "$G" --model x --threads 0
    expect_error "bad float" '--temperature = "hot"' "$G" --model x --temperature hot
    expect_error "bad choice" '--matmul = "fast": must be one of det|blas' "$G" --model x --matmul fast
    expect_error "negative temperature" '--temperature = "-1": must be >= 0' \
        "$G" --model x --temperature -1
    printf 'threads = 999\n' >"$T/bad.conf"
    expect_error "file value out of range" "$T/bad.conf:1: threads = \"999\": out of range" \
        "$G" --model x --config "$T/bad.conf"
    expect_error "missing model" "--model is required" "$G" --max-tokens 3

    # A model: the real stories260K when present, else a random tiny one.
    M=${TANDEM_SHARED_DIR:-/nonexistent}/models/stories260K/stories260K.bin
    if [ ! -f "$M" ]; then
        [ -x "$BIN/make-test-model" ] || { echo "skipped: no model and no make-test-model"; exit 77; }
        M=$T/tiny.bin
        "$BIN/make-test-model" --format llama2c --shape tiny --seed 1 --out "$M" ||
            fail "make-test-model"
    fi
    cat >"$T/gen.conf" <<EOF
# tandem-generate options
model = $M
max-tokens = 7
temperature = 0
ignore-eos = true
json = true
EOF
    "$G" --config "$T/gen.conf" >"$T/a.json" 2>"$T/err" || fail "config run: $(cat "$T/err")"
    [ "$(json_tokens "$T/a.json")" -eq 7 ] || fail "--config max-tokens = 7: $(cat "$T/a.json")"
    "$G" --max-tokens 3 --config "$T/gen.conf" >"$T/b.json" 2>"$T/err" ||
        fail "flag run: $(cat "$T/err")"
    [ "$(json_tokens "$T/b.json")" -eq 3 ] || fail "--max-tokens 3 over the file: $(cat "$T/b.json")"
    "$G" --config "$T/gen.conf" --max-tokens=2 --json=false >"$T/c.txt" 2>"$T/err" ||
        fail "text run: $(cat "$T/err")"
    if grep -q '"tokens"' "$T/c.txt"; then fail "--json=false over the file still printed JSON"; fi
    ;;

tokenize)
    K=$BIN/tandem-tokenize
    expect_help tandem-tokenize "$K"
    grep -q -- "--bench=INT" "$T/out" || fail "help lacks --bench"
    TOK=${TANDEM_SHARED_DIR:-/nonexistent}/models/stories260K/tok512.bin
    if [ ! -f "$TOK" ]; then
        [ -x "$BIN/make-test-model" ] || { echo "skipped: no tokenizer and no make-test-model"; exit 77; }
        "$BIN/make-test-model" --format llama2c --shape tiny --seed 1 --out "$T/tiny.bin" ||
            fail "make-test-model"
        TOK=$T/tokenizer.bin
    fi
    expect_error "unknown flag" "unknown flag '--boss' (did you mean '--bos'?)" "$K" "$TOK" --boss hi
    expect_error "bench out of range" '--bench = "-1": must be >= 0' "$K" "$TOK" --bench -1 hi
    printf 'bos = true\n' >"$T/tok.conf"
    "$K" "$TOK" --config "$T/tok.conf" "a" >"$T/a.txt" || fail "tokenize --config"
    "$K" "$TOK" --config "$T/tok.conf" --bos=false "a" >"$T/b.txt" || fail "tokenize --bos=false"
    [ "$(cut -d' ' -f1 "$T/a.txt")" = 1 ] || fail "--config bos = true: no BOS in $(cat "$T/a.txt")"
    [ "$(wc -w <"$T/a.txt")" -eq $(($(wc -w <"$T/b.txt") + 1)) ] ||
        fail "--bos=false over the file: $(cat "$T/a.txt") vs $(cat "$T/b.txt")"
    # TEXT after the options is taken as given, even with leading dashes.
    "$K" "$TOK" -- "--bos" >"$T/c.txt" || fail "text after --"
    "$K" "$TOK" "-x" >"$T/d.txt" || fail "text starting with '-'"
    ;;

loadtest)
    L=$BIN/tandem-loadtest
    "$L" --help >"$T/out" || fail "tandem-loadtest --help"
    grep -q "replay --help" "$T/out" || fail "top-level help"
    for sub in replay synth fit compare; do
        expect_help "tandem-loadtest $sub" "$L" "$sub"
        grep -q -- "--log-level=STRING" "$T/out" || fail "$sub help lacks --log-level"
    done
    "$L" replay --help >"$T/out"
    grep -q -- "--slo-ttft-ms=FLOAT" "$T/out" || fail "replay help lacks --slo-ttft-ms"
    expect_error "unknown subcommand" "unknown command 'replai'" "$L" replai
    expect_error "unknown flag" "unknown flag '--spedup' (did you mean '--speedup'?)" \
        "$L" replay --trace x --format burstgpt --spedup 2
    expect_error "flag of another subcommand" "unknown flag '--trace'" "$L" synth --trace x
    expect_error "max-conns out of range" '--max-conns = "0": out of range [1, 100000]' \
        "$L" replay --trace x --format burstgpt --max-conns 0
    expect_error "bad format" '--format = "csv": must be one of burstgpt|azure|mooncake' \
        "$L" fit --trace x --format csv
    expect_error "bad int" '--n = "ten"' "$L" synth --n ten --write-trace -
    expect_error "compare needs two dirs" "usage: tandem-loadtest compare DIR_A DIR_B" \
        "$L" compare only-one
    expect_error "speedup and rate" "exclusive" "$L" replay --trace x --format burstgpt \
        --speedup 2 --rate 3

    cat >"$T/synth.conf" <<EOF
n = 5
seed = 3
write-trace = $T/trace.jsonl
log-level = warn
EOF
    "$L" synth --config "$T/synth.conf" 2>"$T/err" || fail "synth --config: $(cat "$T/err")"
    [ "$(wc -l <"$T/trace.jsonl")" -eq 5 ] || fail "--config n = 5"
    "$L" synth --config "$T/synth.conf" --n 3 2>"$T/err" || fail "synth --n 3: $(cat "$T/err")"
    [ "$(wc -l <"$T/trace.jsonl")" -eq 3 ] || fail "--n 3 over the file"
    printf 'n = 0\n' >"$T/bad.conf"
    expect_error "file value out of range" "$T/bad.conf:1: n = \"0\": out of range" \
        "$L" synth --config "$T/bad.conf" --write-trace -
    ;;

make-test-model)
    P=$BIN/make-test-model
    expect_help make-test-model "$P"
    grep -q -- "--shards=INT" "$T/out" || fail "help lacks --shards"
    expect_error "unknown flag" "unknown flag '--shap' (did you mean '--shape'?)" \
        "$P" --format hf --shap tiny --seed 1 --out "$T/x"
    expect_error "shards out of range" '--shards = "0": out of range [1, 99999]' \
        "$P" --format hf --shape tiny --seed 1 --shards 0 --out "$T/x"
    expect_error "negative seed" '--seed = "-1": must be >= 0' \
        "$P" --format hf --shape tiny --seed -1 --out "$T/x"
    expect_error "required" "are required" "$P" --format hf --shape tiny --out "$T/x"
    [ ! -e "$T/x" ] || fail "a failed run wrote $T/x"
    printf 'format = llama2c\nshape = tiny\nseed = 1\n' >"$T/mtm.conf"
    "$P" --config "$T/mtm.conf" --out "$T/m.bin" || fail "make-test-model --config"
    [ -f "$T/m.bin" ] && [ -f "$T/tokenizer.bin" ] || fail "--config format = llama2c"
    "$P" --config "$T/mtm.conf" --format hf --out "$T/hf" || fail "--format hf over the file"
    [ -d "$T/hf" ] && [ -f "$T/hf/config.json" ] || fail "--format hf over the file: no directory"
    printf 'list-shapes = yes\n' >"$T/list.conf"
    "$P" --config "$T/list.conf" >"$T/out" || fail "list-shapes from a file"
    grep -q "^tiny " "$T/out" || fail "list-shapes output"
    ;;

benchmarks)
    for b in tandem-rpc-bench tandem-kvx-bench tandem-kvc-bench; do
        [ -x "$BIN/$b" ] || continue
        expect_help "$b" "$BIN/$b"
        expect_error "$b unknown flag" "unknown flag '--bogus'" "$BIN/$b" --bogus 1
    done
    [ -x "$BIN/tandem-rpc-bench" ] &&
        expect_error "rpc-bench range" '--seconds = "0"' "$BIN/tandem-rpc-bench" --seconds 0
    [ -x "$BIN/tandem-kvx-bench" ] &&
        expect_error "kvx-bench transport" '--transport = "bogus": must be one of all|tcp|shm' \
            "$BIN/tandem-kvx-bench" --transport bogus
    [ -x "$BIN/tandem-kvc-bench" ] &&
        expect_error "kvc-bench range" '--n-seqs = "0": out of range' "$BIN/tandem-kvc-bench" \
            --n-seqs 0
    ;;

*)
    fail "unknown binary group '$WHAT'"
    ;;
esac
echo PASS
