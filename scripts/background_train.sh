#!/usr/bin/env bash
# The long CPU run behind default model v4, in the background at the lowest priority, resumable anywhere:
#   bash scripts/background_train.sh            # start, or resume from runs/ or from the packed checkpoint
#   python scripts/pack_run.py pack runs/v4-cpu checkpoints/v4-cpu   # before a commit: keep the run in git
# It takes what the machine leaves idle: one thread less than the cores, nice 19, and (Linux) its own session
# with the autogroup niced too, since with autogroups a plain nice only orders the processes of one session.
# The schedule is fixed up front (100 epochs, warm-up then cosine); every invocation continues it exactly where
# the last one stopped (mid-epoch checkpoints every 100 steps), so it may be killed at any time.
set -euo pipefail
cd "$(dirname "$0")/.."
DATA=${DATA:-../shared/datasets/cifar10}
RUN=${RUN:-runs/v4-cpu}
PACKED=${PACKED:-checkpoints/v4-cpu}
PYTHON=${PYTHON:-.venv/bin/python}
THREADS=$(( $(nproc) > 1 ? $(nproc) - 1 : 1 ))

mkdir -p "$(dirname "$RUN")"
if [ -f "$PACKED/MANIFEST.json" ]; then
  "$PYTHON" scripts/pack_run.py unpack "$PACKED" "$RUN"   # keeps a newer local checkpoint
fi
setsid env OMP_NUM_THREADS="$THREADS" nice -n 19 "$PYTHON" -m corinfomax.cli train --preset cpu \
  --data "$DATA/train" --out "$RUN" --batch-size 128 --epochs 100 --time-budget-min 0 \
  --checkpoint-every 100 --val-data "$DATA/test" --knn-every 10 --no-progress \
  >> "$RUN.log" 2>&1 < /dev/null &
PID=$!
sleep 1  # the new session (and its autogroup) exists once setsid has run
echo 19 > "/proc/$PID/autogroup" 2>/dev/null || true
echo "training $RUN in the background (pid $PID, $THREADS thread(s), nice 19); log: $RUN.log"
