#!/usr/bin/env bash
# The results table (six methods, five noise settings, seeds 0 1 2; no extra rows) on one CUDA
# GPU machine inside a fixed time, for a session that holds such a machine for minutes only.
# Run scripts/gpu_check.sh first: it builds the extension in place with that machine's python3.
#
#   OUT=<folder> TIME_LIMIT=420 JOBS=16 bash scripts/gpu_table.sh [run folder, default runs/gpu_table]
#
# METHODS (default "mixnn_plus gce sce mixup ce mixnn") limits the cells to some methods, NOISES
# (default: every noise setting of the table) to some settings.
# One table cell per process, JOBS at a time, one CPU thread each, all on the one GPU.  MixNN+'s
# cells start first, then the other methods seed by seed, so that a run stopped by the time
# limit leaves whole seeds, not a scatter of holes.  No cell starts in the last 90 s; a cell still
# running at TIME_LIMIT is stopped and left out (its folder resumes if the script is run again).
# The finished run folders, without checkpoints, are packed into $OUT/gpu_table.tar.gz; here,
# unpack them and write the table with `mixnn table --seeds 0 1 2 --no-ablations --out-dir <folder>
# --report-only`.  REHEARSE=1 runs the same steps here on the CPU with tiny cells (300 images,
# 3 epochs), to find mistakes in this script before a GPU session does.
set -uo pipefail
cd "$(dirname "$0")/.."
RUNS=${1:-runs/gpu_table}
OUT=${OUT:-$PWD/build/gpu-table-out}
PYTHON=${PYTHON:-python3}
JOBS=${JOBS:-16}
TIME_LIMIT=${TIME_LIMIT:-420}
METHODS=${METHODS:-mixnn_plus gce sce mixup ce mixnn}
# The table's noise settings, from the table's own list (NOISES="sym-60 sym-80" limits them).
NOISES=${NOISES:-$("$PYTHON" -c 'from mixnn_fast.app.experiments import TABLE_NOISE; print(" ".join(n[2] for n in TABLE_NOISE))')} || {
  echo "gpu_table: $PYTHON cannot import mixnn_fast to list the table's noise settings" >&2; exit 2; }
FMNIST=/usr/share/datasets/fashion-mnist
mkdir -p "$OUT" "$RUNS"

# Without Debian's files the table would fall back to scikit-learn's digits: a different table.
for f in train-images-idx3-ubyte.gz train-labels-idx1-ubyte.gz t10k-images-idx3-ubyte.gz t10k-labels-idx1-ubyte.gz; do
  if [ ! -s "$FMNIST/$f" ]; then
    echo "gpu_table: $FMNIST/$f is missing; copy Debian's dataset-fashion-mnist files there first" >&2
    exit 2
  fi
done
TABLE_ARGS=""  # words for every cell's command line
if [ "${REHEARSE:-0}" = 1 ]; then
  TABLE_ARGS="--subset 300 --epochs 3"
else
  "$PYTHON" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" || {
    echo "gpu_table: $PYTHON sees no CUDA device; this script is for a GPU machine" >&2; exit 2; }
fi

start=$(date +%s)
last_start=$((start + TIME_LIMIT - 90))
cells=()
if [[ " $METHODS " == *" mixnn_plus "* ]]; then
  for noise in $NOISES; do
    for seed in 0 1 2; do cells+=("mixnn_plus $noise $seed"); done
  done
fi
for seed in 0 1 2; do
  for method in $METHODS; do
    [ "$method" = mixnn_plus ] && continue
    for noise in $NOISES; do cells+=("$method $noise $seed"); done
  done
done
echo "gpu_table: ${#cells[@]} cells, $JOBS at a time, $TIME_LIMIT s, into $RUNS"

run_cell() {  # method noise seed: one cell, unless the time to start cells is over
  if [ "$(date +%s)" -ge "$last_start" ]; then echo "[skip] $*: no time left"; return 0; fi
  local t0; t0=$(date +%s)
  if "$PYTHON" -m mixnn_fast table --methods "$1" --noise "$2" --seeds "$3" --no-ablations \
       --num-threads 1 --out-dir "$RUNS" $TABLE_ARGS > "$OUT/cell_$1_$2_$3.log" 2>&1; then
    echo "[done] $* in $(( $(date +%s) - t0 )) s"
  else
    echo "[fail] $* after $(( $(date +%s) - t0 )) s: $(tail -n 3 "$OUT/cell_$1_$2_$3.log" | tr '\n' ' ')"
  fi
}
export -f run_cell
export PYTHON RUNS OUT last_start TABLE_ARGS
printf '%s\n' "${cells[@]}" | timeout --kill-after=5 "$TIME_LIMIT" xargs -P "$JOBS" -L 1 bash -c 'run_cell "$@"' _
echo "gpu_table: $(( $(date +%s) - start )) s; $(ls "$RUNS"/*/summary.json 2>/dev/null | wc -l) runs finished"

# The tail of every cell's log, in one file (the device returns few files).
tail -n 20 "$OUT"/cell_*.log > "$OUT/cell_logs.txt" 2>/dev/null; rm -f "$OUT"/cell_*.log
tar -czf "$OUT/gpu_table.tar.gz" --exclude='checkpoint*.pt' --exclude='.*lock' --exclude='label_issues.csv' \
    --exclude='report.html' --exclude='*.png' "$RUNS"
ls -la "$OUT"
