#!/usr/bin/env bash
# What issue 16 (or, with SET=mixgate, issue 30's MixGateNet) still needs from a GPU, in one
# run bounded by DEADLINE (a `date +%s` value; default: 9 minutes from now), finished or not.
# Logs go to $OUT/recipes/ and come back packed in $OUT/recipes.tgz (the device returns only
# a handful of files).
#
#   bash benchmarks/gpu_recipes.sh [DATA_DIR] [SET]   # on the lent machine: carry .dev (gpu_env.sh)
#                                                     # SET: issue16 (default) or mixgate
#   SPEED_ARGS="--quick --set train.cuda_graph=false" RECIPE_OVERRIDES="data.source=fake data.fake_size=128 \
#     data.val_size=0 train.epochs=1 augment.plain_last_epochs=0 train.batch_size=64 train.tta_flip=false" \
#     bash benchmarks/gpu_recipes.sh               # a dry run of the script (CPU is fine)
#
# 1. SepResNet's pace alone on the GPU against the seed net's (benchmarks/model_speed.py,
#    eager and with the CUDA-graph step), before anything else shares the GPU.
# 2. At once, side by side (each run is small next to the chip):
#    - configs/sep_resnet100.yaml, seeds 0 and 1, on the test split, to the end (>= 90%?),
#      with the captured step if step 1 captured SepResNet without error;
#    - 10-epoch candidates on the validation carve (5,000 training images held out),
#      seeds 0 and 1 each: sep_resnet10 as it is, batch 256, and batch 128 (on the CPU
#      batch 128 scored 82.6%, two seeds, against 81.8% at 512, one seed) alone and with
#      a higher peak LR (square-root instead of linear scaling from 512), lighter
#      augmentation with more plain epochs, or residual units started as the identity;
#      with the captured step too where it worked.
# 3. When the candidates are done: the best mean validation accuracy over the two seeds,
#    10 epochs on the test split, seeds 0 and 1 (>= 85% in 10 epochs?).
# SET=mixgate (issue 30 item 4; not yet run on a GPU): MixGateNet's pace against SepResNet's
# and the seed net's, then its two recipes beside SepResNet's on the same shared GPU:
# 1. benchmarks/model_speed.py, eager at batch 512 and captured at 512 and 128, for
#    fast85_gpu, sep_resnet10 and mixgate10 (at 512 and at its own 128);
# 2. at once: configs/mixgate10.yaml and configs/sep_resnet10_lightaug.yaml (the same recipe,
#    the other net) on the validation carve, seeds 0 and 1; configs/mixgate100.yaml on the
#    test split, seeds 0 and 1 (against sep_resnet100's 88.3-88.4%), with the captured step
#    where step 1 captured MixGateNet. Accuracy against time: benchmarks/plot_runs.py on the
#    training_log.md files it brings back, at the captured images/s of step 1.
# The issue16 set ran once on an H200 (docs/results.md, "Device run 3"). SepResNet's runs are bound by the
# chip's work, not by launching kernels: together they get about 58,000 images/s whatever
# their number, so all of the above is about 17 M images, 5 minutes of the GPU. There the
# two speed steps took 190 s (the eager one at batch 128 ran out of time) and the deadline
# cut the 100-epoch runs at epoch 61-62; the eager step now times batch 512 only.
set -uo pipefail
export OUT=${OUT:-/tmp/gpu_check}
DATA=${1:-/tmp/cifar10-jpeg}
SET=${2:-issue16}
case "$SET" in issue16|mixgate) ;; *) echo "gpu_recipes.sh: unknown set '$SET'; give issue16 or mixgate" >&2; exit 2;; esac
DEADLINE=${DEADLINE:-$(( $(date +%s) + 540 ))}
LOGS="$OUT/recipes"
mkdir -p "$LOGS"
source benchmarks/gpu_env.sh
# Up to 16 processes share the machine's cores: one thread each keeps them off each other.
export OMP_NUM_THREADS=1

