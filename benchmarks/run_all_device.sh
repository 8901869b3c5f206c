#!/usr/bin/env bash
# One device call for everything GPU: install, all GPU tests, the end-to-end throughput benchmark
# (with the Python scheduler and the transformers peer), the decode-step profile and the
# whole workload's GPU time by kind of step and kernel.
# Logs and JSON go to $OUT (default benchmarks/out/); the throughput table is printed last.
#   OUT=... [PEER_REQUESTS=0 (skip the peer)] bash benchmarks/run_all_device.sh
set -uo pipefail
export PYTHONUNBUFFERED=1
OUT=${OUT:-benchmarks/out}
mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
python3 -m pip install --no-build-isolation --no-deps -e . -q >"$OUT/pip.log" 2>&1 || tail -20 "$OUT/pip.log"
timeout 300 python3 -m pytest -q -p no:cacheprovider tests/gpu >"$OUT/gpu_tests.log" 2>&1
grep -E "passed|failed|FAILED|Error" "$OUT/gpu_tests.log" | tail -12
PEER_ARGS=(--peer-requests "${PEER_REQUESTS:-32}")
[ "${PEER_REQUESTS:-32}" = 0 ] && PEER_ARGS=(--no-peer)
if ! timeout 230 python3 benchmarks/bench_throughput.py --out "$OUT/throughput.json" \
     "${PEER_ARGS[@]}" >"$OUT/throughput.log" 2>&1; then
  tail -15 "$OUT/throughput.log"
  echo "== retry with MINIVLLM_FUSED_KERNELS=0"
  MINIVLLM_FUSED_KERNELS=0 timeout 150 python3 benchmarks/bench_throughput.py --no-peer \
    --no-python --out "$OUT/throughput_unfused.json" >"$OUT/throughput_unfused.log" 2>&1
  tail -12 "$OUT/throughput_unfused.log"
fi
timeout 90 python3 benchmarks/profile_decode_step.py --out "$OUT/profile.json" \
  >"$OUT/profile.log" 2>&1
timeout 150 python3 benchmarks/profile_workload.py --out "$OUT/profile_workload.json" \
  >"$OUT/profile_workload.log" 2>&1
grep -A8 "^GPU timeline" "$OUT/profile_workload.log"
grep -A3 "^ running" "$OUT/profile.log"; grep "extras" "$OUT/profile.log"
grep -vE "^\s*$|Warning|_warn_once|eos_token_id" "$OUT/throughput.log" | tail -14
