#!/usr/bin/env bash
# The GPU check, in one command and at most six minutes: on a machine with a CUDA GPU it builds
# the extension with that machine's own python3 and nvcc and checks everything that runs on the
# device (scripts/gpu_check.py says what); without a GPU it checks that the extension would
# build, says so and exits 0.  Writes $OUT/gpu_check.json and $OUT/gpu_check.log.
#
#   OUT=/some/folder bash scripts/gpu_check.sh      (default OUT: build/gpu-check-out)
#
# PYTHON picks the interpreter (default python3; .venv/bin/python when python3 has no torch).
# GPU_CHECK_BUDGET (seconds, default 330): the driver stops any stage that would overrun it.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-$PWD/build/gpu-check-out}
mkdir -p "$OUT"
PYTHON=${PYTHON:-python3}
if ! "$PYTHON" -c "import torch" >/dev/null 2>&1 && [ -x .venv/bin/python ]; then
  echo "[gpu-check] $PYTHON cannot import torch; using .venv/bin/python"
  PYTHON=.venv/bin/python
fi
BUDGET=${GPU_CHECK_BUDGET:-330}
# The driver keeps to its budget by itself; this outer limit only catches a driver that hangs.
exec timeout --kill-after=10 $((BUDGET + 20)) "$PYTHON" scripts/gpu_check.py --out "$OUT" --budget "$BUDGET" "$@"
