#!/usr/bin/env bash
# The tiny model's supervised warm-up against held-out content: the style task (test topics never in training),
# P-DPO individual and P-RM individual trained with each warm-up length, scored on test.jsonl and on train.jsonl.
#   bash benchmarks/warmup_probe.sh [WORK_DIR]   (each run is one to three minutes alone on 2 cores)
set -euo pipefail
work=${1:-/tmp/prlhf_warmup_probe}
mkdir -p "$work"
run() {  # NAME SEED [train flags...]
  local name=$1 seed=$2; shift 2
  local data=$work/style_seed$seed out=$work/runs/$name
  [ -f "$data/train.jsonl" ] || prlhf data build style --out "$data" --seed "$seed" > /dev/null
  rm -rf "$out"
  prlhf train --data "$data/train.jsonl" --out "$out" --model tiny --threads 1 --report-to none --quiet "$@" > /dev/null
  prlhf eval --run "$out" --data "$data/test.jsonl" --out "$out/eval_test.json" --threads 1 > /dev/null
  prlhf eval --run "$out" --data "$data/train.jsonl" --out "$out/eval_train.json" --threads 1 > /dev/null
  python3 -c "import json, sys; t, s = (json.load(open(f'$out/eval_{x}.json')) for x in ('test', 'train'));
print(f\"| $name | $seed | {t['mean_user_accuracy']:.3f} / {t['worst_user_accuracy']:.3f} | \"
      f\"{s['mean_user_accuracy']:.3f} / {s['worst_user_accuracy']:.3f} |\")"
}
echo "| run | task seed | held-out mean / worst seen user | in-sample mean / worst |"
echo "|---|---|---|---|"
run dpo_sft300 0 --sft-steps 300
run dpo_sft300_early_stop 0 --sft-steps 300 --sft-holdout 0.1
run dpo_sft100 0 --sft-steps 100
run dpo_sft0 0 --sft-steps 0
run dpo_sft100 1 --sft-steps 100
run dpo_sft0 1 --sft-steps 0
# the reward model: first with the 3 epochs that were its default, then the pooled readout and more passes
run rm_sft300 0 --objective rm --sft-steps 300 --epochs 3
run rm_sft100 0 --objective rm --sft-steps 100 --epochs 3
run rm_sft0 0 --objective rm --sft-steps 0 --epochs 3
run rm_sft300 1 --objective rm --sft-steps 300 --epochs 3
run rm_sft0 1 --objective rm --sft-steps 0 --epochs 3
run rm_mean_sft0 0 --objective rm --reward-pool mean --sft-steps 0 --epochs 3
run rm_mean_sft0 1 --objective rm --reward-pool mean --sft-steps 0 --epochs 3
run rm_mean_sft300 0 --objective rm --reward-pool mean --sft-steps 300 --epochs 3
run rm_mean_sft300 1 --objective rm --reward-pool mean --sft-steps 300 --epochs 3
run rm_mean_sft0_ep6 0 --objective rm --reward-pool mean --sft-steps 0 --epochs 6
run rm_mean_sft0_ep6 1 --objective rm --reward-pool mean --sft-steps 0 --epochs 6
run rm_mean_sft0_lr3e-3 0 --objective rm --reward-pool mean --sft-steps 0 --epochs 3 --lr 3e-3
run rm_sft0_ep6 0 --objective rm --sft-steps 0 --epochs 6
run rm_sft0_ep6 1 --objective rm --sft-steps 0 --epochs 6
run rm_sft0_ep6_user_lr1e-2 1 --objective rm --sft-steps 0 --epochs 6 --user-lr 0.01
# seed 2: built after the choice, to check it (the old default against the new one, which is plain --objective rm)
run rm_sft300 2 --objective rm --sft-steps 300 --epochs 3
run rm_default 2 --objective rm
