#!/usr/bin/env bash
# Evaluate a CamVid model on the val split with every protocol, and with both unseen-synonym lists.
#   bash benchmarks/camvid_eval.sh [MODEL_DIR] [OUT_DIR] [SIZE]
# SIZE is the long side the model was trained for (480 for configs/camvid.yaml: full resolution):
# `single` runs at SIZE, `slide` at SIZE in windows of the recipe's 256 training crop, `lseg-ms` (the
# paper's scales 0.5-1.75 and flip) uses SIZE as its base size and its crop. Metrics are always
# computed at the original 360 x 480 label resolution.
set -euo pipefail
model="${1:-runs/camvid/model}"
out="${2:-runs/camvid/eval}"
size="${3:-480}"
data="${CAMVID_ROOT:-../shared/data/camvid}"
common=(--checkpoint "$model" --dataset camvid --data-root "$data" --split val)
words=(--labels-file configs/labels/camvid.txt)
lseg evaluate "${common[@]}" "${words[@]}" --protocol single --size "$size" --out "$out/single"
lseg evaluate "${common[@]}" "${words[@]}" --protocol slide --size "$size" --crop-size 256 --out "$out/slide"
lseg evaluate "${common[@]}" "${words[@]}" --protocol lseg-ms --size "$size" --crop-size "$size" --out "$out/lseg-ms"
lseg evaluate "${common[@]}" --synonyms configs/labels/camvid_synonyms.txt --size "$size" --out "$out/synonyms"
lseg evaluate "${common[@]}" --synonyms configs/labels/camvid_synonyms_2.txt --size "$size" --out "$out/synonyms_2"
