#!/usr/bin/env bash
# The long recipes of issue 16, run side by side on one GPU (each run is small next to
# the chip, so several share it). Logs go to $OUT/recipes/; everything ends by DEADLINE
# (a `date +%s` value; default: 10 minutes from now), finished or not.
#
#   bash benchmarks/gpu_recipes.sh [DATA_DIR]
#   RECIPE_OVERRIDES="data.source=fake train.epochs=1 ..." bash ...  # a dry run of the script
#
# Round 1, at once:
#   - configs/seed100.yaml, seeds 0 and 1, on the test split (the seed's claim: >= 85%);
#   - configs/sep_resnet10.yaml candidates on the validation carve (5,000 training images
#     held out), seed 0: widths and peak LR. The best validation accuracy wins.
# Round 2, when the candidates are done: the winner on the test split, seeds 0 and 1, for
# 10 epochs (sep_resnet10) and for 100 (sep_resnet100).
set -uo pipefail
OUT=${OUT:-/tmp/gpu_check}
DATA=${1:-/tmp/cifar10-jpeg}
DEADLINE=${DEADLINE:-$(( $(date +%s) + 600 ))}
LOGS="$OUT/recipes"
mkdir -p "$LOGS"
export PYTHONUNBUFFERED=1 OMP_NUM_THREADS=2

train() {  # train NAME CONFIG OVERRIDES...: in the background, bounded by DEADLINE
  local name=$1 config=$2; shift 2
  local left=$(( DEADLINE - $(date +%s) ))
  [ "$left" -gt 10 ] || { echo "$name: no time left" >> "$LOGS/summary.txt"; return; }
  timeout "$left" python3 launch/train.py --config "$config" data.root="$DATA" out_dir="/tmp/runs/$name" \
    train.progress_bar=false "$@" ${RECIPE_OVERRIDES:-} > "$LOGS/$name.log" 2>&1 &
}

accuracy() {  # accuracy NAME: the final accuracy a finished run printed, or 0
  python3 - "$LOGS/$1.log" <<'EOF'
import json, sys
lines = [l for l in open(sys.argv[1]) if l.startswith("final: ")]
print(json.loads(lines[-1][len("final: "):])["test_accuracy"] if lines else 0)
EOF
}

declare -A CANDIDATES=(
  [sep_w48_lr04]="model.widths=[48,96,128,192] train.lr=0.4"
  [sep_w48_lr02]="model.widths=[48,96,128,192] train.lr=0.2"
  [sep_w64_lr04]="model.widths=[64,112,128,160] train.lr=0.4"
  [sep_w64b_lr04]="model.widths=[64,128,128,144] train.lr=0.4"
)
for seed in 0 1; do
  train "seed100_s$seed" configs/seed100.yaml seed=$seed
done
candidate_pids=()
for name in "${!CANDIDATES[@]}"; do
  # shellcheck disable=SC2086  # the overrides are words on purpose
  train "$name" configs/sep_resnet10.yaml data.val_size=5000 seed=0 ${CANDIDATES[$name]}
  candidate_pids+=($!)
done
wait "${candidate_pids[@]}"

best="" best_acc=0
for name in "${!CANDIDATES[@]}"; do
  acc=$(accuracy "$name")
  echo "candidate $name (${CANDIDATES[$name]}): val accuracy $acc" | tee -a "$LOGS/summary.txt"
  if python3 -c "import sys; sys.exit(0 if $acc > $best_acc else 1)"; then best=$name best_acc=$acc; fi
done
if [ -n "$best" ]; then
  echo "chosen on the validation carve: $best (${CANDIDATES[$best]})" | tee -a "$LOGS/summary.txt"
  for seed in 0 1; do
    # shellcheck disable=SC2086
    train "sep_resnet10_s$seed" configs/sep_resnet10.yaml seed=$seed ${CANDIDATES[$best]}
    # shellcheck disable=SC2086
    train "sep_resnet100_s$seed" configs/sep_resnet100.yaml seed=$seed ${CANDIDATES[$best]}
  done
fi
wait
for log in "$LOGS"/seed100_s*.log "$LOGS"/sep_resnet*_s*.log; do
  [ -f "$log" ] || continue
  name=$(basename "$log" .log)
  echo "$name: final accuracy $(accuracy "$name"); last epoch line: $(grep '^epoch' "$log" | tail -n 1)" \
    | tee -a "$LOGS/summary.txt"
done
