#!/usr/bin/env bash
# One device call for the quantizer work (issue 13): environment, kernel sweep with correctness checks,
# Nsight Compute counters before / after, then the GPU tests of tests/test_quant.py, each step bounded.
#   bash scripts/quant_gpu_run.sh BASELINE_MODULE [SECONDS_FOR_TESTS]      (results under $OUT)
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-out}; mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD/src${PYTHONPATH:+:$PYTHONPATH}
base=$1; test_s=${2:-120}
NCU=$(command -v ncu || ls /opt/nvidia/nsight-compute/*/ncu 2>/dev/null | head -1)
{ nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.max.sm,clocks.mem --format=csv
  python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__, 'gpus', torch.cuda.device_count())"
  echo "ncu: $NCU"; } > "$OUT/env.txt" 2>&1; cat "$OUT/env.txt"
timeout 160 python3 scripts/quant_sweep.py --json "$OUT/sweep.json" --baseline "$base" > "$OUT/sweep.log" 2>&1
echo "sweep exit $?"
regex='regex:^_(nvfp4|mxfp4|fp8_group|fp8_token|dequant_nvfp4|dequant_fp8)_kernel'
secs="--section SpeedOfLight --section ComputeWorkloadAnalysis --section InstructionStats --section Occupancy --section LaunchStats --section SchedulerStats"
mets="--metrics sm__inst_executed_pipe_alu.avg.pct_of_peak_sustained_active,sm__inst_executed_pipe_fma.avg.pct_of_peak_sustained_active,sm__inst_executed_pipe_fmaheavy.avg.pct_of_peak_sustained_active,smsp__inst_executed.sum,dram__bytes.sum"
for which in after before; do
  b=""; items=""
  [[ $which == before ]] && b="--baseline $base" && items="--items nvfp4,nvfp4-swizzled,mxfp4,fp8-token,fp8-group,fp8-group-ue8m0"
  timeout 50 "$NCU" --clock-control none --kernel-name "$regex" $secs $mets --csv --page details \
    python3 scripts/quant_sweep.py --ncu $b $items > "$OUT/ncu_$which.csv" 2> "$OUT/ncu_$which.err" \
  || timeout 30 "$NCU" --clock-control none --kernel-name "$regex" $secs --csv --page details \
    python3 scripts/quant_sweep.py --ncu $b $items > "$OUT/ncu_$which.csv" 2>> "$OUT/ncu_$which.err"
  echo "ncu $which exit $? ($(wc -l < "$OUT/ncu_$which.csv") lines)"
done
timeout "$test_s" python3 -m pytest -m gpu -q -rs -p no:cacheprovider tests/test_quant.py > "$OUT/tests.log" 2>&1
echo "tests exit $?"; tail -n 25 "$OUT/tests.log"; tail -n 45 "$OUT/sweep.log"
