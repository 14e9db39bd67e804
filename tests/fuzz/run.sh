#!/bin/sh
# Runs the libFuzzer targets one after another (a build configured with
# -DTANDEM_FUZZ=ON -DCMAKE_C_COMPILER=clang -DTANDEM_SANITIZE=ON).
#
#   tests/fuzz/run.sh BUILD_DIR SECONDS [TARGET...]
#
# TARGET is a name without the fuzz_ prefix (tok_json, model_gguf, ...);
# default: all. Each target starts from a scratch copy of its seed corpus in
# $WORK (default /tmp/tandem-fuzz-work) so the repository corpus stays small;
# crashes land in $WORK/<target>/artifacts. Prints libFuzzer's final stats.
set -eu
build=${1:?usage: run.sh BUILD_DIR SECONDS [TARGET...]}
secs=${2:?usage: run.sh BUILD_DIR SECONDS [TARGET...]}
shift 2
here=$(cd "$(dirname "$0")" && pwd)
work=${WORK:-/tmp/tandem-fuzz-work}
# target:corpus pairs
all="tok_json:tok_json tok_gpt2:tok_gpt2 tok_l2c:tok_l2c tok_ops:tok_ops
safetensors:safetensors model_hf:model_hf model_gguf:model_gguf model_l2c:model_l2c
trace_burstgpt:trace_burstgpt trace_azure:trace_azure trace_mooncake:trace_mooncake
lt_sse:lt_sse kvx_wire:kvx_wire config:config"
[ $# -gt 0 ] && want=" $* " || want=""
status=0
for pair in $all; do
    t=${pair%%:*}
    c=${pair#*:}
    case "$want" in "" | *" $t "*) ;; *) continue ;; esac
    bin=$build/bin/fuzz_${t}_libfuzzer
    [ -x "$bin" ] || { echo "== $t: $bin not built, skipped"; continue; }
    mkdir -p "$work/$t/corpus" "$work/$t/artifacts"
    cp -n "$here/corpus/$c/"* "$work/$t/corpus/" 2>/dev/null || true
    dict=""
    [ -f "$here/dict/$t.dict" ] && dict="-dict=$here/dict/$t.dict"
    echo "== $t ($secs s)"
    if ! "$bin" -max_total_time="$secs" -timeout=10 -rss_limit_mb=2048 -malloc_limit_mb=512 -max_len=8192 \
        -print_final_stats=1 -artifact_prefix="$work/$t/artifacts/" $dict \
        "$work/$t/corpus" >"$work/$t/log" 2>&1; then
        status=1
        echo "   FAILED: see $work/$t/log and $work/$t/artifacts/"
    fi
    grep -E "^#[0-9]+[[:space:]]+DONE|stat::number_of_executed_units|stat::new_units_added|^(INFO|==[0-9]+==ERROR|SUMMARY)" \
        "$work/$t/log" | grep -v "INFO: Seed\|INFO: Loaded\|INFO: -max_len\|INFO: A corpus\|INFO: Running" | tail -6
done
exit $status
