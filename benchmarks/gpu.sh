#!/usr/bin/env bash
# The GPU figures of benchmarks/README.md, one step per call so each ends well inside a 10-minute limit.
#
#   bash benchmarks/gpu.sh engine   OUT_DIR   # vectorised vs one-at-a-time, overhead, peak memory (eager, compiled)
#   bash benchmarks/gpu.sh planning OUT_DIR   # server planning on the GPU (federation.server_device=cuda path)
#   bash benchmarks/gpu.sh nlu      OUT_DIR   # the nlu table, seed 1 (resumable: finished runs are reused)
#
# Each step prints its table and writes it to OUT_DIR/<step>.md; `nlu` also writes the compare folder
# OUT_DIR/compare-nlu (checkpoints off, so it stays small enough to carry between machines).
set -euo pipefail
step=${1:?usage: gpu.sh engine|planning|nlu OUT_DIR}
out=${2:?usage: gpu.sh engine|planning|nlu OUT_DIR}
mkdir -p "$out"
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
here=$(cd "$(dirname "$0")" && pwd)
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$out/$step.md"
case "$step" in
  engine)
    python "$here/bench_engine.py" --clients 20 --batch 16 --steps 4 --rounds 3 | tee -a "$out/$step.md"
    python "$here/bench_engine.py" --clients 20 --batch 16 --steps 4 --rounds 3 --compile | tee -a "$out/$step.md"
    ;;
  planning)
    python "$here/bench_planning.py" --backend torch --device cuda | tee -a "$out/$step.md"
    ;;
  nlu)
    start=$(date +%s)
    fedtreelora compare --suite nlu --seeds 1 --out "$out/compare-nlu" --quiet \
      --set logging.tensorboard=false --set federation.checkpoint_every=0 | tee -a "$out/$step.md"
    echo "wall seconds: $(($(date +%s) - start))" | tee -a "$out/$step.md"
    ;;
  *)
    echo "unknown step $step (engine, planning or nlu)" >&2
    exit 2
    ;;
esac
