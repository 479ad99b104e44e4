#!/usr/bin/env bash
# The one GPU script: GPU tests and benchmarks, in one device call.
#   bash scripts/gpu_check.sh [STEP ...]     STEP: tests quant experts coll moe counted demo all (default: all)
# Results (logs, JSON, PNG, tables) are packed into $OUT/results.tar.gz after every step (else ./out).
# Runs from a plain checkout (PYTHONPATH=src, no install), as on the device machine.
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
want tests && step gpu_tests 300 python3 -m pytest -m gpu -q -rs -x -p no:cacheprovider tests
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
