#!/usr/bin/env bash
# One GPU lease, one script: build lipkern with its CUDA kernels, run every GPU test, check the
# CUDA and Triton kernels under compute-sanitizer, then the benchmarks. Each stage runs even
# if an earlier one failed (a summary line per stage comes last). Logs and JSON rows go to
# $OUT (the device tool's folder) or bench/results/gpu-<date>/.
#
#   bash bench/gpu_session.sh [stage ...]     stages: env build test sanitize bench sn
#                                             (default: all, in that order)
#   bash bench/gpu_session.sh env build i17   issue 17: certified_sigma on CUDA, both backends
#   bash bench/gpu_session.sh env build i14   issue 14's done criteria in one call (< 8 min
#                                             on an H100/H200 with the build): grouped and
#                                             graph tests, toy/mlp tables with lipkern_grouped
#                                             and device time, --graph, the captured MLP step
# On a machine without registry access (the lent GPU machines), torch/triton/pytest must be
# there already: the install uses --no-build-isolation --no-deps.
set -u
cd "$(dirname "$0")/.."
OUT=${OUT:-bench/results/gpu-$(date +%Y%m%d)}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
PY=${PYTHON:-python3}
DRY=0
if [ "${1:-}" = "--dry-run" ]; then  # the plumbing on a CPU: v2 stages under the interpreter
  DRY=1
  shift
  export TRITON_INTERPRET=1
fi
STAGES=${*:-env build test sanitize bench sn v2}
[ $DRY = 1 ] && STAGES=${*:-v2}
SUMMARY=()

stage() {  # stage NAME TIMEOUT_S CMD...: run, log to $OUT/NAME.log, record the outcome
  local name=$1 limit=$2
  shift 2
  local t0=$SECONDS
  echo "=== $name (limit ${limit}s)"
  timeout "$limit" "$@" > "$OUT/$name.log" 2>&1
  local rc=$?
  tail -n 25 "$OUT/$name.log"
  SUMMARY+=("$name: rc=$rc in $((SECONDS - t0))s")
}

for s in $STAGES; do
  case $s in
    env)
      stage env 60 bash -c "nvidia-smi; $PY -c 'import torch, triton, platform; \
print(\"torch\", torch.__version__, \"cuda\", torch.version.cuda, \"triton\", triton.__version__, \
\"python\", platform.python_version(), torch.cuda.get_device_name())'; nvcc --version | tail -n 2" ;;
    build)
      stage build 420 env LIPKERN_BUILD_EXT=1 LIPKERN_BUILD_CUDA=1 LIPKERN_CUDA_ARCHS=9.0 \
        MAX_JOBS=16 $PY -m pip install --no-build-isolation --no-deps -v -e . ;;
    test)
      # separate processes: a CUDA fault in one backend cannot poison the others' context
      stage test_triton 420 $PY -m pytest -q -p no:cacheprovider tests/test_power_iter.py \
        tests/test_op.py tests/test_normalize.py -k "triton and cuda or normalize and cuda"
      stage test_cuda_ext 300 $PY -m pytest -q -p no:cacheprovider tests/test_power_iter.py \
        tests/test_op.py -k "cuda and not triton"
      stage test_gpu_marked 420 $PY -m pytest -q -p no:cacheprovider -m gpu tests ;;
    sanitize)
      stage sanitize 300 compute-sanitizer --tool memcheck --target-processes all \
        --error-exitcode 9 $PY bench/gpu_smoke.py ;;
    bench)
      for w in toy mlp resnet18; do
        stage "bench_$w" 300 $PY bench/bench_power_iter.py --workload "$w" --mode both \
          --reps 20 --warmup 3 --out "$OUT/power_iter.jsonl"
      done ;;
    sn)
      stage bench_sn 300 $PY bench/bench_spectral_norm.py --no-deel --reps 30 --warmup 5 \
        --out "$OUT/spectral_norm.jsonl" ;;
    i14)
      # issue 14: grouped on CUDA vs the reference, host syncs, graph capture/replay, compile
      stage i14_test 240 $PY -m pytest -q -p no:cacheprovider tests/test_graphs.py \
        tests/test_grouped.py tests/test_power_iter.py tests/test_normalize.py \
        -k "graphs or (grouped and cuda)"
      # done criteria: lipkern_grouped fwd+bwd >= 2x the user's grouped conv on the toy net;
      # a kernel faster than grouped; device time beside wall time; the same under --graph
      stage i14_bench_toy 120 $PY bench/bench_power_iter.py --workload toy --reps 20 \
        --warmup 3 --providers naive,grouped,grouped_compile,lipkern_grouped,lipkern_triton,lipkern_cuda \
        --out "$OUT/power_iter.jsonl"
      stage i14_bench_toy_graph 90 $PY bench/bench_power_iter.py --workload toy --reps 20 \
        --warmup 3 --graph --providers naive,grouped,lipkern_grouped,lipkern_triton \
        --out "$OUT/power_iter.jsonl"
      stage i14_bench_mlp 90 $PY bench/bench_power_iter.py --workload mlp --reps 20 \
        --warmup 3 --providers naive,grouped,lipkern_grouped,lipkern_triton,lipkern_cuda \
        --out "$OUT/power_iter.jsonl"
      # the captured spectral_norm_model MLP step: overhead <= 1/10 of torch's in the same run
      stage i14_sn_graph 120 $PY bench/bench_spectral_norm.py --workload mlp --no-deel \
        --reps 30 --warmup 5 --graph --out "$OUT/spectral_norm.jsonl"
      stage i14_host 60 $PY bench/bench_host_time.py --device cuda --reps 100 ;;
    i17)
      # issue 17: certified_sigma on CUDA (backends torch and triton) against the exact
      # circular norms, and its time against 50 power iterations (bench/gpu_certified_check.py)
      stage i17_check 240 $PY bench/gpu_certified_check.py --out "$OUT" ;;
    v2)
      # issue 13: Triton v2 (opt-in). AOT compile with register/spill/PTX checks, the step-mode
      # tests, then the device checks and kernel times (bench/gpu_v2_check.py: persistent
      # barrier path with several programs per layer, every precision vs fp64, hang guard,
      # launch counts, toy/resnet18/sngan v1 vs v2 vs grouped), compute-sanitizer on a small
      # case; the fwd+bwd tables with v2 switched on. A hang is cut by `timeout`.
      if [ $DRY = 1 ]; then
        stage v2_check_dry 600 $PY bench/gpu_v2_check.py --dry-run --out "$OUT"
      else
        stage v2_aot 240 env -u TRITON_INTERPRET $PY -m lipkern.triton_kernels.v2_aot --cap 90
        stage v2_tests 300 $PY -m pytest -q -p no:cacheprovider tests/test_triton_v2_gpu.py \
          tests/test_triton_v2_static.py -k "not compiles and not ptx and not 16_byte"
        stage v2_check 300 $PY bench/gpu_v2_check.py --out "$OUT" --reps 20 --warmup 3
        stage v2_sanitize 180 compute-sanitizer --tool memcheck --error-exitcode 9 \
          $PY bench/gpu_v2_check.py --out "$OUT/sanitize" --reps 1 --warmup 0 --workloads toy
        for w in toy resnet18; do
          stage "v2_bench_$w" 180 env LIPKERN_TRITON_V2=1 $PY bench/bench_power_iter.py \
            --workload "$w" --mode both --reps 20 --warmup 3 --out "$OUT/power_iter_v2.jsonl"
        done
      fi ;;
    *) echo "unknown stage $s" ;;
  esac
done
printf '%s\n' "${SUMMARY[@]}" | tee "$OUT/summary.txt"
