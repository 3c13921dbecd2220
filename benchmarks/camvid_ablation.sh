#!/usr/bin/env bash
# Recipe ablation on CamVid without touching val: train on drives 0001TP + 0016E5, score the held-out
# drive 0006R0 with the training words and with the development synonyms (configs/labels/
# camvid_synonyms_dev.txt), at the original label resolution. Each run: 400 steps, about 4 minutes on
# 2 cores in bf16.
#   bash benchmarks/camvid_ablation.sh SEED VARIANT [VARIANT ...]
# VARIANT is a '+'-joined list of override files in benchmarks/camvid_ablation/ ('base' for none),
# e.g.: bash benchmarks/camvid_ablation.sh 0 base fp32 halfres unbalanced+ohem
set -euo pipefail
seed="$1"; shift
data="${CAMVID_ROOT:-../shared/data/camvid}"
for variant in "$@"; do
  out="runs/camvid_ablation/seed$seed/$variant"
  configs=(--config configs/camvid.yaml --config configs/camvid_holdout.yaml)
  size=480
  if [ "$variant" != base ]; then
    for part in ${variant//+/ }; do
      configs+=(--config "benchmarks/camvid_ablation/$part.yaml")
      [ "$part" = halfres ] && size=240
    done
  fi
  start=$(date +%s)
  lseg train "${configs[@]}" --seed_everything "$seed" --trainer.default_root_dir "$out" \
    --trainer.enable_progress_bar false
  echo "$variant seed $seed: trained in $(( $(date +%s) - start )) s" | tee -a "runs/camvid_ablation/times.txt"
  common=(--checkpoint "$out/model" --dataset camvid --data-root "$data" --split train --sequences 0006R0 --size "$size")
  lseg evaluate "${common[@]}" --labels-file configs/labels/camvid.txt --out "$out/eval_words" --examples 0
  lseg evaluate "${common[@]}" --synonyms configs/labels/camvid_synonyms_dev.txt --out "$out/eval_dev_synonyms" --examples 0
done
