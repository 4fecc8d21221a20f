#!/usr/bin/env bash
# Every benchmark on one accelerator machine, in one go (the device is lent for minutes).
# Usage: OUT=/some/dir bash benchmarks/run_gpu.sh   (run from the repository root)
# Each script gets its own time limit so that one slow script cannot eat the others' time.
set -u
OUT=${OUT:-benchmarks/results}
mkdir -p "$OUT"
export PYTHONPATH=$PWD:$PWD/benchmarks${PYTHONPATH:+:$PYTHONPATH}
export PYTHONUNBUFFERED=1
# the results directory the scripts write their JSON to
export XLA_PYTHON_CLIENT_PREALLOCATE=false
py=${PYTHON:-python3}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>&1 | tee "$OUT/gpu.txt"
$py -c "import jax, flax, optax; print('jax', jax.__version__, jax.devices(), 'flax', flax.__version__, 'optax', optax.__version__)" 2>&1 | tee -a "$OUT/gpu.txt"
run() {  # run NAME LIMIT_S ARGS...
  local name=$1 limit=$2; shift 2
  echo "=== $name ($*) ==="
  timeout "$limit" $py "$@" 2>&1 | grep -v -E "^W[0-9]{4}|UserWarning" | tee "$OUT/$name.log"
  echo "=== $name exit ${PIPESTATUS[0]} ==="
}
run north_star        200 benchmarks/north_star.py --measure-epochs 3 --measure-examples 8192
run ensemble_training 150 benchmarks/ensemble_training.py --steps 100 --rounds 2
run likelihood         80 benchmarks/likelihood.py --examples 4096
run leverage           80 benchmarks/leverage.py --quick
run paper_protocol     30 benchmarks/paper_protocol.py --backend gpu
cp benchmarks/results/*-gpu.json "$OUT"/ 2>/dev/null || true
ls -la "$OUT"
