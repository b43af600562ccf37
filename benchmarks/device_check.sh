#!/usr/bin/env bash
# Every GPU check in one call to a lent GPU machine, in under 10 minutes (its per-call limit):
#   here:  make device-wheels        (.whl/: what its python3 lacks, ~21 MB)
#   there: bash benchmarks/device_check.sh   with carry [".whl"], timeout_s 590
# 1. benchmarks/gpu_baselines.py: ours vs Accelerate vs DeepSpeed ZeRO-Inference, OPT-6.7B
#    fp16 under a 4 GiB gpu budget (issue 10's GPU target, and system=deepspeed's first run);
# 2. benchmarks/cuda_check.py: parity on CUDA, overlap trace, capped OPT-6.7B, blocked attention.
# Each part has its own time limit, so one that hangs leaves the other its turn; logs go to
# $OUT (the device tool's folder that comes back) or ./device_logs.
set -u
out=${OUT:-device_logs}
mkdir -p "$out"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$out/gpu.txt"
timeout "${GPU_BASELINES_S:-330}" python3 -m benchmarks.gpu_baselines "$@" 2>&1 \
    | tee "$out/gpu_baselines.log"
timeout "${CUDA_CHECK_S:-220}" python3 -m benchmarks.cuda_check 2>&1 | tee "$out/cuda_check.log"
