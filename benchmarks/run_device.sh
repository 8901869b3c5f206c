#!/usr/bin/env bash
# One call on a GPU machine: install minivllm, then run the chosen steps, each under its own
# timeout (so one hang cannot eat the whole call), with logs and JSON in $OUT; a short summary
# table is printed last (benchmarks/summary.py).
#
#   OUT=/tmp/out bash benchmarks/run_device.sh [STEP ...]      (or STEPS="..." in the environment)
#
# Steps (default: tests throughput latency):
#   tests       tests/gpu
#   throughput  bench_throughput.py          latency   bench_latency.py
#   serving     bench_serving.py             host      bench_host.py
#   workload    profile_workload.py
#   latency_ab  bench_latency.py once per variant of $LATENCY_AB, each with its own environment
#               (the engine's switches): "NAME:VAR=VALUE,VAR=VALUE NAME: ..." (default: base,
#               the qkv GEMM as 2 or 4 split-K partial sums (qkv2, qkv4: MINIVLLM_QKV_SPLITS),
#               without the GEMMs' early weight columns (nowearly));
#               $LATENCY_AB_ARGS for each run, JSON latency_NAME.json
#   kernels     all of: prefill_attention decode_attention decode_varlen gemm layer_chain
#               small_kernels mixed_decode (bench_<name>.py; each can be named alone)
# Extra arguments per step: <STEP>_ARGS, e.g. THROUGHPUT_ARGS="--model-shape 8b --no-python"
# (throughput defaults to --no-peer; PREFILL_ATTENTION_ARGS="--sweep --plot" and the like;
# TESTS_ARGS: pytest's arguments, default tests/gpu; TESTS_TIMEOUT_S, default 330).
# BUDGET_S (default 570): no step runs past this many seconds from the start, so the summary
# comes back within the device's 10-minute command limit; steps left without time are skipped.
set -uo pipefail
export PYTHONUNBUFFERED=1
OUT=${OUT:-benchmarks/out}
BUDGET_S=${BUDGET_S:-570}
mkdir -p "$OUT"
: >"$OUT/steps.txt"
if [ $# -gt 0 ]; then steps=("$@"); else read -ra steps <<<"${STEPS:-tests throughput latency}"; fi
KERNELS=(prefill_attention decode_attention decode_varlen gemm layer_chain small_kernels
  mixed_decode)

nvidia-smi --query-gpu=name,memory.total --format=csv,noheader | tee "$OUT/gpu.txt"
# The device's copy of the tree may carry an older .git: "+changes" says the files differ from it.
(cd benchmarks && python3 -c 'import bench_common; print(bench_common.git_commit() or "unknown")') \
  >"$OUT/commit.txt" 2>/dev/null || echo unknown >"$OUT/commit.txt"
if ! timeout 300 python3 -m pip install --no-build-isolation --no-deps -e . -q \
    >"$OUT/pip.log" 2>&1; then
  echo "install failed:"
  tail -20 "$OUT/pip.log"
  exit 1
fi

run() {  # run NAME SECONDS COMMAND...: the command's output to $OUT/NAME.log
  local name=$1 limit=$2 start=$SECONDS rc
  local left=$((BUDGET_S - SECONDS))
  shift 2
  if [ "$left" -lt 20 ]; then
    echo "$name skipped: ${left}s of the budget left" | tee -a "$OUT/steps.txt"
    return
  fi
  [ "$left" -lt "$limit" ] && limit=$left
  timeout "$limit" "$@" >"$OUT/$name.log" 2>&1
  rc=$?
  echo "$name rc=$rc $((SECONDS - start))s (limit ${limit}s)" | tee -a "$OUT/steps.txt"
  if [ $rc -ne 0 ]; then tail -12 "$OUT/$name.log"; fi
}

extra() {  # the words of $<STEP>_ARGS, or the given default
  local var="${1^^}_ARGS"
  echo "${!var-${2:-}}"
}

for step in "${steps[@]}"; do
  [ "$step" = kernels ] && set -- "${KERNELS[@]}" || set -- "$step"
  for s in "$@"; do
    case $s in
      tests)
        run gpu_tests "${TESTS_TIMEOUT_S:-330}" \
          python3 -m pytest -q -p no:cacheprovider $(extra tests tests/gpu) ;;
      throughput)
        run throughput 300 python3 benchmarks/bench_throughput.py \
          --out "$OUT/throughput.json" $(extra throughput --no-peer) ;;
      latency)
        run latency 200 python3 benchmarks/bench_latency.py --out "$OUT/latency.json" \
          $(extra latency) ;;
      latency_ab)
        default="base: qkv2:MINIVLLM_QKV_SPLITS=2 qkv4:MINIVLLM_QKV_SPLITS=4"
        default="$default nowearly:MINIVLLM_GEMM_EARLY_COLUMNS=0"
        for variant in ${LATENCY_AB:-$default}; do
          name=${variant%%:*}
          IFS=, read -ra envs <<<"${variant#*:}"
          run "latency_$name" 150 env "${envs[@]}" python3 benchmarks/bench_latency.py \
            --out "$OUT/latency_$name.json" $(extra latency_ab "--prompt-lens 1024 --running 1 8 \
            16 32 --decode-tokens 64 --max-model-len 32768")
        done ;;
      serving)
        run serving 300 python3 benchmarks/bench_serving.py --out "$OUT/serving.json" \
          $(extra serving) ;;
      host)
        run host 200 python3 benchmarks/bench_host.py --out "$OUT/host.json" $(extra host) ;;
      workload)
        run profile_workload 300 python3 benchmarks/profile_workload.py \
          --out "$OUT/profile_workload.json" $(extra workload) ;;
      prefill_attention | decode_attention)
        run "$s" 240 python3 "benchmarks/bench_$s.py" --out "$OUT/$s.json" $(extra "$s") ;;
      decode_varlen | gemm | layer_chain | small_kernels | mixed_decode)
        run "$s" 200 python3 "benchmarks/bench_$s.py" $(extra "$s") ;;
      *)
        echo "unknown step $s" | tee -a "$OUT/steps.txt" ;;
    esac
  done
done
python3 benchmarks/summary.py "$OUT"
