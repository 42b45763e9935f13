#!/usr/bin/env bash
# Sets up everything mixnn_fast needs on a fresh machine, idempotently:
#   1. the real Fashion-MNIST from Debian's dataset-fashion-mnist (the embedded demo's data),
#   2. the project's virtual environment in .venv/ with the pinned requirements,
#   3. the package itself, editable, with its native extension (C++/OpenMP, and CUDA when nvcc is found).
# A second run only rebuilds what changed.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$(pwd)
PYTHON=${PYTHON:-python3}
FMNIST_DIR=/usr/share/datasets/fashion-mnist

log() { printf '[setup] %s\n' "$*"; }

if [ ! -f "$FMNIST_DIR/train-images-idx3-ubyte.gz" ]; then
  if command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
    log "installing Debian's dataset-fashion-mnist"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq dataset-fashion-mnist >/dev/null 2> >(grep -v "^debconf: delaying" >&2)
  else
    log "WARNING: $FMNIST_DIR is missing and apt-get is not usable as root; the demo will fall back to scikit-learn's digits"
  fi
fi

if [ ! -x .venv/bin/python ]; then
  log "creating .venv with $($PYTHON --version)"
  "$PYTHON" -m venv .venv
fi
VPY="$ROOT/.venv/bin/python"

req_hash=$(sha256sum requirements.txt | cut -d' ' -f1)
if [ "$(cat .venv/.requirements.sha256 2>/dev/null)" != "$req_hash" ]; then
  log "installing requirements (torch, DALI, hnswlib, ...; a few minutes the first time)"
  # pip's own notes about the machine's local package folders are noise here
  "$VPY" -m pip install -q -r requirements.txt 2> >(grep -v "^WARNING: Location" >&2)
  echo "$req_hash" > .venv/.requirements.sha256
fi

log "building mixnn_fast (editable) and its native extension (log: build/setup-build.log)"
mkdir -p build
if ! "$VPY" -m pip install --no-deps --no-build-isolation -e . > build/setup-build.log 2>&1; then
  grep -v "^WARNING: Location" build/setup-build.log | tail -40 >&2
  log "ERROR: building mixnn_fast failed; the full log is build/setup-build.log"
  exit 1
fi
"$VPY" - <<'PY'
import mixnn_fast
print(f"[setup] mixnn_fast {mixnn_fast.__version__}: native extension {mixnn_fast.build_info()}")
PY
