#!/usr/bin/env bash
# One device call: install the carried wheels (.whl: pytest-mpi; .whl-cpu, where present:
# numba and llvmlite for the compiled CPU kernels), then the steps named
# on the command line (default: all), each under its own time limit:
#   kernel       GPU kernel tests (mma, Hopper, decode, backward) on one rank
#                (KERNEL_TESTS: other test files, KERNEL_K: pytest -k)
#   strategies   GPU strategy and transport tests at 1 and 2 ranks (sharing one GPU)
#   cpu          the CPU suite's fault and agreement tests at 2 ranks on the host cores
#   decode       examples/decode.py with --graph at 1 and 2 ranks, kv_sharded plan host
#                time at 2 ranks (benchmarks/kv_plans.py)
#   bench        a short forward benchmark against torch SDPA
#   forward      the Hopper forward's tests (FORWARD_TESTS: pytest -k), then the forward
#                grid against torch SDPA cuDNN and FLASH (benchmarks/gpu_attention.py
#                --grid; FORWARD_BENCH: other arguments, or none; JSON under $OUT)
#   sweep        the Hopper forward's tile configurations per head dim (SWEEP_DIMS)
#   backward     the backward tests (both kernel paths), then a short backward benchmark
#   graphs       CUDA graph capture and plan tests at 1 and 2 ranks, the capture tests
#                with the kept graph memory switched off (what they catch), decode
#                latency per call and host time per call
#   graph-tests  only the capture and plan tests of graphs, at 1 and 2 ranks
#   counters     Nsight Compute counters of the Hopper backward kernel and cuDNN's
#                (bf16, d=128, 16k, causal and not; report under $OUT)
#   host         where a tiny call's host time goes: each step of a planned decode call
#                alone, then cProfile per public function (benchmarks/host_profile.py)
#   decode-splits  decode kernel time against its split count (DECODE_KEYS, DECODE_SPLITS)
#                beside torch SDPA (benchmarks/gpu_decode.py --splits)
#   decode-bench the decode grid against torch SDPA (benchmarks/gpu_decode.py; JSON under $OUT)
#   cpu-node     the host CPU: ring attention at every ranks x threads split of its 16
#                cores against torch's CPU SDPA, one rank's thread scaling
#                (benchmarks/cpu_node.py; JSON under $OUT)
# Logs under $OUT; a short summary last. Run from the repository root on a GPU machine.
set -u
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl \
  >/dev/null 2>&1