STARTED=$(date +%s)
left() { echo $(( DEADLINE - $(date +%s) )); }
mark() { echo "t+$(( $(date +%s) - STARTED ))s: $*" | tee -a "$LOGS/summary.txt"; }

train() {  # train NAME CONFIG OVERRIDES...: in the background, bounded by DEADLINE
  local name=$1 config=$2; shift 2
  [ "$(left)" -gt 10 ] || { echo "$name: no time left" >> "$LOGS/summary.txt"; return; }
  # shellcheck disable=SC2086  # RECIPE_OVERRIDES is words on purpose
  timeout "$(left)" python3 launch/train.py --config "$config" data.root="$DATA" out_dir="/tmp/runs/$name" \
    train.progress_bar=false "$@" ${RECIPE_OVERRIDES:-} > "$LOGS/$name.log" 2>&1 &
}

accuracy() {  # accuracy NAME: the final accuracy a finished run printed, or 0
  python3 - "$LOGS/$1.log" <<'EOF'
import json, os, sys
lines = [l for l in open(sys.argv[1]) if l.startswith("final: ")] if os.path.exists(sys.argv[1]) else []
print(json.loads(lines[-1][len("final: "):])["test_accuracy"] if lines else 0)
EOF
}

# The JPEGs are decoded once, into the cache every run then reads, while step 1 times
# fake data on the GPU (decoding is CPU work, on other cores).
python3 -c "
from cifar_ddp.config import load_config; from cifar_ddp.data.sources import load_dataset
load_dataset(load_config('configs/sep_resnet10.yaml', ['data.root=$DATA']).data)" > "$LOGS/cache.log" 2>&1 &
cache_pid=$!
mark "set-up done (set $SET)"

# pace GRAPH_LIMIT_S EAGER_RECIPE... -- CAPTURED_ONLY_RECIPE...: benchmarks/model_speed.py
# eager on the first recipes, then (on a GPU) with the CUDA-graph step on all of them;
# sets captured_step to the override every run below takes when capturing worked (about
# 2x the eager pace at batch 512, more at 128: the deadline cut the 100-epoch runs once).
# Eager at batch 128 is launch-bound (11,600 images/s on the H200): those recipes are timed
# captured only. Each measurement is seconds; the limits only stop a hang.
pace() {
  local graph_limit=$1; shift
  local speed=(--repeats 2 --timed-images 25600 --warmup-images 10240 --images 10240)
  while [ "$1" != -- ]; do speed+=(--recipe "$1"); shift; done
  shift
  # shellcheck disable=SC2206  # SPEED_ARGS is words on purpose
  speed+=(${SPEED_ARGS:-})
  timeout 100 python3 benchmarks/model_speed.py "${speed[@]}" > "$LOGS/speed_eager.log" 2>&1
  echo "speed, eager: exit $? | $(tail -n 1 "$LOGS/speed_eager.log")" | tee -a "$LOGS/summary.txt"
  for recipe in "$@"; do speed+=(--recipe "$recipe"); done
  captured_step=""
  if python3 -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
    timeout "$graph_limit" python3 benchmarks/model_speed.py "${speed[@]}" --set train.cuda_graph=true \
      > "$LOGS/speed_graph.log" 2>&1
    local status=$?
    echo "speed, cuda_graph: exit $status | $(tail -n 1 "$LOGS/speed_graph.log")" | tee -a "$LOGS/summary.txt"
    [ "$status" -eq 0 ] && captured_step="train.cuda_graph=true"
  fi
}

