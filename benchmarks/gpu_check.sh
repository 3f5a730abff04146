#!/usr/bin/env bash
# Every check that needs a CUDA GPU, in one run, each step bounded in time so one hang
# cannot eat the rest. Logs and small result files go to $OUT (default /tmp/gpu_check).
#
#   bash benchmarks/gpu_check.sh [DATA_DIR]        # DATA_DIR: the JPEG CIFAR-10 folders
#
# On the lent device machine (see ../shared/device/README.md): put the wheels and the data
# zip in .dev/ (git-ignored), carry .dev, and run this script; benchmarks/gpu_env.sh installs
# the wheels into /tmp/site and unpacks the zip to DATA_DIR when they are there.
#
# 1. the data cache (the JPEGs decoded once), timed apart;
# 2. the 20-epoch GPU recipe (configs/fast85_gpu.yaml) on the test split, timed end to end;
# 3. benchmarks/throughput.py at the recipe's batch (512): naive, default (eager), compiled
#    + captured; then the captured step alone at 512 and at fast85's 128;
# 4. the GPU tests (tests/test_gpu.py: captured step vs eager, no host sync in the
#    steady state, torchrun --nproc_per_node 1 on nccl).
# Issue 16's runs are benchmarks/gpu_recipes.sh, a script of their own: its first step
# times the networks with the GPU to itself, so it does not share a run with this one.
# Each step's time limit is set so that the whole script stays under 9.5 minutes (the
# device tool allows 10 per command); the CPU test suite is CI's job, not this script's.
set -uo pipefail
export OUT=${OUT:-/tmp/gpu_check}
mkdir -p "$OUT"
DATA=${1:-/tmp/cifar10-jpeg}
source benchmarks/gpu_env.sh

step() {  # step NAME TIMEOUT_S COMMAND...: run, log to $OUT/NAME.log, record status and seconds
  local name=$1 limit=$2; shift 2
  local started=$(date +%s.%N)
  timeout "$limit" "$@" > "$OUT/$name.log" 2>&1
  local status=$?
  local seconds=$(python3 -c "import time; print(round(time.time() - $started, 1))")
  echo "$name: exit $status, ${seconds}s wall" | tee -a "$OUT/summary.txt"
  tail -n 4 "$OUT/$name.log"
}

step data_cache 90 python3 -c "
from cifar_ddp.config import load_config; from cifar_ddp.data.sources import load_dataset
load_dataset(load_config('configs/fast85_gpu.yaml', ['data.root=$DATA']).data)"
step fast85_gpu 100 python3 launch/train.py --config configs/fast85_gpu.yaml data.root="$DATA" \
  out_dir=/tmp/runs/fast85_gpu train.progress_bar=false
step throughput_512 150 python3 benchmarks/throughput.py --batch-size 512 --steps 200 --images 16384
step throughput_512_graph 45 python3 benchmarks/throughput.py --batch-size 512 --steps 200 --images 16384 \
  --skip naive --skip compiled --set train.cuda_graph=true
step throughput_128_graph 45 python3 benchmarks/throughput.py --batch-size 128 --steps 400 --images 16384 \
  --skip naive --skip compiled --set train.cuda_graph=true
step gpu_tests 150 python3 -m pytest -q -p no:cacheprovider tests/test_gpu.py
cat "$OUT/summary.txt"
# The device tool returns only a handful of files: every log goes back in one archive.
cp /tmp/runs/fast85_gpu/training_log.md "$OUT/fast85_gpu.training_log.md.log" 2>/dev/null
(cd "$OUT" && shopt -s nullglob && python3 -m tarfile -c logs.tgz ./*.log && rm -f ./*.log)
