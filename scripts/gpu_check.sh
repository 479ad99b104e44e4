#!/usr/bin/env bash
# The one GPU script: GPU tests and benchmarks, in one device call.
#   bash scripts/gpu_check.sh [STEP ...]     STEP: tests ranks quant experts coll moe combine overlap counted demo
#   all (default: all)
# Results (logs, JUnit XML, JSON, PNG, tables) are packed into $OUT/results.tar.gz after every step (else ./out).
# Runs from a plain checkout (PYTHONPATH=src, no install), as on the device machine.
#
# tests: every GPU test (pytest -m gpu) within TESTS_S seconds (default 420), in three groups at once:
#   tests/test_quant.py spread over SHARDS pytest processes (default 6, --shard in tests/conftest.py; its time
#   is Triton JIT compiles, ~400 kernel specializations on a fresh machine, and CPU oracles), the multi-rank
#   tests (several processes on one GPU, or one per GPU), and the rest. Each log has pytest's --durations=15;
#   gpu_tests.json (scripts/junit_report.py) has every test's outcome and seconds; the 15 slowest are printed.
# ranks: only the tests that run several ranks on one GPU (marked gpu and one_gpu_ranks); `tests` runs them too.
set -uo pipefail
cd "$(dirname "$0")/.."
steps=${*:-all}
OUT=${OUT:-out}
R=$(mktemp -d)
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
export PYTHONPATH=$PWD/src${PYTHONPATH:+:$PYTHONPATH}
mc="python3 -m moecomm.cli"
n=$(python3 -c "import torch; print(torch.cuda.device_count())")
want() { [[ " $steps " == *" $1 "* || " $steps " == *" all "* ]]; }
step() {  # step NAME TIMEOUT_S CMD...: run, keep the log, print its tail
  local name=$1 t=$2; shift 2
  echo "=== $name ($(date -u +%H:%M:%S)): $*"
  timeout "$t" "$@" > "$R/$name.log" 2>&1
  echo "--- exit $? ---"; tail -n "${TAILN:-25}" "$R/$name.log"
  tar -C "$R" -czf "$OUT/results.tar.gz" .
}
{ nvidia-smi --query-gpu=name,memory.total,clocks.sm,clocks.mem --format=csv
  python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__, 'gpus', torch.cuda.device_count())"
} > "$R/env.txt" 2>&1; cat "$R/env.txt"
pytest="python3 -m pytest -q -rfEs -p no:cacheprovider --durations=15"
gpu_tests() {  # three groups at once, each within TESTS_S: test_quant.py in SHARDS processes (JIT compiles and
  # CPU oracles), the tests that run several ranks (several processes on one GPU, or one per GPU), the rest
  local t=${TESTS_S:-420} shards=${SHARDS:-6} pids=() names=() i
  local threads=$(( $(nproc) / (shards + 2) > 0 ? $(nproc) / (shards + 2) : 1 ))
  local ranks="tests/test_counted_gpu.py tests/test_groups.py"
  echo "=== gpu_tests ($(date -u +%H:%M:%S)): test_quant.py in $shards shards, $ranks, the rest; ${t} s each"
  for ((i = 0; i < shards; i++)); do
    OMP_NUM_THREADS=$threads timeout "$t" $pytest -m gpu --shard "$i/$shards" \
      --junitxml "$R/gpu_tests_quant$i.xml" tests/test_quant.py > "$R/gpu_tests_quant$i.log" 2>&1 &
    pids+=($!); names+=("quant$i")
  done
  OMP_NUM_THREADS=$threads timeout "$t" $pytest -v -m gpu --junitxml "$R/gpu_tests_ranks.xml" $ranks \
    > "$R/gpu_tests_ranks.log" 2>&1 &
  pids+=($!); names+=(ranks)
  OMP_NUM_THREADS=$threads timeout "$t" $pytest -v -m gpu --ignore tests/test_quant.py \
    $(for f in $ranks; do echo --ignore "$f"; done) --junitxml "$R/gpu_tests_rest.xml" tests \
    > "$R/gpu_tests_rest.log" 2>&1 &
  pids+=($!); names+=(rest)
  for i in "${!pids[@]}"; do
    wait "${pids[$i]}"
    echo "--- ${names[$i]}: exit $? at +${SECONDS} s: $(tail -n 1 "$R/gpu_tests_${names[$i]}.log")"
    [[ -s "$R/gpu_tests_${names[$i]}.xml" ]] || echo "!!! no JUnit XML from ${names[$i]}: killed at the bound or crashed"
  done
  grep -h -E "(FAILED|ERROR)" "$R"/gpu_tests_*.log | grep -v "^=" | head -40
  python3 scripts/junit_report.py "$R/gpu_tests.json" "$R"/gpu_tests_*.xml --slowest 15
  tar -C "$R" -czf "$OUT/results.tar.gz" .
}
want tests && gpu_tests
[[ " $steps " == *" ranks "* ]] &&  # not part of all: the tests step runs these too
  step gpu_ranks 240 $pytest -m "gpu and one_gpu_ranks" --junitxml "$R/gpu_ranks.xml" tests
