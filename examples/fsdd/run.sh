#!/usr/bin/env bash
# EAT on the Free Spoken Digit Dataset, end to end on CPU in a few minutes (see examples/fsdd/README.md):
#   1. manifests (FSDD's own test set = takes 0-4, valid = takes 5-9, train = takes 10-49)
#   2. EAT pre-training of a tiny model on the train split, labels unused
#   3. fine-tuning of a digit classifier from that checkpoint (train labels, validation on valid)
#   4. eat-evaluate on the test split (300 clips): accuracy
#
# usage: examples/fsdd/run.sh FSDD_RECORDINGS_DIR [WORK_DIR]
#   FSDD_RECORDINGS_DIR  the recordings/ folder of a checkout of
#                        https://github.com/Jakobovski/free-spoken-digit-dataset
#   WORK_DIR             where manifests, checkpoints and logs go (default: fsdd_run). The recipe's
#                        own subfolders in it (pretrain/, finetune/, finetune_scratch/) are replaced.
# environment knobs:
#   PRETRAIN_UPDATES   pre-training updates (default 2000; 0 skips pre-training and the pre-trained
#                      fine-tune, e.g. with SCRATCH=1 for the baseline alone)
#   FINETUNE_UPDATES   fine-tuning updates (default 1500; 75 updates = one epoch of batch 32)
#   SCRATCH            1 = also fine-tune the same classifier from random weights, same budget (default 0)
#   OMP_NUM_THREADS    torch threads per process (default 1: on a small shared machine, several threads
#                      per process compete with other work and run many times slower)
#   PYTHON             interpreter with eat_fairseq[fairseq] installed (default: the one that runs
#                      fairseq-hydra-train on PATH, else <repo>/.venv/bin/python)
set -euo pipefail