if [ -d .whl-cpu ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl-cpu/*.whl \
    >/dev/null 2>&1
fi
export PYTHONPATH=/tmp/site:$PWD NCCL_NVLS_ENABLE=0 PYTHONUNBUFFERED=1
export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/gpu.txt"
steps=${*:-kernel strategies cpu bench}
summary=()
step() {  # step NAME SECONDS COMMAND...
  local name=$1 limit=$2; shift 2
  local start=$SECONDS
  timeout "$limit" "$@" >"$OUT/$name.log" 2>&1
  local rc=$?
  summary+=("$(printf '%-22s rc=%-3s %4ss  %s' "$name" "$rc" "$((SECONDS - start))" \
    "$(grep -aE '(passed|failed|error)' "$OUT/$name.log" | tail -1 | cut -c1-90)")")
}
mpi=(mpiexec --allow-run-as-root --oversubscribe -n)  # then N python3 -m mpi4py ARGS
for s in $steps; do
  case $s in
    kernel)
      step kernel ${KERNEL_TEST_LIMIT:-420} python3 -m pytest -q -p no:cacheprovider -x -m gpu \
        ${KERNEL_K:+-k "$KERNEL_K"} ${KERNEL_TESTS:-tests/test_gpu_kernel.py tests/test_gpu_kernel_sm90.py \
        tests/test_gpu_decode.py tests/test_gpu_backward.py} ;;
    strategies)
      for n in 1 2; do
        step strategies-$n 300 "${mpi[@]}" "$n" python3 -m mpi4py -m pytest --with-mpi -q -p no:cacheprovider -m gpu \
          tests/test_gpu_strategies.py tests/test_gpu_transport.py tests/test_interop.py
      done ;;
    cpu)
      step cpu-faults 300 "${mpi[@]}" 2 python3 -m mpi4py -m pytest --with-mpi -q -p no:cacheprovider \
        tests/test_failures.py tests/test_agreement.py tests/test_memory.py ;;
    backward)
      step backward-tests ${BACKWARD_TEST_LIMIT:-300} python3 -m pytest -q -p no:cacheprovider -x -m gpu \
        tests/test_gpu_backward.py ${BACKWARD_TESTS:+-k "$BACKWARD_TESTS"}
      bench_args=${BACKWARD_BENCH:---dtypes bf16 --dims 64,128 --ns 16384}
      step backward-bench ${BACKWARD_BENCH_LIMIT:-420} python3 benchmarks/gpu_backward.py $bench_args
      tail -8 "$OUT/backward-bench.log" ;;
    graphs|graph-tests)
      step graphs-1 300 python3 -m pytest --with-mpi -q -p no:cacheprovider -m gpu tests/test_gpu_graphs.py \
        tests/test_gpu_plans.py
      step graphs-2 200 "${mpi[@]}" 2 python3 -m mpi4py -m pytest --with-mpi -q -p no:cacheprovider \
        -m gpu tests/test_gpu_graphs.py -k "sharing or raises"
      [ "$s" = graph-tests ] && continue
      step graphs-unkept 300 python3 -c 'import contextlib, sys, pytest, seqpar._interop as i
i.graph_memory = lambda first: contextlib.nullcontext()  # as before seqpar.graphs
sys.exit(pytest.main(["--with-mpi", "-q", "-p", "no:cacheprovider", "-m", "gpu", "tests/test_gpu_graphs.py"]))'
      step graphs-bench 240 python3 benchmarks/gpu_graphs.py
      tail -14 "$OUT/graphs-bench.log" ;;
    decode)
      step decode-graph-1 120 python3 examples/decode.py --gpu --dtype bfloat16 --graph \
        --capacity 262144 --heads 32 --kv-heads 8 --head-dim 128
      step decode-graph-2 150 "${mpi[@]}" 2 python3 -m mpi4py examples/decode.py --gpu \
        --dtype bfloat16 --graph --capacity 262144 --heads 32 --kv-heads 8 --head-dim 128
      step kv-plans-2 150 "${mpi[@]}" 2 python3 -m mpi4py benchmarks/kv_plans.py --gpu
      tail -4 "$OUT/decode-graph-1.log" "$OUT/decode-graph-2.log"; tail -8 "$OUT/kv-plans-2.log" ;;
    counters)
      step counters 300 ncu --clock-control none --kernel-name-base demangled \
        --kernel-name "regex:bwd_sm90<|bprop|dgrad" --launch-count 6 \
        --section SpeedOfLight --section ComputeWorkloadAnalysis --section WarpStateStats \
        --section SchedulerStats --section MemoryWorkloadAnalysis --section Occupancy \
        --section LaunchStats -o "$OUT/backward_counters" -f \
        python3 benchmarks/gpu_backward.py --once --dtypes bf16 --dims 128 --ns 16384
      ncu --import "$OUT/backward_counters.ncu-rep" --page details >"$OUT/counters.txt" 2>&1
      grep -aE "^  [a-z_]|bwd_sm90|Compute \(SM\) Throughput|Tensor|Issue Slots Busy|Stall|Warp Cycles Per Issued|Duration|Registers Per|Achieved Occupancy" \
        "$OUT/counters.txt" | cut -c1-110 | head -60 ;;
    host)
      step host 180 python3 benchmarks/host_profile.py --pieces --calls 2000 --top 12
      sed -n '/=== the steps/,/^$/p' "$OUT/host.log"; grep -a "^=== " "$OUT/host.log" ;;
    decode-splits)
      step decode-splits 240 python3 benchmarks/gpu_decode.py --keys "${DECODE_KEYS:-4096,65536,262144,1048576}" \
        --splits "${DECODE_SPLITS:-16,33,66,132,264,528}" --json "$OUT/gpu_decode_splits.json"
      sed -n '/^| batch/,$p' "$OUT/decode-splits.log" ;;
    decode-bench)
      step decode-bench 240 python3 benchmarks/gpu_decode.py --json "$OUT/gpu_decode.json"
      sed -n '/^| batch/,$p' "$OUT/decode-bench.log" ;;
    cpu-node)
      step cpu-node 300 python3 benchmarks/cpu_node.py --json "$OUT/cpu_node.json"
      sed -n "/^## seqpar on one CPU node/,\$p" "$OUT/cpu-node.log" ;;
    forward)
      step forward-tests ${FORWARD_TEST_LIMIT:-300} python3 -m pytest -q -p no:cacheprovider -x -m gpu \
        tests/test_gpu_kernel_sm90.py ${FORWARD_TESTS:+-k "$FORWARD_TESTS"}
      [ "${FORWARD_BENCH:-}" = none ] && continue
      step forward-grid ${FORWARD_BENCH_LIMIT:-480} python3 benchmarks/gpu_attention.py \
        ${FORWARD_BENCH:---grid} --json "$OUT/gpu_attention_grid.json"
      sed -n '/^| dtype/,$p' "$OUT/forward-grid.log" | tail -100 ;;
    sweep)
      step sweep ${SWEEP_LIMIT:-240} python3 benchmarks/gpu_attention_sm90.py --sweep --no-mma --dims "" \
        --sweep-dims "${SWEEP_DIMS:-96,192,256}" --out "$OUT"
      grep -a "sweep d=" "$OUT/sweep.log" ;;
    bench)
      step forward-bench 240 python3 benchmarks/gpu_attention.py --dtypes bf16 --dims 64,128 \
        --ns 16384 --causal 0,1
      tail -12 "$OUT/forward-bench.log" ;;
  esac
done
printf '%s\n' "${summary[@]}"
