#!/usr/bin/env bash
# One-shot GPU validation on a fresh GPU machine with torch and triton preinstalled:
# builds kiln._cuda, runs `pytest -m gpu`, the GPU benchmarks of every op (triton and cuda forms
# against torch and torch.compile) and `kiln bench --device cuda`, and writes every log, table,
# JSON and plot (and the GPU's name) to OUTDIR. Each step has its own time limit and the whole
# script stops itself before 8 minutes; a step that hangs is killed and the next one runs.
#
#   bench/gpu_validate.sh OUTDIR            (then: tar czf validate.tgz -C OUTDIR .)
set -uo pipefail
out=${1:?usage: bench/gpu_validate.sh OUTDIR}
mkdir -p "$out"
cd "$(dirname "$0")/.."
budget=${KILN_VALIDATE_SECONDS:-460}
deadline=$((SECONDS + budget))
summary="$out/summary.txt"
: > "$summary"
export PYTHONUNBUFFERED=1

step() {  # step NAME LIMIT_S COMMAND...: run with a limit clipped to what is left, log to OUTDIR/NAME.log
  local name=$1 limit=$2; shift 2
  local left=$((deadline - SECONDS))
  (( left < limit )) && limit=$left
  if (( limit < 10 )); then echo "$name: skipped, out of time" | tee -a "$summary"; return; fi
  local start=$SECONDS
  timeout -k 5 "$limit" "$@" > "$out/$name.log" 2>&1
  local rc=$?
  local verdict=ok; (( rc == 124 || rc == 137 )) && verdict="killed at its ${limit}s limit"; (( rc != 0 && rc != 124 && rc != 137 )) && verdict="failed (rc $rc)"
  echo "$name: $verdict, $((SECONDS - start)) s" | tee -a "$summary"
}

{ nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv
  python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__, 'gpu', torch.cuda.get_device_name())"
} > "$out/gpu.txt" 2>&1
cat "$out/gpu.txt"

step build 180 env KILN_CUDA=ON CMAKE_BUILD_PARALLEL_LEVEL="$(nproc)" \
  python3 -m pip install --no-build-isolation --no-deps -e .
step info 30 python3 -m kiln info
step pytest_gpu 170 python3 -m pytest -m gpu -q -p no:cacheprovider -o addopts="" -rfE
for script in bench/gpu_*.py; do
  name=$(basename "$script" .py)
  step "$name" 45 python3 "$script" --out "$out/$name.md"
done
step kiln_bench 90 python3 -m kiln bench --device cuda --quick --no-progress --out "$out/kiln_bench"
echo "total: $SECONDS s" | tee -a "$summary"
