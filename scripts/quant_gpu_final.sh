#!/usr/bin/env bash
# The closing device call: GPU tests of tests/test_quant.py (the 2-GPU test where 2 GPUs are present;
# the slow 16k-row and fp16/fp32 production-shape tests left out), `moecomm bench quant`, Nsight Compute.
#   bash scripts/quant_gpu_final.sh        (results under $OUT)
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-out}; mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD/src${PYTHONPATH:+:$PYTHONPATH}
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
{ date -u; nvidia-smi --query-gpu=name,driver_version --format=csv
  python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__, 'gpus', torch.cuda.device_count())"; } > "$OUT/env.txt" 2>&1
timeout 85 python3 -m pytest -m gpu -q -rs -p no:cacheprovider tests/test_quant.py -k "not 16k and (not large or bfloat16)" > "$OUT/tests.log" 2>&1
echo "tests exit $?"; tail -n 15 "$OUT/tests.log"
timeout 60 python3 -m moecomm.cli bench quant --tokens 1,16,128,4096,16384 --iters 30 --json "$OUT/bench.json" > "$OUT/bench.log" 2>&1
echo "bench exit $?"
NCU=$(command -v ncu || ls /opt/nvidia/nsight-compute/*/ncu 2>/dev/null | head -1)
timeout 30 "$NCU" --clock-control none --kernel-name 'regex:^_(nvfp4|mxfp4|fp8_group|fp8_token|dequant_nvfp4|dequant_fp8)_kernel' \
  --section SpeedOfLight --section ComputeWorkloadAnalysis --section InstructionStats --section Occupancy --section LaunchStats --section SchedulerStats \
  --metrics sm__inst_executed_pipe_alu.avg.pct_of_peak_sustained_active,sm__inst_executed_pipe_fma.avg.pct_of_peak_sustained_active,sm__inst_executed_pipe_fmaheavy.avg.pct_of_peak_sustained_active,smsp__inst_executed.sum,dram__bytes.sum \
  --csv --page details python3 scripts/quant_sweep.py --ncu > "$OUT/ncu_after.csv" 2> "$OUT/ncu.err"
echo "ncu exit $?"; tail -n 30 "$OUT/bench.log"