usage() { sed -n '8,21p' "$0" | sed 's/^# \{0,1\}//'; exit 2; }
[[ $# -ge 1 && $# -le 2 ]] || usage
[[ "$1" != "-h" && "$1" != "--help" ]] || usage

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
CONFIGS="$REPO/examples/fsdd"
[[ -d "$1" ]] || { echo "error: FSDD recordings folder not found: $1" >&2; exit 2; }
RECORDINGS=$(cd "$1" && pwd)
mkdir -p "${2:-fsdd_run}"
WORK=$(cd "${2:-fsdd_run}" && pwd)

PRETRAIN_UPDATES=${PRETRAIN_UPDATES:-2000}
FINETUNE_UPDATES=${FINETUNE_UPDATES:-1500}
SCRATCH=${SCRATCH:-0}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
export MKL_NUM_THREADS=${MKL_NUM_THREADS:-$OMP_NUM_THREADS}
for knob in PRETRAIN_UPDATES FINETUNE_UPDATES; do
  [[ "${!knob}" =~ ^[0-9]+$ ]] || { echo "error: $knob must be a non-negative integer, got '${!knob}'" >&2; exit 2; }
done
(( FINETUNE_UPDATES > 0 )) || { echo "error: FINETUNE_UPDATES must be positive" >&2; exit 2; }

# the tools: next to $PYTHON, else on PATH, else the repository's .venv
if [[ -n "${PYTHON:-}" ]]; then
  BIN=$(dirname "$(command -v "$PYTHON")")
elif command -v fairseq-hydra-train >/dev/null 2>&1; then
  BIN=$(dirname "$(command -v fairseq-hydra-train)")
else
  BIN="$REPO/.venv/bin"
fi
PYTHON=${PYTHON:-$BIN/python}
for tool in fairseq-hydra-train eat-evaluate eat-user-dir; do
  [[ -x "$BIN/$tool" ]] || { echo "error: $BIN/$tool not found; install eat_fairseq[fairseq] (make install) or set PYTHON" >&2; exit 2; }
done
USER_DIR=$(PYTHONWARNINGS=ignore "$BIN/eat-user-dir")

# warm-up = 10% of the updates, as in the project's recipes
warmup() { local w=$(( $1 / 10 )); echo $(( w > 0 ? w : 1 )); }

# run NAME FILTER CMD...: full output to $WORK/NAME.log, the lines matching FILTER to the terminal;
# prints and remembers the wall time
run() {
  local name=$1 filter=$2; shift 2
  local start=$SECONDS rc=0
  echo "==> $name"
  # from $WORK, so fairseq's hydra_train.log lands there and not in the caller's directory
  (cd "$WORK" && "$@") 2>&1 | tee "$WORK/$name.log" \
    | { grep --line-buffered -E "$filter" | sed -u -E -e 's/^\[[^]]*\]\[[^]]*\]\[INFO\] - //' -e "$SHORTEN" || true; } \
    || rc=$?
  printf -v "WALL_$name" '%s' "$(( SECONDS - start ))"
  if (( rc != 0 )); then echo "error: $name failed (exit $rc); the full log is $WORK/$name.log" >&2; exit "$rc"; fi
  local wall="WALL_$name"
  echo "<== $name: ${!wall} s (log: $WORK/$name.log)"
}
TRAIN_LINES='train_inner|valid on|done training|Error|error'
# fairseq's progress lines, shortened to epoch, updates, loss / accuracy
SHORTEN='s/^(epoch [0-9]+): +[0-9]+ \/ [0-9]+ (loss=[^,]+).* (num_updates=[0-9]+).*/\1 \3 train \2/;'\
's/^(epoch [0-9]+) \| valid on .* \| (accuracy [0-9.]+) \|.* \| (num_updates [0-9]+)( \|.*)?$/\1 \3 valid \2/'

# 1. manifests
run manifests "rows|excluded|rror" "$PYTHON" "$REPO/manifests/fsdd.py" "$RECORDINGS" --dest "$WORK/manifests" --force --quiet

finetune() {  # finetune NAME MODEL_PATH
  rm -rf "${WORK:?}/$1"
  run "$1" "$TRAIN_LINES" "$BIN/fairseq-hydra-train" --config-dir "$CONFIGS" --config-name finetune \
    task.data="$WORK/manifests" common.user_dir="$USER_DIR" checkpoint.save_dir="$WORK/$1" \
    model.model_path="$2" optimization.max_update="$FINETUNE_UPDATES" \
    lr_scheduler.warmup_updates="$(warmup "$FINETUNE_UPDATES")"
  run "evaluate_$1" "^test: |rror" "$BIN/eat-evaluate" --checkpoint "$WORK/$1/checkpoint_best.pt" --data "$WORK/manifests" \
    --split test --device cpu --no-progress --out "$WORK/$1/per_class_ap_test.tsv"
}

accuracy() {  # accuracy NAME: from the JSON line eat-evaluate prints last
  "$PYTHON" -c 'import json, sys; print("%.4f" % json.loads(open(sys.argv[1]).read().strip().splitlines()[-1])["accuracy"])' \
    "$WORK/evaluate_$1.log"
}

if (( PRETRAIN_UPDATES > 0 )); then
  # 2. pre-training (labels unused)
  rm -rf "${WORK:?}/pretrain"
  run pretrain "$TRAIN_LINES" "$BIN/fairseq-hydra-train" --config-dir "$CONFIGS" --config-name pretrain \
    task.data="$WORK/manifests" common.user_dir="$USER_DIR" checkpoint.save_dir="$WORK/pretrain" \
    optimization.max_update="$PRETRAIN_UPDATES" lr_scheduler.warmup_updates="$(warmup "$PRETRAIN_UPDATES")"
  # 3. + 4. fine-tuning from the pre-trained encoder, test accuracy
  finetune finetune "$WORK/pretrain/checkpoint_last.pt"
fi
if [[ "$SCRATCH" == 1 || "$PRETRAIN_UPDATES" == 0 ]]; then
  # baseline: the same fine-tuning from random weights
  finetune finetune_scratch null
fi

echo
echo "FSDD test split (takes 0-4, 300 clips); OMP_NUM_THREADS=$OMP_NUM_THREADS; results in $WORK/results.tsv"
{
  printf 'run\tpretrain_updates\tfinetune_updates\ttest_accuracy\tpretrain_s\tfinetune_s\n'
  if (( PRETRAIN_UPDATES > 0 )); then
    printf 'pretrained\t%s\t%s\t%s\t%s\t%s\n' "$PRETRAIN_UPDATES" "$FINETUNE_UPDATES" "$(accuracy finetune)" \
      "$WALL_pretrain" "$WALL_finetune"
  fi
  if [[ -n "${WALL_finetune_scratch:-}" ]]; then
    printf 'scratch\t0\t%s\t%s\t0\t%s\n' "$FINETUNE_UPDATES" "$(accuracy finetune_scratch)" "$WALL_finetune_scratch"
  fi
} > "$WORK/results.tsv"
if command -v column >/dev/null 2>&1; then column -t -s $'\t' "$WORK/results.tsv"; else cat "$WORK/results.tsv"; fi
