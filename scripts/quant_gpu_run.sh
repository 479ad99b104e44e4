#!/usr/bin/env bash
# One device call for the quantizer work, each step bounded: environment, the GPU tests of
# tests/test_quant.py (but the slow 16k-row ones), `moecomm bench quant`, the kernel sweep (settings,
# correctness, before / after), Nsight Compute counters after / before. Results under $OUT (8 files).
#   bash scripts/quant_gpu_run.sh BASELINE_KERNEL_MODULE
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-out}; mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD/src${PYTHONPATH:+:$PYTHONPATH}
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
base=$1
NCU=$(command -v ncu || ls /opt/nvidia/nsight-compute/*/ncu 2>/dev/null | head -1)
{ date -u; nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.max.sm,clocks.mem --format=csv
  python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__, 'gpus', torch.cuda.device_count())"
  echo "ncu: $NCU"; } > "$OUT/env.txt" 2>&1; cat "$OUT/env.txt"
timeout 95 python3 -m pytest -m gpu -q -rs -p no:cacheprovider tests/test_quant.py -k "not 16k" > "$OUT/tests.log" 2>&1
echo "tests exit $?"; tail -n 12 "$OUT/tests.log"
timeout 70 python3 -m moecomm.cli bench quant --tokens 1,16,128,4096,16384 --iters 30 --json "$OUT/bench.json" > "$OUT/bench.log" 2>&1
echo "bench exit $?"
timeout 100 python3 scripts/quant_sweep.py --json "$OUT/sweep.json" --baseline "$base" --tokens 128,4096,16384 > "$OUT/sweep.log" 2>&1
echo "sweep exit $?"
regex='regex:^_(nvfp4|mxfp4|fp8_group|fp8_token|dequant_nvfp4|dequant_fp8)_kernel'
secs="--section SpeedOfLight --section ComputeWorkloadAnalysis --section InstructionStats --section Occupancy --section LaunchStats --section SchedulerStats"
mets="--metrics sm__inst_executed_pipe_alu.avg.pct_of_peak_sustained_active,sm__inst_executed_pipe_fma.avg.pct_of_peak_sustained_active,sm__inst_executed_pipe_fmaheavy.avg.pct_of_peak_sustained_active,smsp__inst_executed.sum,dram__bytes.sum"
for which in after before; do
  b=""; [[ $which == before ]] && b="--baseline $base --items nvfp4,nvfp4-swizzled,mxfp4,fp8-token,fp8-group,fp8-group-ue8m0"
  timeout 35 "$NCU" --clock-control none --kernel-name "$regex" $secs $mets --csv --page details \
    python3 scripts/quant_sweep.py --ncu $b > "$OUT/ncu_$which.csv" 2>> "$OUT/sweep.log" \
  || timeout 30 "$NCU" --clock-control none --kernel-name "$regex" $secs --csv --page details \
    python3 scripts/quant_sweep.py --ncu $b > "$OUT/ncu_$which.csv" 2>> "$OUT/sweep.log"
  echo "ncu $which exit $? ($(wc -l < "$OUT/ncu_$which.csv") lines)"
done
tail -n 30 "$OUT/bench.log"; tail -n 22 "$OUT/sweep.log"
