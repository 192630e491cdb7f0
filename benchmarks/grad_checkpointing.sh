#!/usr/bin/env bash
# Activation checkpointing (model.grad_checkpointing) on the CPU: the training time and the peak
# resident memory of `svp train` at Vim-Tiny, 224 px, random weights, one thread, without and with
# it, each twice, alternating (docs/benchmarks.md, "Activation checkpointing on the CPU").
#   bash benchmarks/grad_checkpointing.sh OUT_DIR
# Needs GNU time (/usr/bin/time -v). The train time is results.json's train_seconds (the steps,
# not the start-up or the evaluation); the peak RSS is the whole process's (importing torch alone
# holds ~0.87 GB of it).
set -euo pipefail
out="${1:?usage: bash benchmarks/grad_checkpointing.sh OUT_DIR}"
svp="$(cd "$(dirname "$0")/.." && pwd)/.venv/bin/svp"
mkdir -p "$out"
export OMP_NUM_THREADS=1 NUMBA_NUM_THREADS=1
for case in "full 8" "full 32" "svp 8"; do
  set -- $case; method=$1; bs=$2; steps=$((bs == 8 ? 10 : 4))
  for rep in 1 2; do
    for gc in false true; do
      name="${method}_b${bs}_gc-${gc}_${rep}"
      rm -rf "$out/runs/$name"
      /usr/bin/time -v "$svp" train --dataset digits --model vim_tiny_patch16_224 --random-init --img-size 224 \
        --method "$method" --batch-size "$bs" "train.max_steps=$steps" "data.max_train_samples=$((bs * 10))" \
        data.max_eval_samples=8 -q --output "$out/runs" --name "$name" "model.grad_checkpointing=$gc" \
        2> "$out/$name.time" > /dev/null
      rss=$(awk '/Maximum resident/ {print $6}' "$out/$name.time")
      secs=$(python3 -c "import json, sys; print(round(json.load(open(sys.argv[1]))['train_seconds'], 2))" \
             "$out/runs/$name/results.json")
      echo "$method batch $bs grad_checkpointing=$gc (run $rep): train ${secs} s, peak RSS $((rss / 1000)) MB"
    done
  done
done
