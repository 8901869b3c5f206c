#!/usr/bin/env bash
# Issue 5 on a GPU machine: install, run the engine GPU tests, then the end-to-end throughput
# benchmark; the throughput table is printed last. Results go to $OUT (default benchmarks/out/).
#   bash benchmarks/run_engine_device.sh [--no-peer] [--no-python] ...
set -uo pipefail
export PYTHONUNBUFFERED=1
OUT=${OUT:-benchmarks/out}
mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
python3 -m pip install --no-build-isolation --no-deps -e . -q >"$OUT/pip.log" 2>&1 || tail -20 "$OUT/pip.log"
if [ -z "${SKIP_TESTS:-}" ]; then
  timeout 300 python3 -m pytest -q -p no:cacheprovider -x tests/gpu/test_engine_gpu.py 2>&1 \
    | tee "$OUT/engine_gpu_tests.log" | tail -15
fi
python3 benchmarks/bench_throughput.py --out "$OUT/throughput.json" "$@" 2>&1 \
  | tee "$OUT/throughput.log" | grep -vE "^\s*$" | tail -25