pack() {  # every run's per-epoch log beside the console logs, then one archive
  for run in /tmp/runs/*/; do cp "$run/training_log.md" "$LOGS/$(basename "$run").training_log.md" 2>/dev/null; done
  cp "$LOGS/summary.txt" "$OUT/recipes_summary.txt"
  (cd "$OUT" && python3 -m tarfile -c recipes.tgz recipes)
}

if [ "$SET" = mixgate ]; then
  pace 150 fast85_gpu=configs/fast85_gpu.yaml sep_resnet10=configs/sep_resnet10.yaml \
    mixgate_b512=configs/mixgate10.yaml:train.batch_size=512 -- \
    sep_resnet10_b128=configs/sep_resnet10.yaml:train.batch_size=128 mixgate10=configs/mixgate10.yaml
  wait "$cache_pid"; mark "data cache built (exit $?)"
  for seed in 0 1; do
    train "mixgate100_s$seed" configs/mixgate100.yaml seed=$seed $captured_step
    train "val_mixgate10_s$seed" configs/mixgate10.yaml data.val_size=5000 seed=$seed $captured_step
    train "val_sep_resnet10_lightaug_s$seed" configs/sep_resnet10_lightaug.yaml data.val_size=5000 seed=$seed \
      $captured_step
  done
  wait
  mark "all runs ended"
  for name in val_mixgate10 val_sep_resnet10_lightaug; do
    echo "$name: val accuracy seeds 0, 1: $(accuracy "${name}_s0") $(accuracy "${name}_s1")" | tee -a "$LOGS/summary.txt"
  done
  for seed in 0 1; do
    echo "mixgate100_s$seed: final accuracy $(accuracy "mixgate100_s$seed"); last epoch line:" \
      "$(grep '^epoch' "$LOGS/mixgate100_s$seed.log" | tail -n 1)" | tee -a "$LOGS/summary.txt"
  done
  pack
  exit 0
fi

# 1. Pace, the GPU to itself.
pace 120 fast85_gpu=configs/fast85_gpu.yaml sep_resnet10=configs/sep_resnet10.yaml -- \
  sep_resnet10_b128=configs/sep_resnet10.yaml:train.batch_size=128

wait "$cache_pid"; mark "data cache built (exit $?)"

# 2. The long runs and the candidates, side by side.
for seed in 0 1; do
  train "sep_resnet100_s$seed" configs/sep_resnet100.yaml seed=$seed $captured_step
done
declare -A CANDIDATES=(
  [as_is]=""
  [batch256]="train.batch_size=256"
  [batch128]="train.batch_size=128"
  [batch128_lr08]="train.batch_size=128 train.lr=0.8"
  [batch128_light_aug]="train.batch_size=128 augment.affine_p=0.25 augment.cutout_p=0 augment.plain_last_epochs=4"
  [batch128_zero_init]="train.batch_size=128 model.zero_init_residual=true"
)
candidate_pids=()
for name in "${!CANDIDATES[@]}"; do
  for seed in 0 1; do
    # shellcheck disable=SC2086  # the overrides are words on purpose
    train "val_${name}_s$seed" configs/sep_resnet10.yaml data.val_size=5000 seed=$seed ${CANDIDATES[$name]} $captured_step
    candidate_pids+=($!)
  done
done
wait "${candidate_pids[@]}"
mark "candidates done"

# 3. The winner on the test split.
best="" best_acc=0
for name in "${!CANDIDATES[@]}"; do
  acc=$(python3 -c "print(round(($(accuracy "val_${name}_s0") + $(accuracy "val_${name}_s1")) / 2, 4))")
  echo "candidate $name (${CANDIDATES[$name]:-sep_resnet10 as it is}): val accuracy, mean of seeds 0 and 1: $acc" \
    | tee -a "$LOGS/summary.txt"
  if python3 -c "import sys; sys.exit(0 if $acc > $best_acc else 1)"; then best=$name best_acc=$acc; fi
done
if [ -n "$best" ]; then
  echo "chosen on the validation carve: $best" | tee -a "$LOGS/summary.txt"
  for seed in 0 1; do
    # shellcheck disable=SC2086
    train "test_${best}_s$seed" configs/sep_resnet10.yaml seed=$seed ${CANDIDATES[$best]} $captured_step
  done
fi
wait
mark "all runs ended"
for log in "$LOGS"/sep_resnet100_s*.log "$LOGS"/test_*.log; do
  [ -f "$log" ] || continue
  name=$(basename "$log" .log)
  echo "$name: final accuracy $(accuracy "$name"); last epoch line: $(grep '^epoch' "$log" | tail -n 1)" \
    | tee -a "$LOGS/summary.txt"
done
pack
