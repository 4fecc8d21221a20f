#!/usr/bin/env bash
# Every benchmark on one accelerator machine, in one go (the device is lent for minutes).
# Usage: OUT=/some/dir bash benchmarks/run_gpu.sh [STAGE...]   (from the repository root)
# Stages (default: all, in this order): profile profile-cublas north_star ensemble_training likelihood
# leverage paper_protocol matmul_dtype north_star-bf16. Each gets its own time limit so that one slow script cannot eat
# the others' time. Logs, JSON results, traces and HLO end up in $OUT/gpu_results.tgz
# (one file: the device tool brings back at most 8) and the logs also on stdout.
set -u
OUT=${OUT:-benchmarks/results}
WORK=$(mktemp -d)
export PYTHONPATH=$PWD:$PWD/benchmarks${PYTHONPATH:+:$PYTHONPATH}
export PYTHONUNBUFFERED=1
export XLA_PYTHON_CLIENT_PREALLOCATE=false
py=${PYTHON:-python3}
stages=${*:-profile profile-cublas north_star ensemble_training likelihood leverage paper_protocol matmul_dtype north_star-bf16}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>&1 | tee "$WORK/gpu.txt"
$py -c "import jax, flax, optax; print('jax', jax.__version__, jax.devices(), 'flax', flax.__version__, 'optax', optax.__version__)" 2>&1 | tee -a "$WORK/gpu.txt"
run() {  # run NAME LIMIT_S ARGS...
  local name=$1 limit=$2; shift 2
  echo "=== $name ($*) ==="
  local t0=$SECONDS
  timeout "$limit" $py "$@" 2>&1 | grep -v -E "^W[0-9]{4}|UserWarning" | tee "$WORK/$name.log"
  echo "=== $name exit ${PIPESTATUS[0]} after $((SECONDS - t0)) s ==="
}
for stage in $stages; do
  case $stage in
    profile)
      run profile 120 benchmarks/profile_training.py --steps 50 --trace-dir "$WORK" --hlo-dir "$WORK"
      XLA_FLAGS="--xla_gpu_enable_command_buffer=" run profile-no-cuda-graphs 60 benchmarks/profile_training.py --steps 50 --top 5 --tag no-cuda-graphs ;;
    profile-cublas)  # XLA's Triton GEMM fusions off: every matmul a cuBLAS call
      XLA_FLAGS="--xla_gpu_enable_triton_gemm=false" run profile-cublas 90 benchmarks/profile_training.py --steps 100 --top 12 --tag cublas
      run profile-default-100 90 benchmarks/profile_training.py --steps 100 --top 5 --tag default-100 ;;
    north_star) run north_star 200 benchmarks/north_star.py --measure-epochs 3 --measure-examples 8192 ;;
    ensemble_training) run ensemble_training 180 benchmarks/ensemble_training.py --steps 100 --rounds 2 ;;
    likelihood) run likelihood 100 benchmarks/likelihood.py --examples 4096 ;;
    leverage) run leverage 80 benchmarks/leverage.py --quick ;;
    paper_protocol) run paper_protocol 30 benchmarks/paper_protocol.py --backend gpu ;;
    matmul_dtype) run matmul_dtype 150 benchmarks/matmul_dtype.py ;;  # also TF32 vs "highest"
    north_star-bf16)  # the same setting, likelihood with bf16 matmuls (its JSON overwrites north_star's: copy first)
      [ benchmarks/results/north_star-gpu.json -nt "$WORK/gpu.txt" ] && cp benchmarks/results/north_star-gpu.json "$WORK/north_star-f32-gpu.json"
      run north_star-bf16 200 benchmarks/north_star.py --measure-epochs 3 --measure-examples 8192 --matmul-dtype bfloat16 ;;
    *) echo "unknown stage $stage" ;;
  esac
done
# only the JSON this run wrote (results/ also holds earlier runs' files)
find benchmarks/results -maxdepth 1 -name "*-gpu.json" -newer "$WORK/gpu.txt" -exec cp {} "$WORK"/ \;
mkdir -p "$OUT"
tar czf "$OUT/gpu_results.tgz" -C "$WORK" .
ls -la "$WORK" "$OUT"