want quant && step bench_quant 90 $mc bench quant --json "$R/quant.json"
want experts && step bench_experts 90 $mc bench experts --json "$R/experts.json"
if want coll; then
  step bench_collectives_ws1 90 $mc bench collectives --world-size 1 --rows 1,1024,16384 --json "$R/collectives_ws1.json"
  [[ $n -gt 1 ]] && step bench_collectives_ws$n 240 $mc bench collectives --world-size "$n" \
    --json "$R/collectives_ws$n.json" --write-table "$R/collectives_table.json"
fi
if want moe; then
  for ws in $(python3 -c "print(*sorted({1, $n}))"); do
    step bench_moe_ws$ws 240 $mc bench moe --world-size "$ws" --graphs --json "$R/moe_ws$ws.json" \
      --plot "$R/moe_ws$ws.png" --write-crossover "$R/crossover.json"
  done
fi
if want combine; then  # the quantized combine: its kernels vs copy, then the collective and the step beside bf16
  step bench_combine_kernels 120 $mc bench quant --ops quantize,dequantize-sum --formats int8-group,fp8-group \
    --pieces 2,4,8 --json "$R/combine_kernels.json"
  if [[ $n -gt 1 ]]; then
    step bench_combine_collectives_ws$n 240 $mc bench collectives --world-size "$n" --rows 1,128,4096,8192 \
      --wire-formats bf16,int8,fp8 --json "$R/combine_collectives_ws$n.json"
    step bench_combine_moe_ws$n 300 $mc bench moe --world-size "$n" --experts bf16 --prefill 4096,8192 \
      --decode 1,64 --chunks 2 --combine-formats bf16,int8,fp8 --json "$R/combine_moe_ws$n.json"
  fi
fi
if want overlap; then  # shared experts during the dispatch; two micro-batches with the async halves
  for ws in $(python3 -c "print(*sorted({1, $n}))"); do
    step bench_moe_shared_ws$ws 300 $mc bench moe --world-size "$ws" --shared-experts 1 \
      --json "$R/moe_shared_ws$ws.json"
    step two_microbatches_ws$ws 120 python3 examples/two_microbatches.py "$ws"
  done
fi
if want counted; then  # device token counts: one graph per rank (world size 1, 4 ranks on one GPU, all GPUs)
  step bench_counted_ws1 300 $mc bench counted --world-size 1 --json "$R/counted_ws1.json"
  step bench_counted_one_gpu 600 $mc bench counted --one-gpu --world-size 4 --small --tokens 1,16,64 --json "$R/counted_one_gpu.json"
  [[ $n -gt 1 ]] && step bench_counted_ws$n 600 $mc bench counted --world-size "$n" --transport auto,padded \
    --json "$R/counted_ws$n.json"
fi
if want demo && [[ -d .carry/site ]]; then  # the demo's model, packed by scripts/pack_minilm_for_device.py
  python3 scripts/pack_minilm_for_device.py --unpack
  PYTHONPATH=$PYTHONPATH:$PWD/.carry/site step demo 90 $mc demo --world-size 1 --json "$R/demo.json"
fi
