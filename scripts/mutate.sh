#!/usr/bin/env bash
# Mutation run: for each mutation in the list (tests/mutation/mutations.txt),
# applies it to the source, rebuilds, runs the tests, restores the source, and
# reports whether the tests caught it (some test failed) or it survived
# (everything passed). docs/mutation.md says how to read the result.
#
# Usage: scripts/mutate.sh [--quick] [--list] [--jobs N] [--file LIST] [ID...]
#   --quick      run each mutation's "tests:" subset instead of the whole suite
#   --list       print the mutations and exit
#   --jobs N     parallel build jobs and tests (default 2)
#   --file LIST  another mutation list
#   ID...        only these mutations (default: all)
# The build tree is BUILD_DIR (default build/, made by scripts/build.sh). The
# mutated file is restored after every mutation, also on an error or Ctrl-C;
# the tree is rebuilt from the restored source at the end. Logs and a summary
# go to BUILD_DIR/mutation/. Exit status: 0 when every mutation was caught,
# 1 when one survived (or could not be applied or built).
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
BUILD_DIR=${BUILD_DIR:-build}
LIST=tests/mutation/mutations.txt
JOBS=2
QUICK=0
IDS=()
while [ $# -gt 0 ]; do
  case "$1" in
    --quick) QUICK=1 ;;
    --list) LISTONLY=1 ;;
    --jobs) JOBS=$2; shift ;;
    --file) LIST=$2; shift ;;
    -h|--help) sed -n '2,19p' "$0"; exit 0 ;;
    -*) echo "mutate.sh: unknown option $1" >&2; exit 2 ;;
    *) IDS+=("$1") ;;
  esac
  shift
done
ML="python3 tests/mutation/mutlist.py $LIST"
if [ ${#IDS[@]} -eq 0 ]; then mapfile -t IDS < <($ML ids); fi
if [ -n "${LISTONLY:-}" ]; then
  for id in "${IDS[@]}"; do
    printf '%-28s %-22s %s\n' "$id" "$($ML show "$id" file)" "$($ML show "$id" why)"
  done
  exit 0
fi
if [ ! -f "$BUILD_DIR/CMakeCache.txt" ]; then
  echo "mutate.sh: no build in $BUILD_DIR (run scripts/build.sh first)" >&2
  exit 2
fi
LOGS=$BUILD_DIR/mutation
mkdir -p "$LOGS"
SUMMARY=$LOGS/summary.txt
: >"$SUMMARY"

BACKUP=""
TARGET=""
restore() {
  if [ -n "$BACKUP" ]; then
    cp "$BACKUP" "$TARGET" # a fresh mtime, so the next build recompiles it
    rm -f "$BACKUP"
    BACKUP=""
  fi
}
trap 'restore' EXIT
trap 'restore; echo; echo "mutate.sh: interrupted; source restored (rebuild: cmake --build $BUILD_DIR)" >&2; exit 130' INT TERM

# The unmutated tree must build and pass, or nothing below means anything.
echo "mutate.sh: building the unmutated tree"
cmake --build "$BUILD_DIR" -j"$JOBS" >"$LOGS/build-base.log" 2>&1 ||
  { echo "mutate.sh: the unmutated tree does not build ($LOGS/build-base.log)" >&2; exit 2; }

caught=0 survived=0 other=0
for id in "${IDS[@]}"; do
  TARGET=$($ML show "$id" file)
  regex=$($ML show "$id" tests)
  start=$(date +%s)
  BACKUP=$(mktemp "${TMPDIR:-/tmp}/mutate.XXXXXX")
  cp "$TARGET" "$BACKUP"
  set +e
  $ML apply "$id" "$ROOT"
  rc=$?
  set -e
  failed=""
  if [ $rc -eq 3 ]; then
    result=stale
  elif [ $rc -ne 0 ]; then
    result=error
  elif ! cmake --build "$BUILD_DIR" -j"$JOBS" >"$LOGS/$id.build.log" 2>&1; then
    result=build-failed
  else
    args=(-j"$JOBS" --output-on-failure)
    if [ $QUICK -eq 1 ] && [ -n "$regex" ]; then args+=(-R "$regex"); fi
    set +e
    (cd "$BUILD_DIR" && ctest "${args[@]}") >"$LOGS/$id.log" 2>&1
    rc=$?
    set -e
    if [ $rc -ne 0 ]; then
      result=caught
      failed=$(sed -n '/The following tests FAILED/,$p' "$LOGS/$id.log" |
        sed -n 's/^[[:space:]]*[0-9]* - \([^ ]*\) (\(.*\))$/\1(\2)/p' | paste -sd' ' -)
    else
      result=survived
    fi
  fi
  restore
  secs=$(($(date +%s) - start))
  case $result in
    caught) caught=$((caught + 1)) ;;
    survived) survived=$((survived + 1)) ;;
    *) other=$((other + 1)) ;;
  esac
  line=$(printf '%-28s %-12s %4ss  %s' "$id" "$result" "$secs" "$failed")
  echo "$line" | tee -a "$SUMMARY"
done
echo "mutate.sh: rebuilding the restored tree"
cmake --build "$BUILD_DIR" -j"$JOBS" >"$LOGS/build-restored.log" 2>&1 || true
echo "caught $caught  survived $survived  stale/not built $other  (of ${#IDS[@]}; $SUMMARY)" |
  tee -a "$SUMMARY"
[ $survived -eq 0 ] && [ $other -eq 0 ]
